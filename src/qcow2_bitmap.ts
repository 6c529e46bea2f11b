/**
 * qcow2 persistent dirty bitmaps (docs/interop/qcow2.txt, "Bitmaps"):
 * reading a bitmap's bits through its bitmap table, and storing bitmaps
 * into an image as qemu does when it closes one: per bitmap its data
 * clusters (only those with a set bit), then its table; then the bitmap
 * directory; then the header with the bitmaps extension and autoclear bit.
 */

import type { BlockFile } from "./file.ts";
import { QimgError } from "./errors.ts";
import { putBe16, putBe32, putBe64 } from "./bytes.ts";
import {
  AUTOCLEAR_BITMAPS,
  type BitmapDirEntry,
  type Qcow2Header,
  readBitmapDirectory,
  readPadded,
  readQcow2Header,
} from "./qcow2_header.ts";
import { Qcow2Refcounts } from "./qcow2_refcounts.ts";
import { headerCluster } from "./qcow2_header_write.ts";

/** Directory entry flags. */
const BME_FLAG_IN_USE = 1;
const BME_FLAG_AUTO = 2;
/** The only bitmap type: dirty tracking. */
const BT_DIRTY_TRACKING_BITMAP = 1;
/** Bitmap table entry: bits 9-55 hold the data cluster's offset. */
const BME_TABLE_OFFSET_MASK = 0x00fffffffffffe00n;
/** Bit 0 of an entry without a cluster: the whole cluster reads as ones. */
const BME_TABLE_ALL_ONES = 1n;
/** Bits 1-8 and 56-63 are reserved. */
const BME_TABLE_RESERVED = 0xff000000000001fen;

/** A persistent dirty bitmap with its bits. */
export interface BitmapContent {
  name: string;
  /** Bytes of guest data each bit stands for. */
  granularity: number;
  /** Records writes (the "auto" flag); a disabled bitmap keeps its bits as they are. */
  enabled: boolean;
  /** Marked in use: not saved properly, so its bits cannot be trusted (qemu's "inconsistent"). */
  inUse: boolean;
  /**
   * One bit per granule of the disk, least significant bit first
   * (bit `i % 8` of byte `i / 8` covers bytes from `i * granularity`);
   * empty for bitmaps in use, whose bits are not read.
   */
  bits: Uint8Array;
}

/** Bytes holding one bit per granule of a disk of `size` bytes. */
function bitmapBytes(size: number, granularity: number): number {
  return Math.ceil(Math.ceil(size / granularity) / 8);
}

/**
 * Reads the bitmaps of the directory `entries` (qcow2Image.bitmapDirectory)
 * with their bits, in directory order.
 */
export async function readBitmaps(
  file: BlockFile,
  header: Qcow2Header,
  entries: readonly BitmapDirEntry[],
): Promise<BitmapContent[]> {
  const cs = header.clusterSize;
  const out: BitmapContent[] = [];
  for (const e of entries) {
    const granularity = 2 ** e.granularityBits;
    const inUse = (e.flags & BME_FLAG_IN_USE) !== 0;
    const bitmap: BitmapContent = {
      name: e.name,
      granularity,
      enabled: (e.flags & BME_FLAG_AUTO) !== 0,
      inUse,
      bits: new Uint8Array(0),
    };
    out.push(bitmap);
    if (inUse) continue;
    const bits = new Uint8Array(bitmapBytes(header.size, granularity));
    const table = await readPadded(file, e.tableOffset, e.tableSize * 8);
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const invalid = () =>
      new QimgError(`Could not read bitmap '${e.name}' from image: Invalid argument`);
    for (let k = 0; k < e.tableSize && k * cs < bits.length; k++) {
      const entry = view.getBigUint64(k * 8);
      if (entry & BME_TABLE_RESERVED) throw invalid();
      const offset = Number(entry & BME_TABLE_OFFSET_MASK);
      const part = bits.subarray(k * cs, (k + 1) * cs);
      if (offset === 0) {
        if (entry & BME_TABLE_ALL_ONES) part.fill(0xff);
        continue;
      }
      if (entry & BME_TABLE_ALL_ONES || offset % cs) throw invalid();
      part.set((await readPadded(file, offset, cs)).subarray(0, part.length));
    }
    // Bits past the end of the disk are not part of the bitmap.
    const total = Math.ceil(header.size / granularity);
    if (total % 8) bits[bits.length - 1] &= (1 << (total % 8)) - 1;
    bitmap.bits = bits;
  }
  return out;
}

