/**
 * qcow2 refcounts as the write side keeps them: the refcount table and its
 * blocks in a metadata cache, cluster allocation (a forward-moving free
 * index, as qemu's), refcount blocks that describe themselves, and the table
 * moved when it is full. Its own module so that snapshot, amend, resize and
 * repair, which change refcounts but write no guest data, do not load the
 * writer and its codecs at start-up.
 */

import type { BlockFile } from "./file.ts";
import { IoError, QimgError } from "./errors.ts";
import { MetadataCache } from "./cache.ts";
import { alignUp, putBe32, putBe64 } from "./bytes.ts";
import { type Qcow2Header, readPadded } from "./qcow2_header.ts";

/** Header offset of the refcount table fields (u64 offset, then u32 clusters). */
const HDR_REFTABLE_OFFSET = 48;

/** Refcount `i` of a block of 2^order-bit entries (sub-byte entries LSB first). */
export function getRefcount(b: Uint8Array, i: number, order: number): number {
  switch (order) {
    case 0:
      return (b[i >> 3] >> (i & 7)) & 1;
    case 1:
      return (b[i >> 2] >> (2 * (i & 3))) & 3;
    case 2:
      return (b[i >> 1] >> (4 * (i & 1))) & 15;
    case 3:
      return b[i];
    case 4:
      return (b[2 * i] << 8) | b[2 * i + 1];
    case 5:
      return ((b[4 * i] << 24) | (b[4 * i + 1] << 16) | (b[4 * i + 2] << 8) | b[4 * i + 3]) >>>
        0;
    default: {
      const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
      return v.getUint32(8 * i) * 0x100000000 + v.getUint32(8 * i + 4);
    }
  }
}

/** Sets refcount `i` of a block of 2^order-bit entries. */
export function setRefcount(b: Uint8Array, i: number, order: number, value: number): void {
  if (order <= 2) {
    const bits = 1 << order;
    const per = 8 / bits;
    const shift = (i % per) * bits;
    const mask = ((1 << bits) - 1) << shift;
    const at = Math.floor(i / per);
    b[at] = (b[at] & ~mask) | ((value << shift) & mask);
    return;
  }
  if (order === 3) b[i] = value;
  else if (order === 4) {
    b[2 * i] = value >> 8;
    b[2 * i + 1] = value & 0xff;
  } else if (order === 5) putBe32(b, 4 * i, value);
  else putBe64(b, 8 * i, value);
}

/**
 * The refcount structures of one image, for allocating and freeing
 * clusters: the refcount table in memory, refcount blocks in a cache.
 */
export class Qcow2Refcounts {
  readonly cache: MetadataCache;
  /** Refcount block offsets by table index (0: none). */
  table: number[];
  /** Entries of the table as it is on disk (entries past it exist only in memory while it moves). */
  #diskEntries: number;
  /** Clusters below this one are known to be in use (qemu's free_cluster_index). */
  freeIndex = 0;
  /** Where the next compressed cluster may start (0: a fresh cluster). */
  freeByte = 0;
  readonly #file: BlockFile;
  readonly #header: Qcow2Header;
  readonly #cs: number;
  readonly #order: number;
  readonly #perBlock: number;
  readonly #max: number;

  constructor(file: BlockFile, header: Qcow2Header, table: number[]) {
    this.#file = file;
    this.#header = header;
    this.#cs = header.clusterSize;
    this.#order = header.refcountOrder;
    this.#perBlock = this.#cs * 8 / 2 ** this.#order;
    this.#max = this.#order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** this.#order) - 1;
    this.table = table;
    this.#diskEntries = table.length;
    const cs = this.#cs;
    this.cache = new MetadataCache({
      load: (offset) => readPadded(file, offset, cs),
      writeBack: (offset, data) => file.write(offset, data),
    }, { maxBytes: Math.max(4 * 1024 * 1024, 4 * cs) });
  }

