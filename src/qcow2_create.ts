/**
 * qcow2 image creation, laid out exactly as qemu-img 7.2 lays it out, so
 * the files compare equal byte for byte.
 *
 * Layout rules (docs/interop/qcow2.txt plus qemu's allocation order):
 * - cluster 0 header, cluster 1 refcount table (one cluster), cluster 2
 *   refcount block 0; these three are allocated first.
 * - Header: 72 bytes (v2) or 112 (v3, compression type byte at 104), then
 *   extensions: backing format (0xe2792aca), external data file (DATA),
 *   feature name table (v3 with clusters over 4 KiB only, always the same
 *   8 entries), end marker; the backing file name follows, unterminated.
 *   Names that do not fit the first cluster fail as in qemu.
 * - The L1 table (exact size, ceil(size / (cs * entries per L2)) entries)
 *   is then allocated at the first free cluster; only its bytes are
 *   written, so the file may end mid-cluster. Size 0 has no L1 (offset 0).
 * - Allocation is first-fit from a moving free index. A refcount block
 *   missing while counting an allocation is itself allocated at the free
 *   index; if it lands in the range it covers it counts itself, otherwise
 *   its own refcount is counted first (recursively). Hooking a new block
 *   restarts the allocation that needed it (its refcounts are undone and
 *   the search starts again at its first cluster), so data may move past
 *   the new block. A full refcount table grows by a new
 *   table plus self-describing blocks placed after everything counted.
 * - metadata preallocation: per L2 range, the L2 table then its data
 *   clusters; the file is grown to the last data cluster. falloc/full: new
 *   refcount structures (exact) at the end of the file, the old table
 *   freed, the data area right after them, then L2 tables first-fit.
 */

import { featureNameTable } from "./qcow2_header.ts";
import type { CreateOptions } from "./driver.ts";
import type { BlockFile } from "./file.ts";
import { QimgError, strerror } from "./errors.ts";
import { putBe32, putBe64 } from "./bytes.ts";
import {
  createFile,
  PREALLOC_MODES,
  type PreallocMode,
  ProtocolError,
  truncateFile,
} from "./protocol.ts";

const DEFAULT_CLUSTER_SIZE = 65536;
const L1E_SIZE = 8;
const REFTABLE_ENTRY_SIZE = 8;
/** qemu refuses L1 tables over 32 MiB. */
const MAX_L1_BYTES = 32 * 1024 * 1024;
/** qemu's QCOW_MAX_REFTABLE_SIZE, compared against entry counts. */
const MAX_REFTABLE_SIZE = 8 * 1024 * 1024;
const OFLAG_COPIED = 1n << 63n;
const INT_MAX = 0x7fffffff;
/** BDRV_REQUEST_MAX_BYTES: INT_MAX in whole sectors. */
const REQUEST_MAX_BYTES = Math.floor(INT_MAX / 512) * 512;
const VERSION_MSG = "compatibility level 1.1 and above (use version=v3 or greater)";

/** Create settings after qemu's checks. */
interface Qcow2CreateSettings {
  version: 2 | 3;
  clusterSize: number;
  refcountOrder: number;
  extendedL2: boolean;
  lazyRefcounts: boolean;
  zstd: boolean;
  prealloc: PreallocMode;
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  dataFileRaw: boolean;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}

function str(v: unknown): string | undefined {
  return v === undefined ? undefined : String(v);
}

/** qemu's QAPI enum error. */
function badValue(name: string, value: string): QimgError {
  return new QimgError(`Parameter '${name}' does not accept value '${value}'`);
}

/** BlockdevDriver names a backing_fmt may take (qemu's QAPI enum). */
const BLOCKDEV_DRIVERS = new Set(
  ("blkdebug blklogwrites blkreplay blkverify bochs cloop compress copy-before-write " +
    "copy-on-read dmg file snapshot-access ftp ftps gluster host_cdrom host_device http " +
    "https iscsi iser luks nbd nfs null-aio null-co nvme nvme-io_uring parallels preallocate " +
    "qcow qcow2 qed quorum raw rbd replication ssh throttle vdi vhdx vmdk vpc vvfat")
    .split(" "),
);