/** Sets bits [first, end) of `bits`, least significant bit first. */
function setBits(bits: Uint8Array, first: number, end: number): void {
  let i = first;
  for (; i < end && i % 8; i++) bits[i >> 3] |= 1 << (i & 7);
  if (i + 8 <= end) {
    bits.fill(0xff, i >> 3, end >> 3);
    i = end - (end % 8);
  }
  for (; i < end; i++) bits[i >> 3] |= 1 << (i & 7);
}

/** A directory entry's size: 24 bytes, the name, padding to 8 bytes. */
function entrySize(name: string): number {
  return Math.ceil((24 + new TextEncoder().encode(name).length) / 8) * 8;
}

/** A bitmap directory entry as stored, with the bits to store for it (qemu's Qcow2Bitmap). */
interface DirEntry {
  name: string;
  tableOffset: number;
  tableSize: number;
  flags: number;
  granularityBits: number;
  /** The in-memory bitmap to store on close; absent: the entry stays as it is (in use). */
  content?: BitmapContent;
}

/** The directory's bytes. */
function encodeDirectory(list: readonly DirEntry[]): Uint8Array {
  const enc = new TextEncoder();
  const raw = new Uint8Array(list.reduce((n, d) => n + entrySize(d.name), 0));
  let pos = 0;
  for (const d of list) {
    const name = enc.encode(d.name);
    putBe64(raw, pos, d.tableOffset);
    putBe32(raw, pos + 8, d.tableSize);
    putBe32(raw, pos + 12, d.flags);
    raw[pos + 16] = BT_DIRTY_TRACKING_BITMAP;
    raw[pos + 17] = d.granularityBits;
    putBe16(raw, pos + 18, name.length);
    raw.set(name, pos + 24);
    pos += entrySize(d.name);
  }
  return raw;
}

/**
 * The persistent bitmaps of a qcow2 image opened for writing, changed as
 * qemu changes them: opening marks the consistent ones in use (directory
 * rewritten in place); `remove` drops one from the image at once (new
 * directory, its clusters freed); everything else happens in memory until
 * `close` stores every consistent bitmap anew (data clusters, table, then
 * the directory and header) and frees their old clusters.
 */
export class Qcow2Bitmaps {
  readonly #file: BlockFile;
  #h: Qcow2Header;
  #refs: Qcow2Refcounts;
  /** The directory on disk. */
  #dir: DirEntry[];
  /**
   * The bitmaps in memory, newest first as qemu lists them (loaded ones in
   * reverse directory order, added ones in front).
   */
  readonly bitmaps: BitmapContent[];

  private constructor(
    file: BlockFile,
    h: Qcow2Header,
    refs: Qcow2Refcounts,
    dir: DirEntry[],
    bitmaps: BitmapContent[],
  ) {
    this.#file = file;
    this.#h = h;
    this.#refs = refs;
    this.#dir = dir;
    this.bitmaps = bitmaps;
  }

