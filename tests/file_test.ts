import { DenoFile, type HostExtent } from "../src/file.ts";
import { QimgError, strerror } from "../src/errors.ts";
import { assert, assertEquals, assertRejects, assertTrue } from "./_assert.ts";
import { qemuImg, qimg, runProgram, sh, tempDir } from "./_util.ts";

const BLOCK = 4096;
const BLOCKS = 256;

/** Block `i` of generation `gen` holds a byte pattern no other block or generation holds. */
function pattern(i: number, gen: number): Uint8Array {
  const b = new Uint8Array(BLOCK);
  for (let j = 0; j < BLOCK; j += 4) {
    b[j] = i & 0xff;
    b[j + 1] = i >> 8;
    b[j + 2] = gen;
    b[j + 3] = 0x5a;
  }
  return b;
}

/** Names the block (or "mixed") a buffer holds, to report what a read got. */
function whichBlock(b: Uint8Array): string {
  for (let j = 4; j < b.length; j += 4) {
    if (b[j] !== b[0] || b[j + 1] !== b[1] || b[j + 2] !== b[2]) return "mixed";
  }
  return `${b[0] | (b[1] << 8)}/${b[2]}`;
}

async function makePatternFile(path: string): Promise<void> {
  const all = new Uint8Array(BLOCK * BLOCKS);
  for (let i = 0; i < BLOCKS; i++) all.set(pattern(i, 0), i * BLOCK);
  await Deno.writeFile(path, all);
}

/**
 * The hazard DenoFile exists to avoid: an async seek, then an async read,
 * on a shared handle. Another request's seek can land between the two.
 */
async function naiveRead(f: Deno.FsFile, offset: number, buf: Uint8Array): Promise<number> {
  await f.seek(offset, Deno.SeekMode.Start);
  let done = 0;
  while (done < buf.length) {
    const n = await f.read(buf.subarray(done));
    if (n === null) break;
    done += n;
  }
  return done;
}

/** Reads every block concurrently (shuffled order) and counts blocks that came back wrong. */
async function concurrentMisreads(
  read: (offset: number, buf: Uint8Array) => Promise<number>,
): Promise<number> {
  const order = Array.from({ length: BLOCKS }, (_, i) => i).sort(() => Math.random() - 0.5);
  const got = await Promise.all(order.map(async (i) => {
    const buf = new Uint8Array(BLOCK);
    await read(i * BLOCK, buf);
    return { i, what: whichBlock(buf) };
  }));
  return got.filter((g) => g.what !== `${g.i}/0`).length;
}

Deno.test("naive async seek-then-read on one handle interleaves (the hazard)", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/f`;
  await makePatternFile(path);
  using f = await Deno.open(path);
  let bad = 0;
  for (let round = 0; round < 20 && bad === 0; round++) {
    bad = await concurrentMisreads((o, b) => naiveRead(f, o, b));
  }
  assertTrue(bad > 0, "the naive helper never misread: the hazard test proves nothing");
});

Deno.test("DenoFile.read() and write() stay correct with many requests in flight on one handle", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/f`;
  await makePatternFile(path);
  const f = await DenoFile.open(path, { write: true });
  try {
    for (let round = 0; round < 5; round++) {
      assertEquals(await concurrentMisreads((o, b) => f.read(o, b)), 0);
    }
    // Interleave writes of generation 1 to the even blocks with reads of the odd ones.
    const jobs: Promise<unknown>[] = [];
    const oddReads: { i: number; buf: Uint8Array }[] = [];
    for (let i = 0; i < BLOCKS; i++) {
      if (i % 2 === 0) jobs.push(f.write(i * BLOCK, pattern(i, 1)));
      else {
        const buf = new Uint8Array(BLOCK);
        oddReads.push({ i, buf });
        jobs.push(f.read(i * BLOCK, buf));
      }
    }
    await Promise.all(jobs);
    for (const r of oddReads) assertEquals(whichBlock(r.buf), `${r.i}/0`);
    await f.flush();
  } finally {
    await f.close();
  }
  const after = await Deno.readFile(path);
  for (let i = 0; i < BLOCKS; i++) {
    assertEquals(
      whichBlock(after.subarray(i * BLOCK, (i + 1) * BLOCK)),
      `${i}/${i % 2 === 0 ? 1 : 0}`,
    );
  }
});

Deno.test("DenoFile.read() returns short counts at and past end of file", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/f`;
  await Deno.writeFile(path, new Uint8Array(1000).fill(9));
  const f = await DenoFile.open(path);
  try {
    assertEquals(await f.size(), 1000);
    const buf = new Uint8Array(200).fill(1);
    assertEquals(await f.read(900, buf), 100);
    assertEquals(buf.subarray(0, 100).every((b) => b === 9), true);
    assertEquals(buf.subarray(100).every((b) => b === 1), true, "bytes past EOF left untouched");
    assertEquals(await f.read(1000, buf), 0);
    assertEquals(await f.read(5000, buf), 0);
    assertEquals(await f.read(0, new Uint8Array(0)), 0);
  } finally {
    await f.close();
  }
});

Deno.test("DenoFile.write() past the end grows the file; truncate() sets the length", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/f`;
  const f = await DenoFile.open(path, { create: true });
  try {
    assertEquals(f.writable, true);
    await f.write(8192, new Uint8Array([1, 2, 3]));
    assertEquals(await f.size(), 8195);
    const buf = new Uint8Array(4);
    assertEquals(await f.read(8191, buf), 4);
    assertEquals([...buf], [0, 1, 2, 3]);
    await f.truncate(100);
    assertEquals(await f.size(), 100);
  } finally {
    await f.close();
  }
});

