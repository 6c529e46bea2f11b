/**
 * Image locking against QEMU itself: qemu-io holds an image (read-write or
 * read-only) and qimg must refuse or accept it exactly as qemu-img does;
 * an image qimg holds must be refused by qemu-img (the locks are real).
 */

import { assertEquals, assertTrue } from "./_assert.ts";
import { assertSameAsQemu, CLI, hashFile, qemuImg, qimg, sh, tempDir } from "./_util.ts";
import {
  layerLocks,
  PERM_CONSISTENT_READ as CR,
  PERM_RESIZE as RESIZE,
  PERM_WRITE as WRITE,
} from "../src/image_lock.ts";

// Other builds (Node) have no fcntl: they lock nothing.
const ignore = Deno.env.get("QIMG_RUNNER") !== undefined;

/**
 * Waits until a lock is on `image` (its inode in /proc/locks): a probe that
 * opened the image itself could refuse the holder in the race.
 */
async function waitLocked(cwd: string, image: string, holder: Deno.ChildProcess): Promise<void> {
  const ino = (await Deno.stat(`${cwd}/${image}`)).ino;
  let exited = false;
  holder.status.then(() => exited = true);
  for (let i = 0; i < 400; i++) {
    // Through cat: Deno reads /proc files only with --allow-all, the suite runs without it.
    const cat = await new Deno.Command("cat", { args: ["/proc/locks"], stdout: "piped" }).output();
    const locks = new TextDecoder().decode(cat.stdout);
    if (locks.split("\n").some((l) => l.includes("OFDLCK") && l.includes(`:${ino} 100 `))) {
      // qemu sets its bytes one after another: let it finish.
      await new Promise((ok) => setTimeout(ok, 100));
      return;
    }
    if (exited) break;
    await new Promise((ok) => setTimeout(ok, 25));
  }
  throw new Error(`qemu-io never locked ${image}`);
}

/** Runs `qemu-io [-r] [-f fmt] -c 'sleep …' image` until disposed, once its locks are on. */
async function hold(cwd: string, image: string, options: string[]) {
  const child = new Deno.Command("qemu-io", {
    args: [...options, "-c", "sleep 60000", image],
    cwd,
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  try {
    await waitLocked(cwd, image, child);
  } catch (e) {
    child.kill("SIGKILL");
    await child.status;
    throw e;
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
    await using _ = await hold(cwd, "h.qcow2", []);
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
    await using _ = await hold(cwd, "a.qcow2", ["-r"]);
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
      await using _ = await hold(cwd, "a.qcow2", []);
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
    await using _ = await hold(cwd, "r.raw", ["-f", "raw"]);
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
    // Watched in /proc/locks: a qemu-img probe could itself refuse qimg's open.
    for (let i = 0; i < 400; i++) {
      if (await Deno.stat(`${cwd}/dst.qcow2`).then(() => true, () => false)) break;
      await new Promise((ok) => setTimeout(ok, 10));
    }
    await waitLocked(cwd, "dst.qcow2", child);
    const target = (await qemuImg(["info", "dst.qcow2"], cwd)).stderr;
    const source = (await qemuImg(["snapshot", "-c", "s", "src.qcow2"], cwd)).stderr;
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
    await using _ = await hold(cwd, "h.qcow2", []);
    const noFfi = [Deno.execPath(), "run", "--no-prompt", "--allow-read", "--allow-write", CLI];
    const r = await qimg(["map", "--output=json", "h.qcow2"], cwd, noFfi);
    assertEquals(r.stderr, "");
    assertEquals(r.code, 0);
    const u = await qemuImg(["map", "-U", "--output=json", "h.qcow2"], cwd);
    assertEquals(r.stdout, u.stdout);
  },
});
