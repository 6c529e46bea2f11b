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

import { type Image as ChainImage, openImageChain } from "./src/image.ts";
import type { Extent, ImageInfo } from "./src/image.ts";
import type { CheckResult } from "./src/driver.ts";
import { imageInfo } from "./src/cmd_info.ts";
import { EXIT, QimgError } from "./src/errors.ts";

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

  constructor(chain: ChainImage) {
    this.#chain = chain;
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
    return withoutUndefined(await imageInfo(this.#chain, 0)) as ImageInfo;
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

/** A copy without the `undefined` members qemu does not print, so it deep-equals qemu's JSON. */
function withoutUndefined(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(withoutUndefined);
  if (v === null || typeof v !== "object") return v;
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(v)) if (x !== undefined) out[k] = withoutUndefined(x);
  return out;
}

/**
 * Opens a disk image and its backing chain, probing the format unless
 * `options.format` is given.
 *
 * @param path The image file.
 * @param options `format` (default: probed), `write` (default false),
 *   `backing` (open the backing chain, default true).
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
 */
export async function openImage(
  path: string,
  options: { format?: string; write?: boolean; backing?: boolean } = {},
): Promise<Image> {
  return new OpenedImage(await openImageChain(path, options));
}
