/**
 * qcow2 refcounts: reading the refcount table and blocks, and `check`'s
 * metadata walk. The walk counts every reference the metadata makes (header,
 * L1/L2 tables and data clusters of the active image and of each snapshot,
 * the snapshot table, refcount structures, crypto header, bitmaps), then
 * compares with the stored refcounts and the OFLAG_COPIED bits, printing
 * qemu's lines in qemu's order. With a Qcow2Repairer (check -r) it also
 * fixes refcounts and OFLAG_COPIED as qemu does, through qcow2_repair.ts.
 */

import type { BlockFile } from "./file.ts";
import type { CheckResult } from "./driver.ts";
import { QimgError, strerror } from "./errors.ts";
import { be32 } from "./bytes.ts";
import { MetadataCache } from "./cache.ts";
import { type Qcow2Header, readPadded } from "./qcow2_header.ts";
import {
  MAX_SNAPSHOTS,
  type Qcow2Snapshot,
  readSnapshotTable,
  SNAPSHOT_ENTRY_SIZE,
  SnapshotTableError,
} from "./qcow2_snapshot.ts";
import type { Qcow2Repairer } from "./qcow2_repair.ts";

const INT_MAX = 0x7fffffff;
const INT64_MAX = 2n ** 63n - 1n;
const L1E_OFFSET_MASK = 0x00fffffffffffe00n;
const L1E_RESERVED_MASK = 0x7f000000000001ffn;
const L2E_OFFSET_MASK = 0x00fffffffffffe00n;
const L2E_STD_RESERVED_MASK = 0x3f000000000001fen;
const REFT_OFFSET_MASK = 0xfffffffffffffe00n;
const REFT_RESERVED_MASK = 0x1ffn;
const OFLAG_COPIED = 1n << 63n;
const OFLAG_COMPRESSED = 1n << 62n;
const OFLAG_ZERO = 1n;
const ALL_ALLOC = 0xffffffffn;
const MAX_L1_ENTRIES = 32 * 1024 * 1024 / 8;
const BME_OFFSET_MASK = 0x00fffffffffffe00n;
const BME_RESERVED_MASK = 0xff000000000001fen;

/** A check that stopped early: qemu-img prints "Check failed: <errno text>" after the lines so far. */
export class CheckFailedError extends QimgError {
  /** The lines printed before the failure. */
  readonly messages: string[];
  constructor(errno: string, messages: string[]) {
    super(errno);
    this.messages = messages;
  }
}

function hex(n: bigint | number): string {
  return n.toString(16);
}

/** C's `%#x`: `0x` prefix except for zero. */
function altHex(n: bigint | number): string {
  return n === 0 || n === 0n ? "0" : "0x" + n.toString(16);
}

/** Whether the u64 at `off` is zero, without making a bigint (hot loops over sparse tables). */
function isZero64(v: DataView, off: number): boolean {
  return v.getUint32(off) === 0 && v.getUint32(off + 4) === 0;
}

function dataView(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

function u64(b: Uint8Array, off: number): bigint {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getBigUint64(off, false);
}

/** The stored refcounts: the table in memory, blocks through a cache. */
export class RefcountReader {
  readonly header: Qcow2Header;
  /** Reftable entries as stored. */
  readonly table: BigUint64Array;
  /** Refcounts per refcount block. */
  readonly blockEntries: number;
  #cache: MetadataCache;
  #onCorruption: (text: string) => void;

  constructor(
    file: BlockFile,
    header: Qcow2Header,
    table: BigUint64Array,
    onCorruption: (text: string) => void,
  ) {
    this.header = header;
    this.table = table;
    this.blockEntries = header.clusterSize * 8 / 2 ** header.refcountOrder;
    this.#cache = new MetadataCache(
      { load: (offset) => readPadded(file, offset, header.clusterSize) },
      { maxBytes: 4 * 1024 * 1024 },
    );
    this.#onCorruption = onCorruption;
  }

  /** Reads the refcount table (its size is bounded by the header's validation). */
  static async open(
    file: BlockFile,
    header: Qcow2Header,
    onCorruption: (text: string) => void,
  ): Promise<RefcountReader> {
    const entries = header.refcountTableClusters * header.clusterSize / 8;
    const raw = await readPadded(file, header.refcountTableOffset, entries * 8);
    const table = new BigUint64Array(entries);
    const v = dataView(raw);
    // Most entries are empty: a bigint only for the others (start-up time).
    for (let i = 0; i < entries; i++) if (!isZero64(v, i * 8)) table[i] = v.getBigUint64(i * 8);
    return new RefcountReader(file, header, table, onCorruption);
  }

  /**
   * The stored refcount of cluster `index` (as qcow2_get_refcount): 0 past
   * the table or in a missing block; an unaligned block is corruption (EIO).
   * 64-bit refcounts above 2^53 come back as bigint.
   */
  async get(index: number): Promise<number | bigint> {
    const block = await this.block(Math.floor(index / this.blockEntries));
    return block ? refcountAt(block, index % this.blockEntries, this.header.refcountOrder) : 0;
  }

  /** Refcount block `t` (undefined: no block, all refcounts 0); throws EIO as qemu. */
  async block(t: number): Promise<Uint8Array | undefined> {
    if (t >= this.table.length) return undefined;
    const offset = this.table[t] & REFT_OFFSET_MASK;
    if (offset === 0n) return undefined;
    if (offset % BigInt(this.header.clusterSize)) {
      this.#onCorruption(
        `Refblock offset ${altHex(offset)} unaligned (reftable index: ${altHex(t)})`,
      );
      throw new QimgError("Input/output error");
    }
    if (offset > BigInt(Number.MAX_SAFE_INTEGER)) {
      // Past any real file: reads as zeroes below qemu's BDRV_MAX_LENGTH, EIO above.
      if (offset + BigInt(this.header.clusterSize) > 2n ** 63n - 2n ** 30n) {
        throw new QimgError("Input/output error");
      }
      return new Uint8Array(this.header.clusterSize);
    }
    return await this.#cache.get(Number(offset));
  }
}

