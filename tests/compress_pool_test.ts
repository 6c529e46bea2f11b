import pako from "pako";
import { assert, assertEquals } from "./_assert.ts";
import { compressBatchInThread, compressClusterFast, CompressPool } from "../src/compress_pool.ts";
import { zstdDecompressCluster } from "../src/codec.ts";
import { WORKER_SOURCE } from "../src/compress_worker.ts";
import { qimg, runProgram, sh, tempDir } from "./_util.ts";
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

/** `n` clusters: text, random and all-zero ones in turn, each distinct. */
function batch(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n * 65536);
  for (let i = 0; i < n; i++) {
    if (i % 3 === 0) b.set(cluster(seed * 100 + i), i * 65536);
    else if (i % 3 === 1) {
      let x = (seed * 7919 + i) * 2654435761 >>> 0 || 1;
      for (let j = i * 65536; j < (i + 1) * 65536; j++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        b[j] = x;
      }
    }
  }
  return b;
}

Deno.test("compressBatchInThread marks random clusters uncompressed and compresses the rest", () => {
  const b = batch(6, 1);
  const r = compressBatchInThread("zlib", b, 65536);
  assertEquals(r.map((c) => c === null), [false, true, false, false, true, false]);
  for (const i of [0, 2, 3, 5]) {
    assertEquals(
      pako.inflateRaw(r[i]!, { windowBits: 12 }),
      b.subarray(i * 65536, (i + 1) * 65536),
    );
  }
  const z = compressBatchInThread("zstd", b, 65536);
  assertEquals(z.map((c) => c === null), [false, true, false, false, true, false]);
  assertEquals(zstdDecompressCluster(z[3]!, 65536), b.subarray(3 * 65536, 4 * 65536));
});

Deno.test("CompressPool with Workers answers each batch with its own clusters' bytes, then closes", async () => {
  for (const codec of ["zlib", "zstd", "zlib-stream"] as const) {
    const pool = new CompressPool(codec, 2);
    const inputs = Array.from({ length: 10 }, (_, i) => batch(5 + (i % 3), i));
    const outs = await Promise.all(inputs.map((d) => pool.compressBatch(d, 65536)));
    assert(pool.threaded);
    for (let i = 0; i < inputs.length; i++) {
      assertEquals(outs[i], compressBatchInThread(codec, inputs[i], 65536));
    }
    pool.close();
  }
});

Deno.test("CompressPool reuses a batch's buffer for a shorter batch and compresses only its clusters", async () => {
  for (const codec of ["zlib", "zstd", "zlib-stream"] as const) {
    const pool = new CompressPool(codec, 1);
    const long = batch(7, 11);
    const first = await pool.compressBatch(long, 65536);
    assertEquals(first, compressBatchInThread(codec, long, 65536));
    pool.recycle(first);
    // 5 clusters go in the 7 clusters' (512 KiB) buffer, its tail still holding the last batch.
    const short = batch(5, 12);
    assertEquals(
      await pool.compressBatch(short, 65536),
      compressBatchInThread(codec, short, 65536),
    );
    pool.close();
  }
});

Deno.test("WORKER_SOURCE keeps one reset codec context per codec and cluster size on this Deno", async () => {
  // The one-shot node:zlib calls are the fallback: they cost 4x on random clusters.
  const src = WORKER_SOURCE + `
self.onmessage = () => {
  const fast = [];
  for (const codec of ["zstd", "zlib", "zlib-stream", "probe"]) {
    for (const cs of [512, 65536, 2097152]) {
      if (codecFor(codec, cs).toString().includes("writeSync")) fast.push(codec + "/" + cs);
    }
  }
  self.postMessage(fast);
};`;
  const url = URL.createObjectURL(new Blob([src], { type: "text/javascript" }));
  const worker = new Worker(url, { type: "module" });
  const fast = await new Promise((resolve) => {
    worker.onmessage = (e) => resolve(e.data);
    worker.postMessage(0);
  });
  worker.terminate();
  URL.revokeObjectURL(url);
  assertEquals(
    fast,
    ["zstd", "zlib", "zlib-stream", "probe"].flatMap((c) =>
      [512, 65536, 2097152].map((cs) => `${c}/${cs}`)
    ),
  );
});