  /** Reads the refcount table of `header`. */
  static async open(file: BlockFile, header: Qcow2Header): Promise<Qcow2Refcounts> {
    const raw = await readPadded(
      file,
      header.refcountTableOffset,
      header.refcountTableClusters * header.clusterSize,
    );
    const v = new DataView(raw.buffer);
    const table: number[] = [];
    for (let i = 0; i < raw.length; i += 8) {
      // Reserved low bits are ignored, as qemu's REFT_OFFSET_MASK does.
      table.push(v.getUint32(i) * 0x100000000 + ((v.getUint32(i + 4) & ~0x1ff) >>> 0));
    }
    return new Qcow2Refcounts(file, header, table);
  }

  /** The largest refcount an entry holds. */
  get max(): number {
    return this.#max;
  }

  /** The refcount of host cluster `index` (0 where no block covers it). */
  async get(index: number): Promise<number> {
    const t = Math.floor(index / this.#perBlock);
    const offset = this.table[t] ?? 0;
    if (!offset) return 0;
    return getRefcount(await this.cache.get(offset), index % this.#perBlock, this.#order);
  }

  /**
   * Finds `n` contiguous free clusters from the free index and moves the
   * index past them, without taking a reference (qemu's alloc_clusters_noref).
   */
  async findFree(n: number): Promise<number> {
    let start = this.freeIndex;
    // A refcount block at a time (one cache lookup for all its entries).
    for (let i = 0; i < n;) {
      const t = Math.floor((start + i) / this.#perBlock);
      const end = (t + 1) * this.#perBlock;
      const offset = this.table[t] ?? 0;
      if (!offset) {
        i = Math.min(n, end - start); // no block: all free
        continue;
      }
      const block = await this.cache.get(offset);
      // 16-bit refcounts (the default): a native search skips to the next
      // free entry (the first allocation starts at cluster 0).
      const u16 = this.#order === 4 && (block.byteOffset & 1) === 0
        ? new Uint16Array(block.buffer, block.byteOffset, this.#perBlock)
        : undefined;
      for (; i < n && start + i < end;) {
        if (i === 0 && u16) {
          const k = u16.indexOf(0, start - (end - this.#perBlock));
          if (k < 0) {
            start = end;
            break;
          }
          start = end - this.#perBlock + k;
        }
        if (getRefcount(block, (start + i) % this.#perBlock, this.#order) !== 0) {
          start += i + 1;
          i = 0;
        } else i++;
      }
    }
    this.freeIndex = start + n;
    return start;
  }

  /** Allocates `n` contiguous clusters with refcount 1; returns the host offset. */
  async allocClusters(n: number): Promise<number> {
    const start = await this.findFree(n);
    for (let c = start; c < start + n;) {
      const t = Math.floor(c / this.#perBlock);
      const offset = this.table[t] ?? 0;
      // A missing block is allocated (and may move the table) by change().
      if (!offset) {
        await this.change(c++, 1);
        continue;
      }
      // The rest of this block's entries in one cache lookup (they were free: no overflow).
      const block = await this.cache.get(offset);
      const end = Math.min(start + n, (t + 1) * this.#perBlock);
      for (; c < end; c++) {
        const i = c % this.#perBlock;
        setRefcount(block, i, this.#order, getRefcount(block, i, this.#order) + 1);
      }
      await this.cache.put(offset, block, { dirty: true });
    }
    return start * this.#cs;
  }

  /**
   * Allocates `size` bytes for a compressed cluster, packed after the
   * previous one as qemu's qcow2_alloc_bytes: a cluster shared by several
   * compressed clusters counts one reference for each.
   */
  async allocBytes(size: number): Promise<number> {
    const cs = this.#cs;
    let offset = this.freeByte;
    if (offset && await this.get(Math.floor(offset / cs)) === this.#max) offset = 0;
    const freeInCluster = cs - (offset % cs);
    if (!offset || freeInCluster < size) {
      const fresh = (await this.findFree(1)) * cs;
      // Continue into the next cluster only when it directly follows.
      if (!offset || alignUp(offset, cs) !== fresh) offset = fresh;
    }
    await this.changeRange(offset, size, 1);
    this.freeByte = (offset + size) % cs ? offset + size : 0;
    return offset;
  }

  /** Changes the refcount of every cluster that bytes [offset, offset + length) touch. */
  async changeRange(offset: number, length: number, delta: number): Promise<void> {
    const cs = this.#cs;
    const last = Math.floor((offset + length - 1) / cs);
    for (let c = Math.floor(offset / cs); c <= last; c++) await this.change(c, delta);
  }

  /** Adds `delta` to the refcount of cluster `index`. */
  async change(index: number, delta: number): Promise<void> {
    const t = Math.floor(index / this.#perBlock);
    let offset = this.table[t] ?? 0;
    if (!offset) {
      if (delta < 0) throw new IoError(`qcow2: freeing cluster ${index} without a refcount`);
      offset = await this.#allocBlock(t);
    }
    const block = await this.cache.get(offset);
    const i = index % this.#perBlock;
    const value = getRefcount(block, i, this.#order) + delta;
    if (value < 0 || value > this.#max) {
      throw new QimgError(
        value < 0
          ? "qcow2: refcount underflow"
          : "qcow2: refcount overflow (Numerical result out of range)",
      );
    }
    setRefcount(block, i, this.#order, value);
    await this.cache.put(offset, block, { dirty: true });
    if (value === 0) {
      if (index < this.freeIndex) this.freeIndex = index;
      if (this.freeByte && Math.floor(this.freeByte / this.#cs) === index) this.freeByte = 0;
    }
  }

  /**
   * Allocates refcount block `t` at the next free cluster. A block that
   * covers its own cluster describes itself; otherwise its reference goes
   * into the block that covers it. The table grows first when too short.
   */
  async #allocBlock(t: number): Promise<number> {
    if (t >= this.table.length) {
      await this.#growTable(t);
      // Moving the table may have allocated this very block already.
      if (this.table[t]) return this.table[t];
    }
    const cs = this.#cs;
    const cluster = await this.findFree(1);
    const offset = cluster * cs;
    const data = new Uint8Array(cs);
    const self = Math.floor(cluster / this.#perBlock) === t;
    if (self) setRefcount(data, cluster % this.#perBlock, this.#order, 1);
    // On disk before any table entry points at it.
    await this.#file.write(offset, data);
    await this.cache.put(offset, data);
    this.table[t] = offset;
    if (!self) await this.change(cluster, 1);
    if (t < this.#diskEntries) {
      // The block's own refcount too, or a crash leaves it referenced with refcount 0.
      if (!self) await this.cache.flush();
      const e = new Uint8Array(8);
      putBe64(e, 0, offset);
      await this.#file.write(this.#header.refcountTableOffset + t * 8, e);
    }
    return offset;
  }

  /**
   * Moves the refcount table to new, larger clusters that hold entries at
   * least up to `t`, enough also for the blocks describing the move itself.
   * The header switches to the new table once it and its blocks are on disk;
   * then the old table's clusters are freed.
   */
  async #growTable(t: number): Promise<void> {
    const cs = this.#cs;
    const oldOffset = this.#header.refcountTableOffset;
    const oldClusters = this.#header.refcountTableClusters;
    let clusters = Math.max(1, oldClusters);
    let entries = 0;
    // Cover the table's own clusters and the blocks that describe them.
    for (let i = 0; i < 4; i++) {
      const end = this.freeIndex + clusters + Math.ceil(clusters * cs / 8) + 2;
      entries = Math.max(t + 1, Math.ceil(end / this.#perBlock) + 1);
      while (clusters * cs / 8 < entries) clusters = Math.floor((clusters * 3 + 1) / 2);
    }
    while (this.table.length < clusters * cs / 8) this.table.push(0);
    const offset = await this.allocClusters(clusters);
    const raw = new Uint8Array(clusters * cs);
    for (let i = 0; i < this.table.length; i++) putBe64(raw, i * 8, this.table[i]);
    await this.cache.flush();
    await this.#file.write(offset, raw);
    const h = new Uint8Array(12);
    putBe64(h, 0, offset);
    putBe32(h, 8, clusters);
    await this.#file.write(HDR_REFTABLE_OFFSET, h);
    this.#header.refcountTableOffset = offset;
    this.#header.refcountTableClusters = clusters;
    this.#diskEntries = this.table.length;
    if (oldClusters) {
      for (let c = 0; c < oldClusters; c++) await this.change(oldOffset / cs + c, -1);
    }
  }
}