Deno.test("DenoFile.open() refuses directories with qemu's message", async () => {
  await using dir = await tempDir();
  const sub = `${dir.path}/sub`;
  await Deno.mkdir(sub);
  const e = await DenoFile.open(sub).then(() => null, (e) => e);
  assertTrue(e instanceof QimgError, `expected QimgError, got ${e}`);
  assertEquals(e.message, `'file' driver requires '${sub}' to be a regular file`);
  // The CLI wraps it exactly as qemu-img does.
  await sh("mkdir d", dir.path);
  const ours = await qimg(["info", "d"], dir.path);
  const theirs = await qemuImg(["info", "d"], dir.path);
  assertEquals([ours.stderr, ours.code], [theirs.stderr, theirs.code]);
});

Deno.test("DenoFile.open() rejects (never throws) a missing file, with ENOENT's text", async () => {
  let threw = false;
  let p: Promise<unknown> | undefined;
  try {
    p = DenoFile.open("/nonexistent/qimg/x");
  } catch {
    threw = true;
  }
  assertEquals(threw, false);
  const e = await p!.then(() => null, (e) => e);
  assertEquals(strerror(e), "No such file or directory");
});

/** Walks a file's host extents as qemu's `map` would ask for them. */
async function walkExtents(f: DenoFile): Promise<(HostExtent & { offset: number })[]> {
  const size = await f.size();
  const out: (HostExtent & { offset: number })[] = [];
  for (let offset = 0; offset < size;) {
    const e = await f.extent(offset, size - offset);
    assertTrue(e.length > 0 && e.length <= size - offset, `bad extent length ${e.length}`);
    const last = out[out.length - 1];
    if (last && last.data === e.data) last.length += e.length;
    else out.push({ offset, ...e });
    offset += e.length;
  }
  return out;
}

const MIB = 1 << 20;
/** 10 MiB with data at 1 MiB (64 KiB) and 5 MiB (1 MiB), holes elsewhere. */
const SPARSE = "truncate -s 10M sp && " +
  "dd if=/dev/urandom of=sp bs=64k count=1 seek=16 conv=notrunc status=none && " +
  "dd if=/dev/urandom of=sp bs=1M count=1 seek=5 conv=notrunc status=none";

const ffiGranted = (await Deno.permissions.query({ name: "ffi" })).state === "granted";

Deno.test({
  name: "DenoFile.extent() finds the holes of a sparse file with --allow-ffi",
  ignore: !ffiGranted || Deno.build.os !== "linux",
  async fn() {
    await using dir = await tempDir();
    await sh(SPARSE, dir.path);
    const f = await DenoFile.open(`${dir.path}/sp`);
    try {
      assertEquals(await walkExtents(f), [
        { offset: 0, length: MIB, data: false },
        { offset: MIB, length: 64 * 1024, data: true },
        { offset: MIB + 64 * 1024, length: 4 * MIB - 64 * 1024, data: false },
        { offset: 5 * MIB, length: MIB, data: true },
        { offset: 6 * MIB, length: 4 * MIB, data: false },
      ]);
      // Asking from inside a run answers for the rest of that run only.
      assertEquals(await f.extent(MIB + 4096, 10 * MIB), { length: 60 * 1024, data: true });
      assertEquals(await f.extent(3 * MIB, MIB), { length: MIB, data: false });
    } finally {
      await f.close();
    }
  },
});

Deno.test({
  name: "DenoFile.discard() punches a hole that reads as zeroes, keeping the size",
  ignore: !ffiGranted || Deno.build.os !== "linux",
  async fn() {
    await using dir = await tempDir();
    await sh("dd if=/dev/urandom of=f bs=1M count=4 status=none", dir.path);
    const ro = await DenoFile.open(`${dir.path}/f`);
    try {
      assertEquals(await ro.discard!(0, MIB), false, "a read-only handle cannot discard");
    } finally {
      await ro.close();
    }
    const f = await DenoFile.open(`${dir.path}/f`, { write: true });
    try {
      assertEquals(await f.discard!(MIB, 2 * MIB), true);
      assertEquals(await f.size(), 4 * MIB);
      const buf = new Uint8Array(2 * MIB + 2);
      assertEquals(await f.read(MIB - 1, buf), buf.length);
      assertTrue(buf[0] !== 0 || buf[buf.length - 1] !== 0, "data around the hole survives");
      assertEquals(buf.subarray(1, buf.length - 1).every((b) => b === 0), true);
      assertEquals(await walkExtents(f), [
        { offset: 0, length: MIB, data: true },
        { offset: MIB, length: 2 * MIB, data: false },
        { offset: 3 * MIB, length: MIB, data: true },
      ]);
    } finally {
      await f.close();
    }
  },
});

