/**
 * The Node build (dist/qimg.mjs, built once into a temp dir) where Node
 * differs from Deno: holes in sparse raw files, which node:fs cannot seek
 * (NodeFile infers them: src/node_file.ts), and zstd, which Node 20's
 * node:zlib lacks (one `qimg:` line, never a stack trace). Ignored without node.
 */

import { build } from "../scripts/build_node.ts";
import { assertEquals, assertTrue } from "./_assert.ts";
import { assertSameAsQemu, CLI, qemuImg, qimg, runProgram, sh, tempDir } from "./_util.ts";

async function has(cmd: string): Promise<boolean> {
  return (await runProgram("sh", ["-c", `command -v ${cmd}`])).code === 0;
}

const NODE = await has("node");

let built: Promise<string> | undefined;
let buildDir: string | undefined;

/** Builds the bundle on first use; later calls share it. */
function bundle(): Promise<string> {
  if (!built) {
    buildDir = Deno.makeTempDirSync({ prefix: "qimg-node-extra-" });
    built = build({ outDir: buildDir });
  }
  return built;
}

globalThis.addEventListener("unload", () => {
  if (buildDir) Deno.removeSync(buildDir, { recursive: true });
});

/**
 * Sparse raw files made by truncate and qemu-io: holes around data, a file
 * of one hole, a dense file whose size is not a multiple of 512 (qemu maps
 * the rest of its last sector as a hole), data in a partial last block, and
 * data at the very start.
 */
const SPARSE = ["holes.raw", "empty.raw", "dense.raw", "tail.raw", "start.raw"];

async function makeSparse(dir: string): Promise<void> {
  await sh(
    `
    truncate -s 4M holes.raw
    qemu-io -f raw -c 'write -P 0x11 1M 64k' -c 'write -P 0x12 3M 5k' holes.raw >/dev/null
    truncate -s 4100000 holes.raw
    truncate -s 3M empty.raw
    head -c 100000 /dev/urandom > dense.raw
    truncate -s 1049000 tail.raw
    qemu-io -f raw -c 'write -P 0x13 1048576 424' tail.raw >/dev/null
    truncate -s 2M start.raw
    qemu-io -f raw -c 'write -P 0x14 0 4k' start.raw >/dev/null
    `,
    dir,
  );
}

Deno.test({
  name: "NodeFile map --output=json and map of sparse raw files are qemu-img's (holes inferred)",
  ignore: !NODE,
  async fn() {
    await using dir = await tempDir();
    await makeSparse(dir.path);
    const node = ["node", await bundle()];
    for (const f of SPARSE) {
      await assertSameAsQemu(["map", "--output=json", f], dir.path, node);
      await assertSameAsQemu(["map", f], dir.path, node);
    }
  },
});

Deno.test({
  name:
    "NodeFile reports all data when allocated zero blocks make holes ambiguous, as qimg on Deno without ffi",
  ignore: !NODE,
  async fn() {
    await using dir = await tempDir();
    // The 64 KiB of zeroes written at 2M are allocated: zero blocks outnumber holes.
    await sh(
      "truncate -s 4M z.raw && qemu-io -f raw -c 'write -P 0x11 1M 64k' -c 'write -P 0 2M 64k' z.raw >/dev/null",
      dir.path,
    );
    const ours = await qimg(["map", "--output=json", "z.raw"], dir.path, ["node", await bundle()]);
    const noFfi = await runProgram(
      Deno.execPath(),
      ["run", "--no-prompt", "--allow-read", CLI, "map", "--output=json", "z.raw"],
      dir.path,
    );
    assertEquals(ours, noFfi);
    assertEquals(
      ours.stdout,
      `[{ "start": 0, "length": 4194304, "depth": 0, "present": true, "zero": false, "data": true, "offset": 0}]\n`,
    );
  },
});

