/**
 * Image locking against QEMU itself: qemu-io holds an image (read-write or
 * read-only) and qimg must refuse or accept it exactly as qemu-img does;
 * an image qimg holds must be refused by qemu-img (the locks are real).
 */

import { assertEquals, assertTrue } from "./_assert.ts";
import {
  assertSameAsQemu,
  CLI,
  hashFile,
  qemuImg,
  qimg,
  runProgram,
  sh,
  tempDir,
} from "./_util.ts";
import {
  layerLocks,
  PERM_CONSISTENT_READ as CR,
  PERM_RESIZE as RESIZE,
  PERM_WRITE as WRITE,
} from "../src/image_lock.ts";

// Other builds (Node) have no fcntl: they lock nothing.
const ignore = Deno.env.get("QIMG_RUNNER") !== undefined;

/** Runs `qemu-io [-r] -c 'sleep …' image` until disposed, once its locks are on. */
async function hold(cwd: string, image: string, readOnly: boolean) {
  const child = new Deno.Command("qemu-io", {
    args: [...(readOnly ? ["-r"] : []), "-c", "sleep 60000", image],
    cwd,
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  // Locked once a writer is refused (a read-only holder refuses writers too);
  // qemu-io opens read-write and quits without writing.
  for (let i = 0; i < 200; i++) {
    const r = await runProgram("qemu-io", ["-c", "quit", image], cwd);
    if (r.stderr.includes("lock")) break;
    await new Promise((ok) => setTimeout(ok, 25));
  }
  return {
    async [Symbol.asyncDispose]() {
      child.kill("SIGKILL");
      await child.status;
    },
  };
}

async function images(cwd: string): Promise<void> {
  await sh(
    "qemu-img create -q -f qcow2 a.qcow2 4M && qemu-io -c 'write -P 7 0 64k' a.qcow2 >/dev/null" +
      " && qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 b.qcow2" +
      " && qemu-img create -q -f qcow2 h.qcow2 4M && qemu-img create -q -f raw r.raw 1M",
    cwd,
  );
}

/** Commands that open `img` read-only, each with and without -U. */
const READS = [
  ["info"],
  ["info", "--backing-chain"],
  ["check"],
  ["map"],
  ["measure", "-O", "qcow2"],
  ["snapshot", "-l"],
  ["bench", "-c", "1"],
];

/** As assertSameAsQemu, but bench's stdout holds its run time: there only stderr and exit code. */
async function assertSameAs(
  args: string[],
  cwd: string,
): Promise<{ stderr: string; code: number }> {
  if (args[0] !== "bench") return await assertSameAsQemu(args, cwd);
  const ours = await qimg(args, cwd);
  const theirs = await qemuImg(args, cwd);
  const outcome = (r: { stderr: string; code: number }) => ({ stderr: r.stderr, code: r.code });
  assertEquals(outcome(ours), outcome(theirs), `qimg ${args.join(" ")}`);
  return ours;
}

Deno.test("layerLocks() takes qemu-img 7.2's permissions per command and format", () => {
  const qcow2Read = layerLocks({});
  assertEquals(qcow2Read, { perm: CR, unshared: WRITE | RESIZE });
  assertEquals(layerLocks({ noIo: true }), { perm: 0, unshared: WRITE | RESIZE });
  assertEquals(layerLocks({ noIo: true, passThrough: true }), { perm: 0, unshared: 0 });
  assertEquals(layerLocks({ passThrough: true }), { perm: CR, unshared: 0 });
  assertEquals(layerLocks({ passThrough: true, stable: true }), {
    perm: CR,
    unshared: WRITE | RESIZE,
  });
  assertEquals(layerLocks({ forceShare: true }), { perm: CR, unshared: 0 });
  assertEquals(layerLocks({ forceShare: true, noIo: true }), { perm: 0, unshared: 0 });
  assertEquals(layerLocks({ write: true }), {
    perm: CR | WRITE | RESIZE,
    unshared: WRITE | RESIZE,
  });
  assertEquals(layerLocks({ write: true, passThrough: true }), {
    perm: CR | WRITE | RESIZE,
    unshared: 0,
  });
  assertEquals(layerLocks({ backing: true, passThrough: true }), {
    perm: CR,
    unshared: WRITE | RESIZE,
  });
});

Deno.test({
  name: "lockFile() refuses an image qemu-io writes as qemu-img does, -U shares it",
  ignore,
  async fn() {
    await using dir = await tempDir();
    const cwd = dir.path;
    await images(cwd);
    await using _ = await hold(cwd, "h.qcow2", false);
    const before = await hashFile(`${cwd}/h.qcow2`);
    for (const args of READS) {
      const r = await assertSameAs([...args, "h.qcow2"], cwd);
      assertTrue(r.stderr.includes('Failed to get shared "write" lock'), args.join(" "));
      const shared = await assertSameAs([...args, "-U", "h.qcow2"], cwd);
      assertEquals(shared.code, 0, `${args.join(" ")} -U`);
    }
    for (
      const args of [
        ["compare", "h.qcow2", "a.qcow2"],
        ["compare", "-U", "h.qcow2", "a.qcow2"],
        ["convert", "-O", "raw", "h.qcow2", "out.raw"],
        ["convert", "-U", "-O", "raw", "h.qcow2", "out.raw"],
        ["dd", "if=h.qcow2", "of=out.raw"],
        ["check", "-r", "all", "h.qcow2"],
        ["snapshot", "-c", "s", "h.qcow2"],
        ["snapshot", "-U", "-c", "s", "h.qcow2"],
        ["commit", "h.qcow2"],
        ["resize", "h.qcow2", "+1M"],
        ["amend", "-o", "lazy_refcounts=on", "h.qcow2"],
        ["rebase", "-u", "-b", "", "h.qcow2"],
        ["bench", "-w", "-c", "1", "h.qcow2"],
        ["bitmap", "--add", "h.qcow2", "bm"],
        ["convert", "-n", "-O", "qcow2", "a.qcow2", "h.qcow2"],
        // Refused before the file is emptied.
        ["convert", "-O", "qcow2", "a.qcow2", "h.qcow2"],
        ["create", "-f", "qcow2", "h.qcow2", "1M"],
        // The backing file is only read for its size: shared.
        ["create", "-f", "qcow2", "-b", "h.qcow2", "-F", "qcow2", "out.qcow2"],
      ]
    ) {
      await Deno.remove(`${cwd}/out.raw`).catch(() => {});
      await assertSameAsQemu(args, cwd);
    }
    assertEquals(await hashFile(`${cwd}/h.qcow2`), before);
  },
});

Deno.test({
  name: "lockFile() lets readers share an image qemu-io reads and refuses writers",
  ignore,
  async fn() {
    await using dir = await tempDir();
    const cwd = dir.path;
    await images(cwd);
    await using _ = await hold(cwd, "a.qcow2", true);
    for (const args of READS) {
      const r = await assertSameAs([...args, "a.qcow2"], cwd);
      assertEquals(r.code, 0, args.join(" "));
    }
    for (
      const args of [
        ["map", "b.qcow2"],
        ["compare", "a.qcow2", "b.qcow2"],
        ["convert", "-O", "raw", "b.qcow2", "out.raw"],
        ["check", "-r", "all", "a.qcow2"],
        ["snapshot", "-c", "s", "a.qcow2"],
        ["resize", "a.qcow2", "+1M"],
        // The base is reopened read-write: qemu names no file.
        ["commit", "b.qcow2"],
        ["create", "-f", "qcow2", "a.qcow2", "1M"],
      ]
    ) {
      await assertSameAsQemu(args, cwd);
    }
  },
});

Deno.test({
  name: "lockFile() refuses a backing file qemu-io writes, and raw only to convert",
  ignore,
  async fn() {
    await using dir = await tempDir();
    const cwd = dir.path;
    await images(cwd);
    {
      await using _ = await hold(cwd, "a.qcow2", false);
      for (
        const args of [
          ["info", "b.qcow2"],
          ["info", "--backing-chain", "b.qcow2"],
          ["map", "b.qcow2"],
          ["map", "-U", "b.qcow2"],
          ["compare", "b.qcow2", "a.qcow2"],
          ["commit", "b.qcow2"],
        ]
      ) {
        await assertSameAsQemu(args, cwd);
      }
    }
    // A raw image shares everything with its user, except with convert's source.
    const child = new Deno.Command("qemu-io", {
      args: ["-f", "raw", "-c", "sleep 60000", "r.raw"],
      cwd,
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).spawn();
    try {
      for (let i = 0; i < 200; i++) {
        const r = await qemuImg(["convert", "-O", "raw", "r.raw", "out.raw"], cwd);
        if (r.code !== 0) break;
        await new Promise((ok) => setTimeout(ok, 25));
      }
      for (
        const args of [
          ["map", "r.raw"],
          ["compare", "r.raw", "r.raw"],
          ["convert", "-O", "qcow2", "r.raw", "out.qcow2"],
          ["convert", "-U", "-O", "qcow2", "r.raw", "out.qcow2"],
          ["resize", "-f", "raw", "r.raw", "1M"],
        ]
      ) {
        await assertSameAsQemu(args, cwd);
      }
    } finally {
      child.kill("SIGKILL");
      await child.status;
    }
  },
});

Deno.test({
  name: "lockFile() locks for real: qemu-img refuses what a running qimg convert holds",
  ignore,
  async fn() {
    await using dir = await tempDir();
    const cwd = dir.path;
    await sh(
      "qemu-img create -q -f qcow2 src.qcow2 8M && qemu-io -c 'write -P 5 0 3M' src.qcow2 >/dev/null",
      cwd,
    );
    const [cmd, pre] = [Deno.execPath(), ["run", "-A", CLI]];
    const child = new Deno.Command(cmd, {
      args: [...pre, "convert", "-r", "1M", "-O", "qcow2", "src.qcow2", "dst.qcow2"],
      cwd,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    let target = "";
    let source = "";
    for (let i = 0; i < 400 && !target.includes("lock"); i++) {
      target = (await qemuImg(["info", "dst.qcow2"], cwd)).stderr;
      await new Promise((ok) => setTimeout(ok, 20));
    }
    source = (await qemuImg(["snapshot", "-c", "s", "src.qcow2"], cwd)).stderr;
    const out = await child.output();
    assertEquals(out.code, 0, new TextDecoder().decode(out.stderr));
    assertEquals(
      target,
      "qimg: Could not open 'dst.qcow2': Failed to get shared \"write\" lock\n" +
        "Is another process using the image [dst.qcow2]?\n",
    );
    assertEquals(
      source,
      "qimg: Could not open 'src.qcow2': Failed to get \"write\" lock\n" +
        "Is another process using the image [src.qcow2]?\n",
    );
    // Released at exit.
    assertEquals((await qemuImg(["compare", "src.qcow2", "dst.qcow2"], cwd)).code, 0);
  },
});

Deno.test({
  name: "lockFile() takes no locks without the ffi permission",
  ignore,
  async fn() {
    await using dir = await tempDir();
    const cwd = dir.path;
    await images(cwd);
    await using _ = await hold(cwd, "h.qcow2", false);
    const noFfi = [Deno.execPath(), "run", "--no-prompt", "--allow-read", "--allow-write", CLI];
    const r = await qimg(["map", "--output=json", "h.qcow2"], cwd, noFfi);
    assertEquals(r.stderr, "");
    assertEquals(r.code, 0);
    const u = await qemuImg(["map", "-U", "--output=json", "h.qcow2"], cwd);
    assertEquals(r.stdout, u.stdout);
  },
});
