/**
 * BlockFile: positional I/O over a host file. This file and cli.ts are the
 * only places that use `Deno.*`; every format driver sees only BlockFile.
 */

import { QimgError } from "./errors.ts";

/** A run of a host file that either holds data or is a hole. */
export interface HostExtent {
  /** Length in bytes from the offset asked (> 0). */
  length: number;
  /** False for a hole (reads as zeroes, takes no disk space). */
  data: boolean;
}

/** Positional byte I/O on one host file. */
export interface BlockFile {
  /** The name as the user gave it (printed by map, info, errors). */
  readonly name: string;
  /** Whether writes are allowed. */
  readonly writable: boolean;
  /** Current length of the file in bytes. */
  size(): Promise<number>;
  /** Bytes the file occupies on disk (st_blocks * 512). */
  allocated(): Promise<number>;
  /** Reads into `buf` at `offset`; returns bytes read, short only at end of file. */
  read(offset: number, buf: Uint8Array): Promise<number>;
  /** Writes all of `data` at `offset`. */
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Sets the file length. */
  truncate(size: number): Promise<void>;
  /** Makes written data durable. */
  flush(): Promise<void>;
  /** Releases the handle; later calls fail. */
  close(): Promise<void>;
  /** Resolves a backing or extent file name relative to this file's directory. */
  resolve(name: string): string;
  /**
   * Whether the bytes at `offset` are data or a hole, and for how long.
   * Files that cannot tell answer "all data".
   */
  extent(offset: number, length: number): Promise<HostExtent>;
  /** Allocates disk blocks for a range without writing (fallocate); may be absent. */
  allocate?(offset: number, length: number): Promise<void>;
  /**
   * Deallocates a range so that it reads as zeroes, keeping the file size
   * (a punched hole). Resolves false when the file cannot, may be absent.
   */
  discard?(offset: number, length: number): Promise<boolean>;
}

/** How a file is opened. */
export interface OpenFileOptions {
  /** Open for writing as well as reading. */
  write?: boolean;
  /** Create the file, truncating an existing one. */
  create?: boolean;
}

/** Reads `buf.length` bytes at `offset`, zeroes past the end of the file (as qemu's block layer). */
export async function readZeroFilled(
  file: BlockFile,
  offset: number,
  buf: Uint8Array,
): Promise<void> {
  const n = await file.read(offset, buf);
  if (n < buf.length) buf.fill(0, n);
}

/** Joins `name` to the directory of `base` unless `name` is absolute, as qemu does for backing files. */
export function resolveRelative(base: string, name: string): string {
  if (name.startsWith("/") || name === "") return name;
  const slash = base.lastIndexOf("/");
  return slash < 0 ? name : base.slice(0, slash + 1) + name;
}

/**
 * Crash-test hook (tests/crash_safety_test.ts): cli.ts arms it from
 * QIMG_CRASH_AFTER_WRITES=N, and the process SIGKILLs itself just before its
 * N-th change to any file (write, truncate, create, discard, allocate), so a
 * test can stop a command at every such point. 0 only counts.
 */
let crashAt = 0;
let changes = 0;

/** Arms the crash hook: die before the `n`-th file change (0: only count). */
export function armCrash(n: number): void {
  crashAt = n;
}

/** How many file changes this process made (for the crash test's count run). */
export function fileChanges(): number {
  return changes;
}

function beforeChange(): void {
  if (++changes === crashAt) Deno.kill(Deno.pid, "SIGKILL");
}

/**
 * A BlockFile over Deno.FsFile. Each read or write is a synchronous
 * seek + read/write pair: nothing can run between the seek and the transfer,
 * so many requests in flight on one handle stay correct, and the sync calls
 * are an order of magnitude faster than Deno's async ones on cached data.
 */
export class DenoFile implements BlockFile {
  readonly name: string;
  readonly writable: boolean;
  #file: Deno.FsFile;
  #path: string;
  #holes: HoleFinder | null | undefined;

  private constructor(name: string, path: string, file: Deno.FsFile, writable: boolean) {
    this.name = name;
    this.#path = path;
    this.#file = file;
    this.writable = writable;
  }

  /**
   * Opens `path`; errors keep Deno's error class so callers can map them.
   * Async so that every failure arrives as a rejection, never a throw.
   */
  // deno-lint-ignore require-await
  static async open(path: string, options: OpenFileOptions = {}): Promise<DenoFile> {
    const write = options.write || options.create || false;
    if (options.create) beforeChange();
    const file = Deno.openSync(path, {
      read: true,
      write,
      create: options.create,
      truncate: options.create,
    });
    if (!file.statSync().isFile) {
      file.close();
      // qemu's file driver refuses directories and other non-regular files.
      throw new QimgError(`'file' driver requires '${path}' to be a regular file`);
    }
    return new DenoFile(path, path, file, write);
  }

  // The methods are async only so that a failing sync call rejects rather than throws.
  // deno-lint-ignore require-await
  async size(): Promise<number> {
    return this.#file.statSync().size;
  }