/** Entry `i` of a refcount block of 2^order-bit entries (sub-byte entries are LSB first). */
function refcountAt(block: Uint8Array, i: number, order: number): number | bigint {
  switch (order) {
    case 0:
      return (block[i >> 3] >> (i & 7)) & 1;
    case 1:
      return (block[i >> 2] >> (2 * (i & 3))) & 3;
    case 2:
      return (block[i >> 1] >> (4 * (i & 1))) & 15;
    case 3:
      return block[i];
    case 4:
      return (block[2 * i] << 8) | block[2 * i + 1];
    case 5:
      return be32(block, 4 * i);
    default: {
      const v = u64(block, 8 * i);
      return v > BigInt(Number.MAX_SAFE_INTEGER) ? v : Number(v);
    }
  }
}

/** The in-memory refcount table the walk builds (qemu's IMRT), grown on demand. */
class Imrt {
  counts: Uint8Array | Uint16Array | Uint32Array | Float64Array;
  length: number;
  readonly max: number;
  readonly #order: number;
  constructor(length: number, order: number) {
    this.#order = order;
    this.length = length;
    this.max = order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** order) - 1;
    this.counts = this.#alloc(length);
  }
  #alloc(n: number) {
    const o = this.#order;
    return o <= 3
      ? new Uint8Array(n)
      : o === 4
      ? new Uint16Array(n)
      : o === 5
      ? new Uint32Array(n)
      : new Float64Array(n);
  }
  grow(length: number): void {
    if (length <= this.counts.length) {
      this.length = Math.max(this.length, length);
      return;
    }
    const next = this.#alloc(Math.max(length, Math.ceil(this.counts.length * 1.5)));
    next.set(this.counts as never);
    this.counts = next;
    this.length = length;
  }
}

/** What the check needs to know about the image besides its header. */
export interface CheckOptions {
  /** Guest data lives in an external data file (its clusters are not counted). */
  hasDataFile: boolean;
  /** Set for `check -r`: what to fix and how to write it. */
  repair?: Qcow2Repairer;
}

/**
 * Checks a qcow2 image's metadata as qemu's qcow2_co_check without repair,
 * returning the counts and the lines qemu prints to stderr. Throws
 * CheckFailedError where qemu's check returns an error.
 */
export async function checkQcow2(
  file: BlockFile,
  header: Qcow2Header,
  options: CheckOptions,
): Promise<CheckResult> {
  const c = new Checker(file, header, options);
  return await c.run();
}

class Checker {
  readonly file: BlockFile;
  readonly h: Qcow2Header;
  readonly opts: CheckOptions;
  readonly cs: number;
  readonly messages: string[] = [];
  readonly res: CheckResult;
  fileLength = 0;
  imrt!: Imrt;
  refs!: RefcountReader;
  snapshots: Qcow2Snapshot[] = [];
  snapshotsOffset = 0n;
  /** Table offsets exactly as stored (the parsed header holds them as numbers). */
  l1Offset = 0n;
  reftableOffset = 0n;
  snapshotsSize = 0;
  signaled = false;
  /** Corruptions of the refcount table that qemu's repair rebuilds the structures for. */
  refblockRebuild = 0;
  /** Whether one of them is a table entry with reserved bits (its rebuild is not written yet). */
  refblockReserved = false;

  constructor(file: BlockFile, header: Qcow2Header, opts: CheckOptions) {
    this.file = file;
    this.h = header;
    this.opts = opts;
    this.cs = header.clusterSize;
    this.res = {
      corruptions: 0,
      leaks: 0,
      checkErrors: 0,
      corruptionsFixed: 0,
      leaksFixed: 0,
      messages: this.messages,
    };
  }

