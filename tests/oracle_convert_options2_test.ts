/**
 * convert's `-r` rate limit, progress on SIGUSR1, `--bitmaps` and
 * `--skip-broken-bitmaps`, against Debian's qemu-img 7.2.
 */

import { build } from "../scripts/build_node.ts";
import { assertEquals, assertTrue } from "./_assert.ts";
import { assertSameAsQemu, CLI, qemuImg, qimg, runProgram, sh, tempDir } from "./_util.ts";
import { bitmapsIn, infoOf } from "./_bitmap_util.ts";

const decoder = new TextDecoder();

/** Runs qimg (or `runner`) in `cwd`, sending SIGUSR1 after each of `delays` (ms after start). */
async function withSignals(
  args: string[],
  cwd: string,
  delays: number[],
  runner?: string[],
): Promise<{ stdout: string; stderr: string; code: number }> {
  const [cmd, ...pre] = runner ??
    [Deno.execPath(), "run", "--no-prompt", "--allow-read", "--allow-write", CLI];
  const child = new Deno.Command(cmd, {
    args: [...pre, ...args],
    cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const start = performance.now();
  for (const at of delays) {
    await new Promise((r) => setTimeout(r, Math.max(0, at - (performance.now() - start))));
    try {
      child.kill("SIGUSR1");
    } catch {
      // already finished
    }
  }
  const out = await child.output();
  return {
    stdout: decoder.decode(out.stdout),
    stderr: decoder.decode(out.stderr),
    code: out.code,
  };
}

/**
 * Deno (2.9.2 and later) also starts its inspector on SIGUSR1 and says so on
 * stderr; qimg cannot turn that off, so these lines are left out here.
 */
function withoutDenoInspector(stderr: string): string {
  return stderr.split(/(?<=\n)/).filter((l) =>
    !/^(Debugger listening on ws:|Visit chrome:\/\/inspect|Failed to start inspector server)/
      .test(l)
  ).join("");
}

async function assertCleanAndSame(dir: string, source: string, target: string): Promise<void> {
  const check = await qemuImg(["check", target], dir);
  assertEquals(check.code, 0, check.stdout + check.stderr);
  const cmp = await qemuImg(["compare", source, target], dir);
  assertEquals(cmp.stdout, "Images are identical.\n", cmp.stderr);
}

Deno.test("convert -r parses the rate limit as qemu-img 7.2", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f raw empty.raw 0", dir.path);
  for (
    const rate of ["abc", "0", "-1", "", "1.5", "1e3", "8E", "9999999999999999999999", "0x10", "1k"]
  ) {
    await assertSameAsQemu(["convert", "-r", rate, "-O", "raw", "empty.raw", "out.raw"], dir.path);
  }
});

Deno.test("convert -r 1M writes about 1 MiB a second, as qemu-img's throttle", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f raw a.raw 4M && qemu-io -f raw -c 'write -P 7 0 4M' a.raw >/dev/null",
    dir.path,
  );
  const start = performance.now();
  await assertSameAsQemu(["convert", "-r", "1M", "-O", "qcow2", "a.raw", "out.qcow2"], dir.path);
  const seconds = (performance.now() - start) / 1000;
  // qemu-img: two 2 MiB writes, the second once the bucket is down to 0.1 MiB: 1.9 s
  // (the qemu-img run above takes as long again).
  assertTrue(seconds >= 2 * 1.85, `both runs took ${seconds.toFixed(2)} s`);
  await assertCleanAndSame(dir.path, "a.raw", "out.qcow2");
});

