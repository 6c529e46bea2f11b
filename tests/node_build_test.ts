/**
 * The Node build (`deno task build` -> dist/qimg.mjs): NodeFile's I/O, then
 * the bundle run with `node` against Debian's qemu-img, also under the
 * `prlimit --as=1GiB` OpenStack and libguestfs put on `qemu-img info`, and
 * as an npm package installed from its tarball. The bundle is built once,
 * into a temp dir, so dist/ is left alone. Node, prlimit and npm are each
 * optional: the tests that need one are ignored without it.
 */

import { build } from "../scripts/build_node.ts";
import { NodeFile } from "../src/node_file.ts";
import { nodeIo } from "../node_cli.ts";
import { QimgError, strerror } from "../src/errors.ts";
import { assertEquals, assertRejects, assertTrue } from "./_assert.ts";
import { assertSameAsQemu, qemuImg, qimg, runProgram, sh, tempDir } from "./_util.ts";

async function has(cmd: string): Promise<boolean> {
  return (await runProgram("sh", ["-c", `command -v ${cmd}`])).code === 0;
}

const NODE = await has("node");
const PRLIMIT = NODE && await has("prlimit");
const NPM = NODE && await has("npm");

/** The qemu-img limits of OpenStack's and libguestfs's callers: 1 GiB of address space, 30 s of CPU. */
const LIMITS = ["prlimit", "--as=1073741824", "--cpu=30"];

let built: Promise<string> | undefined;
let buildDir: string | undefined;

/** Builds the bundle on first use; later calls share it. */
function bundle(): Promise<string> {
  if (!built) {
    buildDir = Deno.makeTempDirSync({ prefix: "qimg-node-build-" });
    built = build({ outDir: buildDir });
  }
  return built;
}

globalThis.addEventListener("unload", () => {
  if (buildDir) Deno.removeSync(buildDir, { recursive: true });
});

/** The runner for assertSameAsQemu: `node <bundle>`. */
async function node(): Promise<string[]> {
  return ["node", await bundle()];
}

/**
 * Test images, all made by qemu-img/qemu-io: a fully written raw file (no
 * holes: node:fs cannot see them, so map would differ from qemu's on a
 * sparse one), a qcow2 with data, zero and unallocated clusters, its
 * compressed copies (zlib and zstd), vmdk, vpc and vdi copies.
 */
async function makeImages(dir: string): Promise<void> {
  await sh(
    `
    head -c 1048576 /dev/urandom > raw.img
    qemu-io -f raw -c 'write -P 0x11 65536 65536' raw.img >/dev/null
    qemu-img create -q -f qcow2 d.qcow2 4M
    qemu-io -f qcow2 -c 'write -P 0x22 0 192k' -c 'write -z 1M 64k' -c 'write -P 0x33 2M 4k' d.qcow2 >/dev/null
    qemu-img convert -c -O qcow2 d.qcow2 c.qcow2
    qemu-img convert -c -O qcow2 -o compression_type=zstd d.qcow2 z.qcow2
    qemu-img convert -O vmdk d.qcow2 d.vmdk
    qemu-img convert -O vpc d.qcow2 d.vpc
    qemu-img convert -O vdi d.qcow2 d.vdi
    mkdir adir
    head -c 100 d.qcow2 > short.qcow2
    `,
    dir,
  );
}

/** Writes a copy of `from` with big-endian `value` at `offset` (a hostile header field). */
async function poke(dir: string, from: string, to: string, offset: number, value: bigint) {
  const b = await Deno.readFile(`${dir}/${from}`);
  const v = new DataView(b.buffer);
  if (value > 0xffffffffn) v.setBigUint64(offset, value);
  else v.setUint32(offset, Number(value));
  await Deno.writeFile(`${dir}/${to}`, b);
}

/** Hostile qcow2 headers: [file, header offset, value], each refused by qemu-img info. */
const HOSTILE: [string, number, bigint][] = [
  ["huge_l1.qcow2", 36, 0x7fffffffn], // l1_size
  ["huge_refcount.qcow2", 56, 0x7fffffffn], // refcount_table_clusters
  ["snapshots.qcow2", 60, 70000n], // nb_snapshots
  ["size.qcow2", 24, 0xffffffffffffffffn], // size
  ["l1_far.qcow2", 40, 0x7fffffffffff0000n], // l1_table_offset
];

async function makeHostile(dir: string): Promise<void> {
  for (const [name, offset, value] of HOSTILE) await poke(dir, "d.qcow2", name, offset, value);
}

// NodeFile runs under Deno too (node:fs), so its contract is tested here directly.

