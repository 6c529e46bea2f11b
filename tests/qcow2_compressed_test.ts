import * as zlib from "node:zlib";
import {
  decompressCluster,
  inflateRawCluster,
  inflateRawClusterPako,
  zstdDecompressCluster,
  zstdFrameLength,
} from "../src/codec.ts";
import { assertEquals, assertRejects, assertTrue } from "./_assert.ts";
import { loadPako, loadZlib } from "../src/zlib_loader.ts";

// The codecs load node:zlib and pako lazily; the synchronous ones tested here need them loaded.
await Promise.all([loadZlib(), loadPako()]);

function sample(n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + (i >> 9)) & 0xff;
  return b;
}

function padded(b: Uint8Array, extra: number, fill = 0): Uint8Array {
  const out = new Uint8Array(b.length + extra).fill(fill);
  out.set(b);
  return out;
}

Deno.test("inflateRawCluster() ignores the sector padding after the deflate stream", () => {
  const data = sample(65536);
  const c = zlib.deflateRawSync(data, { windowBits: 12 });
  assertEquals(inflateRawCluster(padded(c, 300, 0x55), 65536), data);
});

Deno.test("inflateRawCluster() fails with EIO on a stream shorter than a cluster", () => {
  const c = zlib.deflateRawSync(sample(4096));
  let message = "";
  try {
    inflateRawCluster(c, 65536);
  } catch (e) {
    message = (e as Error).message;
  }
  assertEquals(message, "Input/output error");
  let message2 = "";
  try {
    inflateRawCluster(new Uint8Array([0xff, 0xff, 0xff]), 512);
  } catch (e) {
    message2 = (e as Error).message;
  }
  assertEquals(message2, "Input/output error");
});

Deno.test("inflateRawCluster() keeps the first cluster of a stream that holds more", () => {
  const data = sample(1 << 20);
  const c = zlib.deflateRawSync(data);
  assertEquals(inflateRawCluster(c, 65536), data.subarray(0, 65536));
});

Deno.test("zstdFrameLength() measures a frame and refuses a truncated one", () => {
  const c = zlib.zstdCompressSync(sample(65536));
  assertEquals(zstdFrameLength(padded(c, 100)), c.length);
  assertEquals(zstdFrameLength(c.subarray(0, c.length - 1)), -1);
  assertEquals(zstdFrameLength(new Uint8Array(16)), -1);
});

Deno.test("zstdDecompressCluster() decodes one frame padded to sectors, or several frames", () => {
  const data = sample(65536);
  const one = zlib.zstdCompressSync(data);
  assertEquals(zstdDecompressCluster(padded(one, 511), 65536), data);
  const a = zlib.zstdCompressSync(data.subarray(0, 1000));
  const b = zlib.zstdCompressSync(data.subarray(1000));
  const two = new Uint8Array(a.length + b.length + 7);
  two.set(a);
  two.set(b, a.length);
  assertEquals(zstdDecompressCluster(two, 65536), data);
});

Deno.test("decompressCluster() rejects a zstd cluster that decodes short", async () => {
  const c = zlib.zstdCompressSync(sample(1000));
  await assertRejects(
    () => decompressCluster("zstd", padded(c, 512), 65536),
    /Input\/output error/,
  );
});

Deno.test("decompressCluster() decodes 64 KiB clusters at a usable speed", async () => {
  const data = sample(65536);
  const z = zlib.deflateRawSync(data, { windowBits: 12 });
  const s = zlib.zstdCompressSync(data);
  const n = 200;
  let t = performance.now();
  for (let i = 0; i < n; i++) await decompressCluster("zlib", z, 65536);
  const zlibMs = performance.now() - t;
  t = performance.now();
  for (let i = 0; i < n; i++) await decompressCluster("zstd", s, 65536);
  const zstdMs = performance.now() - t;
  // 200 clusters = 12.5 MiB; well under a second each on any machine we run on.
  assertTrue(zlibMs < 2000 && zstdMs < 2000, `zlib ${zlibMs} ms, zstd ${zstdMs} ms`);
});

Deno.test("inflateRawClusterPako() follows the node:zlib path: padding ignored, short streams EIO", async () => {
  const data = sample(65536);
  const c = zlib.deflateRawSync(data, { windowBits: 12 });
  assertEquals(await inflateRawClusterPako(padded(c, 300, 0x55), 65536), data);
  assertEquals(
    await inflateRawClusterPako(zlib.deflateRawSync(sample(1 << 20)), 65536),
    sample(1 << 20).subarray(0, 65536),
  );
  await assertRejects(
    () => inflateRawClusterPako(zlib.deflateRawSync(sample(4096)), 65536),
    /Input\/output error/,
  );
});
