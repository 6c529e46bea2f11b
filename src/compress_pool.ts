/**
 * Cluster compression off the main thread: Web Workers (two on a machine
 * with two or more cores) compress qcow2 clusters while the copy engine
 * reads and writes. Results come back per request, so callers keep their
 * own order. Where Workers cannot start (Node, a runtime without them) the
 * same codec runs in-thread.
 *
 * Codec: node:zlib raw deflate with qemu's 4 KiB window and memLevel 9, at
 * level 9: Deno's zlib packs at 9 as qemu's zlib does at 6 (sizes within
 * bytes, often the same bytes; at 6 it is ~8% larger) and is ~2-8x faster
 * than pako. zstd is node:zlib's, with the content size.
 */

import { loadZlib, zlibSync } from "./zlib_loader.ts";
import { QimgError } from "./errors.ts";
import { WORKER_SOURCE } from "./compress_worker.ts";

/** qcow2's compression types. */
export type ClusterCodec = "zlib" | "zstd";

/**
 * Compresses one whole cluster with `codec`: raw deflate as qemu's
 * (windowBits -12, so qemu's inflate can read it) or a zstd frame.
 */
export function compressClusterFast(codec: ClusterCodec, data: Uint8Array): Uint8Array {
  if (codec === "zstd") {
    const zstd = (zlibSync() as unknown as {
      zstdCompressSync?: (b: Uint8Array, o: { pledgedSrcSize: number }) => Uint8Array;
    }).zstdCompressSync;
    if (!zstd) throw new QimgError("This runtime cannot compress zstd clusters");
    const out = zstd(data, { pledgedSrcSize: data.length });
    return new Uint8Array(out.buffer, out.byteOffset, out.length);
  }
  // Deno's node:zlib at level 9 packs as zlib does at qemu's level 6 (sizes
  // within bytes; at its level 6 ~8% larger) and runs ~5x faster than pako.
  const out = zlibSync().deflateRawSync(data, { windowBits: 12, memLevel: 9, level: 9 });
  return new Uint8Array(out.buffer, out.byteOffset, out.length);
}

/** A request sent to a worker. */
export interface CompressRequest {
  id: number;
  codec: ClusterCodec;
  data: Uint8Array;
}

/** A worker's answer: the compressed bytes, or the error's text. */
export interface CompressReply {
  id: number;
  data?: Uint8Array;
  error?: string;
}

interface Pending {
  resolve: (data: Uint8Array) => void;
  reject: (err: unknown) => void;
}

interface Slot {
  worker: Worker;
  busy: number;
}

/** How long idle workers live: they keep the process alive, so they go once compression stops. */
const IDLE_MS = 200;

/** Compresses clusters on Worker threads, falling back to the calling thread. */
export class CompressPool {
  readonly codec: ClusterCodec;
  readonly #size: number;
  #slots: Slot[] | undefined;
  /** Workers could not start: compress in-thread from now on. */
  #inThread = false;
  #nextId = 0;
  readonly #pending = new Map<number, Pending>();
  /** Each request's input, kept to rerun in-thread if its worker fails to load. */
  readonly #requests = new Map<number, Uint8Array>();
  #idle: ReturnType<typeof setTimeout> | undefined;
  #url: string | undefined;

  /**
   * @param codec the cluster codec
   * @param workers how many Workers: by default 2 for zlib with two or more cores, else 0
   *   (in-thread; zstd compresses a cluster in about what a Worker round trip costs)
   */
  constructor(codec: ClusterCodec, workers?: number) {
    this.codec = codec;
    const cores = (globalThis as { navigator?: { hardwareConcurrency?: number } }).navigator
      ?.hardwareConcurrency ?? 1;
    this.#size = Math.max(0, Math.floor(workers ?? (codec === "zlib" && cores >= 2 ? 2 : 0)));
    if (this.#size === 0) this.#inThread = true;
  }

  /** Whether compression runs on Worker threads (false until the first request). */
  get threaded(): boolean {
    return this.#slots !== undefined;
  }

  /** Compresses `data` (copied at once: the caller may reuse its buffer). */
  compress(data: Uint8Array): Promise<Uint8Array> {
    const slots = this.#inThread ? undefined : this.#start();
    if (!slots) return loadZlib().then(() => compressClusterFast(this.codec, data));
    if (this.#idle !== undefined) {
      clearTimeout(this.#idle);
      this.#idle = undefined;
    }
    let slot = slots[0];
    for (const s of slots) if (s.busy < slot.busy) slot = s;
    const id = this.#nextId++;
    const copy = data.slice();
    slot.busy++;
    return new Promise<Uint8Array>((resolve, reject) => {
      const done = () => {
        slot.busy--;
        this.#pending.delete(id);
        this.#requests.delete(id);
        if (this.#pending.size === 0) this.#scheduleIdle();
      };
      this.#pending.set(id, {
        resolve: (d) => (done(), resolve(d)),
        reject: (e) => (done(), reject(e)),
      });
      this.#requests.set(id, copy);
      // Cloned, not transferred: the copy stays here in case the worker fails.
      const request: CompressRequest = { id, codec: this.codec, data: copy };
      slot.worker.postMessage(request);
    });
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
    for (const p of [...this.#pending.values()]) p.reject(new QimgError("compression cancelled"));
    this.#pending.clear();
    this.#requests.clear();
  }

  #scheduleIdle(): void {
    if (this.#idle !== undefined || !this.#slots) return;
    this.#idle = setTimeout(() => {
      this.#idle = undefined;
      if (this.#pending.size === 0) this.close();
    }, IDLE_MS);
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
    if (r.error !== undefined) p.reject(new QimgError(r.error));
    else p.resolve(r.data!);
  }

  /** Workers failed to load: finish what they held in-thread and stay in-thread. */
  #broken(): void {
    this.#inThread = true;
    const slots = this.#slots;
    this.#slots = undefined;
    for (const s of slots ?? []) s.worker.terminate();
    if (this.#idle !== undefined) clearTimeout(this.#idle);
    this.#idle = undefined;
    for (const [id, p] of [...this.#pending]) {
      const data = this.#requests.get(id);
      if (!data) {
        p.reject(new QimgError("compression worker failed"));
        continue;
      }
      loadZlib().then(() => compressClusterFast(this.codec, data)).then(p.resolve, p.reject);
    }
    this.#requests.clear();
  }
}
