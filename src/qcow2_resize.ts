/**
 * qcow2 resize as qemu 7.2's qcow2_co_truncate, beyond the plain grow the
 * writer does (qcow2_write.ts): shrinking (clusters past the new end lose
 * this layer's reference, L1 entries past it are cleared, refcount blocks
 * left empty are dropped, the file tail is cut), preallocation of the grown
 * range (metadata: clusters allocated, the file grown sparse; falloc/full:
 * refcount structures for the new area first, then the data clusters
 * contiguous at the file end), and zeroes over the grown range when the
 * backing file is longer than the image was (it must not show through).
 *
 * Metadata ordering for crash safety: a new L2 table or data cluster has
 * its refcount on disk before any table points at it; a cluster loses its
 * refcount only after no table points at it any more.
 */

import type { BackingReader } from "./driver.ts";
import type { BlockFile } from "./file.ts";
import { QimgError } from "./errors.ts";
import { alignUp, putBe64 } from "./bytes.ts";
import { type PreallocMode, truncateFile } from "./protocol.ts";
import { INCOMPAT_DIRTY, type Qcow2Header, readPadded } from "./qcow2_header.ts";
import {
  type ClusterMapper,
  compressedDescriptor,
  entryOffset,
  OFLAG_COMPRESSED_HI,
  OFLAG_COPIED_HI,
} from "./qcow2_cluster.ts";
import { getRefcount, Qcow2Refcounts, setRefcount } from "./qcow2_refcounts.ts";

const COPIED = 1n << 63n;
/** Header offsets: virtual size; refcount table offset and clusters. */
const HDR_SIZE = 24;
const HDR_REFTABLE = 48;

/** What resize needs of an open qcow2 image. */
export interface ResizeTarget {
  readonly file: BlockFile;
  readonly header: Qcow2Header;
  readonly mapper: ClusterMapper;
  /** The external data file, when the image has one. */
  readonly dataFile?: BlockFile;
  readonly hasBacking: boolean;
  /** The writer's plain grow: a larger L1 table when needed, then the header's size. */
  grow(size: number): Promise<void>;
  /** Makes guest bytes read as zeroes through the writer. */
  writeZeroes(offset: number, length: number, backingRead?: BackingReader): Promise<void>;
  /** Writes guest bytes through the writer. */
  write(offset: number, data: Uint8Array, backingRead?: BackingReader): Promise<void>;
  /** Flushes the writer and forgets every cached table (metadata is edited directly next). */
  settle(): Promise<void>;
  /** Loads the persistent bitmaps, refusing inconsistent ones as qemu (qcow2_bitmap.ts). */
  checkBitmaps?(): Promise<void>;
}

/** How to resize. */
export interface ResizeOptions {
  preallocation?: string;
  /** The length of the backing file, when the image has one. */
  backingSize?: number;
  /** Reads the layers below (copy-on-write of a partly zeroed cluster). */
  backingRead?: BackingReader;
}

/** Resizes a qcow2 image to `size` bytes. */
export async function resizeQcow2(
  t: ResizeTarget,
  size: number,
  options: ResizeOptions = {},
): Promise<void> {
  const h = t.header;
  const prealloc = (options.preallocation ?? "off") as PreallocMode;
  if (!["off", "metadata", "falloc", "full"].includes(prealloc)) {
    throw new QimgError(`Unsupported preallocation mode '${prealloc}'`);
  }
  if (size % 512) throw new QimgError("The new size must be a multiple of 512");
  if (h.nbSnapshots && h.version < 3) {
    throw new QimgError("Can't resize a v2 image which has snapshots");
  }
  if (h.incompatibleFeatures & INCOMPAT_DIRTY) {
    throw new QimgError("writing dirty qcow2 images (lazy refcounts): not supported yet");
  }
  // qemu resizes the bitmaps and stores them again as it closes the image.
  if (h.bitmaps && !h.bitmapsInconsistent) {
    if (!t.checkBitmaps) {
      throw new QimgError("resize of qcow2 images with bitmaps: not supported yet");
    }
    await t.checkBitmaps();
  }
  const old = h.size;
  if (size < old) {
    if (prealloc !== "off") {
      throw new QimgError("Preallocation can't be used for shrinking an image");
    }
    await t.settle();
    await shrink(t, size);
    return;
  }
  // A longer backing file must not show through the grown range (qemu's
  // BDRV_REQ_ZERO_WRITE). falloc/full clusters read as zeroes already.
  const zeroNew = size > old && options.backingSize !== undefined && options.backingSize > old;
  const dataPrealloc = (prealloc === "falloc" || prealloc === "full") && !t.dataFile;
  await t.grow(size);
  if (prealloc !== "off" && size > old) {
    await t.settle();
    if (dataPrealloc) await preallocateData(t, old, size, prealloc, zeroNew);
    else await preallocateMetadata(t, old, size, prealloc, options.backingRead);
    await t.settle();
  } else if (t.dataFile && prealloc === "off") {
    // The data file follows the virtual size exactly.
    await t.dataFile.truncate(size);
  }
  if (!zeroNew) return;
  const unit = dataPrealloc ? h.clusterSize : subclusterSize(h);
  const from = alignUp(old, unit);
  if (size > from && !dataPrealloc) {
    if (h.version < 3) {
      // No zero flag: qemu fails here, its header keeping the old size.
      await t.settle();
      await writeSize(t.file, h, old);
      throw new QimgError("Failed to zero out new clusters: Operation not supported");
    }
    await t.writeZeroes(from, size - from, options.backingRead);
  }
  // The cluster the old end cuts through: explicit zeroes after its head.
  const head = Math.min(from, size) - old;
  if (head > 0) await t.write(old, new Uint8Array(head), options.backingRead);
  await t.settle();
}