  /**
   * Opens the bitmaps of the qcow2 image in `file`, whose own tables are on
   * disk (no writer holds changes), and marks the consistent ones in use.
   */
  static async open(file: BlockFile): Promise<Qcow2Bitmaps> {
    const h = await readQcow2Header(file, { write: true });
    if (h.bitmaps && h.bitmapsInconsistent) {
      throw new QimgError("qcow2 images with stale bitmaps: not supported yet");
    }
    const entries = await readBitmapDirectory(file, h);
    const contents = await readBitmaps(file, h, entries);
    const dir: DirEntry[] = entries.map((e) => ({ ...e }));
    const refs = await Qcow2Refcounts.open(file, h);
    const image = new Qcow2Bitmaps(file, h, refs, dir, contents.reverse());
    if (dir.some((d) => !(d.flags & BME_FLAG_IN_USE))) {
      for (const d of dir) d.flags |= BME_FLAG_IN_USE;
      await file.write(h.bitmaps!.directoryOffset, encodeDirectory(dir));
      // In use on disk before any write the bitmaps do not show yet.
      await file.flush();
    }
    return image;
  }

  /** A bitmap in memory by name. */
  get(name: string): BitmapContent | undefined {
    return this.bitmaps.find((b) => b.name === name);
  }

  /**
   * Marks guest bytes [offset, offset + length) dirty in every enabled
   * bitmap, a granule at a time (qemu's bdrv_set_dirty after each write).
   */
  mark(offset: number, length: number): void {
    if (length <= 0) return;
    for (const b of this.bitmaps) {
      if (!b.enabled || b.inUse) continue;
      const first = Math.floor(offset / b.granularity);
      const end = Math.min(Math.ceil((offset + length) / b.granularity), b.bits.length * 8);
      setBits(b.bits, first, end);
    }
  }