Deno.test("NodeFile read() and write() are positional, with many requests in flight on one handle", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/f`;
  const f = await NodeFile.open(path, { create: true });
  try {
    const blocks = 64;
    await Promise.all(
      Array.from({ length: blocks }, (_, i) => f.write(i * 4096, new Uint8Array(4096).fill(i))),
    );
    assertEquals(await f.size(), blocks * 4096);
    const got = await Promise.all(Array.from({ length: blocks }, async (_, i) => {
      const b = new Uint8Array(4096);
      assertEquals(await f.read(i * 4096, b), 4096);
      return b.every((x) => x === i);
    }));
    assertEquals(got.filter((ok) => !ok).length, 0);
    // Short only at the end of the file.
    assertEquals(await f.read(blocks * 4096 - 10, new Uint8Array(100)), 10);
    assertEquals(await f.read(blocks * 4096 + 5, new Uint8Array(100)), 0);
    await f.truncate(100);
    assertEquals(await f.size(), 100);
    assertEquals(await f.extent(0, 1 << 20), { length: 1 << 20, data: true });
    assertEquals(f.resolve("b.qcow2"), `${dir.path}/b.qcow2`);
    assertEquals(f.resolve("/abs"), "/abs");
    await f.flush();
  } finally {
    await f.close();
  }
  // A closed handle is refused rather than reaching a reused descriptor number.
  await assertRejects(() => f.read(0, new Uint8Array(1)), /closed/);
});

Deno.test("NodeFile.open() keeps errno codes for qemu's text and refuses directories and writes on read-only handles", async () => {
  await using dir = await tempDir();
  const missing = await NodeFile.open(`${dir.path}/nope`).then(() => null, (e) => e);
  assertEquals(strerror(missing), "No such file or directory");
  const asDir = await NodeFile.open(dir.path).then(() => null, (e) => e);
  assertTrue(asDir instanceof QimgError);
  assertEquals(asDir.message, `'file' driver requires '${dir.path}' to be a regular file`);
  await Deno.writeFile(`${dir.path}/ro`, new Uint8Array(10));
  const ro = await NodeFile.open(`${dir.path}/ro`);
  try {
    assertEquals(ro.writable, false);
    await assertRejects(() => ro.write(0, new Uint8Array(1)));
    assertEquals(await ro.allocated() >= 0, true);
  } finally {
    await ro.close();
  }
  // create truncates an existing file, as DenoFile's.
  const rw = await NodeFile.open(`${dir.path}/ro`, { create: true });
  assertEquals(await rw.size(), 0);
  await rw.close();
});

Deno.test("NodeFile past 2^53: reads find end of file, writes and truncates fail with EFBIG, never misplaced", async () => {
  await using dir = await tempDir();
  const f = await NodeFile.open(`${dir.path}/f`, { create: true });
  try {
    await f.write(0, new Uint8Array([7, 7]));
    assertEquals(await f.read(2 ** 60, new Uint8Array(4)), 0);
    // node:fs would write these two bytes at the file pointer (offset 0 or 2) instead.
    const w = await f.write(2 ** 60, new Uint8Array([1, 1])).then(() => null, (e) => e);
    assertEquals(strerror(w), "File too large");
    const t = await f.truncate(7 * 2 ** 60).then(() => null, (e) => e);
    assertEquals(strerror(t), "File too large");
    assertEquals(await f.size(), 2);
    const b = new Uint8Array(2);
    await f.read(0, b);
    assertEquals([...b], [7, 7]);
  } finally {
    await f.close();
  }
});

Deno.test("nodeIo opens, tests for and removes files through node:fs (node_cli.ts, imported without running)", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/f`;
  assertEquals(await nodeIo.exists!(path), false);
  const f = await nodeIo.openFile(path, { create: true, write: true });
  assertTrue(f instanceof NodeFile);
  await f.write(0, new Uint8Array([1, 2, 3]));
  await f.close();
  assertEquals(await nodeIo.exists!(path), true);
  assertEquals([...await Deno.readFile(path)], [1, 2, 3]);
  await nodeIo.remove!(path);
  assertEquals(await nodeIo.exists!(path), false);
});

/** Oracle cases for `node dist/qimg.mjs`, each compared with qemu-img: stdout, stderr, exit code. */
const ORACLE: string[][] = [
  ["info", "raw.img"],
  ["info", "--output=json", "raw.img"],
  ["info", "d.qcow2"],
  ["info", "--output=json", "d.qcow2"],
  ["info", "--output=json", "c.qcow2"],
  ["info", "z.qcow2"],
  ["check", "d.qcow2"],
  ["check", "--output=json", "c.qcow2"],
  ["map", "--output=json", "d.qcow2"],
  ["map", "d.qcow2"],
  ["map", "--output=json", "raw.img"],
  ["compare", "d.qcow2", "c.qcow2"],
  ["compare", "d.qcow2", "raw.img"],
  ["measure", "-O", "qcow2", "d.qcow2"],
  // Bad input: each must end with qemu-img's message and exit code.
  [],
  ["frobnicate"],
  ["info"],
  ["info", "--bogus", "d.qcow2"],
  ["info", "missing.img"],
  ["info", "adir"],
  ["info", "short.qcow2"],
  ["info", "-f", "qcow2", "raw.img"],
  ["info", "-f", "nosuchfmt", "raw.img"],
  ["check", "raw.img"],
  ["convert", "-O", "raw", "missing.img", "out.raw"],
  ["info", "huge_l1.qcow2"],
  // A size node:fs cannot pass to ftruncate: EFBIG, as the kernel answers qemu-img.
  ["create", "-q", "-f", "raw", "huge.raw", "7E"],
];

