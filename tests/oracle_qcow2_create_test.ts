/** Oracle tests: `create -f qcow2` against Debian's qemu-img 7.2, down to the file bytes. */

import { assertEquals, assertTrue } from "./_assert.ts";
import { qemuImg, qimg, type RunResult, sh, tempDir } from "./_util.ts";

/** What one create left behind: its output and the files it made. */
interface Outcome {
  run: RunResult;
  image?: Uint8Array;
  /** Size and allocated blocks of the data file, when there is one. */
  data?: string;
}

async function readOrUndefined(path: string): Promise<Uint8Array | undefined> {
  try {
    return await Deno.readFile(path);
  } catch {
    return undefined;
  }
}

async function dataFileShape(path: string): Promise<string | undefined> {
  try {
    const st = await Deno.stat(path);
    return `${st.size}/${st.blocks}`;
  } catch {
    return undefined;
  }
}

/**
 * Runs `create -f qcow2 <args>` with qemu-img and then with qimg in the same
 * directory (relative backing and data file names resolve alike), moving
 * qemu's results aside in between. `IMG` in args names the image.
 */
async function createBoth(
  dir: string,
  args: string[],
): Promise<{ ours: Outcome; theirs: Outcome }> {
  const argv = ["create", "-f", "qcow2", ...args.map((a) => a.replace("IMG", "t.qcow2"))];
  const collect = async (run: RunResult): Promise<Outcome> => {
    const out = {
      run,
      image: await readOrUndefined(`${dir}/t.qcow2`),
      data: await dataFileShape(`${dir}/d.raw`),
    };
    await Deno.remove(`${dir}/t.qcow2`).catch(() => {});
    await Deno.remove(`${dir}/d.raw`).catch(() => {});
    return out;
  };
  const theirs = await collect(await qemuImg(argv, dir));
  const ours = await collect(await qimg(argv, dir));
  return { ours, theirs };
}

function sameBytes(a?: Uint8Array, b?: Uint8Array): boolean {
  if (a === undefined || b === undefined) return a === b;
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

async function assertCreateSame(dir: string, args: string[]): Promise<void> {
  const { ours, theirs } = await createBoth(dir, args);
  const label = `create -f qcow2 ${args.join(" ")}`;
  assertEquals(
    { stdout: ours.run.stdout, stderr: ours.run.stderr, code: ours.run.code },
    { stdout: theirs.run.stdout, stderr: theirs.run.stderr, code: theirs.run.code },
    label,
  );
  assertEquals(ours.image?.length, theirs.image?.length, `${label}: image length`);
  assertTrue(sameBytes(ours.image, theirs.image), `${label}: image bytes differ`);
  assertEquals(ours.data, theirs.data, `${label}: data file`);
}

/** Runs cases in parallel, each in its own directory with backing files ready. */
async function runCases(cases: string[][]): Promise<void> {
  await using root = await tempDir();
  const setup = "qemu-img create -q base.raw 1M && qemu-img create -q -f qcow2 base.qcow2 3M " +
    "&& mkdir sub && qemu-img create -q -f qcow2 sub/b.qcow2 2M && mkdir -p sub/" +
    "z".repeat(200) + "/" + "z".repeat(200);
  const width = 6;
  for (let i = 0; i < cases.length; i += width) {
    await Promise.all(
      cases.slice(i, i + width).map(async (args, j) => {
        const dir = `${root.path}/c${i + j}`;
        await Deno.mkdir(dir);
        await sh(setup, dir);
        await assertCreateSame(dir, args.map((a) => a.replace("ROOT", dir)));
      }),
    );
  }
}

Deno.test("createQcow2() matches qemu-img byte for byte across sizes", async () => {
  const cases: string[][] = [];
  for (const size of ["0", "1M", "1G", "1T", "100T", "1000", "3P"]) cases.push(["IMG", size]);
  await runCases(cases);
});

Deno.test("createQcow2() matches qemu-img byte for byte for every cluster size", async () => {
  const cases: string[][] = [];
  for (let cs = 512; cs <= 2 * 1024 * 1024; cs *= 2) {
    for (const size of ["0", "1G", "1T"]) cases.push(["-o", `cluster_size=${cs}`, "IMG", size]);
  }
  // Refcount blocks allocated while counting the L1 table (self-describing and not).
  cases.push(["-o", "cluster_size=2048", "IMG", "1T"]);
  cases.push(["-o", "cluster_size=16384", "IMG", "100T"]);
  await runCases(cases);
});

Deno.test("createQcow2() matches qemu-img for refcount widths, including table growth", async () => {
  const cases: string[][] = [];
  for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
    cases.push(["-o", `refcount_bits=${bits}`, "IMG", "1G"]);
    cases.push(["-o", `refcount_bits=${bits},cluster_size=512`, "IMG", "1G"]);
  }
  // The refcount table fills up and moves.
  cases.push(["-o", "refcount_bits=64,cluster_size=512", "IMG", "30G"]);
  await runCases(cases);
});