  say(line: string): void {
    this.messages.push(line);
  }

  fail(errno: string): never {
    throw new CheckFailedError(errno, this.messages);
  }

  async run(): Promise<CheckResult> {
    await this.readSnapshots();
    this.fileLength = await this.file.size();
    const nbClusters = Math.ceil(this.fileLength / this.cs);
    if (nbClusters > INT_MAX) {
      this.res.checkErrors++;
      this.fail("File too large");
    }
    this.res.totalClusters = Math.ceil(this.h.size / this.cs);
    this.res.allocatedClusters = 0;
    this.res.fragmentedClusters = 0;
    this.res.compressedClusters = 0;
    this.refs = await RefcountReader.open(this.file, this.h, (t) => this.signal(t));
    this.imrt = new Imrt(nbClusters, this.h.refcountOrder);
    await this.calculate();
    const repair = this.opts.repair;
    const before = { ...this.res };
    const compared = await this.compare();
    let highest = compared.highest;
    if (repair) {
      if (
        before.corruptions !== this.refblockRebuild || before.checkErrors ||
        this.res.checkErrors || (this.refblockReserved && repair.mode === "all")
      ) {
        // qemu repairs these in ways not written yet.
        throw new QimgError("check -r: repairing this image: not supported yet");
      }
      const rebuild = compared.rebuild || this.refblockRebuild > 0;
      if (rebuild && repair.mode === "all") {
        highest = await this.rebuild(repair);
      } else if (rebuild) {
        this.say("ERROR need to rebuild refcount structures");
        this.res.checkErrors++;
        this.fail("Input/output error");
      }
      if (this.res.leaks || this.res.corruptions) {
        // The second pass repairs: its counts replace the first one's.
        this.res.leaks = before.leaks;
        this.res.corruptions = before.corruptions;
        highest = (await this.compare(repair)).highest;
        await repair.flush();
        this.refs = await RefcountReader.open(this.file, this.h, (t) => this.signal(t));
      }
    }
    await this.checkCopied(repair && this.copiedRepairable(repair) ? repair : undefined);
    this.res.imageEndOffset = (highest + 1) * this.cs;
    return this.res;
  }

  /** qemu's qcow2_signal_corruption on a read-only image: once, not fatal. */
  signal(text: string): void {
    if (this.signaled) return;
    this.signaled = true;
    this.say(
      `qcow2: Image is corrupt: ${text}; further non-fatal corruption events will be suppressed`,
    );
  }

  /** The snapshot table, re-read and validated as qemu's check does (open skips it). */
  async readSnapshots(): Promise<void> {
    const head = await readPadded(this.file, 0, 72);
    this.l1Offset = u64(head, 40);
    this.reftableOffset = u64(head, 48);
    const b = head.subarray(60);
    let nb = be32(b, 0);
    const offset = u64(b, 4);
    if (
      nb > MAX_SNAPSHOTS || INT64_MAX - BigInt(nb) * BigInt(SNAPSHOT_ENTRY_SIZE) < offset ||
      offset % BigInt(this.cs)
    ) {
      this.res.checkErrors++;
      if (nb > MAX_SNAPSHOTS) {
        this.say("qimg: ERROR snapshot table too large");
        this.say(
          `You can force-remove all ${
            nb - MAX_SNAPSHOTS
          } overhanging snapshots with qimg check -r all`,
        );
        this.fail("File too large");
      }
      this.say("qimg: ERROR snapshot table offset invalid");
      this.fail("Invalid argument");
    }
    if (offset > BigInt(Number.MAX_SAFE_INTEGER)) {
      // Beyond any real file: qemu reads zeroes there (or fails past its maximum).
      if (nb && offset > 2n ** 63n - 2n ** 30n) {
        this.res.checkErrors++;
        this.say(
          "qimg: ERROR failed to read the snapshot table: Failed to read snapshot table: Input/output error",
        );
        this.fail("Input/output error");
      }
    }
    this.snapshotsOffset = offset;
    try {
      const t = await readSnapshotTable(this.file, this.h, {
        nbSnapshots: nb,
        offset: Number(offset),
      });
      this.snapshots = t.snapshots;
      this.snapshotsSize = t.size;
    } catch (e) {
      if (!(e instanceof SnapshotTableError)) throw e;
      this.res.checkErrors++;
      this.say(`qimg: ERROR failed to read the snapshot table: ${e.message}`);
      if (e.hint) this.say(e.hint);
      nb = 0;
      this.fail(e.errno);
    }
    if (this.h.version >= 3) {
      this.snapshots.forEach((sn, i) => {
        if (sn.extraDataSize < 16) {
          this.res.corruptions++;
          this.say(`ERROR snapshot table entry ${i} is incomplete`);
        }
      });
    }
  }