function subclusterSize(h: Qcow2Header): number {
  return h.extendedL2 ? h.clusterSize / 32 : h.clusterSize;
}

/** Writes the virtual size into the header. */
async function writeSize(file: BlockFile, h: Qcow2Header, size: number): Promise<void> {
  const b = new Uint8Array(8);
  putBe64(b, 0, size);
  await file.write(HDR_SIZE, b);
  await file.flush();
  h.size = size;
}

/** A host range losing one reference once nothing points at it. */
type Release = { offset: number; length: number };

/** The host ranges an L2 entry holds a reference to (none with an external data file). */
function entryRelease(
  view: DataView,
  at: number,
  h: Qcow2Header,
  dataMode: boolean,
): Release | undefined {
  const hi = view.getUint32(at);
  const lo = view.getUint32(at + 4);
  if (hi & OFLAG_COMPRESSED_HI) {
    const d = compressedDescriptor(hi, lo, h.clusterBits);
    return { offset: d.hostOffset & ~511, length: d.size + (d.hostOffset & 511) };
  }
  const host = entryOffset(hi, lo);
  if (!host || dataMode) return undefined;
  return { offset: host, length: h.clusterSize };
}

/**
 * Shrinks to `size`: every cluster from the new end (rounded up to a
 * cluster) is discarded in the active L1 table, L2 tables wholly past the
 * end are dropped, refcount blocks left unused are dropped, and the file
 * ends after its last used cluster. The L1 table keeps its size, as qemu's.
 */
