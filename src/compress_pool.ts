/**
 * Cluster compression off the main thread: Web Workers (two on a machine
 * with two or more cores) compress batches of qcow2 clusters while the copy
 * engine reads and writes. A batch (convert sends up to 1 MiB of clusters)
 * travels as one transferred buffer each way, so a round trip costs little
 * next to the codec, and zstd uses the Workers as zlib does. Results come
 * back per request, so callers keep their own order. Where Workers cannot
 * start (Node, a runtime without them) the same codec runs in-thread.
 *
 * Codec: node:zlib raw deflate with qemu's 4 KiB window and memLevel 9, at
 * level 9 (Deno's zlib at 9 packs as qemu's zlib does at 6, and runs as
 * fast as at 6), or a zstd frame with the content size at zstd's default
 * level 3, which is qemu's. Before deflating, a zstd level-1 pass (~10x
 * faster than deflate on random data) tells incompressible clusters: those
 * are written uncompressed as qemu would after deflating them in vain.
 *
 * Figures (1 GiB raw, 40% data as bench/bench.ts makeRaw: 5152 non-zero
 * 64 KiB clusters, half random; 2 cores shared with 7 other engineers, load
 * 10-13; medians of 3 runs alternating before/after/qemu-img; cpu = user +
 * sys of all threads; per thread from /proc/PID/task):
 *   codec alone, one thread: deflate level 9: random 2.3 s, text 1.4 s;
 *     level 1: random 1.0 s, text 0.3 s but +8% size; zstd level-1 probe
 *     ~0.2 s on random (it skips 2560 of 5152 clusters here, every one of
 *     them stored uncompressed by qemu-img too: same `map` output);
 *     zstd level 3: 0.5 s in all.
 *   zlib   before (a message per cluster): 16.7 s wall, 4.66 s cpu, 202 MiB
 *          after: 10.6 s wall, 2.67 s cpu (main 0.63, Workers 0.89 + 0.85,
 *            V8 GC 0.2), 193 MiB;   qemu-img: 7.2 s wall, 4.80 s cpu, 13 MiB
 *   zstd   before (in-thread):        2.7 s wall, 0.90 s cpu, 109 MiB
 *          after: 3.1 s wall, 1.14 s cpu (main 0.35, Workers 0.30 + 0.28),
 *            208 MiB;                  qemu-img: 1.1 s wall, 0.84 s cpu, 13 MiB
 *   4 GiB input: zlib 10.9 s cpu, 206 MiB (qemu-img 19.6 s cpu); zstd 4.0 s
 *     cpu, 218 MiB (qemu-img 4.0 s): memory does not grow with the image.
 * Then (4 GiB of the same input, zstd unless said; cpu = user + sys):
 * the Workers keep one codec context and reset it per cluster
 * (compress_worker.ts: node:zlib's one-shot calls built a context per
 * cluster, which cost more than zstd on a random cluster), and -c maps the
 * source's plain data instead of reading it into a buffer: main thread
 * 1.3-1.6 -> 0.9-1.2 s, Workers 1.0-1.1 -> 0.75-0.9 s each; medians of 3
 * alternating runs: cpu 4.98 -> 3.70 s (qemu-img 4.24), peak RSS 247 -> 146
 * MiB; zlib 1 GiB: cpu 2.77 -> 2.35 s (qemu-img 4.97), 195 -> 146 MiB.
 * Output bytes unchanged.
 * Wall times on that machine say little: any deno process (the in-thread
 * "before" too) got about a third of a core while qemu-img got 2/3 to a
 * whole one. On an idle 2-core machine the cpu split bounds the wall time
 * at about max(main, cpu / 2): zlib ~1.3 s (~0.3x qemu-img), zstd ~0.6 s
 * (~0.7x), plus start-up (each `new Worker` blocks the main thread while
 * its isolate starts).
 */

import { loadPako, loadZlib, pakoSync, zlibSync } from "./zlib_loader.ts";
import { QimgError } from "./errors.ts";
import { WORKER_SOURCE } from "./compress_worker.ts";

