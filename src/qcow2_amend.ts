/**
 * Rewriting a qcow2 image's header (as qemu's qcow2_update_header): the
 * backing file reference for rebase, options for amend.
 */

import type { BlockFile } from "./file.ts";
import { QimgError } from "./errors.ts";
import { putBe32, putBe64 } from "./bytes.ts";
import {
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  CRYPT_LUKS,
  CRYPT_NONE,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  type Qcow2Header,
  readPadded,
} from "./qcow2_header.ts";
import { Qcow2Refcounts, setRefcount } from "./qcow2_refcounts.ts";
import {
  compressedDescriptor,
  entryOffset,
  OFLAG_COMPRESSED_HI,
  OFLAG_COPIED_HI,
  OFLAG_ZERO,
} from "./qcow2_cluster.ts";
import type { OptionValues } from "./options.ts";
import {
  backingChangeError,
  changeBacking,
  headerCluster,
  HeaderError,
} from "./qcow2_header_write.ts";
import { amendProgress, changeRefcountOrder } from "./qcow2_refcount_rebuild.ts";

const bad = (message: string) => new QimgError(message);
const notYet = (what: string) => new QimgError(`${what}: not supported yet`);

// The header rewrite lives in qcow2_header_write.ts (rebase loads only that).
export { backingChangeError, changeBacking, headerCluster, HeaderError };

/** Why qimg cannot empty this image yet (commit without -d), or undefined. */
export function makeEmptyObstacle(h: Qcow2Header): string | undefined {
  // Bitmaps stay as they are: qemu empties by discarding every cluster,
  // which marks no bitmap.
  if (h.cryptMethod !== CRYPT_NONE || (h.incompatibleFeatures & INCOMPAT_DATA_FILE)) {
    return "emptying this qcow2 image";
  }
  return undefined;
}

/**
 * Whether qemu's make_completely_empty applies (else qemu discards every
 * cluster): v3, no snapshots, bitmaps, LUKS or data file, and the header,
 * refcount table and block and L1 table fit one refcount block.
 */
export function canEmptyCompletely(h: Qcow2Header): boolean {
  const l1Clusters = Math.ceil(h.l1Size * 8 / h.clusterSize);
  const blockEntries = h.clusterSize * 8 / (1 << h.refcountOrder);
  return h.version >= 3 && h.nbSnapshots === 0 && !(h.bitmaps && h.bitmaps.nbBitmaps > 0) &&
    3 + l1Clusters <= blockEntries && h.cryptMethod !== CRYPT_LUKS &&
    !(h.incompatibleFeatures & INCOMPAT_DATA_FILE);
}

/**
 * qemu's make_empty fallback: a full discard of every cluster. Entries
 * become 0, their clusters lose this layer's reference (freed ones are
 * punched out of the file); L2 tables shared with snapshots are copied first.
 */
export async function discardAllClusters(
  file: BlockFile,
  h: Qcow2Header,
  l1: Uint8Array,
): Promise<void> {
  const cs = h.clusterSize;
  const esize = h.l2EntrySize;
  const refs = await Qcow2Refcounts.open(file, h);
  const l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  // Freed clusters are punched out of the file (qemu's pass-discard-snapshot).
  const punchFreed = async (first: number, last: number) => {
    for (let c = first; c <= last; c++) {
      if (await refs.get(c) === 0) await file.discard?.(c * cs, cs);
    }
  };
  const drop = async (offset: number) => {
    await refs.change(offset / cs, -1);
    await punchFreed(offset / cs, offset / cs);
  };
  for (let i = 0; i < h.l1Size; i++) {
    const l1Hi = l1View.getUint32(i * 8);
    const l2 = entryOffset(l1Hi, l1View.getUint32(i * 8 + 4));
    if (!l2) continue;
    const table = await readPadded(file, l2, cs);
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    let target = l2;
    if (!(l1Hi & OFLAG_COPIED_HI)) {
      // Shared with a snapshot: this layer gets its own copy.
      target = await refs.allocClusters(1);
      await refs.cache.flush();
    }
    // The emptied table is on disk before any cluster it mapped loses a
    // reference or is punched: a crash then leaves leaks, never lost data.
    await file.write(target, new Uint8Array(cs));
    if (target !== l2) {
      const entry = new Uint8Array(8);
      putBe64(entry, 0, BigInt(target) | (1n << 63n));
      await file.write(h.l1TableOffset + i * 8, entry);
      l1.set(entry, i * 8);
    }
    // Data refcounts count the L1 tables (active and snapshots) using a
    // cluster, so they drop even when the L2 table is shared.
    for (let j = 0; j < cs / esize; j++) {
      const hi = view.getUint32(j * esize);
      const lo = view.getUint32(j * esize + 4);
      if (hi & OFLAG_COMPRESSED_HI) {
        const d = compressedDescriptor(hi, lo, h.clusterBits);
        const start = d.hostOffset & ~511;
        const length = d.size + (d.hostOffset & 511);
        await refs.changeRange(start, length, -1);
        await punchFreed(Math.floor(start / cs), Math.floor((start + length - 1) / cs));
      } else if (entryOffset(hi, lo)) {
        await drop(entryOffset(hi, lo));
      }
    }
    if (target !== l2) await drop(l2);
    await refs.cache.flush();
  }
  await file.flush();
}