async function shrink(t: ResizeTarget, size: number): Promise<void> {
  const h = t.header;
  const file = t.file;
  const cs = h.clusterSize;
  const esize = h.l2EntrySize;
  const span = cs * h.l2Size;
  const dataMode = t.dataFile !== undefined;
  const refs = await Qcow2Refcounts.open(file, h);
  const l1 = t.mapper.l1;
  const l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  const newL1 = Math.ceil(size / span);
  const from = alignUp(size, cs);
  let releases: Release[] = [];
  /** Freed cluster ranges [start, end), coalesced: punched once the file is cut. */
  const freed: [number, number][] = [];
  let l1First = -1, l1End = -1;
  const l1Changed = (i: number) => {
    l1First = l1First < 0 ? i : Math.min(l1First, i);
    l1End = Math.max(l1End, i + 1);
  };
  // In batches: the tables that no longer point at clusters reach the disk,
  // then the clusters lose their references (memory stays bounded).
  const commit = async () => {
    await file.flush();
    if (l1First >= 0) {
      await file.write(h.l1TableOffset + l1First * 8, l1.subarray(l1First * 8, l1End * 8));
      await file.flush();
      l1First = l1End = -1;
    }
    for (const r of releases) {
      await refs.changeRange(r.offset, r.length, -1);
      const c1 = Math.floor((r.offset + r.length - 1) / cs);
      for (let c = Math.floor(r.offset / cs); c <= c1; c++) {
        if (await refs.get(c) !== 0) continue;
        const last = freed[freed.length - 1];
        if (last && last[1] === c) last[1]++;
        else freed.push([c, c + 1]);
      }
    }
    await refs.cache.flush();
    releases = [];
  };
  for (let i = Math.floor(from / span); i < h.l1Size; i++) {
    const l2 = t.mapper.l2Offset(i);
    if (!l2) continue;
    const table = await readPadded(file, l2, cs);
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const first = i * span >= from ? 0 : (from - i * span) / cs;
    let changed = false;
    for (let j = first; j < h.l2Size; j++) {
      const r = entryRelease(view, j * esize, h, dataMode);
      if (r) releases.push(r);
      if (view.getUint32(j * esize) || view.getUint32(j * esize + 4)) changed = true;
      for (let k = 0; k < esize; k += 4) view.setUint32(j * esize + k, 0);
    }
    if (i >= newL1) {
      // The whole table goes (its data references dropped above).
      l1View.setBigUint64(i * 8, 0n);
      l1Changed(i);
      releases.push({ offset: l2, length: cs });
    } else if (changed && (l1View.getUint32(i * 8) & OFLAG_COPIED_HI)) {
      await file.write(l2, table);
    } else if (changed) {
      // Shared with a snapshot: this layer gets its own copy.
      const copy = await refs.allocClusters(1);
      await refs.cache.flush();
      await file.write(copy, table);
      l1View.setBigUint64(i * 8, COPIED | BigInt(copy));
      l1Changed(i);
      releases.push({ offset: l2, length: cs });
    }
    if (releases.length >= 65536) await commit();
  }
  await commit();
  await shrinkRefcountTable(file, h);
  const last = await lastUsedCluster(file, h);
  const fileSize = await file.size();
  if (last >= 0 && (last + 1) * cs < fileSize) await file.truncate((last + 1) * cs);
  // Freed clusters still inside the file are punched (qemu discards them).
  const end = Math.ceil(await file.size() / cs);
  for (const [c0, c1] of freed) {
    if (c0 < end) await file.discard?.(c0 * cs, (Math.min(c1, end) - c0) * cs);
  }
  if (t.dataFile) await t.dataFile.truncate(size);
  await writeSize(file, h, size);
}

/**
 * Drops refcount blocks that count nothing but (possibly) themselves: their
 * table entries are cleared on disk first, then a block counted by another
 * block loses that reference.
 */
async function shrinkRefcountTable(file: BlockFile, h: Qcow2Header): Promise<void> {
  const cs = h.clusterSize;
  const refs = await Qcow2Refcounts.open(file, h);
  const perBlock = cs * 8 / 2 ** h.refcountOrder;
  const dropped: number[] = [];
  for (let i = 0; i < refs.table.length; i++) {
    const offset = refs.table[i];
    if (!offset) continue;
    const block = (await readPadded(file, offset, cs)).slice();
    const cluster = offset / cs;
    if (Math.floor(cluster / perBlock) === i) {
      setRefcount(block, cluster % perBlock, h.refcountOrder, 0);
    }
    if (block.every((b) => b === 0)) dropped.push(i);
  }
  if (!dropped.length) return;
  const raw = await readPadded(file, h.refcountTableOffset, h.refcountTableClusters * cs);
  for (const i of dropped) raw.fill(0, i * 8, i * 8 + 8);
  await file.write(h.refcountTableOffset, raw);
  await file.flush();
  const after = await Qcow2Refcounts.open(file, h);
  for (const i of dropped) {
    const cluster = refs.table[i] / cs;
    if (Math.floor(cluster / perBlock) !== i && await after.get(cluster)) {
      await after.change(cluster, -1);
    }
  }
  await after.cache.flush();
  await file.flush();
}

/** The last host cluster with a nonzero refcount (-1: none). */
async function lastUsedCluster(file: BlockFile, h: Qcow2Header): Promise<number> {
  const cs = h.clusterSize;
  const refs = await Qcow2Refcounts.open(file, h);
  const perBlock = cs * 8 / 2 ** h.refcountOrder;
  for (let i = refs.table.length - 1; i >= 0; i--) {
    const offset = refs.table[i];
    if (!offset) continue;
    const block = await readPadded(file, offset, cs);
    for (let j = perBlock - 1; j >= 0; j--) {
      if (getRefcount(block, j, h.refcountOrder)) return i * perBlock + j;
    }
  }
  return -1;
}

