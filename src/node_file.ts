/**
 * BlockFile over node:fs, for the Node build (node_cli.ts). Positional
 * fs.readSync/writeSync calls carry their own offset, so there is no shared
 * file position: many requests in flight on one handle stay correct
 * without a lock, as with DenoFile's sync seek + transfer pairs.
 */

import * as fs from "node:fs";
import { QimgError } from "./errors.ts";
import { type BlockFile, type HostExtent, type OpenFileOptions, resolveRelative } from "./file.ts";

/**
 * A BlockFile over a node:fs file descriptor. node:fs has no SEEK_DATA,
 * SEEK_HOLE or fallocate, so every range reports data (as DenoFile without
 * the ffi permission) and `allocate`/`discard` are absent: callers write
 * zeroes instead, as they do where qemu's fallocate fails.
 */
export class NodeFile implements BlockFile {
  readonly name: string;
  readonly writable: boolean;
  #handle: number;
  #path: string;
  #closed = false;

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
  async extent(_offset: number, length: number): Promise<HostExtent> {
    return { length, data: true };
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
