/**
 * What the fuzz tests share: sparse in-memory files, an Io over them that
 * captures what a command prints, a seeded PRNG, running one command
 * in-process within a time bound, and what a clean outcome looks like.
 */

import { main } from "../src/command.ts";
import type { Io } from "../src/command.ts";
import type { BlockFile, HostExtent, OpenFileOptions } from "../src/file.ts";
import { QimgError } from "../src/errors.ts";
import { reportError } from "../src/report.ts";

const CHUNK = 64 * 1024;

/** The bytes of one in-memory file, in 64 KiB chunks (absent chunks read as zeroes). */
export interface MemStore {
  size: number;
  chunks: Map<number, Uint8Array>;
}

/** A sparse in-memory file: fuzz cases never touch the disk. */
export class MemFile implements BlockFile {
  readonly name: string;
  readonly writable: boolean;
  #store: MemStore;
  constructor(name: string, store: MemStore, writable: boolean) {
    this.name = name;
    this.#store = store;
    this.writable = writable;
  }
  size(): Promise<number> {
    return Promise.resolve(this.#store.size);
  }
  allocated(): Promise<number> {
    return Promise.resolve(this.#store.chunks.size * CHUNK);
  }
  read(offset: number, buf: Uint8Array): Promise<number> {
    const s = this.#store;
    const n = Math.max(0, Math.min(buf.length, s.size - offset));
    buf.fill(0, 0, n);
    for (let done = 0; done < n;) {
      const at = offset + done;
      const c = s.chunks.get(Math.floor(at / CHUNK));
      const inChunk = at % CHUNK;
      const len = Math.min(n - done, CHUNK - inChunk);
      if (c) buf.set(c.subarray(inChunk, inChunk + len), done);
      done += len;
    }
    return Promise.resolve(n);
  }
  write(offset: number, data: Uint8Array): Promise<void> {
    if (!this.writable) throw new Error("read-only MemFile");
    const s = this.#store;
    for (let done = 0; done < data.length;) {
      const at = offset + done;
      const idx = Math.floor(at / CHUNK);
      let c = s.chunks.get(idx);
      if (!c) s.chunks.set(idx, c = new Uint8Array(CHUNK));
      const inChunk = at % CHUNK;
      const len = Math.min(data.length - done, CHUNK - inChunk);
      c.set(data.subarray(done, done + len), inChunk);
      done += len;
    }
    s.size = Math.max(s.size, offset + data.length);
    return Promise.resolve();
  }
  truncate(size: number): Promise<void> {
    const s = this.#store;
    for (const idx of [...s.chunks.keys()]) if (idx * CHUNK >= size) s.chunks.delete(idx);
    s.size = size;
    return Promise.resolve();
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
  resolve(name: string): string {
    return name;
  }
  extent(offset: number, length: number): Promise<HostExtent> {
    // Absent chunks are holes, so sparse scans (vhdx BAT, map) meet some.
    const has = (at: number) => this.#store.chunks.has(Math.floor(at / CHUNK));
    const data = has(offset);
    let len = CHUNK - offset % CHUNK;
    while (len < length && has(offset + len) === data) len += CHUNK;
    return Promise.resolve({ length: Math.min(len, length), data });
  }
}

function isZero(c: Uint8Array): boolean {
  const w = new Uint32Array(c.buffer, c.byteOffset, c.byteLength >> 2);
  for (let i = 0; i < w.length; i++) if (w[i]) return false;
  return true;
}

/** A store holding `bytes`; all-zero chunks stay holes. */
export function storeOf(bytes: Uint8Array): MemStore {
  const chunks = new Map<number, Uint8Array>();
  for (let i = 0; i < bytes.length; i += CHUNK) {
    const c = new Uint8Array(CHUNK);
    c.set(bytes.subarray(i, i + CHUNK));
    if (isZero(c)) continue;
    chunks.set(i / CHUNK, c);
  }
  return { size: bytes.length, chunks };
}

/** An Io over in-memory files, capturing what a command prints. */
export function memIo(files: Map<string, MemStore>): Io & { out: string; err: string } {
  const io = {
    out: "",
    err: "",
    stdout(text: string) {
      io.out += text;
    },
    stderr(text: string) {
      io.err += text;
    },
    openFile(path: string, o: OpenFileOptions): Promise<BlockFile> {
      let s = files.get(path);
      if (o.create) files.set(path, s = { size: 0, chunks: new Map() });
      if (!s) {
        return Promise.reject(
          new QimgError(`Could not open '${path}': No such file or directory`),
        );
      }
      return Promise.resolve(new MemFile(path, s, o.write ?? false));
    },
    exists: (path: string) => Promise.resolve(files.has(path)),
    remove: (path: string) => Promise.resolve(void files.delete(path)),
    now: () => 0,
  };
  return io;
}

/** mulberry32: small, seeded, good enough to pick pokes. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** What one command printed and returned. */
export interface Outcome {
  code: number;
  out: string;
  err: string;
}

/** Runs one command in-process, as cli.ts would, within `ms`. */
export async function runIn(
  files: Map<string, MemStore>,
  argv: string[],
  ms: number,
): Promise<Outcome> {
  const io = memIo(files);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms`)), ms);
  });
  try {
    const code = await Promise.race([
      main(argv, io).catch((e) => reportError(e, (t) => io.stderr(t), true)),
      timeout,
    ]);
    return { code, out: io.out, err: io.err };
  } finally {
    clearTimeout(timer);
  }
}

/** qemu-img's exit codes per command. */
const EXIT_CODES: Record<string, number[]> = {
  check: [0, 1, 2, 3, 63],
  compare: [0, 1, 2],
};

/** What a clean outcome looks like; returns why not, or undefined. */
export function problem(cmd: string, r: Outcome): string | undefined {
  if (r.err.includes("internal error")) return "internal error";
  if (r.err.includes("Uncaught")) return "uncaught exception";
  if (/\n\s+at /.test(r.err)) return "stack trace";
  if (!(EXIT_CODES[cmd] ?? [0, 1]).includes(r.code)) return `exit code ${r.code}`;
  if (r.code !== 0 && !(cmd === "check" && r.code !== 1) && !(cmd === "compare" && r.code === 1)) {
    const lines = r.err.split("\n").filter((l) => l !== "");
    if (!lines.some((l) => l.startsWith("qimg: "))) return "no qimg: line";
  }
  return undefined;
}
