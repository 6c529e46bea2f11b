import pako from "pako";
import { assert, assertEquals } from "./_assert.ts";
import { compressClusterFast, CompressPool } from "../src/compress_pool.ts";
import { zstdDecompressCluster } from "../src/codec.ts";
import { runProgram, sh, tempDir } from "./_util.ts";
import { loadPako, loadZlib } from "../src/zlib_loader.ts";

// The codecs load node:zlib and pako lazily; the synchronous ones tested here need them loaded.
await Promise.all([loadZlib(), loadPako()]);

function cluster(seed: number): Uint8Array {
  const b = new Uint8Array(65536);
  const text = new TextEncoder().encode(`cluster ${seed} text that repeats\n`.repeat(3000));
  b.set(text.subarray(0, 32768));
  let x = seed * 2654435761 >>> 0;
  for (let i = 32768; i < 40000; i++) b[i] = (x = (x * 1103515245 + 12345) >>> 0) >>> 24;
  return b;
}

Deno.test("compressClusterFast zlib gives raw deflate qemu's 4 KiB window inflates", () => {
  const d = cluster(1);
  const out = compressClusterFast("zlib", d);
  assert(out.length < d.length / 2);
  assertEquals(pako.inflateRaw(out, { windowBits: 12 }), d);
});

Deno.test("compressClusterFast zstd gives a frame that decodes to the cluster", () => {
  const d = cluster(2);
  assertEquals(zstdDecompressCluster(compressClusterFast("zstd", d), d.length), d);
});

Deno.test("CompressPool with Workers answers each request with its own bytes, then closes", async () => {
  const pool = new CompressPool("zlib", 2);
  const inputs = Array.from({ length: 12 }, (_, i) => cluster(i));
  const buf = inputs[0].slice();
  const pending = inputs.map((d) => {
    buf.set(d);
    return pool.compress(buf); // the pool copies: the buffer may be reused at once
  });
  const outs = await Promise.all(pending);
  assert(pool.threaded);
  for (let i = 0; i < inputs.length; i++) {
    assertEquals(outs[i], compressClusterFast("zlib", inputs[i]));
  }
  pool.close();
});

Deno.test("CompressPool with no Workers compresses in-thread", async () => {
  const pool = new CompressPool("zstd", 0);
  const d = cluster(5);
  assertEquals(await pool.compress(d), compressClusterFast("zstd", d));
  assert(!pool.threaded);
  pool.close();
});

Deno.test("CompressPool idle Workers terminate by themselves", async () => {
  const pool = new CompressPool("zlib", 1);
  await pool.compress(cluster(3));
  assert(pool.threaded);
  await new Promise((r) => setTimeout(r, 400));
  assert(!pool.threaded);
});

Deno.test("convert -c with read/write only on the images compresses on Workers, quietly, as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "seq 1 300000 > t.raw && head -c 1M /dev/urandom >> t.raw && truncate -s 4M t.raw",
    dir.path,
  );
  const cli = new URL("../cli.ts", import.meta.url).pathname;
  const r = await runProgram(Deno.execPath(), [
    "run",
    "--no-prompt",
    `--allow-read=${dir.path}`,
    `--allow-write=${dir.path}`,
    cli,
    ...["convert", "-c", "-O", "qcow2", "t.raw", "o.qcow2"],
  ], dir.path);
  assertEquals(r, { stdout: "", stderr: "", code: 0 });
  await sh("qemu-img convert -c -O qcow2 t.raw q.qcow2", dir.path);
  await sh("qemu-img check o.qcow2 && qemu-img compare t.raw o.qcow2", dir.path);
  const q = (await Deno.stat(`${dir.path}/q.qcow2`)).size;
  const o = (await Deno.stat(`${dir.path}/o.qcow2`)).size;
  assert(Math.abs(o - q) <= q * 0.02, `size ${o} against qemu-img's ${q}`);
});
