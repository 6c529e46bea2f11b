/**
 * The qcow2 write side: cluster allocation through the refcounts of
 * qcow2_refcounts.ts, L2 table allocation and copy-on-write, and the
 * FormatImage writes (write, writeZeroes, writeCompressed, flush).
 *
 * Allocation is append-style as qemu's: a free-cluster index moves forward
 * through the refcounts, so a fresh image fills up from its end, an L2
 * table just before the data it maps. Ordering: refcount blocks are flushed
 * before L2 tables (the L2 cache depends on the refcount cache), data is
 * written before the L2 entry pointing at it, L2 tables before the L1 table.
 * All writes run one at a time (qemu's s->lock).
 */

import { Lock } from "./lock.ts";
import type { BackingReader } from "./driver.ts";
import type { BlockFile } from "./file.ts";
import { IoError, QimgError } from "./errors.ts";
import { decompressCluster } from "./codec.ts";
import type { BatchResult, CompressPool } from "./compress_pool.ts";
import { alignUp, isZero, putBe32, putBe64 } from "./bytes.ts";
import { CRYPT_NONE, INCOMPAT_DIRTY, type Qcow2Header, readPadded } from "./qcow2_header.ts";
import {
  type ClusterMapper,
  compressedDescriptor,
  entryOffset,
  OFLAG_COMPRESSED_HI,
  OFLAG_COPIED_HI,
  OFLAG_ZERO,
} from "./qcow2_cluster.ts";
import { loadPako, loadZlib, pakoSync, zlibSync } from "./zlib_loader.ts";
import { Qcow2Refcounts } from "./qcow2_refcounts.ts";

/** How a Qcow2Writer works on its image. */
export interface Qcow2WriterOptions {
  /** Whether the image has a backing file (unallocated clusters then read from it). */
  hasBacking: boolean;
  /** The external data file, when the image has one. */
  dataFile?: BlockFile;
  /** Called after metadata changes that can make cached decompressed data stale. */
  onChange?: () => void;
  /** The caller marks the image's persistent bitmaps for every write (Qcow2Image). */
  tracksBitmaps?: boolean;
}

/** The parts of an L2 entry the writer looks at. */
interface L2Entry {
  offset: number;
  /** Has a host cluster (offset 0 counts with an external data file and COPIED). */
  host: boolean;
  copied: boolean;
  compressed: boolean;
  /** The whole cluster reads as zeroes whatever its host cluster holds. */
  zero: boolean;
  /** Every byte lives in the host cluster (no zero or unallocated subclusters). */
  full: boolean;
  /** Extended L2: allocation (bits 0-31) and zero (bits 32-63) bitmaps. */
  ext?: { alloc: number; zero: number };
  hi: number;
  lo: number;
}

const ALL = 0xffffffff;

/** Entry `i` of an L2 table (16-byte entries with extended L2). */
function readEntry(view: DataView, i: number, ext: boolean, dataFile: boolean): L2Entry {
  const at = i * (ext ? 16 : 8);
  const hi = view.getUint32(at);
  const lo = view.getUint32(at + 4);
  const compressed = (hi & OFLAG_COMPRESSED_HI) !== 0;
  const offset = compressed ? 0 : entryOffset(hi, lo);
  const copied = (hi & OFLAG_COPIED_HI) !== 0;
  const host = offset !== 0 || (dataFile && copied && !compressed);
  if (ext) {
    const bits = { alloc: view.getUint32(at + 12), zero: view.getUint32(at + 8) };
    const zero = !compressed && bits.alloc === 0 && bits.zero === ALL;
    return { hi, lo, compressed, offset, host, copied, zero, full: bits.alloc === ALL, ext: bits };
  }
  const zero = !compressed && (lo & OFLAG_ZERO) !== 0;
  return { hi, lo, compressed, offset, host, copied, zero, full: !zero };
}

/** Bitmaps of an extended L2 entry: all allocated, all zero, none (compressed). */
const BITMAP_DATA = 0xffffffffn;
const BITMAP_ZERO = 0xffffffffn << 32n;

/** Sets entry `i`; `bitmap` is the extended L2 bitmap word (ignored otherwise). */
function setEntry(view: DataView, i: number, ext: boolean, value: bigint, bitmap = 0n): void {
  view.setBigUint64(i * (ext ? 16 : 8), value);
  if (ext) view.setBigUint64(i * 16 + 8, bitmap);
}

/** An unallocated cluster. */
const NO_ENTRY: L2Entry = {
  offset: 0,
  host: false,
  copied: false,
  compressed: false,
  zero: false,
  full: false,
  hi: 0,
  lo: 0,
};

const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;

/** Writes guest data into an open qcow2 image. */
export class Qcow2Writer {
  readonly #file: BlockFile;
  readonly #header: Qcow2Header;
  readonly #mapper: ClusterMapper;
  readonly #options: Qcow2WriterOptions;
  #refs?: Qcow2Refcounts;
  /** The L1 entries changed since the last flush (first, end). */
  #l1Dirty: [number, number] | undefined;
  /**
   * Refcount decrements waiting for the tables that dropped their references
   * to reach the disk: a lower refcount written first would leave a table on
   * disk pointing at a cluster with refcount 0 (corruption) after a crash.
   */
  #releases: (() => Promise<void>)[] = [];
  #lock = new Lock();
  #backingRead?: BackingReader;