Deno.test("createQcow2() matches qemu-img for compat, features and extended L2", async () => {
  const cases: string[][] = [];
  for (
    const o of [
      "compat=0.10",
      "compat=v2",
      "compat=1.1",
      "compat=v3",
      "lazy_refcounts=on",
      "compression_type=zstd",
      "compression_type=zlib,compat=0.10",
      "extended_l2=on",
      "extended_l2=on,cluster_size=16k",
      "extended_l2=on,cluster_size=2M",
      "nocow=on",
      "encryption=off",
    ]
  ) {
    cases.push(["-o", o, "IMG", "1G"]);
  }
  await runCases(cases);
});

Deno.test("createQcow2() stores backing files and data files as qemu-img does", async () => {
  await runCases([
    ["-b", "base.raw", "-F", "raw", "IMG"],
    ["-b", "base.qcow2", "-F", "qcow2", "IMG"],
    ["-b", "base.qcow2", "-F", "qcow2", "IMG", "5G"],
    ["-b", "ROOT/base.qcow2", "-F", "qcow2", "IMG"],
    ["-b", "sub/b.qcow2", "-F", "qcow2", "IMG"],
    ["-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2", "IMG"],
    ["-o", "cluster_size=512", "-b", "base.raw", "-F", "raw", "IMG"],
    ["-o", "backing_file=base.raw,backing_fmt=raw", "IMG", "2M"],
    ["-u", "-b", "missing.qcow2", "-F", "qcow2", "IMG", "1M"],
    ["-b", "base.raw", "-F", "raw", "-o", "data_file=d.raw", "IMG"],
    ["-o", "data_file=d.raw", "IMG", "1G"],
    ["-o", "data_file=d.raw,data_file_raw=on", "IMG", "10M"],
    ["-o", "data_file=d.raw,data_file_raw=on,extended_l2=on", "IMG", "10M"],
    ["-o", "data_file=d.raw,preallocation=full", "IMG", "3M"],
    ["-o", "data_file=nodir/d.raw", "IMG", "1M"],
  ]);
});

Deno.test("createQcow2() preallocates as qemu-img does (metadata, falloc, full)", async () => {
  const cases: string[][] = [];
  for (const mode of ["metadata", "falloc", "full"]) {
    for (const cs of ["512", "64k", "2M"]) {
      cases.push(["-o", `preallocation=${mode},cluster_size=${cs}`, "IMG", "7M"]);
    }
    cases.push(["-o", `preallocation=${mode}`, "IMG", "0"]);
    cases.push(["-o", `preallocation=${mode},extended_l2=on`, "IMG", "10M"]);
    cases.push(["-o", `preallocation=${mode},refcount_bits=1`, "IMG", "10M"]);
    cases.push(["-o", `preallocation=${mode},cluster_size=512,refcount_bits=64`, "IMG", "10M"]);
    cases.push([
      "-o",
      `preallocation=${mode},extended_l2=on`,
      "-b",
      "base.raw",
      "-F",
      "raw",
      "IMG",
      "4M",
    ]);
  }
  // An L2 table landing on a refcount block boundary; and table growth.
  cases.push(["-o", "preallocation=metadata,cluster_size=512", "IMG", "5M"]);
  cases.push(["-o", "preallocation=metadata,cluster_size=512", "IMG", "100M"]);
  await runCases(cases);
});

Deno.test("createQcow2() preallocated images look the same to qemu-img info, check, compare, map", async () => {
  await using root = await tempDir();
  const dir = root.path;
  for (const mode of ["metadata", "falloc", "full"]) {
    await sh(`qemu-img create -q -f qcow2 -o preallocation=${mode} q.qcow2 5M`, dir);
    const made = await qimg([
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      `preallocation=${mode}`,
      "m.qcow2",
      "5M",
    ], dir);
    assertEquals(made.code, 0, made.stderr);
    const info = async (name: string) => {
      const r = await qemuImg(["info", "--output=json", name], dir);
      const v = JSON.parse(r.stdout);
      delete v.filename;
      delete v["actual-size"];
      return v;
    };
    assertEquals(await info("m.qcow2"), await info("q.qcow2"), `info ${mode}`);
    const check = await qemuImg(["check", "m.qcow2"], dir);
    assertEquals(check.code, 0, check.stdout + check.stderr);
    assertTrue(check.stdout.includes("No errors were found"), check.stdout);
    const compare = await qemuImg(["compare", "m.qcow2", "q.qcow2"], dir);
    assertEquals(compare.stdout, "Images are identical.\n");
    const map = async (name: string) => (await qemuImg(["map", "--output=json", name], dir)).stdout;
    assertEquals(await map("m.qcow2"), await map("q.qcow2"), `map ${mode}`);
  }
});

