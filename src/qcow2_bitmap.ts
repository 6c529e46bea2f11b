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
  readPadded,
  readQcow2Header,
} from "./qcow2_header.ts";
import { Qcow2Refcounts } from "./qcow2_write.ts";
import { headerCluster } from "./qcow2_amend.ts";

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

/** A directory entry's size: 24 bytes, the name, padding to 8 bytes. */
function entrySize(name: Uint8Array): number {
  return Math.ceil((24 + name.length) / 8) * 8;
}

/**
 * Stores `bitmaps` (in directory order, none in use, each with bits for the
 * image's size) into the qcow2 image in `file`, which has none yet. The
 * image's own tables must be on disk already (its writer flushed), since
 * this allocates through a refcount view of its own.
 */
export async function storeBitmaps(
  file: BlockFile,
  bitmaps: readonly BitmapContent[],
): Promise<void> {
  if (bitmaps.length === 0) return;
  const h = await readQcow2Header(file, { write: true });
  if (h.bitmaps && !h.bitmapsInconsistent) {
    throw new QimgError("adding bitmaps to a qcow2 image that has some: not supported yet");
  }
  const cs = h.clusterSize;
  const refs = await Qcow2Refcounts.open(file, h);
  const enc = new TextEncoder();
  const dir: { name: Uint8Array; tableOffset: number; tableSize: number; b: BitmapContent }[] = [];
  for (const b of bitmaps) {
    const bytes = bitmapBytes(h.size, b.granularity);
    const tableSize = Math.ceil(bytes / cs);
    const table = new Uint8Array(tableSize * 8);
    for (let k = 0; k < tableSize; k++) {
      const part = b.bits.subarray(k * cs, Math.min((k + 1) * cs, bytes));
      if (!part.some((x) => x !== 0)) continue; // an all-zero cluster needs no data cluster
      const offset = await refs.allocClusters(1);
      const cluster = new Uint8Array(cs);
      cluster.set(part);
      await file.write(offset, cluster);
      putBe64(table, k * 8, offset);
    }
    const tableOffset = await refs.allocClusters(Math.ceil(table.length / cs));
    await file.write(tableOffset, table);
    dir.push({ name: enc.encode(b.name), tableOffset, tableSize, b });
  }
  const dirSize = dir.reduce((n, d) => n + entrySize(d.name), 0);
  const raw = new Uint8Array(dirSize);
  let pos = 0;
  for (const d of dir) {
    putBe64(raw, pos, d.tableOffset);
    putBe32(raw, pos + 8, d.tableSize);
    putBe32(raw, pos + 12, d.b.enabled ? BME_FLAG_AUTO : 0);
    raw[pos + 16] = BT_DIRTY_TRACKING_BITMAP;
    raw[pos + 17] = Math.log2(d.b.granularity);
    putBe16(raw, pos + 18, d.name.length);
    raw.set(d.name, pos + 24);
    pos += entrySize(d.name);
  }
  const dirOffset = await refs.allocClusters(Math.ceil(dirSize / cs));
  await file.write(dirOffset, raw);
  // Refcounts first, then the header that makes the new clusters reachable.
  await refs.cache.flush();
  h.bitmaps = { nbBitmaps: dir.length, directorySize: dirSize, directoryOffset: dirOffset };
  h.bitmapsInconsistent = false;
  h.autoclearFeatures |= AUTOCLEAR_BITMAPS;
  await file.write(0, headerCluster(h));
}