Deno.test("CompressPool with no Workers compresses in-thread", async () => {
  const pool = new CompressPool("zstd", 0);
  const d = batch(3, 5);
  assertEquals(await pool.compressBatch(d, 65536), compressBatchInThread("zstd", d, 65536));
  assert(!pool.threaded);
  pool.close();
});

Deno.test("CompressPool idle Workers terminate by themselves", async () => {
  const pool = new CompressPool("zlib", 1, 200);
  await pool.compressBatch(cluster(3), 65536);
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

/**
 * 20 MiB of 4 KiB blocks that each name their own offset (text), with
 * random, zero and unallocated stretches: any cluster written to the wrong
 * place, or another cluster's bytes, shows in qemu-img compare.
 */
function distinctInput(): Uint8Array {
  const size = 20 * 1048576;
  const b = new Uint8Array(size);
  const enc = new TextEncoder();
  let x = 12345;
  for (let off = 0; off < size; off += 4096) {
    const kind = Math.floor(off / 196608) % 5; // 192 KiB stretches, not cluster-aligned
    if (kind === 0 || kind === 2) {
      b.set(enc.encode(`block at ${off} of kind ${kind}\n`.repeat(200)).subarray(0, 4096), off);
    } else if (kind === 1) {
      for (let i = off; i < off + 4096; i++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        b[i] = x;
      }
    }
  }
  return b;
}

Deno.test("convert -c with several Workers writes every cluster in place (zlib, zstd; 4 KiB, 64 KiB, 2 MiB clusters)", async () => {
  await using dir = await tempDir();
  await Deno.writeFile(`${dir.path}/in.raw`, distinctInput());
  // Holes as well as written zeroes.
  await sh("fallocate -p -o 2M -l 3M in.raw && truncate -s 21M in.raw", dir.path);
  const cli = new URL("../cli.ts", import.meta.url).pathname;
  for (const codec of ["zlib", "zstd"]) {
    for (const cs of ["4k", "64k", "2M"]) {
      const o = `-o compression_type=${codec},cluster_size=${cs}`;
      const r = await runProgram(Deno.execPath(), [
        "run",
        "-A",
        cli,
        ...["convert", "-c", "-O", "qcow2", "-o", `compression_type=${codec},cluster_size=${cs}`],
        ...["in.raw", "o.qcow2"],
      ], dir.path);
      assertEquals(r, { stdout: "", stderr: "", code: 0 });
      await sh(`qemu-img convert -c -O qcow2 ${o} in.raw q.qcow2`, dir.path);
      await sh("qemu-img check -q o.qcow2 && qemu-img compare -q in.raw o.qcow2", dir.path);
      const q = (await Deno.stat(`${dir.path}/q.qcow2`)).size;
      const s = (await Deno.stat(`${dir.path}/o.qcow2`)).size;
      assert(Math.abs(s - q) <= q * 0.02, `${codec} ${cs}: size ${s} against qemu-img's ${q}`);
      await sh("rm o.qcow2 q.qcow2", dir.path);
    }
  }
});

Deno.test("convert -c from a qcow2 with smaller clusters reads a cluster past a short data run, not the host bytes after it", async () => {
  await using dir = await tempDir();
  // Guest cluster 0 (4 KiB) lies in the host file just before guest 60k's:
  // a 64 KiB target cluster at 0 must not take the host bytes that follow.
  await sh(
    "qemu-img create -q -f qcow2 -o cluster_size=4k s.qcow2 1M && " +
      "qemu-io -c 'write -P 0x22 0 4k' -c 'write -P 0x11 60k 4k' -c 'write -P 0x33 200k 128k' s.qcow2",
    dir.path,
  );
  for (const codec of ["zlib", "zstd"]) {
    const r = await qimg(
      ["convert", "-c", "-O", "qcow2", "-o", `compression_type=${codec}`, "s.qcow2", "o.qcow2"],
      dir.path,
    );
    assertEquals(r, { stdout: "", stderr: "", code: 0 });
    await sh("qemu-img check -q o.qcow2 && qemu-img compare -q s.qcow2 o.qcow2", dir.path);
    await sh("rm o.qcow2", dir.path);
  }
});