Deno.test("createQcow2() refuses bad options with qemu-img's messages and leaves no file", async () => {
  const cases: string[][] = [];
  for (
    const o of [
      "compat=1.2",
      "compat=0.10,lazy_refcounts=on",
      "compat=0.10,compression_type=zstd",
      "compression_type=foo",
      "compat=0.10,extended_l2=on",
      "compat=0.10,data_file=d.raw",
      "compat=0.10,refcount_bits=8",
      "refcount_bits=3",
      "refcount_bits=128",
      "refcount_bits=0",
      "refcount_bits=-16",
      "cluster_size=1000",
      "cluster_size=256",
      "cluster_size=4M",
      "extended_l2=on,cluster_size=8k",
      "compat=0.10,extended_l2=on,cluster_size=1000",
      "preallocation=foo",
      "preallocation=foo,compression_type=foo",
      "data_file_raw=on",
      "backing_fmt=raw",
      "cluster_size=512,refcount_bits=3,compat=0.10,lazy_refcounts=on",
      "encrypt.format=foo",
      "encrypt.cipher-alg=aes-256",
      "encryption=on",
      "encrypt.format=luks",
      "encryption=on,encrypt.format=luks",
    ]
  ) {
    cases.push(["-o", o, "IMG", "1M"]);
  }
  cases.push(["-o", "cluster_size=512", "IMG", "1T"]);
  cases.push(["-u", "-b", "x", "-F", "raw", "-o", "preallocation=full", "IMG", "1M"]);
  cases.push(["-u", "-b", "x", "-F", "raw", "-o", "data_file=d.raw,data_file_raw=on", "IMG", "1M"]);
  cases.push(["-u", "-b", "x", "-F", "foo", "IMG", "1M"]);
  cases.push(["-o", "refcount_bits=3", "nodir/IMG", "1M"]);
  await runCases(cases);
});

Deno.test("createQcow2() refuses names that do not fit the header, as qemu-img", async () => {
  const long = (n: number) => "a/" + "y".repeat(n);
  const cases: string[][] = [];
  for (const cs of ["512", "1024", "2048"]) {
    for (const n of [300, 390, 400, 600, 1021, 1100]) {
      cases.push(["-o", `cluster_size=${cs}`, "-u", "-b", long(n), "-F", "raw", "IMG", "1M"]);
    }
    cases.push([
      "-o",
      `cluster_size=${cs},compat=0.10`,
      "-u",
      "-b",
      long(420),
      "-F",
      "raw",
      "IMG",
      "1M",
    ]);
  }
  // The external data file name alone overflows a 512-byte header cluster.
  const dir = "z".repeat(200);
  cases.push(["-o", `cluster_size=512,data_file=sub/${dir}/${dir}/d.raw`, "IMG", "1M"]);
  cases.push(["-o", `cluster_size=1024,data_file=sub/${dir}/${dir}/d.raw`, "IMG", "1M"]);
  await runCases(cases);
});

Deno.test("createQcow2() removes an existing file it fails to replace, as qemu-img", async () => {
  await using root = await tempDir();
  await Deno.writeTextFile(`${root.path}/t.qcow2`, "old");
  const r = await qimg(
    ["create", "-f", "qcow2", "-o", "refcount_bits=3", "t.qcow2", "1M"],
    root.path,
  );
  assertEquals(r.code, 1);
  assertEquals(await readOrUndefined(`${root.path}/t.qcow2`), undefined);
});

Deno.test("createQcow2() refuses encryption with one line (not supported yet)", async () => {
  await using root = await tempDir();
  const r = await qimg([
    "create",
    "-f",
    "qcow2",
    "--object",
    "secret,id=sec0,data=123456",
    "-o",
    "encrypt.format=luks,encrypt.key-secret=sec0",
    "t.qcow2",
    "1M",
  ], root.path);
  assertEquals(r.code, 1);
  assertEquals(
    r.stderr,
    "qimg: t.qcow2: create of encrypted qcow2 images: not supported yet\n",
  );
  assertEquals(await readOrUndefined(`${root.path}/t.qcow2`), undefined);
});
