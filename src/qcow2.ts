/**
 * The qcow2 format driver: open, read through the cluster mapping (with
 * backing fallthrough), block status and info. Header parsing lives in
 * qcow2_header.ts, address translation in qcow2_cluster.ts.
 *
 * For check, snapshots and the write side, an open Qcow2Image exposes its
 * parsed `header`, its `mapper` (L1 table, cached L2 tables, `lookup`) and
 * `readCompressed`; qcow2_cluster.ts's ClusterMapper also walks any other
 * L1 table (a snapshot's) over the same file.
 */

import type {
  BackingReader,
  BackingRef,
  BlockStatus,
  CheckResult,
  FormatDriver,
  FormatImage,
  FormatInfo,
  OpenOptions,
  SnapshotInfo,
} from "./driver.ts";
import type { BlockFile } from "./file.ts";
import type { JsonValue } from "./output.ts";
import type { OptionValues } from "./options.ts";
import { QimgError, strerror } from "./errors.ts";
import {
  AUTOCLEAR_DATA_FILE_RAW,
  type BitmapDirEntry,
  COMPAT_LAZY_REFCOUNTS,
  CRYPT_AES,
  CRYPT_LUKS,
  CRYPT_NONE,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  type LuksInfo,
  probeQcow2,
  type Qcow2Header,
  readBitmapDirectory,
  readLuksInfo,
  readPadded,
  readQcow2Header,
  readZeroPadded,
} from "./qcow2_header.ts";
import {
  ClusterMapper,
  type ClusterRun,
  type CompressedDescriptor,
  entryOffset,
  Qcow2CorruptionError,
  readL1Table,
} from "./qcow2_cluster.ts";
import { loadSnapshotL1, type Qcow2Snapshot, readSnapshotTable } from "./qcow2_snapshot.ts";
// The write side, check, snapshots' changes, create and amend load on first
// use (`import()` below): read-only commands start faster without them.
import type { Qcow2Writer } from "./qcow2_write.ts";
import type { ResizeOptions } from "./qcow2_resize.ts";
import type { BitmapContent, Qcow2Bitmaps } from "./qcow2_bitmap.ts";
import { QCOW2_CREATE_OPTIONS } from "./options.ts";

/** qcow2_write.ts, once loaded: Qcow2Image's sync write paths (prepareCompressed) need it at hand. */
let writeSide: typeof import("./qcow2_write.ts") | undefined;

async function loadWriteSide(): Promise<void> {
  writeSide ??= await import("./qcow2_write.ts");
}

/** One bitmap as `info` lists it. */
export interface BitmapInfo {
  name: string;
  granularity: number;
  flags: string[];
}

/** An open qcow2 image. */
export class Qcow2Image implements FormatImage {
  readonly file: BlockFile;
  readonly header: Qcow2Header;
  /** Where guest data lives: the external data file, or `file`. */
  readonly dataFile: BlockFile | undefined;
  readonly mapper: ClusterMapper;
  backing?: BackingRef;
  /** The LUKS header as `info` shows it, for LUKS-encrypted images. */
  luks?: LuksInfo;
  /** The bitmap directory (empty without bitmaps). */
  bitmapDirectory: BitmapDirEntry[] = [];
  /** The internal snapshots (read at open, except for check). */
  snapshotList: Qcow2Snapshot[] = [];
  #cached?: { offset: number; data: Uint8Array };
  #preallocated?: Promise<boolean>;
  #corruptionReported = false;
  /** Receives qemu's warnings (corruption events); set by openQcow2 from OpenOptions.warn. */
  warn?: (message: string) => void;

  constructor(
    file: BlockFile,
    header: Qcow2Header,
    mapper: ClusterMapper,
    dataFile: BlockFile | undefined,
  ) {
    this.file = file;
    this.header = header;
    this.mapper = mapper;
    this.dataFile = dataFile;
    if (header.backingFile) {
      this.backing = { name: header.backingFile, format: header.backingFormat };
    }
  }