Deno.test({
  name: "node dist/qimg.mjs answers as qemu-img: info, check, map, compare, measure and bad input",
  ignore: !NODE,
  async fn() {
    await using dir = await tempDir();
    await makeImages(dir.path);
    await makeHostile(dir.path);
    const runner = await node();
    for (const args of ORACLE) {
      const r = await assertSameAsQemu(args, dir.path, runner);
      assertTrue(!r.stderr.includes("internal error"), `${args.join(" ")}: ${r.stderr}`);
    }
  },
});

Deno.test({
  name: "node dist/qimg.mjs convert writes images qemu-img finds identical (raw, compressed qcow2)",
  ignore: !NODE,
  async fn() {
    await using dir = await tempDir();
    await makeImages(dir.path);
    const runner = await node();
    for (
      const [args, out] of [
        [["convert", "-O", "raw", "d.qcow2", "out.raw"], "out.raw"],
        [["convert", "-c", "-O", "qcow2", "d.qcow2", "out.qcow2"], "out.qcow2"],
        [["convert", "-O", "raw", "c.qcow2", "out2.raw"], "out2.raw"],
      ] as const
    ) {
      const r = await qimg([...args], dir.path, runner);
      assertEquals({ out: r.stdout, err: r.stderr, code: r.code }, { out: "", err: "", code: 0 });
      const cmp = await qemuImg(["compare", "d.qcow2", out], dir.path);
      assertEquals(cmp.stdout, "Images are identical.\n", `${args.join(" ")}: ${cmp.stderr}`);
    }
    assertEquals((await qemuImg(["check", "out.qcow2"], dir.path)).code, 0);
    const info = await qemuImg(["info", "--output=json", "out.qcow2"], dir.path);
    assertEquals(JSON.parse(info.stdout).format, "qcow2");
  },
});

Deno.test({
  name: "node dist/qimg.mjs under prlimit --as=1GiB: info --output=json --force-share as qemu-img",
  ignore: !PRLIMIT,
  async fn() {
    await using dir = await tempDir();
    await makeImages(dir.path);
    await makeHostile(dir.path);
    const runner = [...LIMITS, ...await node()];
    const images = ["raw.img", "d.qcow2", "c.qcow2", "z.qcow2", "d.vmdk", "d.vpc", "d.vdi"];
    for (const img of images) {
      const r = await assertSameAsQemu(
        ["info", "--output=json", "--force-share", img],
        dir.path,
        runner,
      );
      assertEquals(r.code, 0, `${img}: ${r.stderr}`);
    }
    // Hostile headers end with qemu-img's error, within the limits.
    for (const [img] of HOSTILE) {
      const r = await assertSameAsQemu(
        ["info", "--output=json", "--force-share", img],
        dir.path,
        runner,
      );
      assertEquals(r.code, 1, img);
      assertEquals(r.stderr.split("\n").length, 2, `${img}: one line: ${r.stderr}`);
    }
    // Decompressing every cluster fits as well.
    await assertSameAsQemu(["check", "--force-share", "c.qcow2"], dir.path, runner);
    await assertSameAsQemu(["compare", "--force-share", "d.qcow2", "c.qcow2"], dir.path, runner);
  },
});

/** Runs `cmd args` in `cwd` with `bin` first on PATH. */
async function runWithPath(bin: string, cmd: string[], cwd: string) {
  const r = await new Deno.Command(cmd[0], {
    args: cmd.slice(1),
    cwd,
    env: { PATH: `${bin}:${Deno.env.get("PATH") ?? "/usr/bin:/bin"}` },
    stdin: "null",
  }).output();
  const text = new TextDecoder();
  return { stdout: text.decode(r.stdout), stderr: text.decode(r.stderr), code: r.code };
}

