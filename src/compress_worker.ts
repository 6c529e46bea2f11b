/**
 * The Worker side of compress_pool.ts, as JavaScript source: the pool
 * starts it from a blob: URL, so it needs no read permission for a module
 * file and survives bundling. It runs compressBatchInThread's codec (kept
 * in step by tests/compress_pool_test.ts) on a batch of clusters and
 * transfers one buffer of results back.
 *
 * Message in: { id, codec, cs, data } with `data` an ArrayBuffer of whole
 * clusters (transferred). Message out: { id, data, lens }: the same buffer
 * (transferred back, for the pool to reuse) now holds the compressed
 * clusters back to back from its start, and `lens[i]` is cluster i's length,
 * or -1 when it is to be written uncompressed (it does not shrink below
 * cs - 1 bytes, as qemu's rule; or, for zlib, a fast zstd probe finds it
 * incompressible, which saves deflating random data for nothing).
 */

/** The worker module's source. */
export const WORKER_SOURCE = `
import * as zlib from "node:zlib";
const PROBE = zlib.zstdCompressSync && zlib.constants.ZSTD_c_compressionLevel !== undefined
  ? { params: { [zlib.constants.ZSTD_c_compressionLevel]: 1 } } : undefined;
function compress(codec, data) {
  const cs = data.length;
  if (codec === "zstd") return zlib.zstdCompressSync(data, { pledgedSrcSize: cs });
  if (PROBE && zlib.zstdCompressSync(data, PROBE).length >= cs - (cs >> 8)) return undefined;
  if (codec === "zlib-stream") return zlib.deflateSync(data);
  return zlib.deflateRawSync(data, { windowBits: 12, memLevel: 9, level: 9 });
}
self.onmessage = (e) => {
  const { id, codec, cs, data } = e.data;
  try {
    const all = new Uint8Array(data);
    const count = all.length / cs;
    const lens = [];
    // Each result goes back into the batch's own buffer, packed: cluster i's
    // output starts at or before i * cs (every output is shorter than a
    // cluster), so it never overwrites a cluster not yet compressed.
    let pos = 0;
    for (let i = 0; i < count; i++) {
      const out = compress(codec, all.subarray(i * cs, (i + 1) * cs));
      if (!out || out.length > cs - 1) {
        lens.push(-1);
        continue;
      }
      lens.push(out.length);
      all.set(out, pos);
      pos += out.length;
    }
    self.postMessage({ id, data, lens }, [data]);
  } catch (err) {
    self.postMessage({ id, error: err instanceof Error ? err.message : String(err) });
  }
};
`;