/**
 * qcow2's compression types, and vmdk's grains ("zlib-stream": a zlib
 * stream at zlib's default level, as the in-thread deflateSync; null, as
 * for zlib, for clusters that do not shrink, which the caller stores).
 */
export type ClusterCodec = "zlib" | "zstd" | "zlib-stream";

/** One batch's results: each cluster's compressed bytes, or null to write it uncompressed. */
export type BatchResult = (Uint8Array | null)[];

type ZstdSync = (b: Uint8Array, o?: object) => Uint8Array;

function zstdSync(): ZstdSync | undefined {
  return (zlibSync() as unknown as { zstdCompressSync?: ZstdSync }).zstdCompressSync;
}

/**
 * Compresses one whole cluster with `codec`: raw deflate as qemu's
 * (windowBits -12, so qemu's inflate can read it) or a zstd frame.
 */
export function compressClusterFast(codec: ClusterCodec, data: Uint8Array): Uint8Array {
  if (codec === "zlib-stream") {
    if (typeof zlibSync().deflateSync !== "function") return pakoSync().deflate(data);
    const out = zlibSync().deflateSync(data);
    return new Uint8Array(out.buffer, out.byteOffset, out.length);
  }
  if (codec === "zstd") {
    const zstd = zstdSync();
    if (!zstd) throw new QimgError("This runtime cannot compress zstd clusters");
    const out = zstd(data, { pledgedSrcSize: data.length });
    return new Uint8Array(out.buffer, out.byteOffset, out.length);
  }
  // No node:zlib (a browser): pako, at qemu's level (its bytes are zlib's).
  if (typeof zlibSync().deflateRawSync !== "function") {
    return pakoSync().deflateRaw(data, { windowBits: 12, memLevel: 9, level: 6 });
  }
  // Deno's node:zlib at level 9 packs as zlib does at qemu's level 6.
  const out = zlibSync().deflateRawSync(data, { windowBits: 12, memLevel: 9, level: 9 });
  return new Uint8Array(out.buffer, out.byteOffset, out.length);
}

/**
 * Whether a fast zstd pass finds `data` incompressible (saving under 1/256):
 * deflate would not shrink it either, so zlib clusters skip deflating it.
 */
export function incompressible(data: Uint8Array): boolean {
  const zstd = zstdSync();
  const level = zlibSync().constants?.ZSTD_c_compressionLevel;
  if (!zstd || level === undefined) return false;
  const cs = data.length;
  return zstd(data, { params: { [level]: 1 } }).length >= cs - (cs >> 8);
}

/**
 * Compresses the whole clusters of `data` (`cs` bytes each) in the calling
 * thread, as the Workers do: null for clusters to write uncompressed.
 */
export function compressBatchInThread(
  codec: ClusterCodec,
  data: Uint8Array,
  cs: number,
): BatchResult {
  const results: BatchResult = [];
  for (let pos = 0; pos < data.length; pos += cs) {
    const cluster = data.subarray(pos, pos + cs);
    const out = codec !== "zstd" && incompressible(cluster)
      ? null
      : compressClusterFast(codec, cluster);
    results.push(out && out.length <= cs - 1 ? out : null);
  }
  return results;
}

/** Loads what compressBatchInThread needs: node:zlib, and pako where it cannot deflate. */
export async function loadCodec(codec: ClusterCodec): Promise<void> {
  const zlib = await loadZlib();
  if (codec !== "zstd" && typeof zlib.deflateRawSync !== "function") await loadPako();
}

/** A request sent to a worker: the first `length` bytes of `data` are whole clusters of `cs` bytes (transferred). */
export interface CompressRequest {
  id: number;
  codec: ClusterCodec;
  cs: number;
  data: ArrayBuffer;
  length: number;
}

