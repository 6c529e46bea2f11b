/**
 * BlockFile: positional I/O over a host file. This file and cli.ts are the
 * only places that use `Deno.*`; every format driver sees only BlockFile.
 */

import { QimgError } from "./errors.ts";
import { CREATE_LOCKS, lockFile } from "./image_lock.ts";

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
  /**
   * As `write`, but the transfer runs on another thread: the caller goes on
   * meanwhile, and writes to different ranges may run at once. `data` must
   * stay unchanged until the promise settles. May be absent.
   */
  writeConcurrent?(offset: number, data: Uint8Array): Promise<void>;
  /**
   * Writes `parts` one after the other from `offset` in one transfer on
   * another thread (pwritev); resolves to the bytes written, short (maybe
   * 0) on an error or where the host cannot. May be absent.
   */
  writevConcurrent?(offset: number, parts: Uint8Array[]): Promise<number>;
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
  /**
   * A read-only view of `length` bytes at `offset` straight from the host's
   * page cache (mmap), without copying; undefined when the host cannot map
   * (no ffi permission) or the range is not wholly inside the file. The
   * bytes must not be touched after `release()`. May be absent.
   */
  view?(offset: number, length: number): Promise<FileView | undefined>;
  /** Allocates disk blocks for a range without writing (fallocate); may be absent. */
  allocate?(offset: number, length: number): Promise<void>;
  /**
   * Deallocates a range so that it reads as zeroes, keeping the file size
   * (a punched hole). Resolves false when the file cannot, may be absent.
   */
  discard?(offset: number, length: number): Promise<boolean>;
  /**
   * Holds shared byte-range locks on exactly the bytes in `hold`, then
   * returns the first byte of `probe` another open of the file holds
   * (src/image_lock.ts). Absent or a no-op where the host cannot lock.
   */
  lockBytes?(hold: readonly number[], probe: readonly number[]): Promise<number | undefined>;
}

/** Bytes of a file mapped into memory (see {@link BlockFile.view}). */
export interface FileView {
  /** The file's bytes; invalid (a crash to touch) after `release()`. */
  readonly bytes: Uint8Array;
  /** Unmaps the bytes. */
  release(): void;
}

/** How a file is opened. */
export interface OpenFileOptions {
  /** Open for writing as well as reading. */
  write?: boolean;
  /** Create the file, truncating an existing one. */
  create?: boolean;
  /** flush() does nothing (cache=unsafe, qemu's BDRV_O_NO_FLUSH: convert's default). */
  noFlush?: boolean;
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
  #noFlush = false;
  #viewSize: number | undefined;
  #locks: ByteLocks | null | undefined;

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
  static async open(path: string, options: OpenFileOptions = {}): Promise<DenoFile> {
    const write = options.write || options.create || false;
    if (options.create) beforeChange();
    const file = Deno.openSync(path, { read: true, write, create: options.create });
    if (!file.statSync().isFile) {
      file.close();
      // qemu's file driver refuses directories and other non-regular files.
      throw new QimgError(`'file' driver requires '${path}' to be a regular file`);
    }
    const opened = new DenoFile(path, path, file, write);
    opened.#noFlush = options.noFlush ?? false;
    if (options.create) {
      // An image another process uses is refused before it is emptied.
      try {
        await lockFile(opened, CREATE_LOCKS);
      } catch (e) {
        await opened.close();
        throw e;
      }
      file.truncateSync(0);
    }
    return opened;
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
    // One pread instead of a seek and a read, once libc is open for this file.
    let done = this.#holes ? this.#holes.pread(offset, buf) : 0;
    if (done === buf.length) return done;
    const f = this.#file;
    f.seekSync(offset + done, Deno.SeekMode.Start);
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
    // pwrite where libc is open already (opening it, ~2.5 ms, costs short
    // commands more than a seek per write); what it leaves (an error) goes
    // through Deno for the error's text.
    const done = this.#holes ? this.#holes.pwrite(offset, data) : 0;
    this.#writeRest(offset, data, done);
  }