/**
 * makeCompletelyEmpty without qemu's dirty window, where the first refcount
 * block is at cluster 2 and clusters 1 and 3.. hold nothing live in another
 * role: the L1 table is zeroed first (every cluster then leaks), clusters 1
 * and 3.. count as used before the header points the refcount and L1 tables
 * at them, and block 2 gets its final refcounts last. A crash at any point
 * leaves leaks only; the result is qemu's byte for byte. False when the
 * layout does not allow it.
 */
async function emptyWithoutDirtyWindow(
  file: BlockFile,
  h: Qcow2Header,
  block: Uint8Array,
): Promise<boolean> {
  const cs = h.clusterSize;
  const l1Clusters = Math.ceil(h.l1Size * 8 / cs);
  const refs = await Qcow2Refcounts.open(file, h);
  if (refs.table[0] !== 2 * cs) return false;
  const tableHere = h.refcountTableOffset === cs && h.refcountTableClusters === 1;
  const l1Here = h.l1TableOffset === 3 * cs;
  // What the header and refcount table point at: it must not sit where the
  // new tables go, unless it is that table already. The L1 table may: it
  // holds zeroes by then, as the new one.
  const inUse = new Set<number>();
  const mark = (offset: number, clusters: number) => {
    for (let c = 0; c < clusters; c++) inUse.add(offset / cs + c);
  };
  if (!tableHere) mark(h.refcountTableOffset, h.refcountTableClusters);
  if (h.l1TableOffset <= cs) mark(h.l1TableOffset, l1Clusters);
  for (const b of refs.table.slice(1)) if (b) inUse.add(b / cs);
  const claim: number[] = [];
  if (!tableHere) claim.push(1);
  if (!l1Here) { for (let c = 3; c < 3 + l1Clusters; c++) claim.push(c); }
  if ([1, ...claim].some((c) => inUse.has(c))) return false;

  await file.write(h.l1TableOffset, new Uint8Array(l1Clusters * cs)); // everything leaks
  for (const c of claim) if (await refs.get(c) === 0) await refs.change(c, 1);
  await refs.cache.flush();
  if (!l1Here) {
    await file.write(3 * cs, new Uint8Array(l1Clusters * cs));
    const field = new Uint8Array(8);
    putBe64(field, 0, 3 * cs);
    await file.write(40, field);
  }
  // Only block 2 stays: the other blocks become unreferenced.
  const table = new Uint8Array(cs);
  putBe64(table, 0, 2 * cs);
  await file.write(cs, table);
  if (!tableHere) {
    const fields = new Uint8Array(12);
    putBe64(fields, 0, cs);
    putBe32(fields, 8, 1);
    await file.write(48, fields);
  }
  await file.write(2 * cs, block); // leaked clusters become free
  await file.truncate((3 + l1Clusters) * cs);
  await file.flush();
  h.l1TableOffset = 3 * cs;
  h.refcountTableOffset = cs;
  h.refcountTableClusters = 1;
  return true;
}

/**
 * Empties a qcow2 v3 image as qemu's make_completely_empty (commit without
 * -d): header, a one-cluster refcount table, one refcount block and a
 * zeroed L1 table at cluster 3; the file ends there.
 */
