/**
 * qimg: QEMU's qemu-img disk image utility as a TypeScript library.
 *
 * @example Usage
 * ```ts
 * import { openImage } from "@qimg/qimg";
 * const path = await Deno.makeTempFile({ suffix: ".raw" });
 * await Deno.writeFile(path, new Uint8Array(1024));
 * await using image = await openImage(path);
 * console.log(image.format, image.size); // raw 1024
 * ```
 * @module
 */

import { type Image as ChainImage, openHostFile, openImageChain } from "./src/image.ts";
import type { BlockFile } from "./src/file.ts";
import type { Extent, ImageInfo } from "./src/image.ts";
import type { CheckResult } from "./src/driver.ts";
import { imageInfo } from "./src/cmd_info.ts";
import { EXIT, QimgError } from "./src/errors.ts";
import { BlobFile, blobName, blobOpener } from "./src/blob_file.ts";
import { type JsonValue, toJsonPretty } from "./src/output.ts";

export type { Extent, ImageInfo } from "./src/image.ts";
export type { CheckResult } from "./src/driver.ts";
export type { JsonValue } from "./src/output.ts";
export { QimgError } from "./src/errors.ts";
export { parseSize } from "./src/size.ts";
export { createImage } from "./src/create.ts";
export type { CreateImageOptions } from "./src/create.ts";

/**
 * An open disk image: the guest view of the image and its backing chain.
 * Close it when done, or open it with `await using`.
 *
 * @example Usage
 * ```ts
 * import { type Image, openImage } from "@qimg/qimg";
 * const path = await Deno.makeTempFile({ suffix: ".raw" });
 * await Deno.writeFile(path, new Uint8Array(8192).fill(1, 4096));
 * const image: Image = await openImage(path);
 * try {
 *   for await (const e of image.extents()) console.log(e.offset, e.length, e.data);
 * } finally {
 *   await image.close();
 * }
 * ```
 */
export interface Image extends AsyncDisposable {
  /** The format name as qemu spells it (`raw`, `qcow2`, `vpc`, ...). */
  readonly format: string;
  /** Virtual (guest) size in bytes. */
  readonly size: number;
  /**
   * Reads guest bytes through the backing chain; bytes past the end read as zeroes.
   * @param offset Guest offset in bytes.
   * @param buf Filled completely.
   */
  read(offset: number, buf: Uint8Array): Promise<void>;
  /**
   * The allocation map, as `qemu-img map` sees it: coalesced runs with their
   * status through the chain.
   * @param options `start` and `length` of the guest range (default: all).
   */
  extents(options?: { start?: number; length?: number }): AsyncIterable<Extent>;
  /** The object `qemu-img info --output=json` prints for this image. */
  info(): Promise<ImageInfo>;
  /**
   * Checks the image's metadata, as `qemu-img check`. Rejects with a
   * `QimgError` (exit code 63) when the format has no check, as raw.
   * @param options `repair` (the image must be open for writing).
   */
  check(options?: { repair?: "leaks" | "all" }): Promise<CheckResult>;
  /** Closes the image and its backing files. */
  close(): Promise<void>;
}

/** The library's Image: a thin view of the chain image that hides its layers. */
class OpenedImage implements Image {
  #chain: ChainImage;
  /** Opened from a Blob: its size on disk is unknown. */
  #blob: boolean;

  constructor(chain: ChainImage, blob = false) {
    this.#chain = chain;
    this.#blob = blob;
  }

  get format(): string {
    return this.#chain.format;
  }

  get size(): number {
    return this.#chain.size;
  }

  read(offset: number, buf: Uint8Array): Promise<void> {
    return this.#chain.read(offset, buf);
  }

  extents(options: { start?: number; length?: number } = {}): AsyncIterable<Extent> {
    return this.#chain.extents(options);
  }