/** A worker's answer: the request's buffer holding the compressed clusters back to back, and their lengths (-1: uncompressed), or the error. */
export interface CompressReply {
  id: number;
  data?: ArrayBuffer;
  lens?: number[];
  error?: string;
}

interface Pending {
  resolve: (r: BatchResult) => void;
  reject: (err: unknown) => void;
  /** The caller's input, to rerun in-thread if its worker fails to load. */
  data: Uint8Array;
  cs: number;
}

interface Slot {
  worker: Worker;
  /** Bytes queued on this worker. */
  busy: number;
}

/** Batch buffers kept for reuse: garbage ArrayBuffers would pile up (RSS) until V8 collects. */
const FREE_BUFFERS = 24;

/**
 * How long idle workers live by default: they keep the process alive, so
 * they go once compression stops (convert closes the pool at its end; a
 * short timeout restarted them whenever a loaded machine stalled the copy).
 */
const IDLE_MS = 2000;

/** Compresses batches of clusters on Worker threads, falling back to the calling thread. */
export class CompressPool {
  readonly codec: ClusterCodec;
  readonly #size: number;
  #slots: Slot[] | undefined;
  /** Workers could not start: compress in-thread from now on. */
  #inThread = false;
  #nextId = 0;
  readonly #pending = new Map<number, Pending>();
  #idle: ReturnType<typeof setTimeout> | undefined;
  #url: string | undefined;
  readonly #idleMs: number;
  /** Batch buffers back from the Workers, free for the next batches. */
  #free: ArrayBuffer[] = [];
  /** The buffer under each batch's results, for recycle(). */
  readonly #buffers = new WeakMap<BatchResult, ArrayBuffer>();

