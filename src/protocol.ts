/** The host-file ("file" protocol) level of image creation: its options and preallocation. */

import type { BlockFile } from "./file.ts";
import type { OptionDesc } from "./options.ts";
import { QimgError } from "./errors.ts";

/** Options qemu's file protocol adds to every format's create options. */
export const PROTOCOL_CREATE_OPTIONS: OptionDesc[] = [
  {
    name: "preallocation",
    type: "string",
    help: "Preallocation mode (allowed values: off, falloc, full)",
  },
  { name: "nocow", type: "bool", help: "Turn off copy-on-write (valid only on btrfs)" },
  {
    name: "extent_size_hint",
    type: "size",
    help: "Extent size hint for the image file, 0 to disable",
  },
];

/**
 * Preallocates `length` bytes at `offset` of a file already truncated to
 * cover them: `falloc` reserves blocks, `full` writes zeroes.
 */
export async function preallocateFile(
  file: BlockFile,
  offset: number,
  length: number,
  mode: string,
): Promise<void> {
  switch (mode) {
    case "off":
      return;
    case "falloc":
      if (file.allocate) return await file.allocate(offset, length);
      // Without fallocate, writing zeroes is the only way to reserve blocks.
      return await writeZeroBytes(file, offset, length);
    case "full":
      return await writeZeroBytes(file, offset, length);
    default:
      throw new QimgError(`Invalid parameter '${mode}'`);
  }
}

async function writeZeroBytes(file: BlockFile, offset: number, length: number): Promise<void> {
  const chunk = new Uint8Array(Math.min(length, 1 << 20));
  for (let done = 0; done < length; done += chunk.length) {
    await file.write(offset + done, chunk.subarray(0, Math.min(chunk.length, length - done)));
  }
}
