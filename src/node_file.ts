/**
 * BlockFile over node:fs, for the Node build (node_cli.ts). Positional
 * fs.readSync/writeSync calls carry their own offset, so there is no shared
 * file position: many requests in flight on one handle stay correct
 * without a lock, as with DenoFile's sync seek + transfer pairs.
 */

import * as fs from "node:fs";
import { isZero } from "./bytes.ts";
import { QimgError } from "./errors.ts";
import { type BlockFile, type HostExtent, type OpenFileOptions, resolveRelative } from "./file.ts";

/** Read-only files up to this size are scanned for holes (see HoleMap). */
const HOLE_SCAN_LIMIT = 1 << 30;
const SCAN_CHUNK = 1 << 20;

/** A file's data and hole runs, in order, covering [0, size). */
interface HoleMap {
  size: number;
  /** Run starts, ascending; `data[i]` says what [starts[i], starts[i + 1] or size) is. */
  starts: number[];
  data: boolean[];
}

/**
 * A BlockFile over a node:fs file descriptor. node:fs has no SEEK_DATA,
 * SEEK_HOLE (nor FIEMAP, nor lseek at all) or fallocate, so `allocate` and
 * `discard` are absent (callers write zeroes instead, as they do where
 * qemu's fallocate fails), and holes are inferred, for read-only files of
 * up to 1 GiB only: a hole reads as zeroes, so when the file's all-zero
 * blocks are exactly as many as its unallocated ones (size minus
 * st_blocks * 512, in st_blksize blocks), they are its holes, as SEEK_HOLE
 * would report them. Where the counts differ (allocated blocks of zeroes,
 * preallocated or metadata blocks) or the file is larger or writable,
 * every range reports data, as DenoFile does without the ffi permission.
 */
export class NodeFile implements BlockFile {
  readonly name: string;
  readonly writable: boolean;
  #handle: number;
  #path: string;
  #closed = false;
  #holes: HoleMap | null | undefined;

  private constructor(name: string, path: string, fd: number, writable: boolean) {
    this.name = name;
    this.#path = path;
    this.#handle = fd;
    this.writable = writable;
  }

  /** The descriptor; after close() its number may belong to another file, so it is refused. */
  get #fd(): number {
    if (this.#closed) throw new Error("Bad file descriptor: the file is closed");
    return this.#handle;
  }

