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

import { type Image, openImageChain, type OpenImageOptions } from "./src/image.ts";

export { Image } from "./src/image.ts";
export type { Extent, ImageInfo } from "./src/image.ts";
export type { CheckResult } from "./src/driver.ts";
export { QimgError } from "./src/errors.ts";
export { parseSize } from "./src/size.ts";

/**
 * Opens a disk image and its backing chain, probing the format unless
 * `options.format` is given.
 *
 * @param path The image file.
 * @param options `format`, `write`, `backing` (open the chain, default true).
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
 * ```
 */
export function openImage(
  path: string,
  options: Pick<OpenImageOptions, "format" | "write" | "backing"> = {},
): Promise<Image> {
  return openImageChain(path, options);
}