  async writeConcurrent(offset: number, data: Uint8Array): Promise<void> {
    beforeChange();
    if (this.#holes === undefined) this.#holes = this.#native();
    const done = this.#holes ? await this.#holes.pwriteAsync(offset, data) : 0;
    this.#writeRest(offset, data, done);
  }

  async writevConcurrent(offset: number, parts: Uint8Array[]): Promise<number> {
    beforeChange();
    if (this.#holes === undefined) this.#holes = this.#native();
    return this.#holes ? await this.#holes.pwritevAsync(offset, parts) : 0;
  }

  /** Writes what pwrite left (after an error: Deno's call throws it with its text). */
  #writeRest(offset: number, data: Uint8Array, done: number): void {
    if (done === data.length) return;
    const f = this.#file;
    f.seekSync(offset + done, Deno.SeekMode.Start);
    while (done < data.length) done += f.writeSync(data.subarray(done));
  }

  // deno-lint-ignore require-await
  async view(offset: number, length: number): Promise<FileView | undefined> {
    if (this.#holes === undefined) this.#holes = this.#native();
    if (!this.#holes || length <= 0) return;
    // Bytes past the end must never be touched (SIGBUS): only ranges inside the file map.
    // A read-only handle's size is taken once (it changes only under another writer).
    const size = this.writable
      ? this.#file.statSync().size
      : (this.#viewSize ??= this.#file.statSync().size);
    if (offset + length > size) return;
    return this.#holes.map(offset, length);
  }

  /**
   * libc on a second descriptor of this file (ffi granted), checked to be
   * the same file: the path may have been renamed or replaced since open.
   */
  #native(): HoleFinder | null {
    const holes = HoleFinder.open(this.#path, this.writable);
    if (holes) {
      const st = this.#file.statSync();
      if (!holes.sameFile(st.dev, st.ino ?? -1)) {
        holes.close();
        return null;
      }
    }
    return holes;
  }

  // deno-lint-ignore require-await
  async truncate(size: number): Promise<void> {
    beforeChange();
    this.#file.truncateSync(size);
  }

  // deno-lint-ignore require-await
  async flush(): Promise<void> {
    if (this.writable && !this.#noFlush) this.#file.syncDataSync();
  }

  // deno-lint-ignore require-await
  async close(): Promise<void> {
    this.#holes?.close();
    this.#holes = null;
    this.#locks?.close();
    this.#locks = null;
    this.#file.close();
  }

  /** OFD locks on a descriptor of their own; none without the ffi permission. */
  // deno-lint-ignore require-await
  async lockBytes(hold: readonly number[], probe: readonly number[]): Promise<number | undefined> {
    if (this.#locks === undefined) {
      if (hold.length === 0) return;
      this.#locks = ByteLocks.open(this.#path, this.#file);
    }
    return this.#locks?.set(hold, probe);
  }

  resolve(name: string): string {
    return resolveRelative(this.#path, name);
  }

  async extent(offset: number, length: number): Promise<HostExtent> {
    if (this.#holes === undefined) this.#holes = this.#native();
    if (this.#holes === null) return { length, data: true };
    // Read-only handles skip the size (an fstat per call, and convert asks
    // per run): past the end SEEK_DATA fails (ENXIO), the same "hole".
    return this.#holes.extent(offset, length, this.writable ? await this.size() : Infinity);
  }

  async allocate(offset: number, length: number): Promise<void> {
    if (this.writable && length > 0) {
      if (this.#holes === undefined) this.#holes = this.#native();
      beforeChange();
      // On another thread: convert reserves every data range before its write.
      if (await this.#holes?.reserveAsync(offset, length)) return;
    }
    // Callers fall back to writing zeroes, as posix_fallocate itself does.
    throw new Error("fallocate is not available");
  }

  // deno-lint-ignore require-await
  async discard(offset: number, length: number): Promise<boolean> {
    if (!this.writable || length <= 0) return false;
    if (this.#holes === undefined) this.#holes = this.#native();
    beforeChange();
    return this.#holes?.punch(offset, length) ?? false;
  }
}

const O_RDWR = 2;
/** FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE */
const FALLOC_PUNCH_HOLE = 0x03;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;

/** libc, opened once for all files; closed when the last file using it closes. */
let libc: Deno.DynamicLibrary<typeof LIBC> | undefined;
let libcUsers = 0;

function openLibc(): Deno.DynamicLibrary<typeof LIBC> {
  libc ??= Deno.dlopen("libc.so.6", LIBC);
  libcUsers++;
  return libc;
}

function closeLibc(): void {
  if (--libcUsers === 0) {
    libc?.close();
    libc = undefined;
  }
}

/** Views map whole windows of this size (see HoleFinder.map), into one of SLOTS slots. */
const WINDOW = 8 << 20;
/**
 * Each slot maps its window and this much of the file after it, so that a
 * view starting in a window never needs a mapping of its own (convert's
 * requests of up to 2 MiB): those, an ArrayBuffer each, made every fourth
 * request count as external memory and set off collections (4 GiB qcow2
 * to raw: 9 full collections, now 1).
 */
const REACH = 2 << 20;
const SLOT = WINDOW + REACH;
// 60 MiB: V8 counts the arena's ArrayBuffer as external memory, and 64 MiB
// of it set off a collection at once (~5 ms); eight workers' views fit in fewer.
const SLOTS = 6;
const PROT_NONE = 0;
const PROT_READ = 1;
const MAP_PRIVATE = 2;
const MAP_FIXED = 0x10;
const MAP_ANONYMOUS = 0x20;
const MAP_NORESERVE = 0x4000;
const MADV_POPULATE_READ = 22;
const MAP_SHARED = 1;
const PAGE = 4096;

/**
 * A second descriptor of a file, through libc, used only when the ffi
 * permission is already granted (never prompts): lseek(SEEK_DATA/SEEK_HOLE),
 * fallocate, pread/pwrite (one call instead of a seek and a transfer) and
 * mmap. Absent that, files report all data and I/O goes through Deno.
 */
class HoleFinder {
  #lib: Deno.DynamicLibrary<typeof LIBC>;
  #fd: number;
  private constructor(lib: Deno.DynamicLibrary<typeof LIBC>, fd: number) {
    this.#lib = lib;
    this.#fd = fd;
  }

  static open(path: string, writable = false): HoleFinder | null {
    try {
      if (Deno.build.os !== "linux") return null;
      const st = Deno.permissions.querySync({ name: "ffi" });
      if (st.state !== "granted") return null;
      const lib = openLibc();
      const cpath = new TextEncoder().encode(path + "\0");
      const fd = lib.symbols.open(cpath, writable ? O_RDWR : 0) as number;
      if (fd < 0) {
        closeLibc();
        return null;
      }
      return new HoleFinder(lib, fd);
    } catch {
      return null;
    }
  }

  /** Whether the descriptor is the file with this device and inode number. */
  sameFile(dev: number, ino: number): boolean {
    // struct stat starts with st_dev and st_ino, 64 bits each, on x86-64 and aarch64 alike.
    const st = new BigUint64Array(32);
    if (this.#lib.symbols.fstat(this.#fd, st) !== 0) return false;
    return Number(st[0]) === dev && Number(st[1]) === ino;
  }

  /** pread until done; returns the bytes read (short at the end of the file or on an error). */
  pread(offset: number, buf: Uint8Array): number {
    return this.#whole("pread", offset, buf);
  }

  /** pwrite until done; returns the bytes written (short on an error). */
  pwrite(offset: number, data: Uint8Array): number {
    return this.#whole("pwrite", offset, data);
  }

  /** Repeats pread or pwrite until all of `buf` moved, or it moves nothing more. */
  #whole(call: "pread" | "pwrite", offset: number, buf: Uint8Array): number {
    const fn = this.#lib.symbols[call];
    let done = 0;
    while (done < buf.length) {
      const n = Number(
        fn(this.#fd, buf.subarray(done), BigInt(buf.length - done), BigInt(offset + done)),
      );
      if (n <= 0) break;
      done += n;
    }
    return done;
  }

  /**
   * pwrite on another thread: the copy into the page cache overlaps with
   * what the caller does next (convert maps and scans the next chunk).
   * `data` must stay unchanged until the promise settles.
   */
  /** pwritev on another thread: one call for several buffers; the bytes written (0 on an error). */
  async pwritevAsync(offset: number, parts: Uint8Array[]): Promise<number> {
    const iov = new BigUint64Array(parts.length * 2);
    for (let i = 0; i < parts.length; i++) {
      iov[2 * i] = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(parts[i])));
      iov[2 * i + 1] = BigInt(parts[i].length);
    }
    const n = Number(
      await this.#lib.symbols.pwritevAsync(this.#fd, iov, parts.length, BigInt(offset)),
    );
    return Math.max(n, 0);
  }

  async pwriteAsync(offset: number, data: Uint8Array): Promise<number> {
    let done = 0;
    while (done < data.length) {
      const n = Number(
        await this.#lib.symbols.pwriteAsync(
          this.#fd,
          data.subarray(done),
          BigInt(data.length - done),
          BigInt(offset + done),
        ),
      );
      if (n <= 0) break;
      done += n;
    }
    return done;
  }

  /**
   * A read-only view of [offset, offset + length). Views share mappings of
   * whole windows, placed in slots of one reserved address range: one
   * ArrayBuffer for all of them, so mapping adds nothing for the garbage
   * collector to count (a new ArrayBuffer per mapping triggered collections),
   * and fewer mmap calls. The window last left without views stays mapped
   * for the next. Undefined when mmap fails.
   */
  map(offset: number, length: number): FileView | undefined {
    const w = Math.floor(offset / WINDOW);
    if (offset + length > w * WINDOW + SLOT) return this.#mapOnce(offset, length);
    let win = this.#windows.get(w);
    if (!win) {
      const slot = this.#freeSlot();
      if (slot === undefined) return this.#mapOnce(offset, length);
      const at = Deno.UnsafePointer.offset(this.#arena!.ptr, slot * SLOT);
      // MAP_FIXED replaces the slot's pages in place; the range stays ours throughout.
      // A window may reach past the end of the file: only bytes inside it are viewed.
      const ptr = this.#lib.symbols.mmap(
        at,
        BigInt(SLOT),
        PROT_READ,
        MAP_SHARED | MAP_FIXED,
        this.#fd,
        BigInt(w * WINDOW),
      );
      if (!ptr || Deno.UnsafePointer.value(ptr) !== Deno.UnsafePointer.value(at)) return;
      win = { slot, views: 0 };
      this.#windows.set(w, win);
    }
    win.views++;
    if (this.#idle === w) this.#idle = undefined;
    // Page tables for the view in one call, cheaper than a fault every 16 pages
    // (MADV_POPULATE_READ; older kernels refuse it, and faults do the work).
    const at = win.slot * SLOT + offset - w * WINDOW;
    const page = at - (at % PAGE);
    this.#lib.symbols.madvise(
      Deno.UnsafePointer.offset(this.#arena!.ptr, page),
      BigInt(at + length - page),
      MADV_POPULATE_READ,
    );
    const held = win;
    let released = false;
    return {
      bytes: new Uint8Array(this.#arena!.buffer, at, length),
      release: () => {
        if (released) return;
        released = true;
        if (--held.views > 0) return;
        if (this.#idle !== undefined) this.#unmap(this.#idle);
        this.#idle = w;
      },
    };
  }

  /** Reserved address space for SLOTS windows (PROT_NONE until a window is mapped in). */
  #arena: { ptr: Deno.PointerObject; buffer: ArrayBuffer; used: boolean[] } | null | undefined;
  #windows = new Map<number, { slot: number; views: number }>();
  /** A window kept mapped without views. */
  #idle: number | undefined;

  #freeSlot(): number | undefined {
    if (this.#arena === undefined) {
      const ptr = this.#lib.symbols.mmap(
        null,
        BigInt(SLOTS * SLOT),
        PROT_NONE,
        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
        -1,
        0n,
      );
      this.#arena = !ptr || Deno.UnsafePointer.value(ptr) === 0xffffffffffffffffn ? null : {
        ptr,
        buffer: Deno.UnsafePointerView.getArrayBuffer(ptr, SLOTS * SLOT),
        used: new Array(SLOTS).fill(false),
      };
    }
    if (!this.#arena) return;
    const slot = this.#arena.used.indexOf(false);
    if (slot < 0) return;
    this.#arena.used[slot] = true;
    return slot;
  }

  #unmap(w: number): void {
    const win = this.#windows.get(w);
    if (!win || win.views > 0) return;
    // Back to reserved, inaccessible pages (never munmap: the range must stay ours).
    const at = Deno.UnsafePointer.offset(this.#arena!.ptr, win.slot * SLOT);
    this.#lib.symbols.mmap(
      at,
      BigInt(SLOT),
      PROT_NONE,
      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
      -1,
      0n,
    );
    this.#arena!.used[win.slot] = false;
    this.#windows.delete(w);
  }

  /** A mapping of its own for a view that reaches past its window's slot. */
  #mapOnce(offset: number, length: number): FileView | undefined {
    const s = this.#lib.symbols;
    const lead = offset % PAGE;
    const size = BigInt(length + lead);
    const ptr = s.mmap(null, size, PROT_READ, MAP_SHARED, this.#fd, BigInt(offset - lead));
    // MAP_FAILED is (void *) -1.
    if (!ptr || Deno.UnsafePointer.value(ptr) === 0xffffffffffffffffn) return;
    const bytes = new Uint8Array(
      Deno.UnsafePointerView.getArrayBuffer(ptr, length + lead),
      lead,
      length,
    );
    let mapped = true;
    return {
      bytes,
      release: () => {
        if (mapped) s.munmap(ptr, size);
        mapped = false;
      },
    };
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

  /** reserve, on another thread. */
  async reserveAsync(offset: number, length: number): Promise<boolean> {
    return await this.#lib.symbols.fallocateAsync(this.#fd, 0, BigInt(offset), BigInt(length)) ===
      0;
  }

  close(): void {
    // Views must not outlive their file: every window goes.
    if (this.#arena) this.#lib.symbols.munmap(this.#arena.ptr, BigInt(SLOTS * SLOT));
    this.#arena = null;
    this.#windows.clear();
    this.#lib.symbols.close(this.#fd);
    closeLibc();
  }
}

/** What byte locks need of libc: opened on its own when the rest is not (a third of the cost). */
const LOCK_LIBC = {
  open: { parameters: ["buffer", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  fstat: { parameters: ["i32", "buffer"], result: "i32" },
  fcntl: { parameters: ["i32", "i32", "buffer"], result: "i32" },
} as const;

let lockLibc: Deno.DynamicLibrary<typeof LOCK_LIBC> | undefined;
let lockLibcUsers = 0;

const O_CLOEXEC = 0o2000000;
const F_OFD_GETLK = 36;
const F_OFD_SETLK = 37;
const F_RDLCK = 0;
const F_WRLCK = 1;
const F_UNLCK = 2;

/**
 * Shared OFD byte-range locks (fcntl F_OFD_SETLK) on a descriptor of their
 * own, as qemu's file protocol holds them (src/image_lock.ts); they go with
 * the descriptor. Only when the ffi permission is already granted.
 */
class ByteLocks {
  #lib: Deno.DynamicLibrary<typeof LOCK_LIBC>["symbols"];
  #release: () => void;
  #fd: number;
  #held = new Set<number>();
  /** struct flock on x86-64 and aarch64: short type, short whence, off_t start, off_t len, pid_t pid. */
  #flock = new DataView(new ArrayBuffer(32));

  private constructor(
    lib: Deno.DynamicLibrary<typeof LOCK_LIBC>["symbols"],
    release: () => void,
    fd: number,
  ) {
    this.#lib = lib;
    this.#release = release;
    this.#fd = fd;
  }

  static open(path: string, file: Deno.FsFile): ByteLocks | null {
    try {
      if (Deno.build.os !== "linux") return null;
      if (Deno.permissions.querySync({ name: "ffi" }).state !== "granted") return null;
      // libc's handle when open already, else only the few calls locks need.
      let lib: Deno.DynamicLibrary<typeof LOCK_LIBC>["symbols"];
      let release: () => void;
      if (libc) {
        lib = openLibc().symbols;
        release = closeLibc;
      } else {
        lockLibc ??= Deno.dlopen("libc.so.6", LOCK_LIBC);
        lockLibcUsers++;
        lib = lockLibc.symbols;
        release = () => {
          if (--lockLibcUsers === 0) {
            lockLibc?.close();
            lockLibc = undefined;
          }
        };
      }
      const fd = lib.open(new TextEncoder().encode(path + "\0"), O_CLOEXEC) as number;
      if (fd < 0) {
        release();
        return null;
      }
      const locks = new ByteLocks(lib, release, fd);
      // The path may name another file by now: lock only the one opened.
      const st = new BigUint64Array(32);
      const own = file.statSync();
      if (
        lib.fstat(fd, st) !== 0 || Number(st[0]) !== own.dev || Number(st[1]) !== (own.ino ?? -1)
      ) {
        locks.close();
        return null;
      }
      return locks;
    } catch {
      return null;
    }
  }

  #fcntl(cmd: number, type: number, byte: number): number {
    const f = this.#flock;
    f.setInt16(0, type, true);
    f.setInt16(2, 0, true); // SEEK_SET
    f.setBigInt64(8, BigInt(byte), true);
    f.setBigInt64(16, 1n, true);
    f.setInt32(24, 0, true);
    return this.#lib.fcntl(this.#fd, cmd, new Uint8Array(f.buffer)) as number;
  }

  set(hold: readonly number[], probe: readonly number[]): number | undefined {
    for (const byte of [...this.#held]) {
      if (hold.includes(byte)) continue;
      this.#fcntl(F_OFD_SETLK, F_UNLCK, byte);
      this.#held.delete(byte);
    }
    for (const byte of hold) {
      if (this.#held.has(byte)) continue;
      // Only a write lock (which qemu never takes) can refuse a shared one.
      if (this.#fcntl(F_OFD_SETLK, F_RDLCK, byte) !== 0) return byte;
      this.#held.add(byte);
    }
    for (const byte of probe) {
      // F_OFD_GETLK answers for other descriptions only; an error means no locking here.
      if (this.#fcntl(F_OFD_GETLK, F_WRLCK, byte) !== 0) continue;
      if (this.#flock.getInt16(0, true) !== F_UNLCK) return byte;
    }
  }

  close(): void {
    this.#lib.close(this.#fd);
    this.#release();
  }
}

const LIBC = {
  open: { parameters: ["buffer", "i32"], result: "i32" },
  fcntl: { parameters: ["i32", "i32", "buffer"], result: "i32" },
  lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  close: { parameters: ["i32"], result: "i32" },
  fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i32" },
  fallocateAsync: {
    name: "fallocate",
    parameters: ["i32", "i32", "i64", "i64"],
    result: "i32",
    nonblocking: true,
  },
  fstat: { parameters: ["i32", "buffer"], result: "i32" },
  pread: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  pwrite: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  pwritevAsync: {
    name: "pwritev",
    parameters: ["i32", "buffer", "i32", "i64"],
    result: "isize",
    nonblocking: true,
  },
  pwriteAsync: {
    name: "pwrite",
    parameters: ["i32", "buffer", "usize", "i64"],
    result: "isize",
    nonblocking: true,
  },
  mmap: { parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], result: "pointer" },
  munmap: { parameters: ["pointer", "usize"], result: "i32" },
  madvise: { parameters: ["pointer", "usize", "i32"], result: "i32" },
} as const;