export async function makeCompletelyEmpty(file: BlockFile, h: Qcow2Header): Promise<void> {
  const cs = h.clusterSize;
  const l1Clusters = Math.ceil(h.l1Size * 8 / cs);
  const zeroes = (offset: number, length: number) =>
    length > 0 ? file.write(offset, new Uint8Array(length)) : Promise.resolve();
  const block = new Uint8Array(cs);
  for (let i = 0; i < 3 + l1Clusters; i++) setRefcount(block, i, h.refcountOrder, 1);
  if (await emptyWithoutDirtyWindow(file, h, block)) return;
  // qemu marks the image dirty while its refcounts are being rebuilt.
  const incompat = new Uint8Array(8);
  putBe64(incompat, 0, h.incompatibleFeatures | INCOMPAT_DIRTY);
  await file.write(72, incompat);
  await file.flush();
  await zeroes(h.l1TableOffset, l1Clusters * cs);
  // As qemu: the new L1 clusters too, before the header points at them.
  await zeroes(cs, (2 + l1Clusters) * cs);
  const fields = new Uint8Array(20);
  putBe64(fields, 0, 3 * cs);
  putBe64(fields, 8, cs);
  putBe32(fields, 16, 1);
  await file.write(40, fields);
  const entry = new Uint8Array(8);
  putBe64(entry, 0, 2 * cs);
  await file.write(cs, entry);
  await file.truncate((3 + l1Clusters) * cs);
  await zeroes(3 * cs, l1Clusters * cs);
  await file.write(2 * cs, block);
  await file.flush();
  putBe64(incompat, 0, h.incompatibleFeatures);
  await file.write(72, incompat);
  await file.flush();
  h.l1TableOffset = 3 * cs;
  h.refcountTableOffset = cs;
  h.refcountTableClusters = 1;
}

/** Reports progress of one amend operation: `done` of `total` units. */
export type AmendStatus = (done: number, total: number) => void;

/** The parts of an open qcow2 image amend works on. */
export interface AmendTarget {
  readonly file: BlockFile;
  readonly header: Qcow2Header;
  readonly mapper: { l2Offset(index: number): number };
  readonly backing?: unknown;
  readonly snapshotCount: number;
  /** The internal snapshots (their L1 tables hold zero clusters too). */
  readonly snapshots?: readonly {
    l1TableOffset: bigint;
    l1Size: number;
    vmStateSize: bigint;
    diskSize: bigint;
    extraDataSize: number;
  }[];
  /** Writes pending metadata. */
  flush(): Promise<void>;
  /** Grows the virtual size. */
  resize(size: number): Promise<void>;
}

/**
 * `amend -o` on qcow2, in qemu 7.2's order: options checked in table
 * order, upgrade, backing file (only the same one), lazy refcounts,
 * header rewrite, size, downgrade. What qimg cannot do yet is refused
 * before anything is written.
 */
