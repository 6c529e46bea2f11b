/**
 * Image: an open image with its backing chain. Probes and opens formats,
 * reads through the chain, and turns each layer's block status into
 * extents (depth, present, zero) for map, convert, compare and measure.
 */

import type { BlockStatus, FormatDriver, FormatImage, FormatInfo } from "./driver.ts";
import { type BlockFile, DenoFile } from "./file.ts";
import { isPermissionError, QimgError, strerror } from "./errors.ts";
import { findFormat, loadFormat, probeFormat } from "./formats.ts";
import { layerLocks, lockFile } from "./image_lock.ts";
import type { JsonValue } from "./output.ts";

/**
 * A run of guest bytes with the same status through the whole chain.
 *
 * @example Usage
 * ```ts
 * import { type Extent, openImage } from "@qimg/qimg";
 * const path = await Deno.makeTempFile({ suffix: ".raw" });
 * await Deno.writeFile(path, new Uint8Array(4096).fill(1));
 * await using image = await openImage(path);
 * for await (const e of image.extents() as AsyncIterable<Extent>) {
 *   console.log(e.offset, e.length, e.data ? "data" : e.zero ? "zero" : "backing");
 * }
 * ```
 */
export interface Extent {
  /** Guest offset in bytes. */
  offset: number;
  /** Length in bytes. */
  length: number;
  /** Allocated with data in the layer at `depth`. */
  data: boolean;
  /** Reads as zeroes. */
  zero: boolean;
  /** Some layer of the chain (not just "beyond the chain") answers for it. */
  present: boolean;
  /** Index in the chain of the layer that answered (0 = top). */
  depth: number;
  /** Host offset of the bytes, when known. */
  hostOffset?: number;
  /** Host file of the bytes, when `hostOffset` is set. */
  file?: string;
  /** Stored compressed. */
  compressed?: boolean;
}

/**
 * What `info --output=json` prints for one image, in qemu's key order.
 *
 * @example Usage
 * ```ts
 * import { type ImageInfo, openImage } from "@qimg/qimg";
 * const path = await Deno.makeTempFile({ suffix: ".raw" });
 * await Deno.writeFile(path, new Uint8Array(4096));
 * await using image = await openImage(path);
 * const info: ImageInfo = await image.info();
 * console.log(info.format, info["virtual-size"]); // raw 4096
 * ```
 */
export type ImageInfo = { [key: string]: JsonValue | undefined };

/** How to open an image. */
export interface OpenImageOptions {
  /** The format; probed from the file's first bytes when absent. */
  format?: string;
  /** Open for writing. */
  write?: boolean;
  /** Open the backing chain (default true). */
  backing?: boolean;
  /** Called with qemu's warnings (e.g. raw probing on a writable open), as FormatOpenOptions.warn. */
  warn?: (message: string, end?: string) => void;
  /** Opens a host file; defaults to the local file system. */
  openFile?: (path: string, write: boolean) => Promise<BlockFile>;
  /** Metadata only (qemu-img info's BDRV_O_NO_IO): no data files, no decryption. */
  noIo?: boolean;
  /** Opening the top image for `check` (qemu's BDRV_O_CHECK). */
  check?: boolean;
  /**
   * A backing file that fails to open fails the chain as qemu's one
   * bdrv_open does: "Could not open 'TOP': Could not open backing file: ..."
   * once per level. Without it the error names only the failing layer, as
   * qemu-img info --backing-chain, which opens each layer on its own.
   */
  nestBackingErrors?: boolean;
  /** `-U`: lock nothing away from other processes (read-only opens). */
  forceShare?: boolean;
  /** The data must not change while open (convert's source): other writers are refused, as qemu-img. */
  stable?: boolean;
}

const PROBE_BYTES = 2048;
const MAX_CHAIN = 64;

/** One layer of a chain: the open format image and how it was opened. */
export interface Layer {
  image: FormatImage;
  driver: FormatDriver;
  /** The file name as given or as stored in the overlay. */
  filename: string;
  /** The host file the layer's locks are on (src/image_lock.ts). */
  hostFile?: BlockFile;
}

/** Opens a local host file. */
export function openHostFile(path: string, write: boolean): Promise<BlockFile> {
  return DenoFile.open(path, { write });
}