Deno.test({
  name: "the README's qemu-img wrapper on PATH serves OpenStack-style calls under prlimit",
  ignore: !PRLIMIT,
  async fn() {
    await using dir = await tempDir();
    await makeImages(dir.path);
    const bin = `${dir.path}/bin`;
    await Deno.mkdir(bin);
    // The README's wrapper, pointing at this build.
    await Deno.writeTextFile(
      `${bin}/qemu-img`,
      `#!/bin/sh\nexport MALLOC_ARENA_MAX=2\nexec node ${await bundle()} "$@"\n`,
      { mode: 0o755 },
    );
    // As oslo.concurrency runs it for nova: limits, then a C locale, then qemu-img from PATH.
    const call = [...LIMITS, "env", "LC_ALL=C", "LANG=C", "qemu-img"];
    // "nope" proves the wrapper ran: Debian's qemu-img would say "qemu-img:", not "qimg:".
    for (const args of [["info", "--output=json", "--force-share", "c.qcow2"], ["info", "nope"]]) {
      const ours = await runWithPath(bin, [...call, ...args], dir.path);
      assertEquals(ours, await qemuImg(args, dir.path), args.join(" "));
    }
    // A compressing convert crashes under the limit without MALLOC_ARENA_MAX; with it, it completes.
    await sh("head -c 20000000 /dev/urandom > r20.raw", dir.path);
    const r = await runWithPath(bin, [
      ...call,
      "convert",
      "-c",
      "-O",
      "qcow2",
      "r20.raw",
      "o.qcow2",
    ], dir.path);
    assertEquals(r, { stdout: "", stderr: "", code: 0 });
    assertEquals(
      (await qemuImg(["compare", "r20.raw", "o.qcow2"], dir.path)).stdout,
      "Images are identical.\n",
    );
  },
});

Deno.test({
  name: "prlimit --as=1GiB stops Deno, so the Node build is what such callers can run",
  ignore: !PRLIMIT,
  async fn() {
    // Without this the test above could pass with a limit that limits nothing.
    const r = await runProgram(LIMITS[0], [...LIMITS.slice(1), Deno.execPath(), "eval", "1"]);
    assertTrue(r.code !== 0, "deno started under a 1 GiB address-space limit");
  },
});

Deno.test({
  name:
    "node dist/qimg.mjs reads zstd-compressed qcow2 clusters, or fails in one line where Node lacks zstd",
  ignore: !NODE,
  async fn() {
    await using dir = await tempDir();
    await makeImages(dir.path);
    const runner = await node();
    const probe = await runProgram("node", [
      "-e",
      "process.exit(typeof require('node:zlib').zstdDecompressSync === 'function' ? 0 : 1)",
    ]);
    if (probe.code === 0) {
      await assertSameAsQemu(["compare", "d.qcow2", "z.qcow2"], dir.path, runner);
      return;
    }
    // Node 20 (zstd came in 22.15/23.8): qimg's one-line error, no crash and no stack.
    for (
      const args of [["compare", "d.qcow2", "z.qcow2"], ["convert", "-O", "raw", "z.qcow2", "o"]]
    ) {
      const r = await qimg(args, dir.path, runner);
      assertTrue(r.code !== 0, args.join(" "));
      assertTrue(
        /^qimg: .*This runtime cannot decompress zstd clusters\n$/.test(r.stderr),
        r.stderr,
      );
    }
  },
});

Deno.test({
  name: "the npm package: npm pack in the build dir, npm install of the tarball, npx qimg runs",
  ignore: !NPM,
  async fn() {
    await using dir = await tempDir();
    await makeImages(dir.path);
    const out = await bundle();
    const dist = out.slice(0, out.lastIndexOf("/"));
    const app = `${dir.path}/app`;
    await Deno.mkdir(app);
    // Local tarball, no dependencies: nothing to fetch, so --offline holds.
    const env = { npm_config_cache: `${dir.path}/npm-cache`, npm_config_update_notifier: "false" };
    const npm = async (args: string[], cwd: string) => {
      const r = await new Deno.Command("npm", { args, cwd, env, stdin: "null" }).output();
      const text = new TextDecoder();
      assertEquals(r.code, 0, `npm ${args.join(" ")}: ${text.decode(r.stderr)}`);
      return text.decode(r.stdout);
    };
    const tarball = (await npm(["pack", "--silent", "--pack-destination", dir.path], dist)).trim()
      .split("\n").pop()!;
    await npm(["init", "-y"], app);
    await npm(["install", "--offline", "--no-audit", "--no-fund", `${dir.path}/${tarball}`], app);
    for (const args of [["info", "d.qcow2"], ["info", "--output=json", "missing.img"]]) {
      const paths = args.map((a) => (a.endsWith("qcow2") || a.endsWith(".img") ? `../${a}` : a));
      const theirs = await qemuImg(paths, app);
      const viaNpx = await runProgram("npx", ["--offline", "qimg", ...paths], app);
      assertEquals(viaNpx, theirs, `npx qimg ${paths.join(" ")}`);
      const viaBin = await runProgram(`${app}/node_modules/.bin/qimg`, paths, app);
      assertEquals(viaBin, theirs, `node_modules/.bin/qimg ${paths.join(" ")}`);
    }
  },
});