export async function amendQcow2(
  img: AmendTarget,
  values: OptionValues,
  status: AmendStatus,
): Promise<void> {
  const h = img.header;
  const has = (k: string) => values[k] !== undefined;
  const oldVersion = h.version;
  let newVersion = oldVersion;
  let lazy = (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
  let refcountBits = 1 << h.refcountOrder;
  let dataFile: string | undefined;
  let dataFileRaw = (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
  const hasDataFile = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  if (Object.keys(values).some((k) => k.startsWith("encrypt."))) {
    if (h.cryptMethod === CRYPT_NONE) {
      throw bad("Can't amend encryption options - encryption not present");
    }
    if (h.cryptMethod !== CRYPT_LUKS) throw bad("Only LUKS encryption options can be amended");
    throw notYet("amend of qcow2 encryption options");
  }
  if (has("compat")) {
    const c = String(values.compat);
    if (c === "0.10" || c === "v2") newVersion = 2;
    else if (c === "1.1" || c === "v3") newVersion = 3;
    else throw bad(`Unknown compatibility level ${c}`);
  }
  const newSize = has("size") ? Number(values.size) : 0;
  const backingFile = has("backing_file") ? String(values.backing_file) : undefined;
  const backingFormat = has("backing_fmt") ? String(values.backing_fmt) : undefined;
  if (has("data_file")) {
    dataFile = String(values.data_file);
    if (!hasDataFile) {
      throw bad("data-file can only be set for images that use an external data file");
    }
  }
  if (has("data_file_raw")) {
    const raw = values.data_file_raw === true;
    if (raw && !dataFileRaw) throw bad("data-file-raw cannot be set on existing images");
    dataFileRaw = raw;
  }
  if (has("lazy_refcounts")) lazy = values.lazy_refcounts === true;
  if (has("refcount_bits")) {
    refcountBits = Number(values.refcount_bits);
    if (refcountBits <= 0 || refcountBits > 64 || (refcountBits & (refcountBits - 1))) {
      throw bad("Refcount width must be a power of two and may not exceed 64 bits");
    }
  }
  // What qimg cannot do yet: refused before the first write.
  const wasLazy = (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
  const backingRefused = (backingFile !== undefined || backingFormat !== undefined) &&
    (backingFile !== h.backingFile || backingFormat !== h.backingFormat);
  const lazyRefused = lazy && !wasLazy && newVersion < 3;
  // v3 needs each snapshot's 64-bit VM state size and disk size (16 bytes
  // of extra data): the upgrade then rewrites the snapshot table.
  const extendSnapshots = newVersion > oldVersion &&
    (img.snapshots ?? []).some((sn) => sn.extraDataSize < 16);
  if (h.incompatibleFeatures & INCOMPAT_DIRTY) throw notYet("amend of dirty qcow2 images");
  // Bitmaps survive amend: the header keeps their extension, a size change
  // resizes them (Qcow2Image.resize) and refcount changes keep their clusters.

  // One meter over the operations that report progress (qemu's amend helper).
  const operations = Number(newVersion !== oldVersion) +
    Number(refcountBits !== 1 << h.refcountOrder);
  const progress = amendProgress(status, operations);
  if (newVersion > oldVersion) {
    // qemu's qcow2_upgrade reports two steps.
    const upgrade = progress("upgrade");
    upgrade(0, 2);
    if (extendSnapshots) {
      await img.flush();
      const { rewriteSnapshotTable } = await import("./qcow2_snapshot_write.ts");
      await rewriteSnapshotTable(img.file, h);
    }
    upgrade(1, 2);
    h.version = 3;
    await writeHeader(img.file, h);
    upgrade(2, 2);
  }
  if (backingRefused) {
    throw bad("Cannot amend the backing file\nYou can use 'qimg rebase' instead.");
  }
  if (lazy !== wasLazy) {
    if (lazyRefused) {
      throw bad(
        "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
      );
    }
    h.compatibleFeatures = lazy
      ? h.compatibleFeatures | COMPAT_LAZY_REFCOUNTS
      : h.compatibleFeatures & ~COMPAT_LAZY_REFCOUNTS;
    await writeHeader(img.file, h);
  }
  if (refcountBits !== 1 << h.refcountOrder) {
    if (newVersion < 3 && refcountBits !== 16) {
      throw bad(
        "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
      );
    }
    await img.flush();
    await changeRefcountOrder(
      img.file,
      h,
      Math.log2(refcountBits),
      () => writeHeader(img.file, h),
      progress("refcount"),
    );
  }
  h.autoclearFeatures = dataFileRaw
    ? h.autoclearFeatures | AUTOCLEAR_DATA_FILE_RAW
    : h.autoclearFeatures & ~AUTOCLEAR_DATA_FILE_RAW;
  if (dataFile !== undefined) h.dataFile = dataFile || undefined;
  await writeHeader(img.file, h);
  if (newSize && newSize !== h.size) await img.resize(newSize);
  if (newVersion < oldVersion) await downgrade(img, progress("downgrade"));
}

/** Rewrites the header cluster from `h`. */
async function writeHeader(file: BlockFile, h: Qcow2Header): Promise<void> {
  try {
    await file.write(0, headerCluster(h));
  } catch (e) {
    if (e instanceof HeaderError) throw bad(`Failed to update the image header: ${e.message}`);
    throw e;
  }
  await file.flush();
}

/** qemu's qcow2_downgrade to v2: refusals, zero clusters expanded, v2 header. */
async function downgrade(img: AmendTarget, status: AmendStatus): Promise<void> {
  const h = img.header;
  if (h.refcountOrder !== 4) throw bad("compat=0.10 requires refcount_bits=16");
  if (h.incompatibleFeatures & INCOMPAT_DATA_FILE) {
    throw bad("Cannot downgrade an image with a data file");
  }
  // v2 programs would not know these snapshots' fields matter.
  for (const sn of img.snapshots ?? []) {
    if (sn.vmStateSize > 0xffffffffn || sn.diskSize !== BigInt(h.size)) {
      throw bad("Internal snapshots prevent downgrade of image");
    }
  }
  // zstd compression is dropped below, when no cluster uses it.
  if (h.incompatibleFeatures & ~INCOMPAT_COMPRESSION) {
    throw bad(
      `Cannot downgrade an image with incompatible features 0x${
        h.incompatibleFeatures.toString(16)
      } set`,
    );
  }
  h.compatibleFeatures = 0n;
  h.autoclearFeatures = 0n;
  await img.flush();
  await expandZeroClusters(img, status);
  if (h.incompatibleFeatures & INCOMPAT_COMPRESSION) {
    if (await hasCompressedClusters(img)) {
      throw bad(
        "Cannot downgrade an image with zstd compression type and existing compressed clusters",
      );
    }
    h.compressionType = "zlib";
    h.incompatibleFeatures &= ~INCOMPAT_COMPRESSION;
  }
  h.version = 2;
  await writeHeader(img.file, h);
}

/**
 * Whether any L2 table of the active or a snapshot's L1 table holds a
 * compressed cluster. qemu 7.2 looks at the active table only, and then
 * leaves snapshots whose zstd clusters read as zlib: qimg refuses those too.
 */
async function hasCompressedClusters(img: AmendTarget): Promise<boolean> {
  const h = img.header;
  const file = img.file;
  const tables = new Set<number>();
  for (let i = 0; i < h.l1Size; i++) {
    const l2 = img.mapper.l2Offset(i);
    if (l2) tables.add(l2);
  }
  for (const sn of img.snapshots ?? []) {
    const t = await readPadded(file, Number(sn.l1TableOffset), sn.l1Size * 8);
    const v = new DataView(t.buffer, t.byteOffset, t.byteLength);
    for (let i = 0; i < sn.l1Size; i++) {
      const l2 = entryOffset(v.getUint32(i * 8), v.getUint32(i * 8 + 4));
      if (l2) tables.add(l2);
    }
  }
  for (const l2 of tables) {
    const table = await readPadded(file, l2, h.clusterSize);
    const v = new DataView(table.buffer, table.byteOffset, table.byteLength);
    for (let j = 0; j < h.l2Size; j++) {
      if (v.getUint32(j * h.l2EntrySize) & OFLAG_COMPRESSED_HI) return true;
    }
  }
  return false;
}

/**
 * v2 has no zero flag: zero clusters become unallocated (no backing file)
 * or clusters of zeroes, as qemu's qcow2_expand_zero_clusters, in the
 * active L1 table then each snapshot's; `status` counts L1 entries.
 */
async function expandZeroClusters(img: AmendTarget, status: AmendStatus): Promise<void> {
  const h = img.header;
  const file = img.file;
  const refs = await Qcow2Refcounts.open(file, h);
  const l1s: { size: number; entry: (i: number) => Promise<number> }[] = [
    { size: h.l1Size, entry: (i) => Promise.resolve(img.mapper.l2Offset(i)) },
  ];
  for (const sn of img.snapshots ?? []) {
    const offset = Number(sn.l1TableOffset);
    const table = await readPadded(file, offset, sn.l1Size * 8);
    const v = new DataView(table.buffer, table.byteOffset, table.byteLength);
    l1s.push({
      size: sn.l1Size,
      entry: (i) => Promise.resolve(entryOffset(v.getUint32(i * 8), v.getUint32(i * 8 + 4))),
    });
  }
  const total = l1s.reduce((n, t) => n + t.size, 0);
  let visited = 0;
  for (const l1 of l1s) {
    for (let i = 0; i < l1.size; i++) {
      const l2 = await l1.entry(i);
      if (l2) await expandL2(img, refs, l2);
      status(++visited, total);
    }
  }
  await file.flush();
}

/** Expands the zero clusters of one L2 table (possibly shared with snapshots). */
async function expandL2(img: AmendTarget, refs: Qcow2Refcounts, l2: number): Promise<void> {
  const h = img.header;
  const cs = h.clusterSize;
  const file = img.file;
  const table = await readPadded(file, l2, cs);
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  const l2Refcount = await refs.get(l2 / cs);
  let dirty = false;
  for (let j = 0; j < cs / 8; j++) {
    const hi = view.getUint32(j * 8);
    const lo = view.getUint32(j * 8 + 4);
    if ((hi & OFLAG_COMPRESSED_HI) || !(lo & OFLAG_ZERO)) continue;
    dirty = true;
    let host = entryOffset(hi, lo);
    if (!host) {
      if (!img.backing) {
        view.setBigUint64(j * 8, 0n);
        continue;
      }
      host = await refs.allocClusters(1);
      // Every L1 table using this L2 table holds a reference.
      if (l2Refcount > 1) await refs.change(host / cs, l2Refcount - 1);
    }
    await file.write(host, new Uint8Array(cs));
    view.setBigUint64(j * 8, BigInt(host) | (l2Refcount === 1 ? 1n << 63n : 0n));
  }
  if (dirty) {
    // Refcounts reach the disk before the entries that rely on them.
    await refs.cache.flush();
    await file.write(l2, table);
  }
}