  get size(): number {
    return this.header.size;
  }

  /** Whether guest data lives in an external data file. */
  get hasDataFile(): boolean {
    return (this.header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  }

  #data(): BlockFile {
    if (!this.dataFile) throw new QimgError("'data-file' is required for this image");
    return this.dataFile;
  }

  async read(offset: number, buf: Uint8Array, backingRead?: BackingReader): Promise<void> {
    const cs = this.header.clusterSize;
    let done = 0;
    while (done < buf.length) {
      const guest = offset + done;
      const run = await this.#lookup(guest, buf.length - done);
      const dst = buf.subarray(done, done + run.length);
      switch (run.type) {
        case "normal": {
          if (this.header.cryptMethod !== CRYPT_NONE) throw encryptedError();
          await readZeroPadded(this.#data(), run.hostOffset!, dst);
          break;
        }
        case "compressed": {
          const cluster = await this.readCompressed(run.compressed!);
          const at = guest % cs;
          dst.set(cluster.subarray(at, at + dst.length));
          break;
        }
        case "zero-plain":
        case "zero-alloc":
          dst.fill(0);
          break;
        default:
          if (backingRead) await backingRead(guest, dst);
          else dst.fill(0);
      }
      done += run.length;
    }
  }

  /** Looks up guest bytes, reporting the first corruption as qemu's corruption event does. */
  async #lookup(offset: number, length: number): Promise<ClusterRun> {
    try {
      return await this.mapper.lookup(offset, length);
    } catch (e) {
      if (e instanceof Qcow2CorruptionError && !this.#corruptionReported) {
        this.#corruptionReported = true;
        this.warn?.(
          this.file.writable
            ? `qcow2: Marking image as corrupt: ${e.detail}; further corruption events will be suppressed`
            : `qcow2: Image is corrupt: ${e.detail}; further non-fatal corruption events will be suppressed`,
        );
      }
      throw e;
    }
  }

  /** Reads and decompresses one compressed cluster (the last one is kept for sequential reads). */
  async readCompressed(desc: CompressedDescriptor): Promise<Uint8Array> {
    if (this.#cached?.offset === desc.hostOffset) return this.#cached.data;
    const input = await readPadded(this.file, desc.hostOffset, desc.size);
    const { decompressCluster } = await import("./codec.ts");
    const data = await decompressCluster(
      this.header.compressionType,
      input,
      this.header.clusterSize,
    );
    this.#cached = { offset: desc.hostOffset, data };
    return data;
  }

  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    const run = await this.#lookup(offset, length);
    const where = run.hostOffset !== undefined && this.header.cryptMethod === CRYPT_NONE
      ? { hostOffset: run.hostOffset, file: this.#data().name }
      : {};
    switch (run.type) {
      case "normal":
        if (where.hostOffset !== undefined && await this.#metadataPreallocated()) {
          return { ...await this.#hostStatus(where.hostOffset, run.length), data: true, ...where };
        }
        return { length: run.length, data: true, zero: false, ...where };
      case "compressed":
        return { length: run.length, data: true, zero: false, compressed: true };
      case "zero-alloc":
        return { length: run.length, data: false, zero: true, ...where };
      case "zero-plain":
        return { length: run.length, data: false, zero: true };
      case "unallocated-alloc":
        return { length: run.length, data: false, zero: false, ...where };
      default:
        return { length: run.length, data: false, zero: false };
    }
  }

  /**
   * qemu asks the host file about data clusters of metadata-preallocated
   * images (BDRV_BLOCK_RECURSE): a hole there reads as zeroes.
   */
  async #hostStatus(
    hostOffset: number,
    length: number,
  ): Promise<{ length: number; zero: boolean }> {
    const file = this.#data();
    const end = await file.size();
    if (hostOffset >= end) return { length, zero: true };
    const e = await file.extent(hostOffset, length);
    if (e.data) return { length: Math.min(length, e.length), zero: false };
    // A hole up to the end of the file answers for the whole run.
    return {
      length: hostOffset + e.length >= end ? length : Math.min(length, e.length),
      zero: true,
    };
  }

  /**
   * qemu's metadata-preallocation test: far more clusters have a refcount
   * than the file occupies on disk (threshold max(n * 10 / 9, n + 2)).
   */
  #metadataPreallocated(): Promise<boolean> {
    this.#preallocated ??= this.#detectPreallocation();
    return this.#preallocated;
  }