  /**
   * Takes the header and refcounts from the file again: a writer of the
   * image's data may have moved tables and allocated clusters since open.
   */
  async reload(): Promise<void> {
    const dir = this.#h.bitmaps;
    this.#h = await readQcow2Header(this.#file, { write: true });
    // A v2 header (amend to compat=0.10) cannot mark the directory
    // consistent, yet it is still the one to replace and free.
    if (this.#h.bitmapsInconsistent && !this.#h.bitmaps) this.#h.bitmaps = dir;
    this.#refs = await Qcow2Refcounts.open(this.#file, this.#h);
  }

  /**
   * qemu's check before a resize: an inconsistent bitmap (in use when the
   * image was opened) cannot be resized. The first in qemu's list is named.
   */
  checkResize(): void {
    const b = this.bitmaps.find((x) => x.inUse);
    if (b) {
      throw new QimgError(
        `Bitmap '${b.name}' is inconsistent and cannot be used\n` +
          "Try block-dirty-bitmap-remove to delete this bitmap from disk",
      );
    }
  }

  /** Gives every bitmap bits for a disk of `size` bytes: new granules clean, those past the end gone. */
  resize(size: number): void {
    for (const b of this.bitmaps) {
      if (b.inUse) continue;
      const bits = new Uint8Array(bitmapBytes(size, b.granularity));
      bits.set(b.bits.subarray(0, bits.length));
      const total = Math.ceil(size / b.granularity);
      if (total % 8 && bits.length) bits[bits.length - 1] &= (1 << (total % 8)) - 1;
      b.bits = bits;
    }
  }

  /** The header as this module last wrote or read it (bitmaps extension, autoclear bit). */
  get header(): Qcow2Header {
    return this.#h;
  }

  /** Adds a new bitmap (stored on close). */
  add(bitmap: BitmapContent): void {
    this.bitmaps.unshift(bitmap);
  }

  /** Removes a bitmap from memory and from the image. */
  async remove(name: string): Promise<void> {
    const i = this.bitmaps.findIndex((b) => b.name === name);
    if (i >= 0) this.bitmaps.splice(i, 1);
    const gone = this.#dir.find((d) => d.name === name);
    if (!gone) return;
    await this.#writeDirectory(this.#dir.filter((d) => d !== gone));
    await this.#freeTable(gone);
    await this.#refs.cache.flush();
  }

  /** Stores every consistent bitmap anew and frees the clusters they had. */
  async close(): Promise<void> {
    const consistent = this.bitmaps.filter((b) => !b.inUse);
    if (consistent.length === 0) return;
    const cs = this.#h.clusterSize;
    const list = this.#dir.map((d) => ({ ...d }));
    const drop: DirEntry[] = [];
    for (const b of consistent) {
      let d = list.find((e) => e.name === b.name);
      if (!d) {
        d = { name: b.name, tableOffset: 0, tableSize: 0, flags: 0, granularityBits: 0 };
        list.push(d);
      } else {
        drop.push({ ...d });
      }
      d.flags = b.enabled ? BME_FLAG_AUTO : 0;
      d.granularityBits = Math.log2(b.granularity);
      d.content = b;
    }
    for (const d of list) {
      const b = d.content;
      if (!b) continue;
      const bytes = bitmapBytes(this.#h.size, b.granularity);
      const tableSize = Math.ceil(bytes / cs);
      const table = new Uint8Array(tableSize * 8);
      for (let k = 0; k < tableSize; k++) {
        const part = b.bits.subarray(k * cs, Math.min((k + 1) * cs, bytes));
        if (!part.some((x) => x !== 0)) continue; // an all-zero cluster needs no data cluster
        const offset = await this.#refs.allocClusters(1);
        const cluster = new Uint8Array(cs);
        cluster.set(part);
        await this.#file.write(offset, cluster);
        putBe64(table, k * 8, offset);
      }
      d.tableOffset = await this.#refs.allocClusters(Math.ceil(table.length / cs));
      d.tableSize = tableSize;
      await this.#file.write(d.tableOffset, table);
    }
    await this.#writeDirectory(list);
    for (const d of drop) await this.#freeTable(d);
    await this.#refs.cache.flush();
  }

  /**
   * Writes `list` as the new directory (qemu's update_ext_header_and_dir):
   * new clusters, refcounts on disk, the header pointing at it, then the
   * old directory's clusters freed.
   */
  async #writeDirectory(list: DirEntry[]): Promise<void> {
    const h = this.#h;
    const cs = h.clusterSize;
    const old = h.bitmaps;
    if (list.length > 0) {
      const raw = encodeDirectory(list);
      const offset = await this.#refs.allocClusters(Math.ceil(raw.length / cs));
      await this.#file.write(offset, raw);
      await this.#refs.cache.flush();
      h.bitmaps = { nbBitmaps: list.length, directorySize: raw.length, directoryOffset: offset };
      h.bitmapsInconsistent = false;
      h.autoclearFeatures |= AUTOCLEAR_BITMAPS;
    } else {
      h.bitmaps = undefined;
      h.autoclearFeatures &= ~AUTOCLEAR_BITMAPS;
    }
    await this.#file.write(0, headerCluster(h));
    if (old && old.directorySize > 0) {
      await this.#refs.changeRange(old.directoryOffset, old.directorySize, -1);
    }
    this.#dir = list.map((d) => ({ ...d, content: undefined }));
  }

  /** Frees a bitmap's data clusters (their bytes discarded, as qemu's DISCARD_ALWAYS) and its table. */
  async #freeTable(d: DirEntry): Promise<void> {
    const cs = this.#h.clusterSize;
    const table = await readPadded(this.#file, d.tableOffset, d.tableSize * 8);
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    for (let k = 0; k < d.tableSize; k++) {
      const offset = Number(view.getBigUint64(k * 8) & BME_TABLE_OFFSET_MASK);
      if (!offset) continue;
      await this.#refs.changeRange(offset, cs, -1);
      // Where the file cannot punch holes it gets zeroes: the bytes read the same.
      if (!(await this.#file.discard?.(offset, cs))) {
        await this.#file.write(offset, new Uint8Array(cs));
      }
    }
    await this.#refs.changeRange(d.tableOffset, d.tableSize * 8, -1);
  }
}