/**
 * Checks the `-o` values in qemu's order: first what its QAPI visitor
 * rejects (in field order), then qcow2_co_create's own checks.
 */
function settingsFrom(o: Record<string, unknown>): Qcow2CreateSettings {
  const encryptKeys = Object.keys(o).filter((k) => k.startsWith("encrypt.") && o[k] !== undefined);
  if (o.encryption === true && o["encrypt.format"] !== undefined) {
    throw new QimgError(
      "'encrypt.format' and its alias 'encryption' can't be used at the same time",
    );
  }
  // Visitor, in BlockdevCreateOptionsQcow2 field order.
  let version: 2 | 3 = 3;
  const compat = str(o.compat);
  if (compat !== undefined) {
    if (compat === "0.10" || compat === "v2") version = 2;
    else if (compat === "1.1" || compat === "v3") version = 3;
    else throw badValue("version", compat);
  }
  const backingFormat = str(o.backing_fmt);
  if (backingFormat !== undefined && !BLOCKDEV_DRIVERS.has(backingFormat)) {
    throw badValue("backing-fmt", backingFormat);
  }
  const encryptFormat = o.encryption === true ? "aes" : str(o["encrypt.format"]);
  if (encryptFormat !== undefined || encryptKeys.length > 0) {
    if (encryptFormat === undefined) throw new QimgError("Parameter 'encrypt.format' is missing");
    if (encryptFormat !== "aes" && encryptFormat !== "luks") {
      throw badValue("format", encryptFormat);
    }
    if (o["encrypt.key-secret"] === undefined) {
      throw new QimgError("Parameter 'encrypt.key-secret' is required for cipher");
    }
    throw new QimgError("create of encrypted qcow2 images: not supported yet");
  }
  const preallocation = str(o.preallocation) ?? "off";
  if (!(PREALLOC_MODES as readonly string[]).includes(preallocation)) {
    throw badValue("preallocation", preallocation);
  }
  let prealloc = preallocation as PreallocMode;
  const compression = str(o.compression_type) ?? "zlib";
  if (compression !== "zlib" && compression !== "zstd") {
    throw badValue("compression-type", compression);
  }

  // qcow2_co_create's checks.
  const extendedL2 = o.extended_l2 === true;
  if (extendedL2 && version < 3) {
    throw new QimgError(`Extended L2 entries are only supported with ${VERSION_MSG}`);
  }
  const clusterSize = o.cluster_size === undefined ? DEFAULT_CLUSTER_SIZE : Number(o.cluster_size);
  if (!isPowerOfTwo(clusterSize) || clusterSize < 512 || clusterSize > 2 * 1024 * 1024) {
    throw new QimgError("Cluster size must be a power of two between 512 and 2048k");
  }
  if (extendedL2 && clusterSize < 16384) {
    throw new QimgError(
      "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
    );
  }
  const backingFile = str(o.backing_file);
  if (backingFile !== undefined && prealloc !== "off" && !extendedL2) {
    throw new QimgError(
      "Backing file and preallocation can only be used at the same time if extended_l2 is on",
    );
  }
  if (backingFormat !== undefined && backingFile === undefined) {
    throw new QimgError("Backing format cannot be used without backing file");
  }
  const lazyRefcounts = o.lazy_refcounts === true;
  if (lazyRefcounts && version < 3) {
    throw new QimgError(`Lazy refcounts only supported with ${VERSION_MSG}`);
  }
  const bits = o.refcount_bits === undefined ? 16 : Number(o.refcount_bits);
  if (bits > 64 || !isPowerOfTwo(bits)) {
    throw new QimgError("Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (version < 3 && bits !== 16) {
    throw new QimgError(
      "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
    );
  }
  const dataFile = str(o.data_file);
  const dataFileRaw = o.data_file_raw === true;
  if (dataFileRaw && dataFile === undefined) {
    throw new QimgError("data-file-raw requires data-file");
  }
  if (dataFileRaw && backingFile !== undefined) {
    throw new QimgError("Backing file and data-file-raw cannot be used at the same time");
  }
  // A raw data file must map every cluster to itself from the start.
  if (dataFileRaw && prealloc === "off") prealloc = "metadata";
  if (dataFile !== undefined && version < 3) {
    throw new QimgError(`External data files are only supported with ${VERSION_MSG}`);
  }
  if (compression !== "zlib" && version < 3) {
    throw new QimgError(`Non-zlib compression type is only supported with ${VERSION_MSG}`);
  }
  return {
    version,
    clusterSize,
    refcountOrder: Math.log2(bits),
    extendedL2,
    lazyRefcounts,
    zstd: compression === "zstd",
    prealloc,
    backingFile,
    backingFormat,
    dataFile,
    dataFileRaw,
  };
}

/** A write or a preallocating truncate, replayed on the file in order. */
type FileOp =
  | { kind: "write"; offset: number; data: Uint8Array }
  | { kind: "grow"; size: number; prealloc: PreallocMode };

/**
 * The image being laid out, in memory: refcounts, refcount table, L1/L2,
 * and the writes qemu would make, replayed at the end.
 */
class Layout {
  readonly cs: number;
  readonly bits: number;
  /** log2 of refcount entries per refcount block. */
  readonly rbBits: number;
  readonly refcountOrder: number;
  #counts = new Uint8Array(1024);
  reftable: number[] = [];
  reftableEntries: number;
  reftableCluster = 1;
  freeIndex = 0;
  ops: FileOp[] = [];
  l1: bigint[] = [];
  l1Cluster = 0;
  l2Entries: number;
  l2EntrySize: number;
  /** L2 tables by cluster index, entries as raw bytes. */
  l2Tables = new Map<number, Uint8Array>();

  constructor(s: Qcow2CreateSettings) {
    this.cs = s.clusterSize;
    this.bits = Math.log2(s.clusterSize);
    this.refcountOrder = s.refcountOrder;
    this.rbBits = this.bits + 3 - s.refcountOrder;
    this.reftableEntries = this.cs / REFTABLE_ENTRY_SIZE;
    this.l2EntrySize = s.extendedL2 ? 16 : 8;
    this.l2Entries = this.cs / this.l2EntrySize;
  }

  get rbEntries(): number {
    return 2 ** this.rbBits;
  }

  #set(cluster: number, value: number): void {
    if (cluster >= this.#counts.length) {
      let n = this.#counts.length;
      while (n <= cluster) n *= 2;
      const grown = new Uint8Array(n);
      grown.set(this.#counts);
      this.#counts = grown;
    }
    this.#counts[cluster] = value;
  }

  /** Refcount as qemu reads it: 0 where no refcount block covers the cluster. */
  refcount(cluster: number): number {
    const idx = Math.floor(cluster / this.rbEntries);
    if (idx >= this.reftableEntries || !this.reftable[idx]) return 0;
    return this.#counts[cluster] ?? 0;
  }

  /** The highest cluster with a count (qcow2_get_last_cluster). */
  lastUsedCluster(): number {
    for (let c = this.#counts.length - 1; c >= 0; c--) if (this.refcount(c)) return c;
    return -1;
  }

  /** First fit of `n` free clusters from the free index (no refcounts taken). */
  #findFree(n: number): number {
    let run = 0;
    while (run < n) {
      const c = this.freeIndex++;
      run = this.refcount(c) === 0 ? run + 1 : 0;
    }
    return this.freeIndex - n;
  }

  /** Adds `addend` to `n` clusters from `first`; false when a new refcount block means "retry". */
  #update(first: number, n: number, addend: number): boolean {
    let block = -1;
    for (let i = 0; i < n; i++) {
      const c = first + i;
      const idx = Math.floor(c / this.rbEntries);
      if (idx !== block) {
        if (!this.#ensureRefblock(c)) {
          if (i > 0) this.#update(first, i, -addend);
          // qemu searches again from the start of the failed range, even
          // when none of it was counted yet (observed, not documented).
          if (first < this.freeIndex) this.freeIndex = first;
          return false;
        }
        block = idx;
      }
      const v = (this.#counts[c] ?? 0) + addend;
      this.#set(c, v);
      if (v === 0 && c < this.freeIndex) this.freeIndex = c;
    }
    return true;
  }

  /** Makes sure a refcount block covers `cluster`; false after creating one (callers retry). */
  #ensureRefblock(cluster: number): boolean {
    const idx = Math.floor(cluster / this.rbEntries);
    if (idx < this.reftableEntries && this.reftable[idx]) return true;
    const block = this.#findFree(1);
    if (Math.floor(block / this.rbEntries) === idx) {
      this.#set(block, 1); // counts itself
    } else if (!this.#update(block, 1, 1)) {
      return false;
    }
    if (idx < this.reftableEntries) {
      this.reftable[idx] = block;
      return false;
    }
    // The table is full: new table and blocks past everything counted so far.
    const used = Math.ceil(Math.max(cluster + 1, block + 1) / this.rbEntries);
    this.refcountArea(used * this.rbEntries, 0, false, idx, block);
    return false;
  }

  /** Allocates `n` contiguous clusters (qcow2_alloc_clusters); returns the first. */
  alloc(n: number): number {
    for (;;) {
      const first = this.#findFree(n);
      if (this.#update(first, n, 1)) return first;
    }
  }

  /** Takes refcounts for clusters known to be free (qcow2_alloc_clusters_at). */
  allocAt(first: number, n: number): void {
    while (!this.#update(first, n, 1));
  }

  /** Refcount blocks needed to count `clusters` plus the refcount metadata itself. */
  #blocksNeeded(clusters: number, generous: boolean): number {
    const perTable = this.cs / REFTABLE_ENTRY_SIZE;
    let table = 0, blocks = 0, n = 0, last;
    do {
      last = n;
      blocks = Math.ceil((clusters + table + blocks) / this.rbEntries);
      table = Math.ceil(blocks / perTable);
      n = clusters + blocks + table;
      if (n === last && generous) {
        // Room for growth: half the table again.
        clusters += Math.ceil(table / 2);
        n = 0;
        generous = false;
      }
    } while (n !== last);
    return blocks;
  }

  /**
   * New refcount structures at `start` (a cluster index) covering `extra`
   * more clusters: missing blocks first, then a new table; every cluster
   * from `start` to the table's end is counted, and the old table freed.
   * Returns the first cluster after them.
   */
  refcountArea(
    start: number,
    extra: number,
    exact: boolean,
    newIndex = 0,
    newBlock = 0,
  ): number {
    const total = this.#blocksNeeded(start + extra, !exact);
    if (total > MAX_REFTABLE_SIZE) throw new ProtocolError("File too large", "EFBIG");
    const perCluster = this.cs / REFTABLE_ENTRY_SIZE;
    let size = exact ? total : total + Math.ceil(total / 2);
    size = Math.ceil(size / perCluster) * perCluster;
    if (size > MAX_REFTABLE_SIZE) throw new ProtocolError("File too large", "EFBIG");
    const tableClusters = size / perCluster;
    const table = new Array<number>(size).fill(0);
    for (let i = 0; i < Math.min(size, this.reftable.length); i++) table[i] = this.reftable[i] ?? 0;
    if (newBlock) table[newIndex] = newBlock;
    const areaIndex = Math.floor(start / this.rbEntries);
    let missing = 0;
    for (let i = areaIndex; i < total; i++) if (!table[i]) missing++;
    const tableStart = start + missing;
    const end = tableStart + tableClusters;
    let next = start;
    for (let i = areaIndex; i < total; i++) {
      if (!table[i]) table[i] = next++;
      const first = i * this.rbEntries;
      if (first >= end) continue;
      const to = Math.min(end - first, this.rbEntries);
      for (let j = Math.max(start - first, 0); j < to; j++) this.#set(first + j, 1);
    }
    // The old table keeps its last contents on disk.
    this.ops.push({
      kind: "write",
      offset: this.reftableCluster * this.cs,
      data: this.reftableBytes(),
    });
    const oldCluster = this.reftableCluster;
    const oldClusters = this.reftableEntries / perCluster;
    this.reftable = table;
    this.reftableEntries = size;
    this.reftableCluster = tableStart;
    this.ops.push({ kind: "write", offset: tableStart * this.cs, data: this.reftableBytes() });
    this.#update(oldCluster, oldClusters, -1);
    return end;
  }

  reftableBytes(): Uint8Array {
    const b = new Uint8Array(this.reftableEntries * REFTABLE_ENTRY_SIZE);
    this.reftable.forEach((c, i) => {
      if (c) putBe64(b, i * 8, BigInt(c) * BigInt(this.cs));
    });
    return b;
  }

  refblockBytes(index: number): Uint8Array {
    const b = new Uint8Array(this.cs);
    const first = index * this.rbEntries;
    const width = 2 ** this.refcountOrder;
    for (let j = 0; j < this.rbEntries; j++) {
      const v = this.#counts[first + j];
      if (!v) continue;
      if (width >= 8) {
        // Big-endian, `width / 8` bytes; counts here are small.
        b[(j + 1) * (width / 8) - 1] = v;
      } else {
        // Sub-byte widths pack from the least significant bit.
        const bit = j * width;
        b[bit >> 3] |= v << (bit & 7);
      }
    }
    return b;
  }

  /** The L2 table for guest cluster `g`, allocated (and hooked into L1) when missing. */
  l2For(g: number): { table: Uint8Array; index: number } {
    const l1Index = Math.floor(g / this.l2Entries);
    let entry = this.l1[l1Index];
    if (!entry) {
      const c = this.alloc(1);
      entry = (BigInt(c) * BigInt(this.cs)) | OFLAG_COPIED;
      this.l1[l1Index] = entry;
      this.l2Tables.set(c, new Uint8Array(this.cs));
    }
    const cluster = Number((entry & ~OFLAG_COPIED) / BigInt(this.cs));
    return { table: this.l2Tables.get(cluster)!, index: g % this.l2Entries };
  }

  /** Maps `n` guest clusters from `g` to host offsets from `host` (bytes). */
  link(g: number, n: number, host: number): void {
    const { table, index } = this.l2For(g);
    for (let i = 0; i < n; i++) {
      putBe64(table, (index + i) * this.l2EntrySize, BigInt(host + i * this.cs) | OFLAG_COPIED);
    }
  }
}

/** Bytes of header and extensions up to and including the end marker. */
function headerLength(s: Qcow2CreateSettings): number {
  const enc = new TextEncoder();
  const ext = (n: number) => 8 + Math.ceil(n / 8) * 8;
  let n = s.version === 3 ? 112 : 72;
  if (s.backingFormat !== undefined) n += ext(enc.encode(s.backingFormat).length);
  if (s.dataFile !== undefined) n += ext(enc.encode(s.dataFile).length);
  if (s.version === 3 && s.clusterSize > 4096) n += ext(featureNameTable().length);
  return n + 8;
}

/** qemu's errors when the header, then the backing file name, do not fit the first cluster. */
function checkHeaderFits(s: Qcow2CreateSettings, withBacking: boolean): void {
  const used = headerLength(s);
  if (!withBacking) {
    if (used > s.clusterSize) {
      throw new QimgError("Could not update qcow2 header: No space left on device");
    }
    return;
  }
  if (s.backingFile === undefined) return;
  const name = new TextEncoder().encode(s.backingFile).length;
  // qemu's backing file name buffer holds 1023 bytes.
  const errno = name > 1023
    ? "Invalid argument"
    : used + name > s.clusterSize
    ? "No space left on device"
    : undefined;
  if (errno) {
    throw new QimgError(
      `Could not assign backing file '${s.backingFile}' with format '${s.backingFormat}': ${errno}`,
    );
  }
}

/** The header cluster: fields, extensions, backing file name. */
function headerBytes(s: Qcow2CreateSettings, L: Layout, size: number): Uint8Array {
  const h = new Uint8Array(s.clusterSize);
  const enc = new TextEncoder();
  putBe32(h, 0, 0x514649fb);
  putBe32(h, 4, s.version);
  putBe32(h, 20, L.bits);
  putBe64(h, 24, size);
  putBe32(h, 36, L.l1.length);
  putBe64(h, 40, L.l1.length ? L.l1Cluster * L.cs : 0);
  putBe64(h, 48, L.reftableCluster * L.cs);
  putBe32(h, 56, L.reftableEntries * REFTABLE_ENTRY_SIZE / L.cs);
  let pos = 72;
  if (s.version === 3) {
    let incompat = 0n;
    if (s.dataFile !== undefined) incompat |= 4n;
    if (s.zstd) incompat |= 8n;
    if (s.extendedL2) incompat |= 16n;
    putBe64(h, 72, incompat);
    putBe64(h, 80, s.lazyRefcounts ? 1n : 0n);
    putBe64(h, 88, s.dataFileRaw ? 2n : 0n);
    putBe32(h, 96, s.refcountOrder);
    putBe32(h, 100, 112);
    h[104] = s.zstd ? 1 : 0;
    pos = 112;
  }
  const ext = (magic: number, data: Uint8Array) => {
    putBe32(h, pos, magic);
    putBe32(h, pos + 4, data.length);
    h.set(data, pos + 8);
    pos += 8 + Math.ceil(data.length / 8) * 8;
  };
  if (s.backingFormat !== undefined) ext(0xe2792aca, enc.encode(s.backingFormat));
  if (s.dataFile !== undefined) ext(0x44415441, enc.encode(s.dataFile));
  // Eight names take 392 bytes: qemu leaves the table out of clusters of 4 KiB and less.
  if (s.version === 3 && s.clusterSize > 4096) {
    const table = featureNameTable();
    ext(0x6803f857, table);
  }
  pos += 8; // end of extensions
  if (s.backingFile !== undefined) {
    const name = enc.encode(s.backingFile);
    putBe64(h, 8, pos);
    putBe32(h, 16, name.length);
    h.set(name, pos);
  }
  return h;
}

/** Metadata preallocation: per L2 range, its table then its data clusters. */
function preallocateMetadata(L: Layout, size: number, dataFile: boolean): number {
  const total = Math.ceil(size / L.cs);
  // qemu allocates at most INT_MAX bytes (whole clusters) per request.
  const perRequest = Math.min(
    Math.floor(INT_MAX / L.cs),
    Math.floor(REQUEST_MAX_BYTES / L.cs),
  );
  let end = 0;
  for (let g = 0; g < total;) {
    const n = Math.min(total - g, L.l2Entries - (g % L.l2Entries), perRequest);
    L.l2For(g);
    const host = dataFile ? g * L.cs : L.alloc(n) * L.cs;
    L.link(g, n, host);
    end = host + n * L.cs;
    g += n;
  }
  return end;
}

/** falloc/full: refcounts for the whole data area up front, data contiguous after them. */
function preallocateFull(L: Layout, size: number, prealloc: PreallocMode, l1End: number): void {
  const last = L.lastUsedCluster();
  const oldClusters = last >= 0 ? last + 1 : Math.ceil(l1End / L.cs);
  const dataClusters = Math.ceil(size / L.cs);
  const l2Tables = Math.ceil(dataClusters / L.l2Entries) + 1;
  const start = L.refcountArea(oldClusters, dataClusters + l2Tables, true);
  L.allocAt(start, dataClusters);
  L.ops.push({ kind: "grow", size: (start + dataClusters) * L.cs, prealloc });
  for (let g = 0; g < dataClusters;) {
    const n = Math.min(dataClusters - g, L.l2Entries - (g % L.l2Entries));
    L.link(g, n, (start + g) * L.cs);
    g += n;
  }
}

async function replay(file: BlockFile, ops: FileOp[]): Promise<void> {
  for (const op of ops) {
    if (op.kind === "write") {
      await file.write(op.offset, op.data);
    } else if (op.size > await file.size() || op.prealloc !== "off") {
      await truncateFile(file, op.size, op.prealloc);
    }
  }
}

/**
 * Creates a qcow2 image on an empty host file, as qemu-img 7.2 does: same
 * checks and messages, same layout, byte for byte.
 *
 * @param file The new, empty image file.
 * @param options Size and parsed `-o` values.
 */
export async function createQcow2(file: BlockFile, options: CreateOptions): Promise<void> {
  // Options may throw before anything is written; qemu removes the file then too.
  const created: string[] = [];
  try {
    await createInto(file, options, created);
  } catch (e) {
    if (options.removeFile) {
      for (const path of [file.name, ...created]) await options.removeFile(path).catch(() => {});
    }
    throw e;
  }
}

async function createInto(
  file: BlockFile,
  options: CreateOptions,
  created: string[],
): Promise<void> {
  const o = options.options;
  // qemu creates the data file (protocol level) before it checks the qcow2 options.
  let dataFile: BlockFile | undefined;
  const dataName = str(o.data_file);
  if (dataName !== undefined) {
    if (!options.openFile) throw new QimgError("data_file: not supported here");
    try {
      dataFile = await options.openFile(dataName, { create: true, write: true });
    } catch (e) {
      if (e instanceof QimgError) throw e;
      throw new QimgError(`Could not create '${dataName}': ${strerror(e)}`);
    }
    created.push(dataName);
  }
  try {
    const size = Math.ceil(options.size / 512) * 512;
    if (dataFile) {
      const p = str(o.preallocation);
      await createFile(dataFile, size, p === "falloc" || p === "full" ? p : "off");
    }
    const s = settingsFrom(o);
    // The data file name goes into the header before the image is sized.
    checkHeaderFits({ ...s, backingFile: undefined, backingFormat: undefined }, false);
    const L = new Layout(s);
    L.reftable[0] = 2;
    L.alloc(3);
    const l1Entries = Math.ceil(size / (L.cs * L.l2Entries));
    if (l1Entries > MAX_L1_BYTES / L1E_SIZE) throw new ProtocolError("File too large", "EFBIG");
    let l1End = 3 * L.cs;
    if (l1Entries > 0) {
      L.l1Cluster = L.alloc(Math.ceil(l1Entries * L1E_SIZE / L.cs));
      L.l1 = new Array<bigint>(l1Entries).fill(0n);
      l1End = L.l1Cluster * L.cs + l1Entries * L1E_SIZE;
      L.ops.push({
        kind: "write",
        offset: L.l1Cluster * L.cs,
        data: new Uint8Array(l1Entries * 8),
      });
    }
    if (s.prealloc === "metadata" || (dataFile && s.prealloc !== "off")) {
      const end = preallocateMetadata(L, size, dataFile !== undefined);
      if (!dataFile) L.ops.push({ kind: "grow", size: end, prealloc: "off" });
    } else if (s.prealloc !== "off") {
      preallocateFull(L, size, s.prealloc, l1End);
    }
    checkHeaderFits(s, true);
    // Final metadata, written over whatever the steps above left.
    const ops: FileOp[] = [
      { kind: "write", offset: L.cs, data: new Uint8Array(2 * L.cs) },
      ...L.ops,
    ];
    for (const [cluster, table] of L.l2Tables) {
      ops.push({ kind: "write", offset: cluster * L.cs, data: table });
    }
    if (L.l1.length) {
      const b = new Uint8Array(L.l1.length * 8);
      L.l1.forEach((e, i) => putBe64(b, i * 8, e));
      ops.push({ kind: "write", offset: L.l1Cluster * L.cs, data: b });
    }
    ops.push({ kind: "write", offset: L.reftableCluster * L.cs, data: L.reftableBytes() });
    L.reftable.forEach((c, i) => {
      if (c) ops.push({ kind: "write", offset: c * L.cs, data: L.refblockBytes(i) });
    });
    // The header last: a crash before it leaves no qcow2 image, never a corrupt one.
    ops.push({ kind: "write", offset: 0, data: headerBytes(s, L, size) });
    await replay(file, ops);
    await file.flush();
  } finally {
    await dataFile?.close();
  }
}