  constructor(
    file: BlockFile,
    header: Qcow2Header,
    mapper: ClusterMapper,
    options: Qcow2WriterOptions,
  ) {
    this.#file = file;
    this.#header = header;
    this.#mapper = mapper;
    this.#options = options;
  }

  /** Guest data lives in an external data file, at the guest offsets (no refcounts). */
  get #dataMode(): boolean {
    return this.#mapper.hasDataFile;
  }

  /** Where guest data lives. */
  get #data(): BlockFile {
    return this.#options.dataFile ?? this.#file;
  }

  /** The L1 table (a resize may replace it). */
  get #l1View(): DataView {
    const l1 = this.#mapper.l1;
    return new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  }

  /** Refuses images whose writes are not implemented (yet). */
  #assertWritable(): void {
    const h = this.#header;
    if (!this.#file.writable) throw new QimgError("Permission denied: image opened read-only");
    if (h.cryptMethod !== CRYPT_NONE) {
      throw new QimgError("writing encrypted qcow2 images: not supported yet");
    }
    if (this.#dataMode && !this.#options.dataFile) {
      throw new QimgError("'data-file' is required for this image");
    }
    // qemu repairs the refcounts of an image left dirty (lazy refcounts) before writing.
    if (h.incompatibleFeatures & INCOMPAT_DIRTY) {
      throw new QimgError("writing dirty qcow2 images (lazy refcounts): not supported yet");
    }
    // Writes must also mark the persistent bitmaps, or they would silently go stale.
    if (h.bitmaps && !h.bitmapsInconsistent && !this.#options.tracksBitmaps) {
      throw new QimgError("writing qcow2 images with persistent bitmaps: not supported yet");
    }
  }

  async #refcounts(): Promise<Qcow2Refcounts> {
    if (!this.#refs) {
      this.#refs = await Qcow2Refcounts.open(this.#file, this.#header);
      // Refcounts reach the disk before the L2 entries that rely on them.
      this.#mapper.l2Cache.dependsOn(this.#refs.cache);
    }
    return this.#refs;
  }

  /** Runs `op` after every earlier write (qemu's s->lock). */
  #serial<T>(op: () => Promise<T>, concurrent = false): Promise<T> {
    // Anything but another concurrent write first lets writeConcurrent's transfers finish.
    const run = concurrent ? op : async () => {
      await this.#drain();
      const result = await op();
      // References this operation dropped are released now, so that the
      // next allocation may reuse the clusters, as qemu's does.
      if (this.#releases.length) await this.#flushTables();
      return result;
    };
    return this.#lock.run(run).finally(() => this.#options.onChange?.());
  }

  /** Data transfers of writeConcurrent still running, by host cluster index. */
  #inflight = new Map<number, Promise<void>>();

  async #drain(): Promise<void> {
    if (this.#inflight.size) await Promise.allSettled(new Set(this.#inflight.values()));
  }

  /** Waits for transfers still running into the host cluster at `hostOffset`. */
  async #settle(hostOffset: number): Promise<void> {
    await this.#inflight.get(Math.floor(hostOffset / this.#header.clusterSize))?.catch(() => {});
  }

  /**
   * Writes data to freshly allocated host clusters: at once, or (for
   * writeConcurrent, `started` given) on another thread after any transfer
   * still running into the same clusters, its promise added to `started`.
   */
  async #put(host: number, bytes: Uint8Array, started?: Promise<void>[]): Promise<void> {
    const file = this.#data;
    if (!started || !file.writeConcurrent) return await file.write(host, bytes);
    const cs = this.#header.clusterSize;
    const first = Math.floor(host / cs);
    const last = Math.floor((host + bytes.length - 1) / cs);
    const before: Promise<void>[] = [];
    for (let c = first; c <= last; c++) {
      const p = this.#inflight.get(c);
      if (p) before.push(p);
    }
    // Fresh clusters: their blocks reserved first (fallocate, on another thread)
    // make the page-cache writes cheaper on ext4 (convert -O qcow2 of 1 GiB
    // with 40% data: CPU about 20 ms less); all of them are then written.
    // Not through write_queue.ts as raw targets: on the idle machine its
    // fallocate-then-pwritev pairs ran 3 of 8 qcow2->qcow2 converts of 4 GiB at
    // twice the time, in system time (0.8-1.1 s against 0.35-0.45 s).
    const reserved = file.allocate?.(host, bytes.length).catch(() => {});
    const p = Promise.all([...before.map((b) => b.catch(() => {})), reserved]).then(() =>
      file.writeConcurrent!(host, bytes)
    );
    for (let c = first; c <= last; c++) this.#inflight.set(c, p);
    const forget = () => {
      for (let c = first; c <= last; c++) if (this.#inflight.get(c) === p) this.#inflight.delete(c);
    };
    p.then(forget, forget);
    started.push(p);
  }

  #setL1(index: number, value: number): void {
    this.#l1View.setBigUint64(index * 8, COPIED | BigInt(value));
    const d = this.#l1Dirty;
    this.#l1Dirty = d ? [Math.min(d[0], index), Math.max(d[1], index + 1)] : [index, index + 1];
  }

  /**
   * The L2 table for L1 entry `index`, ready for changes: allocated when
   * missing, copied when shared with a snapshot (no COPIED flag).
   */
  async #l2ForWrite(index: number): Promise<{ offset: number; table: Uint8Array }> {
    const refs = await this.#refcounts();
    const cs = this.#header.clusterSize;
    const hi = this.#l1View.getUint32(index * 8);
    const current = this.#mapper.l2Offset(index);
    if (current && (hi & OFLAG_COPIED_HI)) {
      return { offset: current, table: await this.#mapper.l2Table(current) };
    }
    const old = current ? await this.#mapper.l2Table(current) : undefined;
    const offset = await refs.allocClusters(1);
    const table = old ? old.slice() : new Uint8Array(cs);
    await this.#mapper.l2Cache.put(offset, table, { dirty: true });
    this.#setL1(index, offset);
    if (current) await this.#releaseLater(() => refs.change(current / cs, -1));
    return { offset, table };
  }

  /** Host clusters for `count` new data clusters from guest offset `guest`. */
  async #allocData(guest: number, count: number): Promise<number> {
    // An external data file maps guest offsets one to one, without refcounts.
    if (this.#dataMode) return guest;
    return await (await this.#refcounts()).allocClusters(count);
  }

  /**
   * Queues a refcount decrement until the tables are next written (at the
   * end of the operation, see #serial); past a bound, writes them now.
   */
  async #releaseLater(release: () => Promise<void>): Promise<void> {
    this.#releases.push(release);
    if (this.#releases.length >= 4096) {
      await this.#drain(); // data before the tables that point at it
      await this.#flushTables();
    }
  }

  /** Drops this layer's reference to the cluster an L2 entry held, once the tables are written. */
  #release(e: L2Entry, discard = false): Promise<void> {
    return this.#releaseLater(() => this.#releaseNow(e, discard));
  }

  async #releaseNow(e: L2Entry, discard: boolean): Promise<void> {
    const refs = await this.#refcounts();
    const cs = this.#header.clusterSize;
    if (e.compressed) {
      const d = compressedDescriptor(e.hi, e.lo, this.#header.clusterBits);
      await refs.changeRange(d.hostOffset & ~511, d.size + (d.hostOffset & 511), -1);
    } else if (e.host && !this.#dataMode) {
      await refs.change(e.offset / cs, -1);
      // A guest's unmap request reaches the file once the cluster is free
      // (qemu's pass-discard-request), as a punched hole.
      if (discard && await refs.get(e.offset / cs) === 0) await this.#file.discard?.(e.offset, cs);
    }
  }

  /** The bytes a cluster held before a write: what copy-on-write keeps around it. */
  async #oldCluster(e: L2Entry, guestCluster: number, backingRead?: BackingReader) {
    const cs = this.#header.clusterSize;
    const buf = new Uint8Array(cs);
    if (e.compressed) {
      const d = compressedDescriptor(e.hi, e.lo, this.#header.clusterBits);
      const input = await readPadded(this.#file, d.hostOffset, d.size);
      buf.set(await decompressCluster(this.#header.compressionType, input, cs));
    } else if (e.zero) {
      // Reads as zeroes.
    } else if (e.ext) {
      // Subcluster by subcluster: host data, zeroes, or the backing file.
      const bits = e.ext;
      const sc = cs / 32;
      if ((bits.alloc | bits.zero) >>> 0 !== ALL && this.#options.hasBacking) {
        buf.set(await this.#oldCluster(NO_ENTRY, guestCluster, backingRead));
      }
      const host = e.host ? await readPadded(this.#data, e.offset, cs) : undefined;
      for (let s = 0; s < 32; s++) {
        if ((bits.alloc >>> s) & 1) buf.set(host!.subarray(s * sc, (s + 1) * sc), s * sc);
        else if ((bits.zero >>> s) & 1) buf.fill(0, s * sc, (s + 1) * sc);
      }
    } else if (e.host) {
      const n = await this.#data.read(e.offset, buf);
      if (n < cs) buf.fill(0, Math.max(n, 0));
    } else if (this.#options.hasBacking) {
      const read = backingRead ?? this.#backingRead;
      if (!read) {
        throw new QimgError(
          "qcow2: partial cluster write needs the backing file: not supported yet",
        );
      }
      const n = Math.min(cs, this.#header.size - guestCluster);
      if (n > 0) await read(guestCluster, buf.subarray(0, n));
    }
    return buf;
  }

  /** Writes guest bytes, allocating clusters as needed. */
  async write(offset: number, data: Uint8Array, backingRead?: BackingReader): Promise<void> {
    this.#assertWritable();
    if (backingRead) this.#backingRead = backingRead;
    return await this.#serial(() => this.#write(offset, data, backingRead));
  }

  /**
   * As write, but the data of newly allocated clusters goes to the file on
   * another thread after the metadata work, beside later calls' transfers
   * (convert): clusters are still allocated in call order. Settles when this
   * call's data is written.
   */
  async writeConcurrent(
    offset: number,
    data: Uint8Array,
    backingRead?: BackingReader,
  ): Promise<void> {
    this.#assertWritable();
    if (backingRead) this.#backingRead = backingRead;
    const started: Promise<void>[] = [];
    await this.#serial(() => this.#write(offset, data, backingRead, started), true);
    const failed = (await Promise.allSettled(started)).find((r) => r.status === "rejected");
    if (failed) throw (failed as PromiseRejectedResult).reason;
  }

  async #write(
    offset: number,
    data: Uint8Array,
    backingRead?: BackingReader,
    started?: Promise<void>[],
  ): Promise<void> {
    // The block layer refuses requests past the end (qemu: EIO).
    if (offset < 0 || offset + data.length > this.#header.size) {
      throw new IoError("Input/output error");
    }
    const span = this.#mapper.l2Span;
    const end = offset + data.length;
    let pos = offset;
    while (pos < end) {
      const l1Index = Math.floor(pos / span);
      const chunkEnd = Math.min(end, (l1Index + 1) * span);
      const chunk = data.subarray(pos - offset);
      await this.#writeInL2(l1Index, pos, chunkEnd, chunk, backingRead, started);
      pos = chunkEnd;
    }
  }

  /** Writes [pos, end) within one L2 table; `data` starts at `pos`. */
  async #writeInL2(
    l1Index: number,
    pos: number,
    end: number,
    data: Uint8Array,
    backingRead?: BackingReader,
    started?: Promise<void>[],
  ): Promise<void> {
    const cs = this.#header.clusterSize;
    const span = this.#mapper.l2Span;
    const { offset: l2Offset, table } = await this.#l2ForWrite(l1Index);
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const ext = this.#header.extendedL2;
    const base = l1Index * span;
    const first = Math.floor((pos - base) / cs);
    const last = Math.floor((end - 1 - base) / cs);
    let i = first;
    while (i <= last) {
      const e = readEntry(view, i, ext, this.#dataMode);
      const cStart = base + i * cs;
      if (e.host && e.copied) {
        // Written in place, maybe read first: after any transfer still running into it.
        if (this.#inflight.size) await this.#settle(e.offset);
        // Ours alone: in place; what the cluster read as before (zeroes, backing
        // data for unallocated subclusters) is filled in around a partial write.
        const from = Math.max(pos, cStart);
        const to = Math.min(end, cStart + cs);
        if (e.ext && !e.full) {
          const bytes = data.subarray(from - pos, to - pos);
          await this.#writeSubclusters(view, i, 1, e.offset, from, to, bytes, backingRead);
          i++;
          continue;
        }
        if (!e.full && (from > cStart || to < cStart + cs)) {
          const buf = await this.#oldCluster(e, cStart, backingRead);
          buf.set(data.subarray(from - pos, to - pos), from - cStart);
          await this.#data.write(e.offset, buf);
          setEntry(view, i, ext, COPIED | BigInt(e.offset), BITMAP_DATA);
          i++;
          continue;
        }
        // The following clusters that continue on the host and take the
        // write whole (or hold all their bytes already) go out in the same
        // request: one write per host run, as qemu's, not one per cluster.
        let k = i;
        for (; k < last; k++) {
          const n = readEntry(view, k + 1, ext, this.#dataMode);
          const nStart = cStart + (k + 1 - i) * cs;
          if (!n.host || !n.copied || n.offset !== e.offset + (k + 1 - i) * cs) break;
          if (!n.full && (n.ext || end < nStart + cs)) break;
          if (this.#inflight.size) await this.#settle(n.offset);
        }
        const runTo = Math.min(end, cStart + (k + 1 - i) * cs);
        await this.#data.write(e.offset + (from - cStart), data.subarray(from - pos, runTo - pos));
        for (let m = i; m <= k; m++) {
          const n = m === i ? e : readEntry(view, m, ext, this.#dataMode);
          if (!n.full) setEntry(view, m, ext, COPIED | BigInt(n.offset), BITMAP_DATA);
        }
        i = k + 1;
        continue;
      }
      // A run of clusters that need new host clusters, allocated together.
      let j = i;
      while (j + 1 <= last) {
        const n = readEntry(view, j + 1, ext, this.#dataMode);
        if (n.host && n.copied) break;
        j++;
      }
      const count = j - i + 1;
      const runStart = base + i * cs;
      const runEnd = runStart + count * cs;
      const from = Math.max(pos, runStart);
      const to = Math.min(end, runEnd);
      let fresh = ext;
      for (let k = i; k <= j && fresh; k++) {
        const n = readEntry(view, k, ext, this.#dataMode);
        fresh = !n.host && !n.compressed;
      }
      if (fresh) {
        // Extended L2, nothing allocated yet: only the subclusters written.
        const host = await this.#allocData(runStart, count);
        const bytes = data.subarray(from - pos, to - pos);
        await this.#writeSubclusters(view, i, count, host, from, to, bytes, backingRead);
        i = j + 1;
        continue;
      }
      // Partly written first and last clusters keep what they read as before
      // (copy-on-write); whole clusters between them go out straight from `data`.
      let head: Uint8Array | undefined;
      let tail: Uint8Array | undefined;
      if (from > runStart) {
        head = await this.#oldCluster(e, runStart, backingRead);
        head.set(data.subarray(from - pos, Math.min(to, runStart + cs) - pos), from - runStart);
      }
      const lastStart = runEnd - cs;
      if (to < runEnd && (count > 1 || !head)) {
        tail = await this.#oldCluster(
          readEntry(view, j, ext, this.#dataMode),
          lastStart,
          backingRead,
        );
        tail.set(
          data.subarray(Math.max(from, lastStart) - pos, to - pos),
          Math.max(from, lastStart) - lastStart,
        );
      }
      const host = await this.#allocData(runStart, count);
      const wholeFrom = head ? runStart + cs : runStart;
      const wholeTo = tail ? lastStart : runEnd;
      if (head) await this.#put(host, head, started);
      if (wholeTo > wholeFrom) {
        await this.#put(
          host + (wholeFrom - runStart),
          data.subarray(wholeFrom - pos, wholeTo - pos),
          started,
        );
      }
      if (tail) await this.#put(host + (lastStart - runStart), tail, started);
      for (let k = 0; k < count; k++) {
        const old = readEntry(view, i + k, ext, this.#dataMode);
        setEntry(view, i + k, ext, COPIED | BigInt(host + k * cs), BITMAP_DATA);
        // Fresh clusters (most of a convert) held nothing to release.
        if (old.host || old.compressed) await this.#release(old);
      }
      i = j + 1;
    }
    await this.#mapper.l2Cache.put(l2Offset, table, { dirty: true });
  }

  /**
   * Extended L2: writes only the subclusters that guest bytes [from, to)
   * touch, in `count` clusters from entry `i` whose host clusters start at
   * `host`; partly written subclusters keep what they read as before. The
   * bitmaps gain exactly those subclusters, the others stay as they were
   * (as qemu does, so files end where qemu's end).
   */
  async #writeSubclusters(
    view: DataView,
    i: number,
    count: number,
    host: number,
    from: number,
    to: number,
    data: Uint8Array,
    backingRead?: BackingReader,
  ): Promise<void> {
    const cs = this.#header.clusterSize;
    const sc = cs / 32;
    const runStart = from - (from % cs);
    const wFrom = from - (from % sc);
    const wTo = Math.min(runStart + count * cs, alignUp(to, sc));
    const buf = new Uint8Array(wTo - wFrom);
    if (from > wFrom) {
      const old = await this.#oldCluster(
        readEntry(view, i, true, this.#dataMode),
        runStart,
        backingRead,
      );
      buf.set(old.subarray(wFrom - runStart, from - runStart));
    }
    if (to < wTo) {
      const tailStart = runStart + (count - 1) * cs;
      const tail = readEntry(view, i + count - 1, true, this.#dataMode);
      const old = await this.#oldCluster(tail, tailStart, backingRead);
      buf.set(old.subarray(to - tailStart, wTo - tailStart), to - wFrom);
    }
    buf.set(data, from - wFrom);
    await this.#data.write(host + (wFrom - runStart), buf);
    for (let k = 0; k < count; k++) {
      const cStart = runStart + k * cs;
      const s0 = Math.max(0, Math.floor((wFrom - cStart) / sc));
      const s1 = Math.min(32, Math.ceil((wTo - cStart) / sc));
      const mask = (2 ** s1 - 2 ** s0) >>> 0;
      const bits = readEntry(view, i + k, true, this.#dataMode).ext!;
      const alloc = (bits.alloc | mask) >>> 0;
      const zero = (bits.zero & ~mask) >>> 0;
      setEntry(
        view,
        i + k,
        true,
        COPIED | BigInt(host + k * cs),
        (BigInt(zero) << 32n) | BigInt(alloc),
      );
    }
  }

  /**
   * Makes a range read as zeroes: zero flags on v3 images (freeing the
   * clusters when `mayUnmap`), explicit zeroes on v2; ranges that already
   * read as zeroes are left alone.
   */
  async writeZeroes(
    offset: number,
    length: number,
    options: { mayUnmap?: boolean; backingRead?: BackingReader } = {},
  ): Promise<void> {
    this.#assertWritable();
    if (options.backingRead) this.#backingRead = options.backingRead;
    return await this.#serial(() => this.#writeZeroes(offset, length, options));
  }

  async #writeZeroes(
    offset: number,
    length: number,
    options: { mayUnmap?: boolean; backingRead?: BackingReader },
  ): Promise<void> {
    const cs = this.#header.clusterSize;
    const ext = this.#header.extendedL2;
    if (this.#dataMode) return await this.#writeZeroData(offset, length, options.backingRead);
    // Extended L2 zeroes subcluster by subcluster.
    const unit = ext ? cs / 32 : cs;
    const size = this.#header.size;
    const end = Math.min(offset + length, size);
    const mayUnmap = options.mayUnmap ?? false;
    const read = options.backingRead;
    let pos = offset;
    while (pos < end) {
      const uStart = pos - (pos % unit);
      const uEnd = Math.min(uStart + unit, size);
      if (pos > uStart || end < uEnd) {
        // Part of a unit: zero the whole unit only if the rest reads as zero.
        const to = Math.min(end, uEnd);
        const rest = await this.#readRange(uStart, uEnd - uStart, read);
        rest.fill(0, pos - uStart, to - uStart);
        if (!isZero(rest)) await this.#write(pos, new Uint8Array(to - pos), read);
        else if (ext) await this.#zeroSubclusters(uStart, uEnd, read);
        else await this.#zeroClusters(uStart, uEnd, mayUnmap, read);
        pos = to;
        continue;
      }
      // Whole units; the image's last one counts whole when the range reaches the end.
      const fullEnd = end === size ? end : end - (end % unit);
      const cEnd = Math.min(pos - (pos % cs) + cs, size);
      if (ext && (pos % cs || fullEnd < cEnd)) {
        const to = Math.min(fullEnd, cEnd);
        await this.#zeroSubclusters(pos, to, read);
        pos = to;
        continue;
      }
      const to = ext ? Math.max(cEnd, fullEnd - (fullEnd % cs)) : fullEnd;
      await this.#zeroClusters(pos, Math.min(to, fullEnd), mayUnmap, read);
      pos = Math.min(to, fullEnd);
    }
  }

  /**
   * With an external data file, zeroes are written as data where the range
   * does not read as zeroes already: the data file (raw or not) then holds
   * them too, and the clusters map as data at their guest offsets, as qemu's.
   */
  async #writeZeroData(offset: number, length: number, backingRead?: BackingReader) {
    const cs = this.#header.clusterSize;
    const end = Math.min(offset + length, this.#header.size);
    for (let pos = offset; pos < end;) {
      const to = Math.min(end, pos - (pos % cs) + cs);
      if (!isZero(await this.#readRange(pos, to - pos, backingRead))) {
        await this.#write(pos, new Uint8Array(to - pos), backingRead);
      }
      pos = to;
    }
  }

  /** Reads `length` guest bytes of this image (with its backing file), within one cluster. */
  async #readRange(offset: number, length: number, backingRead?: BackingReader) {
    const cs = this.#header.clusterSize;
    const cStart = offset - (offset % cs);
    const span = this.#mapper.l2Span;
    const l2 = this.#mapper.l2Offset(Math.floor(cStart / span));
    let e = NO_ENTRY;
    if (l2) {
      const t = await this.#mapper.l2Table(l2);
      const view = new DataView(t.buffer, t.byteOffset, t.byteLength);
      e = readEntry(view, (cStart % span) / cs, this.#header.extendedL2, this.#dataMode);
    }
    if (!e.host && !e.compressed && !e.zero && !this.#options.hasBacking) {
      return new Uint8Array(length);
    }
    const old = await this.#oldCluster(e, cStart, backingRead);
    return old.subarray(offset - cStart, offset - cStart + length);
  }

  /**
   * Extended L2: zero bits for the subclusters [start, end) of one cluster
   * (a compressed cluster takes explicit zeroes, as qemu falls back to).
   */
  async #zeroSubclusters(start: number, end: number, backingRead?: BackingReader) {
    const cs = this.#header.clusterSize;
    const sc = cs / 32;
    const span = this.#mapper.l2Span;
    const cStart = start - (start % cs);
    const l1Index = Math.floor(cStart / span);
    const s0 = (start - cStart) / sc;
    const s1 = Math.ceil((end - cStart) / sc);
    const mask = (2 ** s1 - 2 ** s0) >>> 0;
    // qemu sets the zero bits even where the subclusters read as zeroes already.
    const { offset: l2Offset, table } = await this.#l2ForWrite(l1Index);
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const i = (cStart % span) / cs;
    const e = readEntry(view, i, true, this.#dataMode);
    if (e.compressed) return await this.#write(start, new Uint8Array(end - start), backingRead);
    const bits = e.ext!;
    const alloc = (bits.alloc & ~mask) >>> 0;
    const zero = (bits.zero | mask) >>> 0;
    const value = (e.copied ? COPIED : 0n) | BigInt(e.offset);
    setEntry(view, i, true, value, (BigInt(zero) << 32n) | BigInt(alloc));
    await this.#mapper.l2Cache.put(l2Offset, table, { dirty: true });
  }

  /** Zeroes whole clusters [start, end) (end may be the unaligned image end). */
  async #zeroClusters(
    start: number,
    end: number,
    mayUnmap: boolean,
    backingRead?: BackingReader,
  ): Promise<void> {
    const cs = this.#header.clusterSize;
    const span = this.#mapper.l2Span;
    const v3 = this.#header.version >= 3;
    let pos = start;
    while (pos < end) {
      const l1Index = Math.floor(pos / span);
      const chunkEnd = Math.min(end, (l1Index + 1) * span);
      // v3 marks even unallocated clusters zero, as qemu (a table is allocated for it).
      if (!v3 && !this.#mapper.l2Offset(l1Index) && !this.#options.hasBacking) {
        pos = chunkEnd; // reads as zeroes already
        continue;
      }
      if (!v3 && mayUnmap && !this.#options.hasBacking) {
        // No zero flag, but nothing below: unallocated clusters read as zeroes.
        await this.#unmapClusters(l1Index, pos, chunkEnd);
        pos = chunkEnd;
        continue;
      }
      if (!v3) {
        // No zero flag: explicit zeroes where the clusters do not read as zero.
        for (let c = pos; c < chunkEnd; c += cs) {
          const n = Math.min(cs, chunkEnd - c);
          const now = await this.#readRange(c, n, backingRead);
          if (!isZero(now)) await this.#write(c, new Uint8Array(n));
        }
        pos = chunkEnd;
        continue;
      }
      const { offset: l2Offset, table } = await this.#l2ForWrite(l1Index);
      const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
      const ext = this.#header.extendedL2;
      const base = l1Index * span;
      for (let i = (pos - base) / cs; base + i * cs < chunkEnd; i++) {
        const e = readEntry(view, i, ext, this.#dataMode);
        if (e.zero && !e.offset) continue;
        const unmap = e.compressed || (mayUnmap && e.offset !== 0);
        // Extended L2 says zero in the bitmap, standard entries in bit 0.
        const flag = ext ? 0n : BigInt(OFLAG_ZERO);
        if (unmap || !e.offset) {
          setEntry(view, i, ext, flag, BITMAP_ZERO);
          if (unmap) await this.#release(e, mayUnmap);
        } else {
          setEntry(view, i, ext, (e.copied ? COPIED : 0n) | BigInt(e.offset) | flag, BITMAP_ZERO);
        }
      }
      await this.#mapper.l2Cache.put(l2Offset, table, { dirty: true });
      pos = chunkEnd;
    }
  }

  /** Deallocates the clusters [start, end) of L1 entry `l1Index` (v2 images without a backing file). */
  async #unmapClusters(l1Index: number, start: number, end: number): Promise<void> {
    const cs = this.#header.clusterSize;
    const span = this.#mapper.l2Span;
    const { offset: l2Offset, table } = await this.#l2ForWrite(l1Index);
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const base = l1Index * span;
    for (let i = (start - base) / cs; base + i * cs < end; i++) {
      const e = readEntry(view, i, false, this.#dataMode);
      if (!e.offset && !e.compressed) continue;
      setEntry(view, i, false, 0n);
      await this.#release(e, true);
    }
    await this.#mapper.l2Cache.put(l2Offset, table, { dirty: true });
  }

  /**
   * Writes whole clusters compressed (convert -c): one cluster, or the run
   * of clusters given to prepareCompressed at the same offset. Clusters
   * that do not shrink below a cluster are written normally, as qemu does.
   * A zero-length write at 0 ends the stream: the file end goes to a sector.
   */
  async writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    this.#assertWritable();
    const prepared = this.#prepared.get(offset);
    this.#prepared.delete(offset);
    // Compressed ahead (prepareCompressed): wait outside the lock.
    let out = prepared ? await prepared : undefined;
    if (data.length === 0) {
      await this.#poolLoad?.catch(() => {});
      this.#pool?.close();
      return await this.#serial(() => this.#endCompressed());
    }
    const cs = this.#header.clusterSize;
    if (!out || out.length !== Math.ceil(data.length / cs)) {
      await Promise.all([loadZlib(), loadPako()]);
      out = [];
      for (let pos = 0; pos < data.length; pos += cs) {
        const cluster = new Uint8Array(cs);
        cluster.set(data.subarray(pos, pos + cs));
        const c = compressCluster(this.#header.compressionType, cluster);
        out.push(c && c.length <= cs - 1 ? c : null);
      }
    }
    const results = out;
    await this.#serial(() => this.#writeCompressed(offset, data, results));
    // Written out: the batch's buffer can carry another batch to a Worker.
    this.#pool?.recycle(results);
  }

  /** Worker threads compressing clusters ahead of writeCompressed (compress_pool.ts). */
  #pool?: CompressPool;
  /** compress_pool.ts is imported on first use (start-up time of other writes). */
  #poolLoad?: Promise<CompressPool>;
  #prepared = new Map<number, Promise<BatchResult>>();

  /**
   * Starts compressing the whole clusters of `data` (the last one may be
   * short: it is padded with zeroes) on worker threads, for the
   * writeCompressed call with the same offset and data that follows
   * (convert compresses ahead, writes in order). `data` must stay unchanged
   * until then.
   */
  prepareCompressed(offset: number, data: Uint8Array): void {
    const cs = this.#header.clusterSize;
    if (this.#dataMode || data.length === 0 || offset % cs) return;
    let clusters = data;
    if (data.length % cs) {
      clusters = new Uint8Array(alignUp(data.length, cs));
      clusters.set(data);
    }
    this.#poolLoad ??= import("./compress_pool.ts").then((m) =>
      this.#pool = new m.CompressPool(this.#header.compressionType)
    );
    const p = this.#poolLoad.then((pool) => pool.compressBatch(clusters, cs));
    p.catch(() => {}); // awaited (and thrown) by writeCompressed
    this.#prepared.set(offset, p);
  }

  async #endCompressed(): Promise<void> {
    if (this.#dataMode) throw new QimgError("Operation not supported");
    const size = await this.#file.size();
    if (size % 512) await this.#file.truncate(alignUp(size, 512));
  }

  async #writeCompressed(offset: number, data: Uint8Array, results: BatchResult): Promise<void> {
    const cs = this.#header.clusterSize;
    // qemu: compressed clusters cannot live in an external data file.
    if (this.#dataMode) throw new QimgError("Operation not supported");
    if (offset % cs) throw new QimgError("qcow2: compressed writes must be cluster-aligned");
    for (let i = 0; i < results.length;) {
      let j = i + 1;
      const packed = results[i] !== null;
      while (j < results.length && (results[j] !== null) === packed) j++;
      const at = offset + i * cs;
      if (packed) await this.#writePacked(at, results.slice(i, j) as Uint8Array[]);
      // Clusters that do not shrink: qemu writes them uncompressed.
      else await this.#write(at, data.subarray(i * cs, Math.min(j * cs, data.length)));
      i = j;
    }
  }

  /** Stores compressed clusters from `offset` on: data in few large writes, then their L2 entries. */
  async #writePacked(offset: number, outs: Uint8Array[]): Promise<void> {
    const cs = this.#header.clusterSize;
    const span = this.#mapper.l2Span;
    const ext = this.#header.extendedL2;
    // Compression never overwrites an allocated cluster (qemu: EIO): check before allocating.
    for (let k = 0; k < outs.length; k++) {
      const at = offset + k * cs;
      const { table } = await this.#l2ForWrite(Math.floor(at / span));
      const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
      const e = readEntry(view, (at % span) / cs, ext, this.#dataMode);
      if (e.offset || e.compressed) throw new IoError("Input/output error");
    }
    const refs = await this.#refcounts();
    const hosts: number[] = [];
    let first = 0;
    for (let k = 0; k <= outs.length; k++) {
      const host = k < outs.length ? await refs.allocBytes(outs[k].length) : -1;
      const follows = k > first && host === hosts[k - 1] + outs[k - 1].length;
      if (k > first && !follows) {
        await this.#file.write(hosts[first], joined(outs, first, k));
        first = k;
      }
      hosts.push(host);
    }
    const shift = BigInt(62 - (this.#header.clusterBits - 8));
    for (let k = 0; k < outs.length; k++) {
      const at = offset + k * cs;
      const { offset: l2Offset, table } = await this.#l2ForWrite(Math.floor(at / span));
      const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
      const host = hosts[k];
      const sectors = Math.floor((host + outs[k].length - 1) / 512) - Math.floor(host / 512);
      setEntry(view, (at % span) / cs, ext, COMPRESSED | (BigInt(sectors) << shift) | BigInt(host));
      await this.#mapper.l2Cache.put(l2Offset, table, { dirty: true });
    }
  }

  /** Writes all changed metadata back, in dependency order, and flushes the file. */
  flush(): Promise<void> {
    return this.#serial(async () => {
      if (!this.#refs && !this.#l1Dirty) return;
      await this.#flushTables();
      if (this.#data !== this.#file) await this.#data.flush();
      await this.#file.flush();
    });
  }

  async #flushTables(): Promise<void> {
    await this.#refs?.cache.flush();
    await this.#mapper.l2Cache.flush();
    const d = this.#l1Dirty;
    if (d) {
      const l1 = this.#mapper.l1;
      await this.#file.write(
        this.#header.l1TableOffset + d[0] * 8,
        l1.subarray(d[0] * 8, d[1] * 8),
      );
      this.#l1Dirty = undefined;
    }
    // No table on disk points at these clusters any more: now they may lose references.
    const releases = this.#releases;
    if (releases.length) {
      this.#releases = [];
      for (const release of releases) await release();
      await this.#refs?.cache.flush();
    }
  }

  /**
   * Grows the virtual size as qemu's qcow2_co_truncate: a larger L1 table
   * (exactly as large as needed) moves to the next free clusters, then the
   * header takes the new table and size. Shrinking and preallocation are
   * not implemented yet.
   */
  async resize(size: number, options: { preallocation?: string; shrink?: boolean }): Promise<void> {
    this.#assertWritable();
    const h = this.#header;
    if (size % 512) throw new QimgError("The new size must be a multiple of 512");
    if (h.nbSnapshots && h.version < 3) {
      throw new QimgError("Can't resize a v2 image which has snapshots");
    }
    if (h.bitmaps && !this.#options.tracksBitmaps) {
      throw new QimgError("resize of qcow2 images with bitmaps: not supported yet");
    }
    if (size < h.size) throw new QimgError("resize --shrink of qcow2 images: not supported yet");
    if ((options.preallocation ?? "off") !== "off") {
      throw new QimgError(
        `resize --preallocation=${options.preallocation} -f qcow2: not supported yet`,
      );
    }
    await this.#serial(async () => {
      const span = this.#mapper.l2Span;
      const needed = Math.ceil(size / span);
      if (needed > h.l1Size) await this.#growL1(needed);
      const b = new Uint8Array(8);
      putBe64(b, 0, size);
      await this.#file.write(24, b);
      h.size = size;
    });
  }

  async #growL1(entries: number): Promise<void> {
    const h = this.#header;
    const cs = h.clusterSize;
    const refs = await this.#refcounts();
    const oldOffset = h.l1TableOffset;
    const oldClusters = Math.ceil(h.l1Size * 8 / cs);
    const l1 = new Uint8Array(entries * 8);
    l1.set(this.#mapper.l1.subarray(0, h.l1Size * 8));
    const offset = await refs.allocClusters(Math.ceil(entries * 8 / cs));
    // Everything the new table points at is on disk before it.
    await this.#flushTables();
    await this.#file.write(offset, l1);
    const hdr = new Uint8Array(12);
    putBe32(hdr, 0, entries);
    putBe64(hdr, 4, offset);
    await this.#file.write(36, hdr);
    h.l1Size = entries;
    h.l1TableOffset = offset;
    this.#mapper.setL1(l1);
    for (let c = 0; c < oldClusters; c++) await refs.change(oldOffset / cs + c, -1);
  }
}

/**
 * Compresses one cluster as qemu does: raw deflate with a 4 KiB window and
 * memLevel 9 (pako gives zlib's bytes exactly, so file sizes match), or a
 * zstd frame carrying the content size. Undefined when this runtime has no
 * zstd compressor.
 */
export function compressCluster(type: "zlib" | "zstd", data: Uint8Array): Uint8Array | undefined {
  if (type === "zstd") {
    const zstd = (zlibSync() as unknown as {
      zstdCompressSync?: (b: Uint8Array, o: { pledgedSrcSize: number }) => Uint8Array;
    }).zstdCompressSync;
    if (!zstd) throw new QimgError("This runtime cannot compress zstd clusters");
    const out = zstd(data, { pledgedSrcSize: data.length });
    return new Uint8Array(out.buffer, out.byteOffset, out.length);
  }
  return pakoSync().deflateRaw(data, { windowBits: 12, memLevel: 9, level: 6 });
}

/** outs[from..to) as one buffer: a view when they lie back to back in one buffer (a Worker's batch). */
function joined(outs: Uint8Array[], from: number, to: number): Uint8Array {
  const a = outs[from];
  let end = a.byteOffset + a.length;
  let same = true;
  let total = 0;
  for (let k = from; k < to; k++) {
    total += outs[k].length;
    if (k > from) {
      same &&= outs[k].buffer === a.buffer && outs[k].byteOffset === end;
      end += outs[k].length;
    }
  }
  if (same) return new Uint8Array(a.buffer, a.byteOffset, total);
  const b = new Uint8Array(total);
  for (let k = from, pos = 0; k < to; pos += outs[k].length, k++) b.set(outs[k], pos);
  return b;
}