Deno.test("DenoFile.extent() without the ffi permission answers all data, silently", async () => {
  await using dir = await tempDir();
  await sh(SPARSE, dir.path);
  const fileTs = new URL("../src/file.ts", import.meta.url).href;
  const script = `${dir.path}/walk.ts`;
  await Deno.writeTextFile(
    script,
    `import { DenoFile } from ${JSON.stringify(fileTs)};
const f = await DenoFile.open(Deno.args[0]);
const size = await f.size();
const out = [];
for (let o = 0; o < size;) { const e = await f.extent(o, size - o); out.push(e); o += e.length; }
await f.close();
console.log(JSON.stringify(out));
`,
  );
  const r = await runProgram(Deno.execPath(), [
    "run",
    "--no-prompt",
    "--allow-read",
    "--no-check",
    script,
    `${dir.path}/sp`,
  ]);
  assertEquals({ stderr: r.stderr, code: r.code }, { stderr: "", code: 0 });
  assertEquals(JSON.parse(r.stdout), [{ length: 10 * MIB, data: true }]);
});

Deno.test("qimg reports a missing Deno read permission in one line, without prompting", async () => {
  await using dir = await tempDir();
  await sh("truncate -s 1M a.raw", dir.path);
  const cli = new URL("../cli.ts", import.meta.url).pathname;
  const r = await runProgram(Deno.execPath(), [
    "run",
    "--no-prompt",
    `--allow-read=${cli},${new URL("../src", import.meta.url).pathname}`,
    cli,
    "info",
    "a.raw",
  ], dir.path);
  assertEquals(r.code, 1);
  assertEquals(r.stdout, "");
  const lines = r.stderr.trimEnd().split("\n");
  assertEquals(lines.length, 1, r.stderr);
  assert.match(lines[0], /^qimg: Could not open 'a\.raw': .*read access.*--allow-read/);
});

/** Runs a command as an unprivileged user when we are root (root reads any file). */
function asUser(cmd: string, args: string[]): [string, string[]] {
  if (Deno.uid() !== 0) return [cmd, args];
  return ["setpriv", ["--reuid=nobody", "--regid=nogroup", "--clear-groups", cmd, ...args]];
}

const denoRunsAsUser = await (async () => {
  if (Deno.uid() !== 0) return true;
  try {
    const [c, a] = asUser(Deno.execPath(), ["--version"]);
    return (await runProgram(c, a)).code === 0;
  } catch {
    return false;
  }
})();

Deno.test({
  name: "qimg reports EACCES as qemu-img does",
  // As root, the check runs as nobody; Deno must then be readable by nobody (not under /root).
  ignore: !denoRunsAsUser,
  async fn() {
    await using dir = await tempDir();
    await sh("chmod 755 . && truncate -s 1M a.raw && chmod 000 a.raw && mkdir cache", dir.path);
    await sh("chmod 777 cache", dir.path);
    const cli = new URL("../cli.ts", import.meta.url).pathname;
    const [c1, a1] = asUser("env", [
      `DENO_DIR=${dir.path}/cache`,
      Deno.execPath(),
      "run",
      // The fresh cache downloads npm dependencies: keep Deno's "Download ..." lines out of stderr.
      "--quiet",
      "--no-prompt",
      "--allow-read",
      "--allow-write",
      "--allow-env",
      cli,
      "info",
      "a.raw",
    ]);
    const ours = await runProgram(c1, a1, dir.path);
    const [c2, a2] = asUser("qemu-img", ["info", "a.raw"]);
    const theirs = await runProgram(c2, a2, dir.path);
    assertEquals(theirs.code, 1, `qemu-img as nobody: ${theirs.stderr}`);
    assertEquals(
      { stderr: ours.stderr, code: ours.code },
      { stderr: theirs.stderr.replaceAll("qemu-img", "qimg"), code: theirs.code },
    );
  },
});

Deno.test("DenoFile.open() of a read-only handle refuses writes", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/f`;
  await Deno.writeFile(path, new Uint8Array(10));
  const f = await DenoFile.open(path);
  try {
    assertEquals(f.writable, false);
    await assertRejects(() => f.write(0, new Uint8Array([1])));
  } finally {
    await f.close();
  }
  assertEquals((await Deno.readFile(path))[0], 0);
});

Deno.test("DenoFile.resolve() joins relative names to the image's directory", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/f`;
  await Deno.writeFile(path, new Uint8Array(1));
  const f = await DenoFile.open(path);
  try {
    assertEquals(f.resolve("base.qcow2"), `${dir.path}/base.qcow2`);
    assertEquals(f.resolve("/abs/b"), "/abs/b");
  } finally {
    await f.close();
  }
});
