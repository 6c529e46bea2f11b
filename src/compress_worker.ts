/**
 * The Worker side of compress_pool.ts, as JavaScript source: the pool
 * starts it from a blob: URL, so it needs no read permission for a module
 * file and survives bundling. It runs compressClusterFast's codec (kept in
 * step by tests/compress_pool_test.ts) and transfers the bytes back.
 */

/** The worker module's source. */
export const WORKER_SOURCE = `
import * as zlib from "node:zlib";
function compress(codec, data) {
  if (codec === "zstd") return zlib.zstdCompressSync(data, { pledgedSrcSize: data.length });
  return zlib.deflateRawSync(data, { windowBits: 12, memLevel: 9, level: 9 });
}
self.onmessage = (e) => {
  const { id, codec, data } = e.data;
  try {
    let out = compress(codec, data);
    // node:zlib may return a view of a larger pooled buffer: send just the bytes.
    out = out.byteOffset === 0 && out.byteLength === out.buffer.byteLength
      ? new Uint8Array(out.buffer)
      : new Uint8Array(out);
    self.postMessage({ id, data: out }, [out.buffer]);
  } catch (err) {
    self.postMessage({ id, error: err instanceof Error ? err.message : String(err) });
  }
};
`;
