/**
 * Image comparison as qemu-img compare does it: walk the block status of
 * both images side by side, read only where at least one of them holds
 * data, and report the first differing 512-byte sector.
 */

import { Buffer } from "node:buffer";
import type { Extent, Image } from "./image.ts";

/** Largest read, as qemu-img's IO_BUF_SIZE. */
const CHUNK = 2 * 1024 * 1024;
const SECTOR = 512;

/** How two images compared. */
export type CompareResult =
  | { kind: "identical" }
  /** The first differing (or, past the shorter image, non-zero) sector. */
  | { kind: "content"; offset: number }
  /** Strict mode: the sizes differ. */
  | { kind: "size" }
  /** Strict mode: allocation status differs at `offset`. */
  | { kind: "status"; offset: number };

/** Options for `compareImages`. */
export interface CompareOptions {
  /** Fail on different sizes or block status (`-s`). */
  strict?: boolean;
  /** Called with the bytes each step covered, for a progress meter. */
  onProgress?: (bytes: number, total: number) => void;
  /** Called when the sizes differ, before the longer image's tail is checked. */
  onSizeMismatch?: () => void;
}

/**
 * Compares the guest contents of two images. Images of different sizes
 * are equal when the longer one reads as zeroes past the shorter one.
 */
export async function compareImages(
  a: Image,
  b: Image,
  options: CompareOptions = {},
): Promise<CompareResult> {
  const sizeA = a.size;
  const sizeB = b.size;
  const common = Math.min(sizeA, sizeB);
  const total = Math.max(sizeA, sizeB);
  const progress = options.onProgress ?? (() => {});
  if (options.strict && sizeA !== sizeB) return { kind: "size" };

  let offset = 0;
  while (offset < common) {
    const sa = await a.blockStatus(offset, sizeA - offset);
    const sb = await b.blockStatus(offset, sizeB - offset);
    let chunk = Math.min(sa.length, sb.length);
    const fa = statusFlags(a, sa);
    const fb = statusFlags(b, sb);
    if (options.strict && fa !== fb) return { kind: "status", offset };
    if (sa.zero && sb.zero) {
      // Both read as zeroes: nothing to read.
    } else if ((fa & ALLOCATED) === (fb & ALLOCATED)) {
      if (fa & ALLOCATED) {
        chunk = Math.min(chunk, CHUNK);
        const [ba, bb] = await Promise.all([readAt(a, offset, chunk), readAt(b, offset, chunk)]);
        const at = firstDifference(ba, bb);
        if (at >= 0) return { kind: "content", offset: offset + sectorStart(at) };
      }
    } else {
      chunk = Math.min(chunk, CHUNK);
      const at = firstNonZero(await readAt(fa & ALLOCATED ? a : b, offset, chunk));
      if (at >= 0) return { kind: "content", offset: offset + sectorStart(at) };
    }
    offset += chunk;
    progress(chunk, total);
  }

  if (sizeA !== sizeB) {
    options.onSizeMismatch?.();
    const longer = sizeA > sizeB ? a : b;
    while (offset < total) {
      const s = await longer.blockStatus(offset, total - offset);
      let chunk = s.length;
      if (!s.zero && statusFlags(longer, s) & ALLOCATED) {
        chunk = Math.min(chunk, CHUNK);
        const at = firstNonZero(await readAt(longer, offset, chunk));
        if (at >= 0) return { kind: "content", offset: offset + sectorStart(at) };
      }
      offset += chunk;
      progress(chunk, total);
    }
  }
  return { kind: "identical" };
}

const ALLOCATED = 0x10;

/**
 * The block status word qemu's compare sees (bdrv_block_status_above):
 * data, zero, offset valid, allocated, and whether the run reaches the
 * end. Past the end of a shorter backing file, qemu answers "zero,
 * allocated" where map's view (Image.blockStatus) says absent.
 */
function statusFlags(image: Image, e: Extent): number {
  const eof = e.offset + e.length === image.size ? 0x20 : 0;
  if (!e.present && e.depth < image.chain.length - 1) return 2 | ALLOCATED | eof;
  return (e.data ? 1 : 0) | (e.zero ? 2 : 0) | (e.hostOffset !== undefined ? 4 : 0) |
    (e.present ? ALLOCATED : 0) | eof;
}

async function readAt(image: Image, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  await image.read(offset, buf);
  return buf;
}

/** qemu reports sectors: the offset of the 512-byte block holding byte `at`. */
function sectorStart(at: number): number {
  return at - (at % SECTOR);
}

const ZEROES = new Uint8Array(CHUNK);

/** Whether two equally long buffers are equal, by the runtime's memcmp. */
function same(x: Uint8Array, y: Uint8Array): boolean {
  return Buffer.compare(x, y) === 0;
}

/** Index of the first differing byte of two equally long buffers, or -1. */
export function firstDifference(x: Uint8Array, y: Uint8Array): number {
  if (same(x, y)) return -1;
  // memcmp over 64 KiB steps finds the differing stretch; words and bytes the place.
  let base = 0;
  while (
    base + 65536 < x.length && same(x.subarray(base, base + 65536), y.subarray(base, base + 65536))
  ) {
    base += 65536;
  }
  if (base > 0) {
    const at = firstDifference(x.subarray(base), y.subarray(base));
    return at < 0 ? -1 : base + at;
  }
  let i = 0;
  // Word compares need 4-byte aligned views; misaligned input goes byte by byte.
  if (((x.byteOffset | y.byteOffset) & 3) === 0) {
    const words = x.length >>> 2;
    const wx = new Uint32Array(x.buffer, x.byteOffset, words);
    const wy = new Uint32Array(y.buffer, y.byteOffset, words);
    while (i < words && wx[i] === wy[i]) i++;
  }
  for (let j = i * 4; j < x.length; j++) if (x[j] !== y[j]) return j;
  return -1;
}

/** Index of the first non-zero byte, or -1. */
export function firstNonZero(x: Uint8Array): number {
  if (x.length <= CHUNK && same(x, ZEROES.subarray(0, x.length))) return -1;
  let i = 0;
  if ((x.byteOffset & 3) === 0) {
    const words = x.length >>> 2;
    const w = new Uint32Array(x.buffer, x.byteOffset, words);
    while (i < words && w[i] === 0) i++;
  }
  for (let j = i * 4; j < x.length; j++) if (x[j] !== 0) return j;
  return -1;
}