  async info(): Promise<ImageInfo> {
    const info = await imageInfo(this.#chain, 0);
    // A Blob has no disk blocks: qemu leaves "actual-size" out when it cannot tell.
    if (this.#blob) info["actual-size"] = undefined;
    return withoutUndefined(info) as ImageInfo;
  }

  check(options: { repair?: "leaks" | "all" } = {}): Promise<CheckResult> {
    const top = this.#chain.chain[0].image;
    if (!top.check) {
      return Promise.reject(
        new QimgError("This image format does not support checks", {
          exitCode: EXIT.CHECK_UNSUPPORTED,
        }),
      );
    }
    return top.check(options);
  }

  close(): Promise<void> {
    return this.#chain.close();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/**
 * Renders a value as qemu-img's `--output=json` does (4-space indentation,
 * members in QEMU's QDict order, a final newline): `toQemuJson(await
 * image.info())` is the text `qemu-img info --output=json` prints, where
 * `JSON.stringify` would give another member order.
 *
 * @param value What `info()` gives, or any JSON value.
 * @returns qemu's pretty JSON text, ending with a newline.
 * @example Usage
 * ```ts
 * import { openImage, toQemuJson } from "@qimg/qimg";
 * await using image = await openImage(new File([new Uint8Array(512)], "disk.img"));
 * console.log(toQemuJson(await image.info()));
 * ```
 */
export function toQemuJson(value: JsonValue | ImageInfo): string {
  return toJsonPretty(value as JsonValue) + "\n";
}

/** A copy without the `undefined` members qemu does not print, so it deep-equals qemu's JSON. */
function withoutUndefined(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(withoutUndefined);
  if (v === null || typeof v !== "object") return v;
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(v)) if (x !== undefined) out[k] = withoutUndefined(x);
  return out;
}

/** `path` without `.` and `x/..` segments, keeping it absolute or relative. */
function normalizePath(path: string): string {
  const out: string[] = [];
  for (const part of path.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === ".." && out.length && out[out.length - 1] !== "..") out.pop();
    else if (part !== ".." || !path.startsWith("/")) out.push(part);
  }
  return (path.startsWith("/") ? "/" : "") + out.join("/");
}

/** Whether `path` lies inside directory `root` (lexically; both absolute or both relative). */
function isInside(path: string, root: string): boolean {
  const p = normalizePath(path);
  const r = normalizePath(root);
  if (r === "") return !p.startsWith("/") && p !== ".." && !p.startsWith("../");
  return p === r || p.startsWith(r.endsWith("/") ? r : r + "/");
}

/**
 * Opens host files for one image: the image itself, and backing or data
 * files only inside `roots`, so that an untrusted image cannot make the
 * library read files elsewhere (the CLI follows qemu and opens any path).
 */
function gatedOpener(
  image: string,
  roots: string[],
): (path: string, write: boolean) => Promise<BlockFile> {
  return (path, write) => {
    if (path !== image && !roots.some((r) => isInside(path, r))) {
      return Promise.reject(
        new QimgError(
          `'${path}' is outside the directories image files may refer to ` +
            `(${roots.map((r) => `'${r}'`).join(", ")}; see options.roots)`,
        ),
      );
    }
    return openHostFile(path, write);
  };
}

/**
 * Options of {@linkcode openImage}.
 *
 * @example Usage
 * ```ts
 * import { openImage, type OpenImageOptions } from "@qimg/qimg";
 * const options: OpenImageOptions = { format: "raw", backing: false };
 * await using image = await openImage(new File([new Uint8Array(512)], "disk.img"), options);
 * console.log(image.format); // raw
 * ```
 */
export interface OpenImageOptions {
  /** The format; probed from the first bytes when absent. */
  format?: string;
  /** Open for writing (default false; a Blob is always read-only). */
  write?: boolean;
  /** Open the backing chain (default true). */
  backing?: boolean;
  /**
   * Directories backing and data files may come from, for a path (default:
   * the image's directory); give them absolute when the path is.
   */
  roots?: string[];
  /**
   * For a Blob or File: the only other files the image may open (backing,
   * data and vmdk extent files), by the name the image stores for them (as
   * qemu resolves it against the image's name; a File's name has no
   * directory, so usually the stored name itself). A file not given fails
   * to open as a missing one does, with qemu-img's message: "Could not open
   * 'top.qcow2': Could not open backing file: Could not open 'base.qcow2':
   * No such file or directory". Open with `backing: false` to read an
   * overlay alone.
   */
  files?: Record<string, Blob>;
}

/**
 * Opens a disk image and its backing chain, probing the format unless
 * `options.format` is given. The image is a path or, in a browser, a Blob
 * or File (read-only; no Deno or Node API is used then). Backing and data
 * files named by the image open only from inside `options.roots` (default:
 * the image's directory) for a path, and only from `options.files` for a Blob.
 *
 * For a Blob, `info()` is what `qemu-img info --output=json` prints for a
 * file of the Blob's name (a File's `name`, else "blob"), without
 * "actual-size": a Blob has no disk blocks. `extents()` reports no holes in
 * the Blob (raw images map as all data, as qemu-img on a file without holes).
 *
 * @param path The image file: a path, or a Blob or File.
 * @param options `format` (default: probed), `write` (default false),
 *   `backing` (open the backing chain, default true), `roots` (directories
 *   backing and data files may come from; give them absolute when `path` is),
 *   `files` (for a Blob: backing, data and extent files by name).
 * @returns The open image; close it (or use `await using`).
 * @example Usage
 * ```ts
 * import { openImage } from "@qimg/qimg";
 * const path = await Deno.makeTempFile({ suffix: ".raw" });
 * await Deno.writeFile(path, new Uint8Array(4096).fill(7));
 * await using image = await openImage(path, { format: "raw" });
 * const buf = new Uint8Array(16);
 * await image.read(0, buf);
 * console.log(buf[0]); // 7
 * const info = await image.info();
 * console.log(info["virtual-size"]); // 4096
 * ```
 * @example A File, as a browser's <input type="file"> gives
 * ```ts
 * import { openImage } from "@qimg/qimg";
 * const file = new File([new Uint8Array(8192).fill(1, 4096)], "disk.img");
 * await using image = await openImage(file);
 * console.log((await image.info()).filename); // disk.img
 * for await (const e of image.extents()) console.log(e.offset, e.length, e.data);
 * ```
 * @example An overlay with its backing file, both picked by the user
 * ```ts
 * import { openImage } from "@qimg/qimg";
 * async function open(top: File, base: File) {
 *   return await openImage(top, { files: { [base.name]: base } });
 * }
 * ```
 */
export async function openImage(
  path: string | Blob,
  options: OpenImageOptions = {},
): Promise<Image> {
  const { format, write, backing } = options;
  if (typeof path !== "string") {
    const name = blobName(path);
    if (write) throw new QimgError(`Could not open '${name}': a Blob or File is read-only`);
    const others = blobOpener(options.files ?? {});
    const top = path;
    const openFile = (p: string, w: boolean): Promise<BlockFile> =>
      p === name && !w ? Promise.resolve(new BlobFile(top, name)) : others(p, w);
    return new OpenedImage(
      await openImageChain(name, { format, backing, openFile, nestBackingErrors: true }),
      true,
    );
  }
  const slash = path.lastIndexOf("/");
  const roots = options.roots ?? [slash < 0 ? "." : path.slice(0, slash + 1) || "/"];
  return new OpenedImage(
    await openImageChain(path, {
      format,
      write,
      backing,
      openFile: gatedOpener(path, roots),
      nestBackingErrors: true,
    }),
  );
}
