/**
 * BlockFile over a Blob (a browser's File): read-only, Web APIs only, so the
 * library can inspect images a page's user picks, with no Deno or Node API.
 * A Blob has no holes and no disk blocks: every range reports data, and
 * `allocated()` is the Blob's size.
 */

import { QimgError } from "./errors.ts";
import { type BlockFile, type HostExtent, resolveRelative } from "./file.ts";

/** The refusal every write-like call gets: a Blob cannot change. */
function readOnly(name: string): QimgError {
  return new QimgError(`Could not write to '${name}': a Blob or File is read-only`);
}

/**
 * A read-only BlockFile over `blob`, named `name` (a File's own name by default).
 * Reads are `blob.slice(a, b).arrayBuffer()`; nothing is read ahead or kept.
 */
export class BlobFile implements BlockFile {
  readonly name: string;
  readonly writable = false;
  #blob: Blob;
  #closed = false;

  constructor(blob: Blob, name: string = blobName(blob)) {
    this.#blob = blob;
    this.name = name;
  }

  #open(): Blob {
    if (this.#closed) throw new Error("Bad file descriptor: the file is closed");
    return this.#blob;
  }

  // deno-lint-ignore require-await
  async size(): Promise<number> {
    return this.#open().size;
  }

  // deno-lint-ignore require-await
  async allocated(): Promise<number> {
    return this.#open().size;
  }

  async read(offset: number, buf: Uint8Array): Promise<number> {
    const blob = this.#open();
    if (offset >= blob.size || buf.length === 0) return 0;
    const end = Math.min(blob.size, offset + buf.length);
    const bytes = new Uint8Array(await blob.slice(offset, end).arrayBuffer());
    buf.set(bytes);
    return bytes.length;
  }

  write(_offset: number, _data: Uint8Array): Promise<void> {
    return Promise.reject(readOnly(this.name));
  }

  truncate(_size: number): Promise<void> {
    return Promise.reject(readOnly(this.name));
  }

  flush(): Promise<void> {
    return Promise.resolve();
  }

  close(): Promise<void> {
    this.#closed = true;
    return Promise.resolve();
  }

  resolve(name: string): string {
    return resolveRelative(this.name, name);
  }

  // deno-lint-ignore require-await
  async extent(_offset: number, length: number): Promise<HostExtent> {
    return { length, data: true };
  }
}

/** A File's name, or "blob" for a Blob that is not a File. */
export function blobName(blob: Blob): string {
  const name = (blob as { name?: unknown }).name;
  return typeof name === "string" && name !== "" ? name : "blob";
}

/**
 * Opens files an image refers to (backing, data and vmdk extent files) from
 * `files`, by the name the image stores, resolved as qemu would resolve it
 * against the image's name. A name not in `files` fails as a missing file
 * does (ENOENT: "No such file or directory"); writing is refused.
 */
export function blobOpener(
  files: Record<string, Blob>,
): (path: string, write: boolean) => Promise<BlockFile> {
  return (path, write) => {
    if (write) return Promise.reject(readOnly(path));
    const blob = Object.hasOwn(files, path) ? files[path] : undefined;
    if (!blob) {
      return Promise.reject(
        Object.assign(new Error(`${path}: not among the files given`), { code: "ENOENT" }),
      );
    }
    return Promise.resolve(new BlobFile(blob, path));
  };
}