Deno.test("convert prints progress on SIGUSR1 to stderr as qemu-img 7.2, ignores it with -p", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f raw a.raw 16M && qemu-io -f raw -c 'write -P 7 0 16M' a.raw >/dev/null",
    dir.path,
  );
  // About 3.4 s: 8 requests of 2 MiB at 4 MiB/s, one at a time.
  const args = ["convert", "-m", "1", "-r", "4M", "-O", "qcow2", "a.raw"];
  const line = /^ {4}\((12\.50|25\.00|37\.50|50\.00|62\.50|75\.00|87\.50|100\.00)\/100%\)\n$/;
  const node = (await runProgram("sh", ["-c", "command -v node"])).code === 0;
  const bundleDir = node ? await Deno.makeTempDir({ prefix: "qimg-sig-node-" }) : undefined;
  try {
    const bundle = bundleDir ? await build({ outDir: bundleDir }) : undefined;
    const [plain, progress, theirs, onNode] = await Promise.all([
      withSignals([...args, "plain.qcow2"], dir.path, [1800, 2600]),
      withSignals(["convert", "-p", ...args.slice(1), "p.qcow2"], dir.path, [1800]),
      qemuImg(["convert", "-p", "-m", "1", "-O", "qcow2", "a.raw", "q.qcow2"], dir.path),
      bundle
        ? withSignals([...args, "node.qcow2"], dir.path, [1800, 2600], ["node", bundle])
        : undefined,
    ]);
    assertEquals(plain.code, 0, plain.stderr);
    assertEquals(plain.stdout, "");
    const lines = withoutDenoInspector(plain.stderr).split(/(?<=\n)/);
    assertEquals(lines.length, 2, plain.stderr);
    for (const l of lines) assertTrue(line.test(l), JSON.stringify(l));
    assertTrue(lines[0] !== lines[1], plain.stderr);
    await assertCleanAndSame(dir.path, "a.raw", "plain.qcow2");

    assertEquals(progress.code, 0, progress.stderr);
    assertEquals(progress.stdout, theirs.stdout);
    assertEquals(withoutDenoInspector(progress.stderr), "");
    await assertCleanAndSame(dir.path, "a.raw", "p.qcow2");

    // Node's own SIGUSR1 use (its inspector) gives way to the listener: stderr as qemu-img's.
    if (onNode) {
      assertEquals(onNode.code, 0, onNode.stderr);
      assertEquals(onNode.stdout, "");
      const nodeLines = onNode.stderr.split(/(?<=\n)/);
      assertEquals(nodeLines.length, 2, onNode.stderr);
      for (const l of nodeLines) assertTrue(line.test(l), JSON.stringify(l));
      await assertCleanAndSame(dir.path, "a.raw", "node.qcow2");
    }
  } finally {
    if (bundleDir) await Deno.remove(bundleDir, { recursive: true });
  }
});

Deno.test("qimg outlives SIGUSR1 in commands without progress, as qemu-img (which blocks it)", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f raw a.raw 64M", dir.path);
  // Seconds of 512-byte reads; the signal comes well after start-up.
  const r = await withSignals(
    ["bench", "-c", "800000", "-d", "1", "-s", "512", "-f", "raw", "a.raw"],
    dir.path,
    [1000],
  );
  assertEquals(r.code, 0, r.stderr);
  assertTrue(r.stdout.includes("Run completed in "), r.stdout);
  assertEquals(withoutDenoInspector(r.stderr), "");
});

/** A qcow2 source with bitmaps b0 (64k), b1 (disabled) and small (512 bytes) that recorded writes. */
const BITMAP_SOURCE = [
  "qemu-img create -q -f qcow2 src.qcow2 64M",
  "qemu-img bitmap --add -g 64k src.qcow2 b0",
  "qemu-img bitmap --add --disable src.qcow2 b1",
  "qemu-img bitmap --add -g 512 src.qcow2 small",
  "qemu-io -c 'write -P 1 1M 1M' -c 'write -P 2 40M 64k' -c 'write -P 3 63M 4k' src.qcow2 >/dev/null",
].join(" && ");