  /** qemu's qcow2_inc_refcounts_imrt: counts one reference to each cluster of a range. */
  inc(offset: bigint, size: number): void {
    if (size <= 0) return;
    if (offset > INT64_MAX) {
      // A negative int64 offset: qemu cannot grow its table that far.
      this.res.checkErrors++;
      this.fail("Cannot allocate memory");
    }
    const end = offset + BigInt(size);
    if (end - BigInt(this.fileLength) >= BigInt(this.cs)) {
      this.say(
        "ERROR: counting reference for region exceeding the end of the file by one cluster or more: " +
          `offset 0x${hex(offset)} size 0x${hex(size)}`,
      );
      this.res.corruptions++;
      return;
    }
    const cs = this.cs;
    const first = Math.floor(Number(offset) / cs);
    const last = Math.floor((Number(end) - 1) / cs);
    const t = this.imrt;
    if (last >= t.length) t.grow(last + 1);
    for (let k = first; k <= last; k++) {
      if (t.counts[k] >= t.max) {
        this.say(`ERROR: overflow cluster offset=0x${hex(k * cs)}`);
        this.say(
          "Use qimg amend to increase the refcount entry width or qimg convert to create a clean copy if the image cannot be opened for writing",
        );
        this.res.corruptions++;
        continue;
      }
      t.counts[k]++;
    }
  }

  /** inc(offset, cluster size) for an aligned cluster offset, without bigints where nothing is wrong. */
  incCluster(offset: number): void {
    const k = offset / this.cs;
    const t = this.imrt;
    if (offset + this.cs - this.fileLength < this.cs && k < t.length && t.counts[k] < t.max) {
      t.counts[k]++;
    } else {
      this.inc(BigInt(offset), this.cs);
    }
  }

  async read(offset: bigint, length: number): Promise<Uint8Array> {
    if (offset > BigInt(Number.MAX_SAFE_INTEGER)) {
      if (offset + BigInt(length) > 2n ** 63n - 2n ** 30n) {
        throw new QimgError("Input/output error");
      }
      return new Uint8Array(length);
    }
    return await readPadded(this.file, Number(offset), length);
  }

  async calculate(): Promise<void> {
    const h = this.h;
    this.inc(0n, this.cs);
    await this.checkL1(this.l1Offset, h.l1Size, true);
    if (this.opts.hasDataFile && this.snapshots.length) {
      this.say(`ERROR ${this.snapshots.length} snapshots in image with data file`);
      this.res.corruptions++;
    }
    for (const sn of this.snapshots) {
      if (sn.l1TableOffset % BigInt(this.cs)) {
        this.say(
          `ERROR snapshot ${sn.id} (${sn.name}) l1_offset=${altHex(sn.l1TableOffset)}: ` +
            "L1 table is not cluster aligned; snapshot table entry corrupted",
        );
        this.res.corruptions++;
        continue;
      }
      if (sn.l1Size > MAX_L1_ENTRIES) {
        this.say(
          `ERROR snapshot ${sn.id} (${sn.name}) l1_size=${altHex(sn.l1Size)}: ` +
            "L1 table is too large; snapshot table entry corrupted",
        );
        this.res.corruptions++;
        continue;
      }
      await this.checkL1(sn.l1TableOffset, sn.l1Size, false);
    }
    this.inc(this.snapshotsOffset, this.snapshotsSize);
    this.inc(this.reftableOffset, h.refcountTableClusters * this.cs);
    const crypto = h.cryptoHeader;
    if (crypto && crypto.length && Number.isSafeInteger(crypto.offset)) {
      this.inc(BigInt(crypto.offset), Math.min(crypto.length, Number.MAX_SAFE_INTEGER));
    }
    await this.bitmaps();
    this.checkRefblocks();
  }

  async checkL1(offset: bigint, l1Size: number, active: boolean): Promise<void> {
    if (!l1Size) return;
    this.inc(offset, l1Size * 8);
    let l1: Uint8Array;
    try {
      l1 = await this.read(offset, l1Size * 8);
    } catch (e) {
      this.say("ERROR: I/O error in check_refcounts_l1");
      this.res.checkErrors++;
      this.fail(strerror(e));
    }
    const l1v = dataView(l1);
    for (let i = 0; i < l1Size; i++) {
      if (isZero64(l1v, i * 8)) continue;
      const entry = l1v.getBigUint64(i * 8);
      if (entry & L1E_RESERVED_MASK) {
        this.say(`ERROR found L1 entry with reserved bits set: ${hex(entry)}`);
        this.res.corruptions++;
      }
      const l2Offset = entry & L1E_OFFSET_MASK;
      this.inc(l2Offset, this.cs);
      if (l2Offset % BigInt(this.cs)) {
        this.say(
          `ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`,
        );
        this.res.corruptions++;
      }
      await this.checkL2(l2Offset, active);
    }
  }