/** Maps a runtime error from opening `path` to qemu's inner message. */
export function openErrorMessage(path: string, e: unknown): string {
  if (e instanceof QimgError) return e.message;
  if (isPermissionError(e)) return strerror(e);
  return `Could not open '${path}': ${strerror(e)}`;
}

async function openLayer(
  filename: string,
  options: OpenImageOptions,
  write: boolean,
  backing = false,
): Promise<Layer> {
  const openFile = options.openFile ?? openHostFile;
  // qemu looks the format up before it opens the file.
  if (options.format !== undefined && !findFormat(options.format)) {
    throw new QimgError(`Could not open '${filename}': Unknown driver '${options.format}'`);
  }
  if (filename === "") {
    throw new QimgError("Could not open '': The 'file' block driver requires a file name");
  }
  let file: BlockFile;
  try {
    file = await openFile(filename, write);
  } catch (e) {
    throw new QimgError(`Could not open '${filename}': ${openErrorMessage(filename, e)}`);
  }
  try {
    let driver: FormatDriver | undefined;
    if (options.format !== undefined) {
      driver = await loadFormat(options.format);
      if (!driver) throw new QimgError(`Unknown driver '${options.format}'`);
    } else {
      const head = new Uint8Array(PROBE_BYTES);
      const n = await file.read(0, head);
      driver = await probeFormat(head.subarray(0, n), filename);
      if (driver.name === "raw" && write) {
        options.warn?.(
          `WARNING: Image format was not specified for '${filename}' and probing guessed raw.\n` +
            "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
            "         Specify the 'raw' format explicitly to remove the restrictions.",
        );
      }
    }
    // As qemu, the locks are taken before the format reads its metadata.
    await lockFile(
      file,
      layerLocks({
        write,
        noIo: options.noIo,
        forceShare: options.forceShare,
        backing,
        stable: options.stable,
        passThrough: driver.name === "raw",
      }),
    );
    const image = await driver.open(file, {
      write,
      openFile,
      noIo: options.noIo,
      check: options.check,
      warn: options.warn,
    });
    return { image, driver, filename, hostFile: file };
  } catch (e) {
    await file.close();
    if (e instanceof QimgError) {
      throw new QimgError(`Could not open '${filename}': ${e.message}`, {
        exitCode: e.exitCode,
        hint: e.hint,
      });
    }
    throw e;
  }
}

/**
 * An open image and its backing chain. Reads, block status and extents
 * answer for the guest view of the whole chain.
 */
export class Image {
  /** Top layer first. */
  readonly chain: Layer[];

  constructor(chain: Layer[]) {
    this.chain = chain;
  }

  /** The top image's format name. */
  get format(): string {
    return this.chain[0].driver.name;
  }

  /** Virtual size in bytes. */
  get size(): number {
    return this.chain[0].image.size;
  }

  /** The top layer's file name. */
  get filename(): string {
    return this.chain[0].filename;
  }