Deno.test("convert --bitmaps copies persistent bitmaps as qemu-img 7.2", async () => {
  await using dir = await tempDir();
  await sh(BITMAP_SOURCE, dir.path);
  const source = await bitmapsIn(`${dir.path}/src.qcow2`);
  assertEquals(source.length, 3);
  assertTrue(source[0].includes("bits=2:255,3:255,80:1,"), source[0]); // the writes were recorded
  for (const opts of [[], ["-o", "cluster_size=4k"], ["-c"]]) {
    const args = ["convert", "--bitmaps", "-O", "qcow2", ...opts, "src.qcow2"];
    const ours = await assertSameAsQemu([...args, "o.qcow2"], dir.path);
    const theirs = await qemuImg([...args, "q.qcow2"], dir.path);
    assertEquals(ours.code, 0, ours.stderr);
    assertEquals(theirs.code, 0);
    await assertCleanAndSame(dir.path, "src.qcow2", "o.qcow2");
    assertEquals(await infoOf("o.qcow2", dir.path), await infoOf("q.qcow2", dir.path));
    assertEquals(await bitmapsIn(`${dir.path}/o.qcow2`), source, opts.join(" "));
    assertEquals(await bitmapsIn(`${dir.path}/q.qcow2`), source, opts.join(" "));
  }
});

Deno.test("convert --skip-broken-bitmaps leaves in-use bitmaps out with qemu-img's warnings", async () => {
  await using dir = await tempDir();
  await sh(
    BITMAP_SOURCE + " && cp src.qcow2 mixed.qcow2 && " +
      // qemu-io aborting with the image open leaves its bitmaps marked in use.
      "{ qemu-io -c 'write -P 4 8M 64k' -c abort mixed.qcow2 >/dev/null 2>&1 || true; } && " +
      "qemu-img bitmap --add -g 128k mixed.qcow2 fresh && " +
      "qemu-io -c 'write -P 5 0 256k' mixed.qcow2 >/dev/null",
    dir.path,
  );
  const all = await bitmapsIn(`${dir.path}/mixed.qcow2`);
  assertEquals(all.length, 4);
  await assertSameAsQemu(
    ["convert", "--bitmaps", "-O", "qcow2", "mixed.qcow2", "o.qcow2"],
    dir.path,
  );
  const args = ["convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "mixed.qcow2"];
  const ours = await assertSameAsQemu([...args, "o.qcow2"], dir.path);
  assertTrue(ours.stderr.includes("warning: Skipping inconsistent bitmap 'b0'"), ours.stderr);
  await qemuImg([...args, "q.qcow2"], dir.path);
  await assertCleanAndSame(dir.path, "mixed.qcow2", "o.qcow2");
  assertEquals(await infoOf("o.qcow2", dir.path), await infoOf("q.qcow2", dir.path));
  assertEquals(await bitmapsIn(`${dir.path}/o.qcow2`), [all[3]]);
});

Deno.test("convert --bitmaps fails as qemu-img 7.2 for v2 targets and targets of another size", async () => {
  await using dir = await tempDir();
  await sh(
    BITMAP_SOURCE + " && qemu-img create -q -f qcow2 big.qcow2 128M && " +
      "qemu-img create -q -f qcow2 same.qcow2 64M && cp same.qcow2 same2.qcow2",
    dir.path,
  );
  await assertSameAsQemu(
    ["convert", "--bitmaps", "-O", "qcow2", "-o", "compat=0.10", "src.qcow2", "v2.qcow2"],
    dir.path,
  );
  await assertSameAsQemu(
    ["convert", "--bitmaps", "-n", "-O", "qcow2", "src.qcow2", "big.qcow2"],
    dir.path,
  );
  // Onto an existing image of the same size: each program gets its own copy.
  const args = ["convert", "--bitmaps", "-n", "-O", "qcow2", "src.qcow2"];
  const ours = await qimg([...args, "same.qcow2"], dir.path);
  const theirs = await qemuImg([...args, "same2.qcow2"], dir.path);
  assertEquals(ours, theirs);
  assertEquals(ours.code, 0);
  await assertCleanAndSame(dir.path, "src.qcow2", "same.qcow2");
  assertEquals(await infoOf("same.qcow2", dir.path), await infoOf("same2.qcow2", dir.path));
  assertEquals(await bitmapsIn(`${dir.path}/same.qcow2`), await bitmapsIn(`${dir.path}/src.qcow2`));
});