  // deno-lint-ignore require-await
  async allocated(): Promise<number> {
    const st = this.#file.statSync();
    return st.blocks === null ? st.size : st.blocks * 512;
  }

  // deno-lint-ignore require-await
  async read(offset: number, buf: Uint8Array): Promise<number> {
    const f = this.#file;
    f.seekSync(offset, Deno.SeekMode.Start);
    let done = 0;
    while (done < buf.length) {
      const n = f.readSync(buf.subarray(done));
      if (n === null || n === 0) break;
      done += n;
    }
    return done;
  }

  // deno-lint-ignore require-await
  async write(offset: number, data: Uint8Array): Promise<void> {
    beforeChange();
    const f = this.#file;
    f.seekSync(offset, Deno.SeekMode.Start);
    let done = 0;
    while (done < data.length) done += f.writeSync(data.subarray(done));
  }

  // deno-lint-ignore require-await
  async truncate(size: number): Promise<void> {
    beforeChange();
    this.#file.truncateSync(size);
  }

  // deno-lint-ignore require-await
  async flush(): Promise<void> {
    if (this.writable) this.#file.syncDataSync();
  }

  // deno-lint-ignore require-await
  async close(): Promise<void> {
    this.#holes?.close();
    this.#holes = null;
    this.#file.close();
  }

  resolve(name: string): string {
    return resolveRelative(this.#path, name);
  }

  async extent(offset: number, length: number): Promise<HostExtent> {
    if (this.#holes === undefined) this.#holes = await HoleFinder.open(this.#path, this.writable);
    if (this.#holes === null) return { length, data: true };
    return this.#holes.extent(offset, length, await this.size());
  }

  async allocate(offset: number, length: number): Promise<void> {
    if (this.writable && length > 0) {
      if (this.#holes === undefined) this.#holes = await HoleFinder.open(this.#path, true);
      beforeChange();
      if (this.#holes?.reserve(offset, length)) return;
    }
    // Callers fall back to writing zeroes, as posix_fallocate itself does.
    throw new Error("fallocate is not available");
  }

  async discard(offset: number, length: number): Promise<boolean> {
    if (!this.writable || length <= 0) return false;
    if (this.#holes === undefined) this.#holes = await HoleFinder.open(this.#path, true);
    beforeChange();
    return this.#holes?.punch(offset, length) ?? false;
  }
}

const O_RDWR = 2;
/** FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE */
const FALLOC_PUNCH_HOLE = 0x03;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;

/**
 * lseek(SEEK_DATA/SEEK_HOLE) through libc, used only when the ffi permission
 * is already granted (never prompts). Absent that, files report all data.
 */
class HoleFinder {
  #lib: Deno.DynamicLibrary<typeof LIBC>;
  #fd: number;
  private constructor(lib: Deno.DynamicLibrary<typeof LIBC>, fd: number) {
    this.#lib = lib;
    this.#fd = fd;
  }

  static async open(path: string, writable = false): Promise<HoleFinder | null> {
    try {
      if (Deno.build.os !== "linux") return null;
      const st = await Deno.permissions.query({ name: "ffi" });
      if (st.state !== "granted") return null;
      const lib = Deno.dlopen("libc.so.6", LIBC);
      const cpath = new TextEncoder().encode(path + "\0");
      const fd = lib.symbols.open(cpath, writable ? O_RDWR : 0) as number;
      if (fd < 0) {
        lib.close();
        return null;
      }
      return new HoleFinder(lib, fd);
    } catch {
      return null;
    }
  }

  extent(offset: number, length: number, fileSize: number): HostExtent {
    if (offset >= fileSize) return { length, data: false };
    const s = this.#lib.symbols;
    const data = Number(s.lseek(this.#fd, BigInt(offset), SEEK_DATA));
    if (data < 0) return { length, data: false }; // ENXIO: only a hole to the end
    if (data > offset) return { length: Math.min(length, data - offset), data: false };
    const hole = Number(s.lseek(this.#fd, BigInt(offset), SEEK_HOLE));
    if (hole < 0) return { length, data: true };
    return { length: Math.min(length, Math.max(hole - offset, 1)), data: true };
  }

  /** fallocate(PUNCH_HOLE | KEEP_SIZE); false when the file system refuses. */
  punch(offset: number, length: number): boolean {
    return this.#lib.symbols.fallocate(
      this.#fd,
      FALLOC_PUNCH_HOLE,
      BigInt(offset),
      BigInt(length),
    ) === 0;
  }

  /** fallocate(mode 0): reserves blocks, growing the file; false when refused. */
  reserve(offset: number, length: number): boolean {
    return this.#lib.symbols.fallocate(this.#fd, 0, BigInt(offset), BigInt(length)) === 0;
  }

  close(): void {
    this.#lib.symbols.close(this.#fd);
    this.#lib.close();
  }
}

const LIBC = {
  open: { parameters: ["buffer", "i32"], result: "i32" },
  lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  close: { parameters: ["i32"], result: "i32" },
  fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i32" },
} as const;