  /** Reads guest bytes at `offset` into `buf` through the chain. */
  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.#readAt(0, offset, buf);
  }

  #readAt(depth: number, offset: number, buf: Uint8Array): Promise<void> {
    const layer = this.chain[depth];
    if (!layer) {
      buf.fill(0);
      return Promise.resolve();
    }
    const size = layer.image.size;
    if (offset >= size) {
      buf.fill(0);
      return Promise.resolve();
    }
    if (offset + buf.length > size) {
      buf.fill(0, size - offset);
      buf = buf.subarray(0, size - offset);
    }
    const below = depth + 1 < this.chain.length
      ? (o: number, b: Uint8Array) => this.#readAt(depth + 1, o, b)
      : undefined;
    return layer.image.read(offset, buf, below);
  }

  /** Block status through the chain at `offset`, for at most `length` bytes. */
  async blockStatus(offset: number, length: number, base = this.chain.length): Promise<Extent> {
    let above: BlockStatus | undefined;
    for (let depth = 0;; depth++) {
      const layer = this.chain[depth];
      if (depth >= base || !layer) {
        return {
          offset,
          length,
          data: false,
          zero: true,
          present: false,
          depth: depth - 1 < 0 ? 0 : depth - 1,
        };
      }
      if (offset >= layer.image.size) {
        // Past the end of a shorter backing file: zeroes; qemu-img map calls
        // them absent, at the depth of the layer above, with that layer's
        // host offset if it had one (an unallocated qcow2 subcluster).
        const host = above?.hostOffset === undefined
          ? {}
          : { hostOffset: above.hostOffset, file: above.file };
        return {
          offset,
          length,
          data: false,
          zero: true,
          present: false,
          depth: depth - 1,
          ...host,
        };
      }
      const s: BlockStatus = await layer.image.blockStatus(
        offset,
        Math.min(length, layer.image.size - offset),
      );
      length = Math.min(length, s.length);
      if (s.data || s.zero) {
        return {
          offset,
          length,
          data: s.data,
          zero: s.zero,
          present: true,
          depth,
          hostOffset: s.hostOffset,
          file: s.file,
          compressed: s.compressed,
        };
      }
      if (depth === this.chain.length - 1) {
        // Unallocated at the bottom reads as zeroes; a host offset still
        // shows (qcow2's unallocated subclusters of an allocated cluster).
        const host = s.hostOffset === undefined ? {} : { hostOffset: s.hostOffset, file: s.file };
        return { offset, length, data: false, zero: true, present: false, depth, ...host };
      }
      above = s;
    }
  }

  /**
   * Yields coalesced extents from `start` for `length` bytes. Neighbours
   * merge when their status is the same and their host offsets continue.
   * With `base`, only the layers above that depth are asked (blockStatus).
   */
  async *extents(
    options: { start?: number; length?: number; base?: number } = {},
  ): AsyncGenerator<Extent> {
    const start = options.start ?? 0;
    const end = Math.min(this.size, start + (options.length ?? this.size));
    let pending: Extent | undefined;
    for (let offset = start; offset < end;) {
      const e = await this.blockStatus(offset, end - offset, options.base);
      if (e.length <= 0) throw new Error(`blockStatus returned an empty run at ${offset}`);
      if (pending && canMerge(pending, e)) {
        pending.length += e.length;
      } else {
        if (pending) yield pending;
        pending = { ...e };
      }
      offset += e.length;
    }
    if (pending) yield pending;
  }

  /** The top layer's format-specific facts. */
  formatInfo(): Promise<FormatInfo> {
    return this.chain[0].image.info();
  }

  /** Flushes every writable layer. */
  async flush(): Promise<void> {
    for (const l of this.chain) await l.image.flush();
  }

  /** Closes every layer. */
  async close(): Promise<void> {
    for (const l of this.chain) await l.image.close();
  }

  /** Closes the image with `await using`. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

function canMerge(a: Extent, b: Extent): boolean {
  if (a.data !== b.data || a.zero !== b.zero || a.present !== b.present || a.depth !== b.depth) {
    return false;
  }
  if (a.compressed !== b.compressed || a.file !== b.file) return false;
  if (a.hostOffset === undefined || b.hostOffset === undefined) {
    return a.hostOffset === b.hostOffset;
  }
  return a.hostOffset + a.length === b.hostOffset;
}

/**
 * Opens an image and, unless told not to, its backing chain.
 */
export async function openImageChain(
  filename: string,
  options: OpenImageOptions = {},
): Promise<Image> {
  const chain: Layer[] = [];
  try {
    chain.push(await openLayer(filename, options, options.write ?? false));
    while (options.backing !== false) {
      const top = chain[chain.length - 1];
      const ref = top.image.backing;
      if (!ref) break;
      if (chain.length >= MAX_CHAIN) {
        throw new QimgError(`Backing chain of '${filename}' is too deep`);
      }
      const path = top.image.file.resolve(ref.name);
      try {
        chain.push(
          await openLayer(
            path,
            { ...options, format: ref.format, warn: undefined, check: undefined },
            false,
            true,
          ),
        );
      } catch (e) {
        if (!options.nestBackingErrors || !(e instanceof QimgError)) throw e;
        const own = `Could not open '${path}': `;
        const inner = e.message.startsWith(own) ? e.message.slice(own.length) : e.message;
        throw new QimgError(
          `Could not open '${filename}': ` + "Could not open backing file: ".repeat(chain.length) +
            inner,
          { exitCode: e.exitCode, hint: e.hint },
        );
      }
    }
  } catch (e) {
    for (const l of chain) await l.image.close();
    throw e;
  }
  return new Image(chain);
}