/** One cluster's new mapping: guest cluster index and host offset. */
type Link = { guest: number; host: number };

/**
 * Points L2 entries at new host clusters, allocating (or copying, when
 * shared) the L2 tables; `bitmap` is the extended L2 allocation word.
 * Refcounts go to disk before the tables, tables before the L1 table.
 */
async function linkClusters(
  t: ResizeTarget,
  refs: Qcow2Refcounts,
  links: Link[],
  bitmap: (guest: number) => bigint,
): Promise<void> {
  const h = t.header;
  const file = t.file;
  const cs = h.clusterSize;
  const esize = h.l2EntrySize;
  const l1 = t.mapper.l1;
  const l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  const tables = new Map<number, { offset: number; table: Uint8Array }>();
  const releases: number[] = [];
  for (const { guest } of links) {
    const i = Math.floor(guest / h.l2Size);
    if (tables.has(i)) continue;
    const current = t.mapper.l2Offset(i);
    if (current && (l1View.getUint32(i * 8) & OFLAG_COPIED_HI)) {
      tables.set(i, { offset: current, table: (await readPadded(file, current, cs)).slice() });
      continue;
    }
    const table = current ? (await readPadded(file, current, cs)).slice() : new Uint8Array(cs);
    tables.set(i, { offset: await refs.allocClusters(1), table });
    if (current) releases.push(current);
  }
  for (const { guest, host } of links) {
    const { table } = tables.get(Math.floor(guest / h.l2Size))!;
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const at = (guest % h.l2Size) * esize;
    view.setBigUint64(at, COPIED | BigInt(host));
    if (esize === 16) view.setBigUint64(at + 8, bitmap(guest));
  }
  await refs.cache.flush();
  // The file reaches the new clusters before an entry points past its end
  // (qemu-img check calls that corruption).
  const end = links.reduce((m, l) => Math.max(m, l.host + cs), 0);
  if (!t.dataFile && end > await file.size()) await file.truncate(end);
  await file.flush();
  for (const { offset, table } of tables.values()) await file.write(offset, table);
  await file.flush();
  for (const [i, { offset }] of tables) {
    const e = new Uint8Array(8);
    putBe64(e, 0, COPIED | BigInt(offset));
    await file.write(h.l1TableOffset + i * 8, e);
    l1.set(e, i * 8);
  }
  await file.flush();
  for (const offset of releases) await refs.change(offset / cs, -1);
  await refs.cache.flush();
}

/** Whether guest cluster `g` has no host cluster of its own (unallocated or a plain zero cluster). */
async function needsCluster(
  t: ResizeTarget,
  g: number,
  memo: { offset?: number; view?: DataView } = {},
): Promise<boolean> {
  const h = t.header;
  const l2 = t.mapper.l2Offset(Math.floor(g / h.l2Size));
  if (!l2) return true;
  // One read per L2 table while a caller walks its entries.
  if (memo.offset !== l2 || !memo.view) {
    const table = await readPadded(t.file, l2, h.clusterSize);
    memo.offset = l2;
    memo.view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  }
  const view = memo.view;
  const at = (g % h.l2Size) * h.l2EntrySize;
  const hi = view.getUint32(at);
  const lo = view.getUint32(at + 4);
  if (hi & OFLAG_COMPRESSED_HI) return false;
  if (t.dataFile) return !(hi & OFLAG_COPIED_HI);
  // A plain zero cluster (no host cluster) gets one too, as qemu allocates it.
  return entryOffset(hi, lo) === 0;
}

/**
 * metadata: each new cluster gets a host cluster (an L2 table first where
 * one is missing); the file then reaches the last of them, sparse. With an
 * external data file the clusters map to their guest offsets and the data
 * file grows to the new size in the mode asked.
 */