  /**
   * Opens `path`; errors keep Node's `code` (ENOENT, EACCES, ...) so that
   * strerror() gives qemu's text. Async so every failure is a rejection.
   */
  // deno-lint-ignore require-await
  static async open(path: string, options: OpenFileOptions = {}): Promise<NodeFile> {
    const write = options.write || options.create || false;
    // "w+" creates and truncates, as DenoFile's create: true, truncate: true.
    const flags = options.create ? "w+" : write ? "r+" : "r";
    const fd = fs.openSync(path, flags);
    let isFile: boolean;
    try {
      isFile = fs.fstatSync(fd).isFile();
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
    if (!isFile) {
      fs.closeSync(fd);
      // qemu's file driver refuses directories and other non-regular files.
      throw new QimgError(`'file' driver requires '${path}' to be a regular file`);
    }
    return new NodeFile(path, path, fd, write);
  }

  // The methods are async only so that a failing sync call rejects rather than throws.
  // deno-lint-ignore require-await
  async size(): Promise<number> {
    return fs.fstatSync(this.#fd).size;
  }

  // deno-lint-ignore require-await
  async allocated(): Promise<number> {
    const st = fs.fstatSync(this.#fd);
    // st_blocks is in 512-byte units on Linux whatever the block size.
    return st.blocks * 512;
  }

  // deno-lint-ignore require-await
  async read(offset: number, buf: Uint8Array): Promise<number> {
    let done = 0;
    while (done < buf.length) {
      // Past 2^53 node:fs takes the position only as a bigint (a number is a RangeError).
      const at = offset + done;
      const position = Number.isSafeInteger(at) ? at : BigInt(at);
      const n = fs.readSync(this.#fd, buf, done, buf.length - done, position);
      if (n === 0) break;
      done += n;
    }
    return done;
  }

  // deno-lint-ignore require-await
  async write(offset: number, data: Uint8Array): Promise<void> {
    // node:fs's writeSync treats a position past 2^53 (number or bigint) as "no
    // position" and writes at the file pointer instead: refuse, as the kernel
    // refuses offsets past the file system's limit.
    if (!Number.isSafeInteger(offset + data.length)) throw fileTooLarge("write");
    let done = 0;
    while (done < data.length) {
      done += fs.writeSync(this.#fd, data, done, data.length - done, offset + done);
    }
  }

  // deno-lint-ignore require-await
  async truncate(size: number): Promise<void> {
    // ftruncateSync takes no bigint and refuses numbers past 2^53 with a RangeError.
    if (size > Number.MAX_SAFE_INTEGER) throw fileTooLarge("ftruncate");
    fs.ftruncateSync(this.#fd, size);
  }

  // deno-lint-ignore require-await
  async flush(): Promise<void> {
    if (this.writable) fs.fdatasyncSync(this.#fd);
  }

  // deno-lint-ignore require-await
  async close(): Promise<void> {
    // A second close must not close a descriptor number reused by another open.
    fs.closeSync(this.#fd);
    this.#closed = true;
  }

  resolve(name: string): string {
    return resolveRelative(this.#path, name);
  }

  // deno-lint-ignore require-await
  async extent(offset: number, length: number): Promise<HostExtent> {
    // A writable file changes under its own writes: not worth a rescan each time.
    if (this.#holes === undefined) this.#holes = this.writable ? null : this.#scanHoles();
    const map = this.#holes;
    if (!map) return { length, data: true };
    // As lseek: past the end is a hole, and a hole up to the end answers for all asked.
    if (offset >= map.size) return { length, data: false };
    let lo = 0;
    let hi = map.starts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (map.starts[mid] <= offset) lo = mid;
      else hi = mid - 1;
    }
    const end = lo + 1 < map.starts.length ? map.starts[lo + 1] : map.size;
    if (!map.data[lo] && end === map.size) return { length, data: false };
    return { length: Math.min(length, end - offset), data: map.data[lo] };
  }

  /**
   * The file's holes when they can be told apart from allocated zeroes (see
   * the class comment), else all data up to the end of the file (past it,
   * a hole, as lseek says). Reads the file once.
   */
  #scanHoles(): HoleMap {
    const st = fs.fstatSync(this.#fd);
    const size = st.size;
    const bs = st.blksize > 0 ? st.blksize : 4096;
    const allocated = st.blocks * 512;
    if (allocated === 0) return { size, starts: [0], data: [false] };
    const allData: HoleMap = { size, starts: [0], data: [true] };
    const blocks = Math.ceil(size / bs);
    if (allocated % bs !== 0 || size > HOLE_SCAN_LIMIT) return allData;
    const holes = blocks - allocated / bs;
    if (holes <= 0) return allData;
    const map: HoleMap = { size, starts: [], data: [] };
    const buf = new Uint8Array(Math.max(bs, SCAN_CHUNK - SCAN_CHUNK % bs));
    let zeroes = 0;
    for (let at = 0; at < size;) {
      const want = Math.min(buf.length, size - at);
      let n = 0;
      while (n < want) {
        const got = fs.readSync(this.#fd, buf, n, want - n, at + n);
        if (got <= 0) return allData; // shrunk under us
        n += got;
      }
      for (let b = 0; b < n; b += bs) {
        const data = !isZero(buf.subarray(b, Math.min(n, b + bs)));
        if (!data && ++zeroes > holes) return allData; // some zero blocks are allocated
        if (map.data[map.data.length - 1] !== data) {
          map.starts.push(at + b);
          map.data.push(data);
        }
      }
      at += n;
    }
    return zeroes === holes ? map : allData;
  }
}

/**
 * EFBIG as node:fs reports it, for offsets node:fs cannot pass to the kernel;
 * strerror() turns it into qemu's "File too large".
 */
function fileTooLarge(syscall: string): Error {
  return Object.assign(new Error(`EFBIG: file too large, ${syscall}`), {
    code: "EFBIG",
    syscall,
  });
}
