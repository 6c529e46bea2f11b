/**
 * The Worker side of compress_pool.ts: compresses each cluster it is sent
 * and sends the bytes back (transferred, not copied).
 */

import { compressClusterFast, type CompressReply, type CompressRequest } from "./compress_pool.ts";

const scope = globalThis as unknown as {
  onmessage: ((e: MessageEvent<CompressRequest>) => void) | null;
  postMessage(message: CompressReply, transfer?: Transferable[]): void;
};

scope.onmessage = (e: MessageEvent<CompressRequest>) => {
  const { id, codec, data } = e.data;
  try {
    let out = compressClusterFast(codec, data);
    // node:zlib may hand back a view of a larger pooled buffer: send just the bytes.
    if (out.byteOffset !== 0 || out.byteLength !== out.buffer.byteLength) out = out.slice();
    scope.postMessage({ id, data: out }, [out.buffer as ArrayBuffer]);
  } catch (err) {
    scope.postMessage({ id, error: err instanceof Error ? err.message : String(err) });
  }
};