async function preallocateMetadata(
  t: ResizeTarget,
  old: number,
  size: number,
  prealloc: PreallocMode,
  backingRead?: BackingReader,
): Promise<void> {
  const h = t.header;
  const cs = h.clusterSize;
  const refs = await Qcow2Refcounts.open(t.file, h);
  // A cluster the old end cuts through keeps what its head showed: over a
  // backing file its new cluster gets the head copied (as qemu's
  // copy-on-write), or with subclusters reads through to it (no subcluster
  // allocated); with nothing to copy from, it stays as it is.
  let g = Math.floor(old / cs);
  const cowHead = old % cs !== 0 && t.hasBacking && !t.dataFile && !h.extendedL2;
  if (cowHead && !backingRead) g++;
  const end = Math.ceil(size / cs);
  let hostEnd = 0;
  for (let l2Start = g; l2Start < end;) {
    const l2End = Math.min(end, (Math.floor(l2Start / h.l2Size) + 1) * h.l2Size);
    const links: Link[] = [];
    // The L2 table comes before its data clusters, as qemu allocates them.
    const l1Index = Math.floor(l2Start / h.l2Size);
    if (!t.mapper.l2Offset(l1Index) && !t.dataFile) {
      const offset = await refs.allocClusters(1);
      await refs.cache.flush();
      await t.file.write(offset, new Uint8Array(cs));
      const e = new Uint8Array(8);
      putBe64(e, 0, COPIED | BigInt(offset));
      await t.file.write(h.l1TableOffset + l1Index * 8, e);
      t.mapper.l1.set(e, l1Index * 8);
    }
    let run: number[] = [];
    const flushRun = async () => {
      if (!run.length) return;
      const host = t.dataFile ? run[0] * cs : await refs.allocClusters(run.length);
      run.forEach((guest, k) => links.push({ guest, host: host + k * cs }));
      hostEnd = Math.max(hostEnd, host + run.length * cs);
      run = [];
    };
    const memo = {};
    for (let c = l2Start; c < l2End; c++) {
      if (await needsCluster(t, c, memo)) run.push(c);
      else await flushRun();
    }
    await flushRun();
    const boundary = links.find((l) => l.guest * cs < old && old % cs);
    if (boundary && cowHead && backingRead) {
      const head = new Uint8Array(old - boundary.guest * cs);
      await backingRead(boundary.guest * cs, head);
      if (boundary.host + cs > await t.file.size()) await t.file.truncate(boundary.host + cs);
      await t.file.write(boundary.host, head);
    }
    if (links.length) {
      // Extended L2: no subcluster counts as written yet, as qemu leaves them.
      await linkClusters(t, refs, links, () => 0n);
    }
    l2Start = l2End;
  }
  if (t.dataFile) {
    const mode = prealloc === "metadata" ? "off" : prealloc;
    if (size > await t.dataFile.size() || mode !== "off") {
      await truncateFile(t.dataFile, size, mode);
    }
  } else if (hostEnd > await t.file.size()) {
    await truncateFile(t.file, hostEnd, "off");
  }
  await t.file.flush();
}

/**
 * falloc/full: refcount structures covering the new data area are built
 * past the file's last used cluster (qemu's qcow2_refcount_area), the data
 * clusters follow them contiguously and the file grows over them in the
 * mode asked; then the L2 entries point at them.
 */
async function preallocateData(
  t: ResizeTarget,
  old: number,
  size: number,
  prealloc: PreallocMode,
  zeroNew = false,
): Promise<void> {
  const h = t.header;
  const file = t.file;
  const cs = h.clusterSize;
  const last = await lastUsedCluster(file, h);
  const oldEnd = last >= 0 ? last + 1 : Math.ceil(await file.size() / cs);
  // A cluster the old end cuts through moves to the new area with its head
  // copied, as qemu's, when it is a plain data cluster;
  // otherwise it keeps its host cluster, or over a backing file stays
  // unallocated (its head would need the backing file's bytes).
  let first = Math.floor(old / cs);
  const moved = old % cs ? await plainCluster(t, first) : undefined;
  if (old % cs && moved === undefined && (t.hasBacking || !(await needsCluster(t, first)))) {
    first++;
  }
  const count = Math.ceil(size / cs) - first;
  if (count <= 0) return;
  const l2Tables = Math.ceil(count / h.l2Size) + 1;
  const start = await refcountArea(file, h, oldEnd, count + l2Tables);
  const refs = await Qcow2Refcounts.open(file, h);
  for (let c = start; c < start + count; c++) await refs.change(c, 1);
  await refs.cache.flush();
  await file.flush();
  await truncateFile(file, (start + count) * cs, prealloc);
  if (moved !== undefined) {
    const head = new Uint8Array(old % cs);
    await file.read(moved, head);
    await file.write(start * cs, head);
  }
  // One L2 table's worth of entries at a time (bounded memory).
  for (let k = 0; k < count;) {
    const g = first + k;
    const n = Math.min(count - k, h.l2Size - (g % h.l2Size));
    const links: Link[] = [];
    for (let j = 0; j < n; j++) links.push({ guest: g + j, host: (start + k + j) * cs });
    // Extended L2: the subclusters count as written only where the backing
    // file must not show through (qemu then allocates them explicitly).
    await linkClusters(t, refs, links, () => zeroNew ? 0xffffffffn : 0n);
    k += n;
  }
  if (moved !== undefined) {
    await refs.change(moved / cs, -1);
    await refs.cache.flush();
    await file.flush();
  }
}

