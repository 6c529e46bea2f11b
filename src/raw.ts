/** The raw format: guest bytes are the file's bytes. */

import type {
  BlockStatus,
  CreateOptions,
  FormatDriver,
  FormatImage,
  FormatInfo,
} from "./driver.ts";
import { type BlockFile, readZeroFilled } from "./file.ts";
import { QimgError } from "./errors.ts";
import { alignUp } from "./bytes.ts";
import { createFile, parsePreallocation, truncateFile } from "./protocol.ts";
import { RAW_CREATE_OPTIONS } from "./options.ts";

class RawImage implements FormatImage {
  readonly file: BlockFile;
  #size: number;
  constructor(file: BlockFile, size: number) {
    this.file = file;
    this.#size = size;
  }

  get size(): number {
    return this.#size;
  }

  read(offset: number, buf: Uint8Array): Promise<void> {
    return readZeroFilled(this.file, offset, buf);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    await this.file.write(offset, data);
    if (offset + data.length > this.#size) this.#size = offset + data.length;
  }

  async writeZeroes(
    offset: number,
    length: number,
    options: { mayUnmap?: boolean } = {},
  ): Promise<void> {
    // Within the file, a punched hole reads as zeroes and frees the blocks (as qemu's file driver).
    if (options.mayUnmap && this.file.discard && offset + length <= (await this.file.size())) {
      if (await this.file.discard(offset, length)) return;
    }
    const chunk = new Uint8Array(Math.min(length, 1 << 20));
    for (let done = 0; done < length; done += chunk.length) {
      await this.file.write(
        offset + done,
        chunk.subarray(0, Math.min(chunk.length, length - done)),
      );
    }
  }

  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    const e = await this.file.extent(offset, Math.min(length, this.#size - offset));
    return {
      length: Math.min(e.length, this.#size - offset),
      data: e.data,
      zero: !e.data,
      hostOffset: offset,
      file: this.file.name,
    };
  }

  info(): Promise<FormatInfo> {
    return Promise.resolve({});
  }

  async resize(size: number, options: { preallocation?: string }): Promise<void> {
    // The file takes exactly the new length; the guest sees whole sectors.
    await truncateFile(this.file, size, parsePreallocation(options.preallocation));
    this.#size = alignUp(size, 512);
  }

  flush(): Promise<void> {
    return this.file.flush();
  }

  close(): Promise<void> {
    return this.file.close();
  }
}

async function createRaw(file: BlockFile, options: CreateOptions): Promise<void> {
  // raw's create is the protocol's: the host file is the image.
  const prealloc = options.options.preallocation;
  await createFile(file, options.size, parsePreallocation(prealloc as string | undefined));
}

/** The raw format driver. */
export const rawDriver: FormatDriver = {
  name: "raw",
  probe: () => 1,
  async open(file) {
    // The block layer counts whole 512-byte sectors; the tail reads as zeroes.
    return new RawImage(file, alignUp(await file.size(), 512));
  },
  create: createRaw,
  createOptions: RAW_CREATE_OPTIONS,
  // A raw file is as large as its guest, whatever the source holds.
  // Whole sectors, as qemu's raw_measure.
  measure: (size) => {
    const bytes = alignUp(size, 512);
    return Promise.resolve({ required: bytes, fullyAllocated: bytes });
  },
};

/** Raised by drivers whose format a file is not. */
export function notInFormat(format: string): QimgError {
  return new QimgError(`Image is not in ${format} format`);
}
