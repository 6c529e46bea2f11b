/**
 * The Worker side of compress_pool.ts, as JavaScript source: the pool
 * starts it from a blob: URL, so it needs no read permission for a module
 * file and survives bundling. It runs compressBatchInThread's codec (the
 * same bytes: checked here at start-up, and by tests/compress_pool_test.ts)
 * on a batch of clusters and transfers one buffer of results back.
 *
 * Message in: { id, codec, cs, data, length } with `data` an ArrayBuffer
 * whose first `length` bytes are whole clusters (transferred). Message out:
 * { id, data, lens }: the same buffer (transferred back, for the pool to
 * reuse) now holds the compressed clusters back to back from its start, and
 * `lens[i]` is cluster i's length, or -1 when it is to be written
 * uncompressed (it does not shrink below cs - 1 bytes, as qemu's rule; or,
 * for zlib, a fast zstd probe finds it incompressible, which saves
 * deflating random data for nothing).
 *
 * node:zlib's one-shot calls (zstdCompressSync, deflateRawSync) build a
 * stream and a codec context per call, which costs more than compressing a
 * random cluster: the Worker keeps one context per codec and resets it
 * after each cluster, driving node:zlib's handle as its sync calls do.
 * Measured per 64 KiB cluster (cpu): zstd text 106 -> 95 us, random 55-106
 * -> 27 us; the level-1 probe on random 88-99 -> 17 us. Where the handle is
 * not as expected (another runtime) or its bytes differ from the one-shot
 * call's on a sample cluster, the Worker uses the one-shot calls.
 */

/** The worker module's source. */
export const WORKER_SOURCE = `
import * as zlib from "node:zlib";
const C = zlib.constants;
const LEVEL = C.ZSTD_c_compressionLevel;
const PROBE = zlib.zstdCompressSync && LEVEL !== undefined ? { params: { [LEVEL]: 1 } } : undefined;

// The one-shot calls, as compressBatchInThread's. Each codec writes its
// output into out and returns its length, or -1 where out cannot hold it.
function oneShot(codec, cs) {
  const copy = (r, out) => r.length > out.length ? -1 : (out.set(r), r.length);
  if (codec === "zstd") return (d, out) => copy(zlib.zstdCompressSync(d, { pledgedSrcSize: cs }), out);
  if (codec === "probe") return (d, out) => copy(zlib.zstdCompressSync(d, PROBE), out);
  if (codec === "zlib-stream") return (d, out) => copy(zlib.deflateSync(d), out);
  return (d, out) => copy(zlib.deflateRawSync(d, { windowBits: 12, memLevel: 9, level: 9 }), out);
}

// The same codec on one context, reset after each cluster. The output is
// whole when the codec took all the input and left room in out.
function reused(codec, cs) {
  let engine;
  let flush = C.Z_FINISH;
  let renew = (h) => h.reset();
  if (codec === "zstd") {
    engine = zlib.createZstdCompress({ pledgedSrcSize: cs });
    flush = C.ZSTD_e_end;
    // A reset forgets the pledged size (the frame's content size, which
    // qemu's frames carry too); init sets it again and no parameter.
    const params = new Uint32Array(1024).fill(0xffffffff);
    renew = (h) => (h.reset(), h.init(params, () => {}, cs));
  } else if (codec === "probe") {
    engine = zlib.createZstdCompress(PROBE);
    flush = C.ZSTD_e_end;
  } else {
    engine = codec === "zlib-stream"
      ? zlib.createDeflate()
      : zlib.createDeflateRaw({ windowBits: 12, memLevel: 9, level: 9 });
  }
  const h = engine._handle;
  const state = engine._writeState;
  if (!h || typeof h.writeSync !== "function" || !state) return undefined;
  return (d, out) => {
    h.writeSync(flush, d, 0, d.length, out, 0, out.length);
    const availOut = state[0];
    const availIn = state[1];
    renew(h);
    return availIn === 0 && availOut > 0 ? out.length - availOut : -1;
  };
}

function noise(b, from, to, seed) {
  let x = seed;
  for (let i = from; i < to; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x >>> 24;
  }
  return b;
}

// A cluster of text-like bytes with a stretch of noise and of zeroes.
function sample(cs) {
  const b = new Uint8Array(cs);
  const line = new TextEncoder().encode("a sample line, 0123456789, of a cluster;");
  for (let i = 0; i < cs; i++) b[i] = line[i % line.length] ^ ((i >> 9) & 7);
  noise(b, cs >> 2, (cs >> 2) + (cs >> 3), 2463534242);
  return b.fill(0, cs - (cs >> 3));
}

// Whether fast gives the one-shot call's bytes (the probe: its verdict).
function same(codec, cs, slow, fast) {
  for (const input of [sample(cs), noise(new Uint8Array(cs), 0, cs, 88675123), sample(cs)]) {
    const a = new Uint8Array(2 * cs + 1024);
    const b = new Uint8Array(codec === "probe" ? cs - (cs >> 8) : cs);
    const n = slow(input, a);
    const m = fast(input, b);
    if (codec === "probe") {
      if ((n >= 0 && n < b.length) !== m >= 0) return false;
    } else if (n < 0 || n > cs - 1) {
      if (m >= 0) return false;
    } else if (n !== m || a.subarray(0, n).some((v, i) => v !== b[i])) return false;
  }
  return true;
}

const codecs = new Map();
function codecFor(codec, cs) {
  const key = codec + "/" + cs;
  let c = codecs.get(key);
  if (c) return c;
  c = oneShot(codec, cs);
  try {
    const fast = reused(codec, cs);
    if (fast && same(codec, cs, c, fast)) c = fast;
  } catch {
    // This runtime's node:zlib differs inside: the one-shot calls.
  }
  codecs.set(key, c);
  return c;
}

let out = new Uint8Array(0);
let probeOut = new Uint8Array(0);

// Cluster d's compressed length in out, or -1 to store it uncompressed.
function compress(codec, d) {
  const cs = d.length;
  if (out.length !== cs) {
    out = new Uint8Array(cs);
    probeOut = new Uint8Array(cs - (cs >> 8));
  }
  if (codec !== "zstd" && PROBE && codecFor("probe", cs)(d, probeOut) < 0) return -1;
  const n = codecFor(codec, cs)(d, out);
  return n > cs - 1 ? -1 : n;
}

self.onmessage = (e) => {
  const { id, codec, cs, data, length } = e.data;
  try {
    const all = new Uint8Array(data, 0, length);
    const count = all.length / cs;
    const lens = [];
    // Each result goes back into the batch's own buffer, packed: cluster i's
    // output starts at or before i * cs (every output is shorter than a
    // cluster), so it never overwrites a cluster not yet compressed.
    let pos = 0;
    for (let i = 0; i < count; i++) {
      const n = compress(codec, all.subarray(i * cs, (i + 1) * cs));
      lens.push(n);
      if (n < 0) continue;
      all.set(out.subarray(0, n), pos);
      pos += n;
    }
    self.postMessage({ id, data, lens }, [data]);
  } catch (err) {
    self.postMessage({ id, error: err instanceof Error ? err.message : String(err) });
  }
};
`;