  async checkL2(l2Offset: bigint, active: boolean): Promise<void> {
    const h = this.h;
    const cs = this.cs;
    // Past the end of the file the table reads as zeroes: nothing to count.
    // (L2 offsets stop at 2^56, far below where qemu's reads fail.)
    if (l2Offset >= BigInt(this.fileLength)) return;
    let table: Uint8Array;
    try {
      table = await this.read(l2Offset, cs);
    } catch (e) {
      this.say("ERROR: I/O error in check_refcounts_l2");
      this.res.checkErrors++;
      this.fail(strerror(e));
    }
    const ext = h.extendedL2;
    const esize = h.l2EntrySize;
    const dataFile = this.opts.hasDataFile;
    const res = this.res;
    const fileLength = this.fileLength;
    // Host offsets are multiples of 512 below 2^56: exact as numbers.
    let next = 0;
    const tv = dataView(table);
    for (let i = 0; i < h.l2Size; i++) {
      const hi = tv.getUint32(i * esize);
      const lo = tv.getUint32(i * esize + 4);
      // Unallocated without a bitmap: nothing to check.
      if (hi === 0 && lo === 0 && (!ext || isZero64(tv, i * esize + 8))) continue;
      // Nearly every entry: standard, not compressed, no reserved bits, an
      // aligned cluster inside the file. Counted with numbers, not bigints.
      if (!ext && !(hi & 0x7f000000) && !(lo & 0x1fe)) {
        const offset = (hi & 0xffffff) * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
        if (offset !== 0 && offset % cs === 0) {
          if (active) {
            res.allocatedClusters!++;
            if (next && offset !== next) res.fragmentedClusters!++;
            next = offset + cs;
          }
          if (!dataFile) {
            // incCluster inline (no call per entry while the code is cold).
            const k = offset / cs;
            const t = this.imrt;
            if (offset + cs - fileLength < cs && k < t.length && t.counts[k] < t.max) t.counts[k]++;
            else this.incCluster(offset);
          }
          continue;
        }
      }
      const entry = tv.getBigUint64(i * esize);
      const bitmap = ext ? tv.getBigUint64(i * esize + 8) : 0n;
      const type = clusterType(entry, ext, dataFile);
      if (type !== "compressed" && entry & L2E_STD_RESERVED_MASK) {
        this.say(`ERROR found l2 entry with reserved bits set: ${hex(entry)}`);
        res.corruptions++;
      }
      switch (type) {
        case "compressed": {
          let e = entry;
          const offsetBits = 62 - (h.clusterBits - 8);
          const offsetMask = (1n << BigInt(offsetBits)) - 1n;
          if (e & OFLAG_COPIED) {
            this.say(
              `ERROR: coffset=0x${
                hex(e & offsetMask)
              }: copied flag must never be set for compressed clusters`,
            );
            e &= ~OFLAG_COPIED;
            res.corruptions++;
          }
          if (dataFile) {
            this.say(`ERROR compressed cluster ${i} with data file, entry=0x${hex(e)}`);
            res.corruptions++;
            break;
          }
          if (bitmap) {
            this.say(
              `ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${
                hex(e)
              }`,
            );
            res.corruptions++;
            break;
          }
          const coffset = e & offsetMask;
          const sectors =
            Number((e >> BigInt(offsetBits)) & ((1n << BigInt(h.clusterBits - 8)) - 1n)) + 1;
          this.inc(coffset, sectors * 512 - Number(coffset & 511n));
          if (active) {
            res.allocatedClusters!++;
            res.compressedClusters!++;
            // Compressed clusters share sectors: fragmented by nature, as qemu counts them.
            res.fragmentedClusters!++;
          }
          break;
        }
        case "normal":
        case "zero-alloc": {
          const offset = entry & L2E_OFFSET_MASK;
          if ((bitmap >> 32n) & bitmap) {
            res.corruptions++;
            this.say(
              `ERROR offset=${
                hex(offset)
              }: Allocated cluster has corrupted subcluster allocation bitmap`,
            );
          }
          if (offset % BigInt(cs)) {
            res.corruptions++;
            const containsData = ext ? (bitmap & ALL_ALLOC) !== 0n : !(entry & OFLAG_ZERO);
            this.say(
              containsData
                ? `ERROR offset=${
                  hex(offset)
                }: Data cluster is not properly aligned; L2 entry corrupted.`
                : `ERROR offset=${
                  hex(offset)
                }: Preallocated cluster is not properly aligned; L2 entry corrupted.`,
            );
          }
          if (active) {
            res.allocatedClusters!++;
            if (next && Number(offset) !== next) res.fragmentedClusters!++;
            next = Number(offset) + cs;
          }
          if (!dataFile) this.inc(offset, cs);
          break;
        }
        case "zero-plain":
          break;
        default:
          if (bitmap & ALL_ALLOC) {
            res.corruptions++;
            this.say("ERROR: Unallocated cluster has non-zero subcluster allocation map");
          }
      }
    }
  }

