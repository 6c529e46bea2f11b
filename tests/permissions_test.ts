/**
 * Permission scoping: qimg runs with only the Deno permissions of the files
 * it touches, and a missing one ends in one line naming it (no prompt, no
 * stack trace, exit 1).
 */

import { assertEquals, assertTrue } from "./_assert.ts";
import { CLI, hashFile, qemuImg, runProgram, type RunResult, sh, tempDir } from "./_util.ts";

/** These tests run cli.ts under Deno's permission flags; another runner has none. */
const ignore = Deno.env.get("QIMG_RUNNER") !== undefined;

/** Runs qimg under Deno with exactly `flags` (and --no-prompt). */
function qimgWith(flags: string[], args: string[], cwd: string): Promise<RunResult> {
  return runProgram(Deno.execPath(), ["run", "--no-prompt", ...flags, CLI, ...args], cwd);
}

/** Asserts qimg failed with one stderr line naming the missing permission. */
function assertOneLine(r: RunResult, needs: string): void {
  assertEquals(r.stdout, "", "stdout");
  assertEquals(r.code, 1, r.stderr);
  const lines = r.stderr.split("\n");
  assertEquals(lines.length, 2, `one line expected:\n${r.stderr}`);
  assertEquals(lines[1], "");
  assertTrue(lines[0].startsWith("qimg: "), lines[0]);
  assertTrue(lines[0].includes(needs), `${lines[0]}\n  should name: ${needs}`);
  assertTrue(!/\bat .*\.ts:\d+/.test(r.stderr), "no stack trace");
}

async function chainDir() {
  const dir = await tempDir();
  await sh(
    "qemu-img create -q -f raw base.raw 1M && qemu-io -f raw -c 'write -P 0x11 0 1M' base.raw >/dev/null && " +
      "qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 && " +
      "qemu-io -c 'write -P 0x22 128k 64k' top.qcow2 >/dev/null && cp base.raw a.raw",
    dir.path,
  );
  return dir;
}

Deno.test({
  name: "cli.ts info needs only --allow-read of the image and matches qemu-img",
  ignore,
  async fn() {
    await using dir = await chainDir();
    const p = dir.path;
    for (
      const [flags, args] of [
        [["--allow-read=a.raw"], ["info", "a.raw"]],
        [[`--allow-read=${p}/a.raw`], ["info", "--output=json", `${p}/a.raw`]],
        [["--allow-read=top.qcow2,base.raw"], ["info", "top.qcow2"]],
        [["--allow-read=top.qcow2,base.raw"], ["info", "--backing-chain", "top.qcow2"]],
        [["--allow-read=top.qcow2,base.raw"], ["map", "--output=json", "top.qcow2"]],
        [["--allow-read=a.raw"], ["snapshot", "-l", "a.raw"]],
        [["--allow-read=a.raw"], ["check", "a.raw"]],
      ]
    ) {
      const ours = await qimgWith(flags, args, p);
      const theirs = await qemuImg(args, p);
      assertEquals(ours, theirs, `${flags.join(" ")} ${args.join(" ")}`);
    }
  },
});

Deno.test({
  name: "cli.ts without --allow-write fails a writing command in one line naming the permission",
  ignore,
  async fn() {
    await using dir = await chainDir();
    const p = dir.path;
    const before = await hashFile(`${p}/a.raw`);
    const needsWrite = (f: string) =>
      `Requires write access to "${f}", run again with the --allow-write flag`;
    for (
      const args of [
        ["snapshot", "-c", "s", "a.raw"],
        ["snapshot", "a.raw"],
        ["amend", "-f", "raw", "-o", "size=2M", "a.raw"],
        ["rebase", "-u", "-b", "x", "-F", "raw", "a.raw"],
        ["bitmap", "--add", "a.raw", "b1"],
        ["commit", "-f", "raw", "a.raw"],
      ]
    ) {
      assertOneLine(await qimgWith(["--allow-read"], args, p), needsWrite("a.raw"));
    }
    assertOneLine(
      await qimgWith(["--allow-read"], ["commit", "-d", "top.qcow2"], p),
      needsWrite("top.qcow2"),
    );
    // Writing the overlay is allowed, the backing file it commits into is not.
    assertOneLine(
      await qimgWith(["--allow-read", "--allow-write=top.qcow2"], ["commit", "-d", "top.qcow2"], p),
      needsWrite("base.raw"),
    );
    assertOneLine(
      await qimgWith(["--allow-read"], ["-T", "file=t.log", "info", "a.raw"], p),
      needsWrite("t.log"),
    );
    assertEquals(await hashFile(`${p}/a.raw`), before);
  },
});

Deno.test({
  name: "cli.ts fails in one line when a backing file is outside the allowed paths",
  ignore,
  async fn() {
    await using dir = await chainDir();
    const p = dir.path;
    const needsRead = `Requires read access to "base.raw", run again with the --allow-read flag`;
    for (
      const args of [
        ["info", "--backing-chain", "top.qcow2"],
        ["map", "top.qcow2"],
        ["commit", "-d", "top.qcow2"],
      ]
    ) {
      assertOneLine(
        await qimgWith(["--allow-read=top.qcow2", "--allow-write=top.qcow2"], args, p),
        needsRead,
      );
    }
    // Nothing allowed at all: the image itself is named.
    assertOneLine(
      await qimgWith([], ["info", "a.raw"], p),
      `Requires read access to "a.raw", run again with the --allow-read flag`,
    );
  },
});

Deno.test({
  name: "cli.ts never prompts: QIMG_DEBUG without --allow-env is ignored",
  ignore,
  async fn() {
    await using dir = await chainDir();
    const r = await runProgram(
      "env",
      ["QIMG_DEBUG=1", Deno.execPath(), "run", "--no-prompt", CLI, "info", "a.raw"],
      dir.path,
    );
    assertOneLine(r, `Requires read access to "a.raw"`);
  },
});