  /**
   * @param codec the cluster codec
   * @param workers how many Workers: by default 2 with two or more cores, else 0 (in-thread)
   * @param idleMs how long Workers without work live
   */
  constructor(codec: ClusterCodec, workers?: number, idleMs = IDLE_MS) {
    this.codec = codec;
    this.#idleMs = idleMs;
    const cores = (globalThis as { navigator?: { hardwareConcurrency?: number } }).navigator
      ?.hardwareConcurrency ?? 1;
    this.#size = Math.max(0, Math.floor(workers ?? (cores >= 2 ? 2 : 0)));
    if (this.#size === 0) this.#inThread = true;
  }

  /** Whether compression runs on Worker threads (false until the first request). */
  get threaded(): boolean {
    return this.#slots !== undefined;
  }

  /**
   * Compresses the whole clusters of `data` (`cs` bytes each). The pool
   * sends a copy; `data` must stay unchanged until the promise settles
   * (a worker that fails to load has its batches rerun in-thread from it).
   */
  compressBatch(data: Uint8Array, cs: number): Promise<BatchResult> {
    if (data.length % cs) throw new QimgError("compressBatch: not whole clusters");
    const slots = this.#inThread ? undefined : this.#start();
    if (!slots) {
      return loadCodec(this.codec).then(() => compressBatchInThread(this.codec, data, cs));
    }
    if (this.#idle !== undefined) {
      clearTimeout(this.#idle);
      this.#idle = undefined;
    }
    let slot = slots[0];
    for (const s of slots) if (s.busy < slot.busy) slot = s;
    const id = this.#nextId++;
    const copy = this.#buffer(data.length);
    copy.set(data);
    slot.busy += data.length;
    return new Promise<BatchResult>((resolve, reject) => {
      const done = () => {
        slot.busy -= data.length;
        this.#pending.delete(id);
        if (this.#pending.size === 0) this.#scheduleIdle();
      };
      this.#pending.set(id, {
        resolve: (r) => (done(), resolve(r)),
        reject: (e) => (done(), reject(e)),
        data,
        cs,
      });
      const request: CompressRequest = {
        id,
        codec: this.codec,
        cs,
        data: copy.buffer,
        length: data.length,
      };
      slot.worker.postMessage(request, [copy.buffer]);
    });
  }

  /**
   * Gives back the buffer under a batch's results once the caller is done
   * with them (written out): the pool sends the next batch in it.
   */
  recycle(results: BatchResult): void {
    const b = this.#buffers.get(results);
    this.#buffers.delete(results);
    if (b && b.byteLength && this.#free.length < FREE_BUFFERS) this.#free.push(b);
  }

  /**
   * A buffer for a batch of `length` bytes: batches vary in length (runs of
   * non-zero clusters), so buffers come in powers of two, and one of the
   * same size is reused (a fresh one costs page faults and zeroing).
   */
  #buffer(length: number): Uint8Array<ArrayBuffer> {
    const size = 2 ** Math.ceil(Math.log2(Math.max(length, 4096)));
    const free = this.#free;
    for (let i = free.length - 1; i >= 0; i--) {
      if (free[i].byteLength !== size) continue;
      const b = free[i];
      free[i] = free[free.length - 1];
      free.pop();
      return new Uint8Array(b, 0, length);
    }
    // The pool is full of other sizes: the oldest goes.
    if (free.length >= FREE_BUFFERS) free.shift();
    return new Uint8Array(new ArrayBuffer(size), 0, length);
  }

  /** Terminates the workers (pending requests fail); later requests start new ones. */
  close(): void {
    if (this.#idle !== undefined) clearTimeout(this.#idle);
    this.#idle = undefined;
    const slots = this.#slots;
    this.#slots = undefined;
    for (const s of slots ?? []) s.worker.terminate();
    if (this.#url) URL.revokeObjectURL(this.#url);
    this.#url = undefined;
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of pending) p.reject(new QimgError("compression cancelled"));
  }

  #scheduleIdle(): void {
    if (this.#idle !== undefined || !this.#slots) return;
    this.#idle = setTimeout(() => {
      this.#idle = undefined;
      if (this.#pending.size === 0) this.close();
    }, this.#idleMs);
  }

  #start(): Slot[] | undefined {
    if (this.#slots) return this.#slots;
    const slots: Slot[] = [];
    try {
      if (typeof Worker !== "function") throw new Error("no Workers");
      // A blob: URL needs no read permission for a module file and survives bundling.
      this.#url ??= URL.createObjectURL(new Blob([WORKER_SOURCE], { type: "text/javascript" }));
      const url = this.#url;
      for (let i = 0; i < this.#size; i++) {
        const worker = new Worker(url, { type: "module" });
        const slot = { worker, busy: 0 };
        worker.onmessage = (e: MessageEvent<CompressReply>) => this.#reply(e.data);
        // A worker that cannot start fails its requests; those rerun in-thread.
        worker.onerror = (e: Event) => {
          e.preventDefault();
          this.#broken();
        };
        slots.push(slot);
      }
    } catch {
      for (const s of slots) s.worker.terminate();
      this.#inThread = true;
      return undefined;
    }
    this.#slots = slots;
    return slots;
  }

  #reply(r: CompressReply): void {
    const p = this.#pending.get(r.id);
    if (!p) return;
    if (r.error !== undefined) return p.reject(new QimgError(r.error));
    const out = new Uint8Array(r.data!);
    const results: BatchResult = [];
    this.#buffers.set(results, r.data!);
    let pos = 0;
    for (const len of r.lens!) {
      if (len < 0) results.push(null);
      else {
        results.push(out.subarray(pos, pos + len));
        pos += len;
      }
    }
    p.resolve(results);
  }

  /** Workers failed to load: finish what they held in-thread and stay in-thread. */
  #broken(): void {
    this.#inThread = true;
    const slots = this.#slots;
    this.#slots = undefined;
    for (const s of slots ?? []) s.worker.terminate();
    if (this.#idle !== undefined) clearTimeout(this.#idle);
    this.#idle = undefined;
    for (const p of [...this.#pending.values()]) {
      loadCodec(this.codec).then(() => compressBatchInThread(this.codec, p.data, p.cs)).then(
        p.resolve,
        p.reject,
      );
    }
  }
}