  /** Bitmap directory, bitmap tables and their clusters (qcow2_check_bitmaps_refcounts). */
  async bitmaps(): Promise<void> {
    const ext = this.h.bitmaps;
    if (!ext || this.h.bitmapsInconsistent) return;
    this.inc(BigInt(ext.directoryOffset), ext.directorySize);
    const dir = await this.read(BigInt(ext.directoryOffset), ext.directorySize).catch(() =>
      undefined
    );
    const bad = (): never => {
      this.res.corruptions++;
      this.fail("Invalid argument");
    };
    if (!dir) bad();
    let pos = 0;
    const tables: { offset: bigint; size: number }[] = [];
    for (let i = 0; i < ext.nbBitmaps; i++) {
      if (pos + 24 > dir!.length) bad();
      const tableOffset = u64(dir!, pos);
      const tableSize = be32(dir!, pos + 8);
      const nameSize = (dir![pos + 18] << 8) | dir![pos + 19];
      const extra = be32(dir!, pos + 20);
      const entry = 24 + extra + nameSize;
      if (pos + entry > dir!.length || tableOffset % BigInt(this.cs)) bad();
      tables.push({ offset: tableOffset, size: tableSize });
      pos += Math.ceil(entry / 8) * 8;
    }
    if (pos !== dir!.length && Math.ceil(pos / 8) * 8 < dir!.length) bad();
    for (const t of tables) {
      if (t.size > 0x8000000) bad(); // qemu's BME_MAX_TABLE_SIZE
      this.inc(t.offset, t.size * 8);
      // Entries past the end of the file read as zeroes and count nothing:
      // read only what the file holds.
      const inFile = t.offset < BigInt(this.fileLength)
        ? Math.min(t.size, Math.ceil((this.fileLength - Number(t.offset)) / 8))
        : 0;
      let raw: Uint8Array | undefined;
      try {
        raw = await this.read(t.offset, inFile * 8);
      } catch {
        bad();
      }
      for (let i = 0; i < inFile; i++) {
        const e = u64(raw!, i * 8);
        const off = e & BME_OFFSET_MASK;
        if (e & BME_RESERVED_MASK || (off && ((e & 1n) || off % BigInt(this.cs)))) {
          this.res.corruptions++;
          continue;
        }
        if (off) this.inc(off, this.cs);
      }
    }
  }

  checkRefblocks(): void {
    this.refblockRebuild = 0;
    this.refblockReserved = false;
    const table = this.refs.table;
    const cs = BigInt(this.cs);
    for (let i = 0; i < table.length; i++) {
      const raw = table[i];
      if (raw === 0n) continue; // an empty entry counts and reports nothing
      const offset = raw & REFT_OFFSET_MASK;
      const cluster = offset / cs;
      if (raw & REFT_RESERVED_MASK) {
        this.say(`ERROR refcount table entry ${i} has reserved bits set`);
        this.res.corruptions++;
        this.refblockRebuild++;
        this.refblockReserved = true;
        continue;
      }
      if (offset % cs) {
        this.say(
          `ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`,
        );
        this.res.corruptions++;
        this.refblockRebuild++;
        continue;
      }
      if (cluster >= BigInt(this.imrt.length)) {
        this.res.corruptions++;
        this.say(`ERROR refcount block ${i} is outside image`);
        continue;
      }
      if (offset !== 0n) {
        this.inc(offset, this.cs);
        const n = this.imrt.counts[Number(cluster)];
        if (n !== 1) {
          this.say(`ERROR refcount block ${i} refcount=${n}`);
          this.res.corruptions++;
          this.refblockRebuild++;
        }
      }
    }
  }