  async #detectPreallocation(): Promise<boolean> {
    const h = this.header;
    const cs = h.clusterSize;
    const realClusters = Math.floor(await this.file.allocated() / cs);
    const threshold = Math.max(Math.floor(realClusters * 10 / 9), realClusters + 2);
    const endCluster = Math.ceil(await this.file.size() / cs);
    // At most endCluster clusters are counted below: a file about as large as
    // what it occupies cannot reach the threshold (no refcount reads then).
    if (endCluster < threshold) return false;
    const bits = 2 ** h.refcountOrder;
    const perBlock = (cs * 8) / bits;
    const table = await readPadded(this.file, h.refcountTableOffset, h.refcountTableClusters * cs);
    const tv = new DataView(table.buffer);
    let count = 0;
    for (let i = 0; i * perBlock < endCluster && count < threshold && i * 8 < table.length; i++) {
      const blockOffset = entryOffset(tv.getUint32(i * 8), tv.getUint32(i * 8 + 4));
      if (blockOffset === 0 || blockOffset % cs) continue;
      const block = await readPadded(this.file, blockOffset, cs);
      const n = Math.min(perBlock, endCluster - i * perBlock);
      count += countNonZero(block, bits, n);
    }
    return count >= threshold;
  }

  async info(): Promise<FormatInfo> {
    const h = this.header;
    const data: Record<string, JsonValue> = {};
    if (h.version === 2) {
      data.compat = "0.10";
    } else {
      data.compat = "1.1";
      if (h.dataFile !== undefined) data["data-file"] = h.dataFile;
      if (this.hasDataFile) {
        data["data-file-raw"] = (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
      }
      data["extended-l2"] = h.extendedL2;
      data["lazy-refcounts"] = (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
      data.corrupt = (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n;
    }
    data["refcount-bits"] = 2 ** h.refcountOrder;
    if (h.cryptMethod === CRYPT_AES) data.encrypt = { format: "aes" };
    else if (this.luks) data.encrypt = this.luks;
    if (h.version === 3) {
      const bitmaps = await this.bitmaps();
      if (bitmaps.length) {
        data.bitmaps = bitmaps.map((b) => ({
          flags: b.flags,
          name: b.name,
          granularity: b.granularity,
        }));
      }
    }
    data["compression-type"] = h.compressionType;
    return {
      clusterSize: h.clusterSize,
      dirty: (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n,
      encrypted: h.cryptMethod !== CRYPT_NONE,
      formatSpecific: { type: "qcow2", data },
    };
  }

  /** The persistent dirty bitmaps listed in the bitmap directory (read at open). */
  bitmaps(): Promise<BitmapInfo[]> {
    return Promise.resolve(this.bitmapDirectory.map((e) => {
      const flags: string[] = [];
      if (e.flags & 1) flags.push("in-use");
      if (e.flags & 2) flags.push("auto");
      return { name: e.name, granularity: 2 ** e.granularityBits, flags };
    }));
  }

  /** The internal snapshots, in table order. */
  snapshots(): Promise<Qcow2Snapshot[]> {
    // qemu lists none for images with an external data file (ENOTSUP).
    return Promise.resolve(this.hasDataFile ? [] : this.snapshotList);
  }

  /** Creates an internal snapshot (qcow2_snapshot_write.ts). */
  async createSnapshot(name: string): Promise<void> {
    await this.#beforeSnapshotOp();
    const { createSnapshot } = await import("./qcow2_snapshot_write.ts");
    this.snapshotList = await createSnapshot(this.file, this.header, name);
  }

  /** Reverts to an internal snapshot (qcow2_snapshot_write.ts). */
  async applySnapshot(name: string): Promise<void> {
    await this.#beforeSnapshotOp();
    const { applySnapshot } = await import("./qcow2_snapshot_write.ts");
    // qemu first resizes the image to the snapshot's disk size.
    await applySnapshot(this.file, this.header, name, {
      resize: async (size) => {
        await this.resize(size, {});
        await this.#beforeSnapshotOp();
      },
    });
    this.mapper.setL1(await readL1Table(this.file, this.header));
  }

  /** Deletes an internal snapshot (qcow2_snapshot_write.ts). */
  async deleteSnapshot(name: string): Promise<void> {
    await this.#beforeSnapshotOp();
    const { deleteSnapshot } = await import("./qcow2_snapshot_write.ts");
    this.snapshotList = await deleteSnapshot(this.file, this.header, name);
  }

  /** Snapshot operations change refcounts and L2 tables on disk: nothing cached may survive. */
  async #beforeSnapshotOp(): Promise<void> {
    await this.flush();
    await this.mapper.l2Cache.clear();
    this.#writer = undefined;
  }

  /** Checks the metadata (qcow2_refcount.ts), repairing with -r (qcow2_repair.ts). */
  async check(options: { repair?: "leaks" | "all" }): Promise<CheckResult> {
    const check = { hasDataFile: this.hasDataFile };
    if (options.repair) {
      const { repairQcow2 } = await import("./qcow2_repair.ts");
      return await repairQcow2(this.file, this.header, { ...check, mode: options.repair });
    }
    const { checkQcow2 } = await import("./qcow2_refcount.ts");
    return await checkQcow2(this.file, this.header, check);
  }

  /**
   * A read-only view of the guest as it was at `snapshot` (convert -l/-s):
   * the snapshot's L1 table over the same files; closing it closes nothing.
   */
  async atSnapshot(snapshot: SnapshotInfo): Promise<Qcow2Image> {
    const sn = this.snapshotList.find((s) => s === snapshot) ??
      this.snapshotList.find((s) => s.id === snapshot.id && s.name === snapshot.name);
    if (!sn) throw new QimgError("Can't find snapshot");
    const { header, l1 } = await loadSnapshotL1(this.file, this.header, sn);
    const mapper = new ClusterMapper(this.file, header, l1, { hasDataFile: this.hasDataFile });
    const view = new Qcow2Image(this.file, header, mapper, this.dataFile);
    view.close = () => Promise.resolve();
    view.warn = this.warn;
    view.luks = this.luks;
    view.#snapshotView = true;
    return view;
  }

  /** The write side (qcow2_write.ts), made on the first write. */
  #writer?: Qcow2Writer;

  /** A read-only view of an internal snapshot (atSnapshot): never written. */
  #snapshotView = false;

  #w(): Qcow2Writer {
    if (this.#snapshotView) throw new QimgError("writing a qcow2 snapshot view: not supported");
    // Every async write path loads the module first; see loadWriteSide.
    this.#writer ??= new writeSide!.Qcow2Writer(this.file, this.header, this.mapper, {
      hasBacking: this.backing !== undefined,
      dataFile: this.dataFile,
      tracksBitmaps: true,
      // A freed compressed cluster's bytes may be reused: forget the decompressed copy.
      onChange: () => this.#cached = undefined,
    });
    return this.#writer;
  }

  /** The persistent bitmaps once a guest write loaded them (qcow2_bitmap.ts). */
  #bitmaps?: Promise<Qcow2Bitmaps | undefined>;

  /**
   * The persistent bitmaps that guest writes mark: loaded and marked in use
   * before the first write, as qemu does when it opens an image read-write.
   */
  #tracking(): Promise<Qcow2Bitmaps | undefined> {
    if (this.#bitmaps) return this.#bitmaps;
    const h = this.header;
    if (!h.bitmaps || h.bitmapsInconsistent || !this.file.writable || this.#snapshotView) {
      return Promise.resolve(undefined);
    }
    return this.#bitmaps ??= (async () => {
      // Qcow2Bitmaps allocates through its own refcount view: tables on disk first.
      await this.#writer?.flush();
      const { Qcow2Bitmaps } = await import("./qcow2_bitmap.ts");
      return await Qcow2Bitmaps.open(this.file);
    })();
  }

  /**
   * Adds persistent bitmaps (convert --bitmaps), stored on close. qemu adds
   * them newest first (last in `list`, which is in directory order, first)
   * and stops at a name the image has; those added before it are kept.
   */
  async addBitmaps(list: readonly BitmapContent[]): Promise<void> {
    if (this.#snapshotView) throw new QimgError("writing a qcow2 snapshot view: not supported");
    let bitmaps = await this.#tracking();
    if (!bitmaps) {
      await this.#writer?.flush();
      const { Qcow2Bitmaps } = await import("./qcow2_bitmap.ts");
      bitmaps = await Qcow2Bitmaps.open(this.file);
      this.#bitmaps = Promise.resolve(bitmaps);
    }
    for (const b of [...list].reverse()) {
      if (bitmaps.get(b.name)) {
        throw new QimgError(`Failed to create bitmap ${b.name}: Bitmap already exists: ${b.name}`);
      }
      bitmaps.add({ ...b, inUse: false, bits: b.bits.slice() });
    }
  }

  /** Stores the bitmaps guest writes marked (new clusters, in use cleared), as qemu on close. */
  async #storeBitmaps(): Promise<void> {
    const bitmaps = await this.#bitmaps;
    if (!bitmaps) return;
    this.#bitmaps = undefined;
    await this.#writer?.flush();
    this.#writer = undefined;
    await bitmaps.reload();
    await bitmaps.close();
    await this.file.flush();
    const h = bitmaps.header;
    this.header.bitmaps = h.bitmaps;
    this.header.autoclearFeatures = h.autoclearFeatures;
  }

  /** Writes guest bytes (qcow2_write.ts). */
  async write(offset: number, data: Uint8Array, backingRead?: BackingReader): Promise<void> {
    await loadWriteSide();
    const bitmaps = await this.#tracking();
    await this.#w().write(offset, data, backingRead);
    bitmaps?.mark(offset, data.length);
  }

  /** Writes guest bytes, the data transfer beside later writes' (qcow2_write.ts). */
  async writeConcurrent(
    offset: number,
    data: Uint8Array,
    backingRead?: BackingReader,
  ): Promise<void> {
    await loadWriteSide();
    const bitmaps = await this.#tracking();
    await this.#w().writeConcurrent(offset, data, backingRead);
    bitmaps?.mark(offset, data.length);
  }

  /** Makes a range read as zeroes (qcow2_write.ts). */
  async writeZeroes(
    offset: number,
    length: number,
    options?: { mayUnmap?: boolean; backingRead?: BackingReader },
  ): Promise<void> {
    await loadWriteSide();
    const bitmaps = await this.#tracking();
    await this.#w().writeZeroes(offset, length, options);
    bitmaps?.mark(offset, length);
  }

  /** Starts compressing a cluster ahead of its writeCompressed (qcow2_write.ts). */
  prepareCompressed(offset: number, data: Uint8Array): void {
    // A hint only: writeCompressed compresses what was not prepared.
    if (writeSide) this.#w().prepareCompressed(offset, data);
    else void loadWriteSide();
  }

  /** Writes one cluster compressed (qcow2_write.ts). */
  async writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    await loadWriteSide();
    const bitmaps = await this.#tracking();
    await this.#w().writeCompressed(offset, data);
    bitmaps?.mark(offset, data.length);
  }

  /** Changes the virtual size (qcow2_resize.ts; a plain grow is the writer's). */
  async resize(size: number, options: ResizeOptions & { shrink?: boolean }): Promise<void> {
    if (this.#snapshotView) throw new QimgError("writing a qcow2 snapshot view: not supported");
    await loadWriteSide();
    const { resizeQcow2 } = await import("./qcow2_resize.ts");
    await resizeQcow2(
      {
        file: this.file,
        header: this.header,
        mapper: this.mapper,
        dataFile: this.hasDataFile ? this.dataFile : undefined,
        hasBacking: this.backing !== undefined,
        grow: (n) => this.#w().resize(n, {}),
        writeZeroes: (o, n, read) => this.#w().writeZeroes(o, n, { backingRead: read }),
        write: (o, d, read) => this.#w().write(o, d, read),
        settle: async () => {
          await this.#writer?.flush();
          await this.mapper.l2Cache.clear();
          this.#writer = undefined;
          this.#cached = undefined;
        },
        checkBitmaps: async () => (await this.#tracking())?.checkResize(),
      },
      size,
      options,
    );
    (await this.#bitmaps)?.resize(size);
  }

  /** Rewrites the backing file reference in the header (qcow2_header_write.ts). */
  async setBacking(name: string | undefined, format: string | undefined): Promise<void> {
    if (this.#snapshotView) throw new QimgError("writing a qcow2 snapshot view: not supported");
    await this.#writer?.flush();
    const { changeBacking } = await import("./qcow2_header_write.ts");
    await changeBacking(this.file, this.header, name, format);
    this.backing = this.header.backingFile
      ? { name: this.header.backingFile, format: this.header.backingFormat }
      : undefined;
  }

  /** Drops all clusters, as qemu's make_completely_empty (qcow2_amend.ts). */
  async makeEmpty(options: { dryRun?: boolean } = {}): Promise<void> {
    if (this.#snapshotView) throw new QimgError("writing a qcow2 snapshot view: not supported");
    const { canEmptyCompletely, discardAllClusters, makeCompletelyEmpty, makeEmptyObstacle } =
      await import("./qcow2_amend.ts");
    const obstacle = makeEmptyObstacle(this.header);
    if (obstacle) throw new QimgError(`${obstacle}: not supported yet`);
    if (options.dryRun) return;
    await this.#writer?.flush();
    this.#writer = undefined;
    if (canEmptyCompletely(this.header)) {
      await makeCompletelyEmpty(this.file, this.header);
      this.mapper.l1.fill(0);
    } else {
      await discardAllClusters(this.file, this.header, this.mapper.l1);
    }
    this.#cached = undefined;
  }

  /** `amend -o` (qcow2_amend.ts). */
  async amend(
    options: OptionValues,
    status: (done: number, total: number) => void = () => {},
    below: { backingSize?: number; backingRead?: BackingReader } = {},
  ): Promise<void> {
    if (this.#snapshotView) throw new QimgError("writing a qcow2 snapshot view: not supported");
    await this.#writer?.flush();
    // qemu loads the bitmaps as it opens the image read-write (marking them
    // in use) and stores them anew on close, whatever amend did.
    await this.#tracking();
    const { amendQcow2 } = await import("./qcow2_amend.ts");
    await amendQcow2(
      {
        file: this.file,
        header: this.header,
        mapper: this.mapper,
        backing: this.backing,
        snapshotCount: this.header.nbSnapshots,
        snapshots: this.snapshotList,
        flush: () => this.flush(),
        // A longer backing file must not show through a grown range.
        resize: (size) => this.resize(size, below),
      },
      options,
      status,
    );
    this.#cached = undefined;
  }

  flush(): Promise<void> {
    return this.#writer ? this.#writer.flush() : Promise.resolve();
  }

  async close(): Promise<void> {
    try {
      await this.#writer?.flush();
      await this.#storeBitmaps();
    } finally {
      if (this.dataFile && this.dataFile !== this.file) await this.dataFile.close();
      await this.file.close();
    }
  }
}

/** Nonzero entries among the first `n` of a refcount block of `bits`-wide entries. */
function countNonZero(block: Uint8Array, bits: number, n: number): number {
  let count = 0;
  if (bits < 8) {
    const mask = (1 << bits) - 1;
    for (let i = 0; i < n; i++) {
      const bit = i * bits;
      if ((block[bit >> 3] >> (bit & 7)) & mask) count++;
    }
    return count;
  }
  const bytes = bits / 8;
  for (let i = 0; i < n; i++) {
    for (let j = i * bytes; j < (i + 1) * bytes; j++) {
      if (block[j]) {
        count++;
        break;
      }
    }
  }
  return count;
}

function encryptedError(): QimgError {
  return new QimgError("Parameter 'encrypt.key-secret' is required for cipher");
}

/** Opens a qcow2 image on `file`. */
export async function openQcow2(file: BlockFile, options: OpenOptions = {}): Promise<Qcow2Image> {
  const o = options;
  const header = await readQcow2Header(file, { write: o.write, warn: o.warn, check: o.check });
  // qemu repairs an image left dirty (lazy refcounts) when it opens it for writing.
  if (o.write && !o.check && !o.noIo && (header.incompatibleFeatures & INCOMPAT_DIRTY)) {
    const { repairDirty } = await import("./qcow2_refcount_rebuild.ts");
    await repairDirty(file, header, {
      hasDataFile: (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n,
      warn: o.warn,
    });
  }
  const l1 = await readL1Table(file, header).catch((e) => {
    throw new QimgError(`Could not read L1 table: ${strerror(e)}`);
  });
  // qemu reads the refcount table at open; a read error fails the open.
  await readPadded(
    file,
    header.refcountTableOffset,
    header.refcountTableClusters * header.clusterSize,
  )
    .catch((e) => {
      throw new QimgError(`Could not initialize refcount handling: ${strerror(e)}`);
    });
  const hasDataFile = (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  let dataFile: BlockFile | undefined = file;
  if (!o.noIo) {
    if (hasDataFile) {
      if (header.dataFile === undefined || !o.openFile) {
        throw new QimgError("'data-file' is required for this image");
      }
      // qemu opens the data file by its stored name as is: relative to the
      // working directory, not to the image.
      const path = header.dataFile;
      try {
        dataFile = await o.openFile(path, o.write ?? false);
      } catch (e) {
        if (e instanceof QimgError) throw e;
        throw new QimgError(`Could not open '${path}': ${strerror(e)}`);
      }
    } else if (header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) {
      throw new QimgError("data-file-raw requires a data file");
    }
    if (header.cryptMethod !== CRYPT_NONE) throw encryptedError();
  } else if (hasDataFile) {
    dataFile = undefined;
  }
  // qemu parses the LUKS header while opening, also for metadata-only opens.
  const luks = header.cryptMethod === CRYPT_LUKS && header.cryptoHeader
    ? await readLuksInfo(file, header)
    : undefined;
  // qemu skips the snapshot table when opening for check, which reports on it.
  const snapshots = o.check ? [] : (await readSnapshotTable(file, header)).snapshots;
  const bitmapDirectory = await readBitmapDirectory(file, header);
  const mapper = new ClusterMapper(file, header, l1, { hasDataFile });
  const image = new Qcow2Image(file, header, mapper, dataFile);
  image.luks = luks;
  image.bitmapDirectory = bitmapDirectory;
  image.warn = o.warn;
  image.snapshotList = snapshots;
  return image;
}

/** The qcow2 format driver. */
export const qcow2Driver: FormatDriver = {
  name: "qcow2",
  probe: (head) => probeQcow2(head),
  open: openQcow2,
  create: async (file, options) => (await import("./qcow2_create.ts")).createQcow2(file, options),
  createOptions: QCOW2_CREATE_OPTIONS,
  supportsBacking: true,
};