/**
 * The host offset of guest cluster `g` when it is a plain data cluster
 * (not zero, not compressed, no subclusters, no external data file; maybe
 * shared with a snapshot, which keeps it); undefined otherwise.
 */
async function plainCluster(t: ResizeTarget, g: number): Promise<number | undefined> {
  const h = t.header;
  if (h.extendedL2 || t.dataFile) return undefined;
  const l2 = t.mapper.l2Offset(Math.floor(g / h.l2Size));
  if (!l2) return undefined;
  const table = await readPadded(t.file, l2, h.clusterSize);
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  const at = (g % h.l2Size) * 8;
  const hi = view.getUint32(at);
  const lo = view.getUint32(at + 4);
  if ((hi & OFLAG_COMPRESSED_HI) || (lo & 1)) return undefined;
  return entryOffset(hi, lo) || undefined;
}

/**
 * Builds refcount structures at cluster `start` covering everything up to
 * it plus `additional` clusters and themselves: missing refcount blocks
 * first, then a new refcount table holding all blocks, switched in by the
 * header; the old table is freed. Returns the first cluster after them.
 */
async function refcountArea(
  file: BlockFile,
  h: Qcow2Header,
  start: number,
  additional: number,
): Promise<number> {
  const cs = h.clusterSize;
  const perBlock = cs * 8 / 2 ** h.refcountOrder;
  const perTableCluster = cs / 8;
  let blocks = 0, table = 0, n = 0, prev: number;
  do {
    prev = n;
    blocks = Math.ceil((start + additional + table + blocks) / perBlock);
    table = Math.ceil(blocks / perTableCluster);
    n = start + additional + blocks + table;
  } while (n !== prev);
  const old = await Qcow2Refcounts.open(file, h);
  const tableClusters = Math.ceil(blocks / perTableCluster);
  const entries: number[] = [];
  for (let i = 0; i < tableClusters * perTableCluster; i++) {
    entries.push(i < blocks ? old.table[i] ?? 0 : 0);
  }
  const areaIndex = Math.floor(start / perBlock);
  let next = start;
  const fresh = new Set<number>();
  for (let i = areaIndex; i < blocks; i++) {
    if (!entries[i]) {
      entries[i] = next * cs;
      fresh.add(i);
      next++;
    }
  }
  const tableAt = next;
  const end = tableAt + tableClusters;
  for (let i = areaIndex; i < blocks; i++) {
    const block = fresh.has(i)
      ? new Uint8Array(cs)
      : (await readPadded(file, entries[i], cs)).slice();
    const covered = i * perBlock;
    if (covered < end) {
      const j0 = Math.max(0, start - covered);
      const j1 = Math.min(end - covered, perBlock);
      for (let j = j0; j < j1; j++) setRefcount(block, j, h.refcountOrder, 1);
    }
    await file.write(entries[i], block);
  }
  await file.flush();
  const raw = new Uint8Array(tableClusters * cs);
  entries.forEach((e, i) => putBe64(raw, i * 8, e));
  await file.write(tableAt * cs, raw);
  await file.flush();
  const fields = new Uint8Array(12);
  putBe64(fields, 0, tableAt * cs);
  new DataView(fields.buffer).setUint32(8, tableClusters);
  await file.write(HDR_REFTABLE, fields);
  await file.flush();
  const oldOffset = h.refcountTableOffset;
  const oldClusters = h.refcountTableClusters;
  h.refcountTableOffset = tableAt * cs;
  h.refcountTableClusters = tableClusters;
  const refs = await Qcow2Refcounts.open(file, h);
  for (let c = 0; c < oldClusters; c++) await refs.change(oldOffset / cs + c, -1);
  await refs.cache.flush();
  return end;
}