  /**
   * Replaces the refcount structures with ones built from the computed
   * refcounts, then counts again and frees the old structures as leaks,
   * reporting as qemu what the rebuild fixed.
   */
  async rebuild(repair: Qcow2Repairer): Promise<number> {
    const old = { corruptions: this.res.corruptions, leaks: this.res.leaks };
    this.say("Rebuilding refcount structure");
    const { offset } = await repair.rebuild(this.imrt);
    this.reftableOffset = BigInt(offset);
    this.res.corruptions = 0;
    this.res.leaks = 0;
    this.fileLength = await this.file.size();
    this.refs = await RefcountReader.open(this.file, this.h, (t) => this.signal(t));
    this.imrt = new Imrt(this.imrt.length, this.h.refcountOrder);
    await this.calculate();
    // The old structures are now leaks: freed here, counted in neither report.
    const saved = { ...this.res };
    Object.assign(this.res, { corruptions: 0, leaks: 0, checkErrors: 0 });
    const again = await this.compare(repair, "leaks");
    if (again.rebuild) this.say("ERROR rebuilt refcount structure is still broken");
    const freshLeaks = this.res.leaks;
    Object.assign(this.res, saved, { messages: this.messages });
    await repair.flush();
    this.refs = await RefcountReader.open(this.file, this.h, (t) => this.signal(t));
    if (this.res.corruptions < old.corruptions) {
      this.res.corruptionsFixed += old.corruptions - this.res.corruptions;
    }
    if (this.res.leaks < old.leaks) this.res.leaksFixed += old.leaks - this.res.leaks;
    this.res.leaks += freshLeaks;
    return again.highest;
  }

  /**
   * Whether OFLAG_COPIED gets fixed: always with -r all; with -r leaks only
   * when the refcounts it relies on are now right (as qemu decides).
   */
  copiedRepairable(repair: Qcow2Repairer): boolean {
    return repair.mode === "all" ||
      !(this.res.checkErrors || this.res.corruptions || this.res.leaks);
  }

  /**
   * Stored against computed refcounts, fixing what `repair` allows; returns
   * the highest cluster in use and whether a referenced cluster has
   * refcount 0 (qemu then needs to rebuild the refcount structures).
   */
  async compare(
    repair?: Qcow2Repairer,
    mode = repair?.mode,
  ): Promise<{ highest: number; rebuild: boolean }> {
    let highest = 0;
    let rebuild = false;
    const t = this.imrt;
    const per = this.refs.blockEntries;
    const order = this.h.refcountOrder;
    for (let start = 0; start < t.length; start += per) {
      let block: Uint8Array | undefined;
      let error: unknown;
      try {
        block = await this.refs.block(start / per);
      } catch (e) {
        error = e;
      }
      const end = Math.min(t.length, start + per);
      for (let i = start; i < end; i++) {
        if (error !== undefined) {
          this.say(`Can't get refcount for cluster ${i}: ${strerror(error)}`);
          this.res.checkErrors++;
          continue;
        }
        const k = i - start;
        const stored = !block
          ? 0
          : order === 4
          ? (block[2 * k] << 8) | block[2 * k + 1]
          : refcountAt(block, k, order);
        const computed = t.counts[i];
        if (stored === 0 && computed === 0) continue;
        highest = i;
        if (typeof stored === "bigint" || stored !== computed) {
          const isLeak = typeof stored === "bigint" || stored > computed;
          if (stored === 0) rebuild = true;
          else if (repair && (isLeak || mode === "all")) {
            if (typeof stored === "bigint") {
              throw new QimgError("check -r: repairing 64-bit refcounts: not supported yet");
            }
            this.say(`Repairing cluster ${i} refcount=${stored} reference=${computed}`);
            await repair.setRefcount(i, stored, computed);
            if (isLeak) this.res.leaksFixed++;
            else this.res.corruptionsFixed++;
            continue;
          }
          this.say(
            `${isLeak ? "Leaked" : "ERROR"} cluster ${i} refcount=${stored} reference=${computed}`,
          );
          if (isLeak) this.res.leaks++;
          else this.res.corruptions++;
        }
      }
    }
    return { highest, rebuild };
  }