Deno.test({
  name: "NodeFile convert of a sparse raw writes what qemu-img convert writes (raw and qcow2)",
  ignore: !NODE,
  async fn() {
    await using dir = await tempDir();
    await makeSparse(dir.path);
    const node = ["node", await bundle()];
    for (const fmt of ["raw", "qcow2"]) {
      const ours = await qimg(["convert", "-O", fmt, "holes.raw", `n.${fmt}`], dir.path, node);
      assertEquals(ours, { stdout: "", stderr: "", code: 0 });
      const theirs = await qemuImg(["convert", "-O", fmt, "holes.raw", `q.${fmt}`], dir.path);
      assertEquals(theirs.code, 0, theirs.stderr);
      const cmp = await qemuImg(["compare", `n.${fmt}`, `q.${fmt}`], dir.path);
      assertEquals(cmp.stdout, "Images are identical.\n");
      const nMap = await qemuImg(["map", "--output=json", `n.${fmt}`], dir.path);
      const qMap = await qemuImg(["map", "--output=json", `q.${fmt}`], dir.path);
      assertEquals(nMap.stdout, qMap.stdout, `allocation of the ${fmt} copy`);
    }
  },
});

/**
 * `node <bundle>`, with node:zlib's zstd taken away (an --import hook) when
 * this Node has it, so the path of a Node without zstd (Node 20) runs either way.
 */
async function nodeWithoutZstd(): Promise<string[]> {
  const probe = await runProgram("node", [
    "-e",
    "process.exit(require('node:zlib').zstdDecompressSync ? 0 : 1)",
  ]);
  if (probe.code !== 0) return ["node", await bundle()];
  const hook =
    'import zlib from "node:zlib"; import { syncBuiltinESMExports } from "node:module"; ' +
    "zlib.zstdCompressSync = undefined; zlib.zstdDecompressSync = undefined; syncBuiltinESMExports();";
  return ["node", "--import", `data:text/javascript,${encodeURIComponent(hook)}`, await bundle()];
}

Deno.test({
  name:
    "runNodeCli() without zstd in node:zlib prints one qimg: line for zstd clusters and zstd compression",
  ignore: !NODE,
  async fn() {
    await using dir = await tempDir();
    await sh(
      `
      qemu-img create -q -f qcow2 d.qcow2 4M
      qemu-io -f qcow2 -c 'write -P 0x22 0 192k' d.qcow2 >/dev/null
      qemu-img convert -c -O qcow2 -o compression_type=zstd d.qcow2 z.qcow2
      `,
      dir.path,
    );
    const node = await nodeWithoutZstd();
    // What needs no decoder works as qemu-img's.
    await assertSameAsQemu(["info", "--output=json", "z.qcow2"], dir.path, node);
    await assertSameAsQemu(["map", "--output=json", "z.qcow2"], dir.path, node);
    await assertSameAsQemu(["check", "z.qcow2"], dir.path, node);
    const plain = await qimg(
      ["convert", "-O", "qcow2", "-o", "compression_type=zstd", "d.qcow2", "p.qcow2"],
      dir.path,
      node,
    );
    assertEquals(plain, { stdout: "", stderr: "", code: 0 });
    // What needs zstd fails with one line and exit 1 (compare's error code is 2).
    const cases: [string[], number][] = [
      [["convert", "-O", "raw", "z.qcow2", "o.raw"], 1],
      [["convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", "d.qcow2", "c.qcow2"], 1],
      [["dd", "if=z.qcow2", "of=o2.raw", "bs=64k", "count=1"], 1],
      [["compare", "z.qcow2", "d.qcow2"], 2],
    ];
    for (const [args, code] of cases) {
      const r = await qimg(args, dir.path, node);
      assertEquals(r.code, code, `${args.join(" ")}: ${r.stderr}`);
      assertTrue(
        /^qimg: [^\n]*zstd[^\n]*\n$/.test(r.stderr),
        `${args.join(" ")} printed ${JSON.stringify(r.stderr)}`,
      );
    }
  },
});