  /** OFLAG_COPIED of the active L1 and L2 entries against the stored refcounts. */
  async checkCopied(repair?: Qcow2Repairer): Promise<void> {
    const h = this.h;
    const l1 = await this.read(this.l1Offset, h.l1Size * 8);
    const cs = BigInt(this.cs);
    const l1v = dataView(l1);
    const refblocks = new BlockWalk(this.refs);
    for (let i = 0; i < h.l1Size; i++) {
      if (isZero64(l1v, i * 8)) continue;
      const l1Entry = l1v.getBigUint64(i * 8);
      const l2Offset = l1Entry & L1E_OFFSET_MASK;
      if (!l2Offset) continue;
      let refcount: number | bigint;
      try {
        refcount = await this.refs.get(Number(l2Offset / cs));
      } catch {
        continue;
      }
      if ((refcount === 1) !== ((l1Entry & OFLAG_COPIED) !== 0n)) {
        this.say(
          `${repair ? "Repairing" : "ERROR"} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${
            hex(l1Entry)
          } refcount=${refcount}`,
        );
        if (repair) {
          const fixed = refcount === 1 ? l1Entry | OFLAG_COPIED : l1Entry & ~OFLAG_COPIED;
          await repair.writeL1Entry(this.l1Offset, i, fixed);
          this.res.corruptionsFixed++;
        } else this.res.corruptions++;
      }
      if (l2Offset >= BigInt(this.fileLength)) continue; // reads as zeroes
      let table: Uint8Array;
      try {
        table = await this.read(l2Offset, this.cs);
      } catch (e) {
        this.say(`ERROR: Could not read L2 table: ${strerror(e)}`);
        this.res.checkErrors++;
        this.fail(strerror(e));
      }
      const tv = dataView(table);
      let l2Dirty = false;
      const esize = h.l2EntrySize;
      const ncs = this.cs;
      for (let j = 0; j < h.l2Size; j++) {
        const hi = tv.getUint32(j * esize);
        const lo = tv.getUint32(j * esize + 4);
        if (hi === 0 && lo === 0) continue;
        // clusterType with numbers: compressed, and zero-plain or unallocated without an offset.
        if (hi & 0x40000000) continue;
        const hostOffset = (hi & 0xffffff) * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
        const copied = (hi & 0x80000000) !== 0;
        if (hostOffset === 0 && (!this.opts.hasDataFile || !copied || (!h.extendedL2 && lo & 1))) {
          continue;
        }
        let rc: number | bigint = 1;
        if (!this.opts.hasDataFile) {
          const cluster = Math.floor(hostOffset / ncs);
          if (!refblocks.holds(cluster)) await refblocks.load(cluster);
          // 16-bit refcounts (the default) read inline: no calls per entry while cold.
          const b16 = refblocks.block16;
          const k = cluster - refblocks.first;
          const rb = b16 ? (b16[2 * k] << 8) | b16[2 * k + 1] : refblocks.at(cluster);
          if (rb === undefined) continue;
          rc = rb;
        }
        if ((rc === 1) !== copied) {
          const entry = tv.getBigUint64(j * esize);
          this.say(
            `${repair ? "Repairing" : "ERROR"} OFLAG_COPIED data cluster: l2_entry=${
              hex(entry)
            } refcount=${rc}`,
          );
          if (repair) {
            const fixed = rc === 1 ? entry | OFLAG_COPIED : entry & ~OFLAG_COPIED;
            tv.setBigUint64(j * h.l2EntrySize, fixed);
            l2Dirty = true;
            this.res.corruptionsFixed++;
          } else this.res.corruptions++;
        }
      }
      if (repair && l2Dirty) await repair.writeL2(l2Offset, table);
    }
  }
}

/**
 * Stored refcounts for a walk in (mostly) ascending cluster order: the
 * current refcount block is kept, so there is one await per block rather
 * than one per cluster (thousands of awaits cost milliseconds).
 */
class BlockWalk {
  readonly #refs: RefcountReader;
  #index = -1;
  #block: Uint8Array | undefined;
  #failed = false;
  constructor(refs: RefcountReader) {
    this.#refs = refs;
  }

  /** The first cluster the kept block describes. */
  first = 0;
  /** The kept block when it holds 16-bit refcounts and was read (entry k: bytes 2k, 2k+1). */
  block16: Uint8Array | undefined;

  /** Whether the block holding `cluster` is the one kept (`at` may be asked). */
  holds(cluster: number): boolean {
    return Math.floor(cluster / this.#refs.blockEntries) === this.#index;
  }

  /** Keeps the block holding `cluster`. */
  async load(cluster: number): Promise<void> {
    this.#index = Math.floor(cluster / this.#refs.blockEntries);
    this.first = this.#index * this.#refs.blockEntries;
    this.block16 = undefined;
    try {
      this.#block = await this.#refs.block(this.#index);
      this.#failed = false;
      if (this.#block && this.#refs.header.refcountOrder === 4) this.block16 = this.#block;
    } catch {
      this.#failed = true;
    }
  }

  /** The stored refcount of `cluster` (in the kept block); undefined where RefcountReader.get throws. */
  at(cluster: number): number | bigint | undefined {
    const per = this.#refs.blockEntries;
    if (this.#failed) return undefined;
    const b = this.#block;
    return b ? refcountAt(b, cluster % per, this.#refs.header.refcountOrder) : 0;
  }
}

/** qemu's qcow2_get_cluster_type for an L2 entry. */
function clusterType(
  entry: bigint,
  extendedL2: boolean,
  hasDataFile: boolean,
): "compressed" | "zero-alloc" | "zero-plain" | "normal" | "unallocated" {
  if (entry & OFLAG_COMPRESSED) return "compressed";
  if (entry & OFLAG_ZERO && !extendedL2) {
    return entry & L2E_OFFSET_MASK ? "zero-alloc" : "zero-plain";
  }
  if (!(entry & L2E_OFFSET_MASK)) {
    // Offset 0 is a real cluster of an external data file when COPIED says so.
    return hasDataFile && entry & OFLAG_COPIED ? "normal" : "unallocated";
  }
  return "normal";
}
