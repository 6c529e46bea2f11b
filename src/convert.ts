/**
 * The copy engine behind `convert` and `dd`: copies the guest view of one
 * or more source images (concatenated) to a target, as qemu-img does.
 *
 * Block status decides what is read: zero and unallocated runs are never
 * read. Data is read in chunks of up to 2 MiB by several workers at once
 * (`parallel`), zero-detected in 512-byte sectors with runs of at least
 * `minSparse` bytes left out, and written in offset order unless
 * `outOfOrder`. The chunking follows qemu-img's so that the written
 * ranges (hence the allocated size of the output) and the progress figures
 * match. Targets are anything with `write` (and optionally `writeZeroes`,
 * `writeCompressed`): a raw or qcow2 FormatImage plugs in unchanged.
 */

import { Lock } from "./lock.ts";
import type { CopyRun, FormatImage } from "./driver.ts";
import { Image } from "./image.ts";
import { QimgError, strerror } from "./errors.ts";
import { isZero } from "./bytes.ts";
import type { BlockFile, FileView } from "./file.ts";
import type { Io } from "./command.ts";
import { WriteQueue } from "./write_queue.ts";

const SECTOR = 512;
/** qemu-img's IO_BUF_SIZE: 2 MiB per request. */
const IO_BUF_SECTORS = 4096;
/** The largest buffer qemu-img grows to (16 MiB). */
const MAX_BUF_SECTORS = 32768;
/** -c reads and compresses this much at a time (1 MiB; one cluster where clusters are larger). */
const COMPRESS_BATCH_SECTORS = 2048;
/** The most sectors one block-status query or request covers (BDRV_REQUEST_MAX_SECTORS). */
const REQUEST_MAX_SECTORS = Math.floor(0x7fffffff / SECTOR);
/** Requests whose writes run at once on a target that allows it (CopyTarget.writeConcurrent). */
const WRITES_IN_FLIGHT = 4;
/** The most parallel workers `-m` allows. */
export const MAX_PARALLEL = 16;
/** The largest `-S` value, in bytes. */
export const MAX_SPARSE = MAX_BUF_SECTORS * SECTOR;

/** Where converted data goes. A FormatImage satisfies it. */
export interface CopyTarget {
  /** Virtual size in bytes. */
  readonly size: number;
  /** Writes guest bytes. */
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Makes a range read as zeroes; `mayUnmap` lets it deallocate (punch holes). */
  writeZeroes?(offset: number, length: number, options?: { mayUnmap?: boolean }): Promise<void>;
  /**
   * Writes one whole cluster compressed (a run of clusters where the target
   * has prepareCompressed). A zero-length write at offset 0 marks the end
   * of the stream (qemu aligns the file end then).
   */
  writeCompressed?(offset: number, data: Uint8Array): Promise<void>;
  /**
   * Starts compressing a run of whole clusters ahead (in parallel) for the
   * writeCompressed of the same offset and data; the data stays unchanged until then.
   */
  prepareCompressed?(offset: number, data: Uint8Array): void;
  /**
   * As `write`, on another thread, and writes to different ranges may run
   * at once (a raw file): convert then starts a request's writes while
   * earlier requests' are still in flight (WRITES_IN_FLIGHT, issued in order).
   */
  writeConcurrent?(offset: number, data: Uint8Array): Promise<void>;
}

/** How to convert. Sizes are in bytes. */
export interface ConvertOptions {
  /** Zero runs at least this long stay unwritten (`-S`); 0 writes everything. Default 4096. */
  minSparse?: number;
  /** Requests in flight (`-m`), 1 to 16. Default 8. */
  parallel?: number;
  /** Allow writes out of offset order (`-W`). */
  outOfOrder?: boolean;
  /** The target already reads as zeroes (a new image, or `--target-is-zero`): zero runs are skipped. */
  targetIsZero?: boolean;
  /** The target has a backing file: runs unallocated above the source's base stay unallocated. */
  targetHasBacking?: boolean;
  /** Size of the target's backing file when known; zero runs beyond it are left alone. */
  targetBackingSize?: number;
  /** Write compressed clusters (`-c`). */
  compressed?: boolean;
  /** The target's cluster size (needed with `compressed`). */
  clusterSize?: number;
  /** The target's request alignment in bytes (default 1). */
  requestAlignment?: number;
  /** The target's preferred request size; requests grow up to 16 MiB to reach it. */
  optimalTransfer?: number;
  /** Copy data runs whole, without zero detection (`-C`, qemu's copy offloading). */
  copyRange?: boolean;
  /** Turn read errors into zeroes (`--salvage`), warning unless `quiet`. */
  salvage?: boolean;
  /** Suppress salvage warnings. */
  quiet?: boolean;
  /** Receives warnings (without the program name). */
  warn?: (message: string) => void;
  /** Receives the absolute percentage done (single precision), as qemu's progress meter. */
  progress?: (percent: number) => void;
}

/** A failed read or write of the copy, with qemu-img's message (`error while reading at byte N: ...`). */
export class CopyError extends QimgError {
  /** Which side failed. */
  readonly operation: "reading" | "writing";
  /** Guest offset of the failed request. */
  readonly offset: number;
  /** The system error's text (strerror). */
  readonly reason: string;
  /**
   * @param operation which side failed
   * @param offset guest offset of the request
   * @param reason the error's text
   */
  constructor(operation: "reading" | "writing", offset: number, reason: string) {
    super(`error while ${operation} at byte ${offset}: ${reason}`);
    this.name = "CopyError";
    this.operation = operation;
    this.offset = offset;
    this.reason = reason;
  }
}

/** What the engine needs of a source: an Image, or a window onto one (see {@link sliceSource}). */
export interface SourceImage {
  /** Virtual size in bytes. */
  readonly size: number;
  /** The backing chain (only its length is used: whether there is a base below the top). */
  readonly chain: readonly unknown[];
  /** Reads guest bytes. */
  read(offset: number, buf: Uint8Array): Promise<void>;
  /** Status through the chain down to (not including) layer `base`. */
  blockStatus(
    offset: number,
    length: number,
    base?: number,
  ): Promise<SourceStatus>;
  /**
   * The host file of layer `depth` when it is the file `file` of a status
   * run and holds the guest bytes as they are (raw, qcow2 data clusters),
   * so data can be mapped from it instead of read (see {@link plainFile}).
   */
  plainFile?(depth: number, file: string): BlockFile | undefined;
  /** The top layer's facts (its cluster size aligns status runs). */
  formatInfo(): Promise<{ clusterSize?: number }>;
}

/** A source's block status; where the bytes live is optional. */
export interface SourceStatus {
  length: number;
  data: boolean;
  zero: boolean;
  present: boolean;
  /** The layer that answered (0 = top). */
  depth?: number;
  /** Where the run's first byte lives in `file`. */
  hostOffset?: number;
  /** The host file's name. */
  file?: string;
  /** Stored compressed (not plain bytes). */
  compressed?: boolean;
}

/**
 * Formats whose host offsets (block status) point at the guest bytes as
 * they are. Not vpc: its copyMap says more (holes inside its blocks).
 */
const PLAIN_FORMATS = new Set(["raw", "qcow2", "vdi"]);

/**
 * The host file whose bytes at a status run's host offset are the guest's
 * bytes, when `source` can say: the layer's own file (not an external
 * data file) of a raw or qcow2 image that can map it.
 */
function plainFile(
  source: SourceImage,
  status: SourceStatus,
): BlockFile | undefined {
  if (status.hostOffset === undefined || status.file === undefined || status.compressed) return;
  const depth = status.depth ?? 0;
  if (source.plainFile) return source.plainFile(depth, status.file);
  if (!(source instanceof Image)) return;
  const layer = source.chain[depth];
  if (!layer || !PLAIN_FORMATS.has(layer.driver.name)) return;
  const file = layer.image.file;
  return file.name === status.file && file.view ? file : undefined;
}

/**
 * A window of `length` bytes of `source` starting at `start`, as a source
 * of its own (dd's skip and count).
 */
export function sliceSource(source: SourceImage, start: number, length: number): SourceImage {
  return {
    size: length,
    chain: source.chain,
    read: async (offset, buf) => {
      const inside = Math.max(0, Math.min(buf.length, length - offset));
      if (inside > 0) await source.read(start + offset, buf.subarray(0, inside));
      buf.fill(0, inside);
    },
    blockStatus: async (offset, len, base) => {
      const e = await source.blockStatus(start + offset, len, base);
      return { ...e, length: Math.min(e.length, len) };
    },
    formatInfo: () => Promise.resolve({}),
    plainFile: (depth, file) =>
      plainFile(source, {
        length: 0,
        data: true,
        zero: false,
        present: true,
        depth,
        hostOffset: 0,
        file,
      }),
  };
}

/** How a run of the source is to be copied. */
const enum Status {
  Data,
  Zero,
  Backing,
}

/** -c: consecutive clusters of a request that are all zero, or all not. */
interface ClusterRun {
  /** Length in sectors. */
  count: number;
  data: boolean;
}

interface Claim {
  sector: number;
  count: number;
  status: Status;
  /** Where a data claim's bytes lie as they are in a host file (mapped instead of read). */
  host?: { file: BlockFile; offset: number };
  /** The layer holding a data claim's bytes, when it has a copyMap; `offset` in its guest bytes. */
  layer?: { image: FormatImage; offset: number };
}

/** The layer that answered a data status, when it can say more for copying (FormatImage.copyMap). */
function copyLayer(source: SourceImage, status: SourceStatus): FormatImage | undefined {
  if (!(source instanceof Image)) return;
  const image = source.chain[status.depth ?? 0]?.image;
  return image?.copyMap ? image : undefined;
}

function pow2floor(n: number): number {
  if (n <= 0) return 0;
  return 2 ** Math.floor(Math.log2(n));
}

/** Whether sector `i` of a buffer (viewed as 32-bit words) holds only zeroes. */
function sectorIsZero(words: Int32Array, i: number): boolean {
  // Eight words OR-ed per step: about twice as fast as a test per word on zeroed sectors.
  const first = i * (SECTOR / 4);
  if (words[first] !== 0) return false; // data nearly always shows in its first word
  for (let j = first, end = j + SECTOR / 4; j < end; j += 8) {
    if (
      (words[j] | words[j + 1] | words[j + 2] | words[j + 3] | words[j + 4] | words[j + 5] |
        words[j + 6] | words[j + 7]) !== 0
    ) return false;
  }
  return true;
}

/** A buffer of whole sectors viewed as 32-bit words (buffers here start 4-byte aligned). */
function wordsOf(buf: Uint8Array): Int32Array {
  return new Int32Array(buf.buffer, buf.byteOffset, buf.length >>> 2);
}

/**
 * Length in sectors of the run at the start of `buf` that is all data or
 * all zero, with its end moved to an `alignment` boundary where that keeps
 * writes aligned (short zero tails count as data).
 */
function sameRun(
  buf: Int32Array,
  start: number,
  n: number,
  sector: number,
  alignment: number,
  known?: number[],
): { count: number; data: boolean } {
  if (n <= 0) return { count: 0, data: false };
  let zero: boolean;
  let i: number;
  if (known) {
    ({ zero, count: i } = knownRun(buf, start, n, known));
  } else {
    zero = sectorIsZero(buf, start);
    i = 1;
    while (i < n && sectorIsZero(buf, start + i) === zero) i++;
  }
  const tail = (sector + i) % alignment;
  if (tail) {
    if (zero && i <= tail) zero = false;
    if (!zero) i = Math.min(i + alignment - tail, n);
    else i -= tail;
  }
  return { count: i, data: !zero };
}

/**
 * The scan of sameRun where the sectors of `known` (sorted [start, end)
 * pairs) read as zeroes without looking at them (copyMap's zero runs).
 */
function knownRun(
  buf: Int32Array,
  start: number,
  n: number,
  known: number[],
): { zero: boolean; count: number } {
  const end = start + n;
  let zero: boolean | undefined;
  let pos = start;
  for (let k = 0; pos < end;) {
    while (k < known.length && known[k + 1] <= pos) k += 2;
    if (k < known.length && known[k] <= pos) {
      if (zero === false) break;
      zero = true;
      pos = Math.min(end, known[k + 1]);
      continue;
    }
    const stop = k < known.length ? Math.min(end, known[k]) : end;
    zero ??= sectorIsZero(buf, pos);
    while (pos < stop && sectorIsZero(buf, pos) === zero) pos++;
    if (pos < stop) break;
  }
  return { zero: zero!, count: pos - start };
}

/**
 * Splits off the first write of a data chunk: data, with zero gaps shorter
 * than `min` sectors swallowed; or a zero run.
 */
function dataRun(
  buf: Int32Array,
  start: number,
  n: number,
  min: number,
  sector: number,
  alignment: number,
  known?: number[],
): { count: number; data: boolean } {
  if (n < min) min = n;
  const first = sameRun(buf, start, n, sector, alignment, known);
  if (!first.data) return first;
  let used = first.count;
  let checked = used;
  while (checked < n) {
    const r = sameRun(buf, start + checked, n - checked, sector + checked, alignment, known);
    checked += r.count;
    if (r.data) used = checked;
    else if (r.count >= min) break;
  }
  return { count: used, data: true };
}

/**
 * The writes of a data request of `count` sectors of `buf` at `sector`:
 * data runs (zero gaps under `min` sectors swallowed) and zero runs, one
 * dataRun after another. `exact` scans every sector even where the
 * shortcut would do (tests compare the two).
 */
export function dataRuns(
  buf: Uint8Array,
  sector: number,
  count: number,
  min: number,
  alignment: number,
  known?: number[],
  exact = false,
): ClusterRun[] {
  const words = wordsOf(buf);
  if (!known && !exact && count > 0 && noZeroRun(words, sector, count, min)) {
    return [{ count, data: true }];
  }
  const runs: ClusterRun[] = [];
  for (let pos = 0; pos < count;) {
    const r = dataRun(words, pos, count - pos, min, sector + pos, alignment, known);
    runs.push(r);
    pos += r.count;
  }
  return runs;
}

/**
 * Whether dataRun would take a request whole as data, found with a look
 * at one sector in `min`: dataRun splits off only zero runs of `min`
 * sectors or more (each holds a sector at a multiple of `min`) and zero
 * heads and tails (the first and last sectors show those). Most data
 * passes, and the scan then touches an eighth of the sectors (-S 4k).
 */
function noZeroRun(words: Int32Array, sector: number, count: number, min: number): boolean {
  if (sectorIsZero(words, 0) || sectorIsZero(words, count - 1)) return false;
  for (let i = (min - (sector % min)) % min; i < count; i += min) {
    if (sectorIsZero(words, i)) return false;
  }
  return true;
}

/**
 * Zeroes the known zero sectors (sorted [start, end) pairs) of `buf` that
 * a data write covers (`runs`; all of them without runs): they were not read.
 */
function fillKnown(buf: Uint8Array, runs: ClusterRun[] | undefined, known: number[]): void {
  let pos = 0;
  for (const r of runs ?? [{ count: Infinity, data: true }]) {
    if (r.data) {
      for (let k = 0; k < known.length; k += 2) {
        const from = Math.max(pos, known[k]);
        const to = Math.min(pos + r.count, known[k + 1]);
        if (to > from) buf.fill(0, from * SECTOR, to * SECTOR);
      }
    }
    pos += r.count;
  }
}

/**
 * `io` whose files never sync to disk: cache=unsafe, qemu-img convert's
 * default (BDRV_O_NO_FLUSH), where closing a qcow2 target writes its
 * tables but does not wait for the data to reach the disk.
 */
export function unsafeCacheIo(io: Io): Io {
  const wrapped: Io = Object.create(io);
  wrapped.openFile = (path, options) => io.openFile(path, { ...options, noFlush: true });
  return wrapped;
}

/** Adapts an open Image to a CopyTarget: its top layer, reading through the rest of its chain. */
export function imageTarget(image: Image): CopyTarget {
  const top: FormatImage = image.chain[0].image;
  const below = image.chain.length > 1 ? new Image(image.chain.slice(1)) : undefined;
  const backingRead = below ? (o: number, b: Uint8Array) => below.read(o, b) : undefined;
  const write = top.write;
  if (!write) throw new QimgError(`writing ${image.format} images: not supported yet`);
  return {
    get size() {
      return top.size;
    },
    write: (offset, data) => write.call(top, offset, data, backingRead),
    writeZeroes: top.writeZeroes
      ? (offset, length, options) => top.writeZeroes!(offset, length, { ...options, backingRead })
      : undefined,
    writeCompressed: top.writeCompressed
      ? (offset, data) => top.writeCompressed!(offset, data)
      : undefined,
    prepareCompressed: top.prepareCompressed
      ? (offset, data) => top.prepareCompressed!(offset, data)
      : undefined,
    writeConcurrent: concurrentWriter(image, backingRead),
  };
}

/**
 * Concurrent writes: the driver's (qcow2: clusters allocated in call
 * order, data transfers overlapping), or straight to a raw target's file,
 * whose offsets are the guest's (past the image's end the driver's write
 * keeps its size).
 */
function concurrentWriter(
  image: Image,
  backingRead?: (offset: number, buf: Uint8Array) => Promise<void>,
): CopyTarget["writeConcurrent"] {
  const top = image.chain[0].image;
  if (top.writeConcurrent) return (offset, data) => top.writeConcurrent!(offset, data, backingRead);
  const file = top.file;
  if (image.chain[0].driver.name !== "raw" || !file.writeConcurrent) return;
  // Two transfers at most, neighbours merged: more only spin on the file's lock.
  const queue = new WriteQueue(file);
  return (offset, data) =>
    offset + data.length <= top.size ? queue.write(offset, data) : top.write!(offset, data);
}

/**
 * Copies the concatenated guest contents of `sources` to `target`.
 * Errors carry qemu-img's messages (`error while reading at byte N: ...`).
 *
 * @param sources the images to copy, in order
 * @param target where the bytes go (see {@link imageTarget})
 * @param options sparseness, parallelism, ordering and progress
 * @returns when every write is done
 */
export async function convert(
  sources: SourceImage[],
  target: CopyTarget,
  options: ConvertOptions = {},
): Promise<void> {
  const engine = new Converter(sources, target, options);
  await engine.init();
  await engine.run();
}

class Converter {
  #sources: SourceImage[];
  #sectors: number[] = [];
  #alignments: number[] = [];
  #target: CopyTarget;
  #o: ConvertOptions;
  #total = 0;
  #minSparse: number;
  #bufSectors: number;
  #alignment: number;
  #clusterSectors: number;
  #hasZeroInit: boolean;
  #backingSectors: number;
  // Iteration state, as qemu's: the cached status and where it ends.
  #status: Status = Status.Data;
  #nextStatus = 0;
  /** Data may be mapped from host files (not for -c, whose Workers keep it, nor --salvage). */
  #viewable: boolean;
  /** The host file and offset of the cached data status run, which starts at `sector`. */
  #host: { file: BlockFile; offset: number; sector: number; end: number } | undefined;
  /** The layer of the cached data status run when it has a copyMap; `start`: its source's first sector. */
  #layer: { image: FormatImage; start: number; end: number } | undefined;
  #sectorNum = 0;
  #allocated = 0;
  #allocatedDone = 0;
  #writeOffset = 0;
  #waiters = new Map<number, () => void>();
  #error: unknown = undefined;
  /** One promise per request that started writing (the latest last): done and its error recorded. */
  #recentWrites: Promise<void>[] = [];
  /** A concurrent write has finished (see the pipelined writes in #worker). */
  #targetWarm = false;
  #lock = new Lock();

  constructor(sources: SourceImage[], target: CopyTarget, options: ConvertOptions) {
    this.#sources = sources;
    this.#target = target;
    this.#o = options;
    this.#minSparse = Math.floor((options.minSparse ?? 4096) / SECTOR);
    const opt = Math.floor((options.optimalTransfer ?? 0) / SECTOR);
    this.#bufSectors = Math.min(MAX_BUF_SECTORS, Math.max(IO_BUF_SECTORS, opt));
    this.#alignment = Math.max(
      pow2floor(this.#minSparse),
      Math.ceil((options.requestAlignment ?? 1) / SECTOR),
      1,
    );
    this.#clusterSectors = Math.floor((options.clusterSize ?? 0) / SECTOR);
    this.#hasZeroInit = options.targetIsZero ?? false;
    this.#viewable = !options.compressed && !options.salvage;
    this.#backingSectors = options.targetBackingSize === undefined
      ? -1
      : Math.ceil(options.targetBackingSize / SECTOR);
  }

  async init(): Promise<void> {
    for (const s of this.#sources) {
      const n = Math.ceil(s.size / SECTOR);
      this.#sectors.push(n);
      this.#total += n;
      const cluster = (await s.formatInfo()).clusterSize ?? 0;
      this.#alignments.push(Math.max(1, Math.floor(cluster / SECTOR)));
    }
    if (this.#o.compressed) {
      if (this.#clusterSectors <= 0 || this.#clusterSectors > this.#bufSectors) {
        throw new QimgError("invalid cluster size");
      }
      // Batches of clusters for targets that compress ahead: one Worker message per batch.
      const batch = this.#target.prepareCompressed ? COMPRESS_BATCH_SECTORS : 0;
      this.#bufSectors = this.#clusterSectors *
        Math.max(1, Math.floor(batch / this.#clusterSectors));
    }
  }

  #part(sector: number): { index: number; start: number } {
    let start = 0;
    let index = 0;
    while (sector - start >= this.#sectors[index]) {
      start += this.#sectors[index];
      index++;
    }
    return { index, start };
  }

  /** Length in sectors of the next request at `sector`; sets #status. */
  async #iterationSectors(sector: number): Promise<number> {
    const { index, start } = this.#part(sector);
    let n = Math.min(this.#total - sector, REQUEST_MAX_SECTORS);
    let postBackingZero = false;
    if (this.#backingSectors >= 0) {
      if (sector >= this.#backingSectors) postBackingZero = true;
      else if (sector + n > this.#backingSectors) n = this.#backingSectors - sector;
    }
    if (this.#nextStatus <= sector) {
      const src = this.#sources[index];
      const offset = (sector - start) * SECTOR;
      const withBase = this.#o.targetHasBacking && src.chain.length > 1;
      let e;
      for (;;) {
        try {
          e = await src.blockStatus(offset, n * SECTOR, withBase ? 1 : src.chain.length);
          break;
        } catch (err) {
          if (!this.#o.salvage) {
            throw new QimgError(
              `error while reading block status at offset ${offset}: ${strerror(err)}`,
            );
          }
          if (n === 1) {
            if (!this.#o.quiet) {
              this.#o.warn?.(
                `error while reading block status at offset ${offset}: ${strerror(err)}`,
              );
            }
            e = { length: SECTOR, data: true, zero: false, present: true };
            break;
          }
          n = Math.ceil(n / 4);
        }
      }
      n = Math.ceil(Math.min(e.length, n * SECTOR) / SECTOR);
      const tail = (sector - start + n) % this.#alignments[index];
      if (n > tail) n -= tail;
      this.#host = undefined;
      // -c maps data too: its batches copy the mapped bytes (no read into a buffer).
      if (e.data && !this.#o.salvage) {
        const file = plainFile(src, e);
        // Mapped only where the run lies in this source (a view never crosses into the next).
        if (file) {
          this.#host = { file, offset: e.hostOffset!, sector, end: start + this.#sectors[index] };
        }
      }
      this.#layer = undefined;
      const image = e.data && this.#viewable && !this.#host ? copyLayer(src, e) : undefined;
      if (image) this.#layer = { image, start, end: start + this.#sectors[index] };
      if (!e.present && withBase) this.#status = Status.Backing;
      else if (e.zero) this.#status = postBackingZero ? Status.Backing : Status.Zero;
      else if (e.data) this.#status = Status.Data;
      else this.#status = this.#o.targetHasBacking ? Status.Backing : Status.Data;
      this.#nextStatus = sector + n;
    }
    n = Math.min(n, this.#nextStatus - sector);
    if (this.#status === Status.Data) n = Math.min(n, this.#bufSectors);
    if (this.#o.compressed) {
      if (n < this.#clusterSectors) {
        n = Math.min(this.#clusterSectors, this.#total - sector);
        this.#status = Status.Data;
      } else {
        n -= n % this.#clusterSectors;
      }
    }
    return n;
  }

  #counts(status: Status): boolean {
    return status === Status.Data || (this.#minSparse === 0 && status === Status.Zero);
  }

  async run(): Promise<void> {
    if (!this.#hasZeroInit && this.#o.targetIsZero) this.#hasZeroInit = true;
    // First pass: how much will be copied, for the progress meter.
    for (let sector = 0; sector < this.#total;) {
      const n = await this.#iterationSectors(sector);
      if (this.#counts(this.#status)) this.#allocated += n;
      sector += n;
    }
    this.#nextStatus = 0;
    const workers = [];
    const parallel = Math.max(1, Math.min(MAX_PARALLEL, this.#o.parallel ?? 8));
    // As qemu's coroutines, every worker claims its first request before any
    // I/O completes (so the progress printed before an early error matches).
    let firstClaims = 0;
    let release = () => {};
    const firstRound = new Promise<void>((resolve) => (release = resolve));
    const claimed = () => {
      if (++firstClaims === parallel) release();
      return firstRound;
    };
    for (let i = 0; i < parallel; i++) workers.push(this.#worker(claimed));
    await Promise.all(workers);
    if (this.#error !== undefined) throw this.#error;
    if (this.#o.compressed && this.#target.writeCompressed) {
      await this.#target.writeCompressed(0, new Uint8Array(0));
    }
  }

  #claim(): Promise<Claim | null> {
    return this.#lock.run(async () => {
      if (this.#error !== undefined || this.#sectorNum >= this.#total) return null;
      let n = await this.#iterationSectors(this.#sectorNum);
      const status = this.#status;
      if (this.#minSparse === 0 && status === Status.Zero) n = Math.min(n, this.#bufSectors);
      const claim: Claim = { sector: this.#sectorNum, count: n, status };
      const h = this.#host;
      // A -c claim of a whole cluster may reach past the data run: that is read.
      const inRun = claim.sector + n <= this.#nextStatus;
      if (
        status === Status.Data && h && claim.sector >= h.sector && claim.sector + n <= h.end &&
        inRun
      ) {
        const offset = h.offset + (claim.sector - h.sector) * SECTOR;
        // Whole 32-bit words for the zero scan.
        if (offset % 4 === 0) claim.host = { file: h.file, offset };
      }
      const l = this.#layer;
      if (status === Status.Data && !claim.host && l && claim.sector + n <= l.end) {
        claim.layer = { image: l.image, offset: (claim.sector - l.start) * SECTOR };
      }
      this.#sectorNum += n;
      return claim;
    });
  }

  #fail(err: unknown): void {
    if (this.#error === undefined) this.#error = err;
    for (const wake of this.#waiters.values()) wake();
    this.#waiters.clear();
  }

  async #worker(firstClaimed: () => Promise<void>): Promise<void> {
    let buf: Uint8Array | undefined;
    let first = true;
    for (;;) {
      let claim: Claim | null = null;
      let failed = false;
      try {
        claim = await this.#claim();
      } catch (err) {
        this.#fail(err);
        failed = true;
      }
      if (first) {
        first = false;
        await firstClaimed();
      }
      if (!claim || failed) return;
      let { status } = claim;
      const { sector, count } = claim;
      if (this.#counts(status)) {
        // -c claims batches of clusters; qemu claims (and reports) one at a time.
        const step = this.#o.compressed ? this.#clusterSectors : count;
        for (let done = 0; done < count; done += step) {
          this.#allocatedDone += Math.min(step, count - done);
          this.#o.progress?.(Math.fround(100 * this.#allocatedDone / this.#allocated));
        }
      }
      // Bytes that lie as they are in a host file are mapped, not copied into buf.
      let view: FileView | undefined;
      if (status === Status.Data && claim.host) {
        view = await claim.host.file.view!(claim.host.offset, count * SECTOR).catch(() =>
          undefined
        );
      }
      // Sector ranges (claim-relative [start, end) pairs) its layer knows read as zeroes.
      let zeroes: number[] | undefined;
      if (status === Status.Data && !view && claim.layer) {
        const plan = await this.#copyPlan(claim.layer, count);
        view = plan?.view;
        zeroes = plan?.zeroes;
      }
      // Allocated only when needed: mapped copies need none, and eight idle
      // buffers' external memory set off garbage collections.
      if ((status === Status.Data && !view) || (this.#minSparse === 0 && status === Status.Zero)) {
        buf ??= new Uint8Array(this.#bufSectors * SECTOR);
      }
      const input = view?.bytes ?? buf;
      if (status === Status.Data && !view) {
        try {
          if (zeroes) await this.#readBetween(sector, count, buf!, zeroes);
          else await this.#read(sector, count, buf!);
        } catch (err) {
          this.#fail(
            new CopyError("reading", sector * SECTOR, strerror(err)),
          );
        }
      } else if (this.#minSparse === 0 && status === Status.Zero) {
        status = Status.Data;
        buf!.fill(0, 0, count * SECTOR);
      }
      // Compress while earlier clusters are still waiting to be written in order.
      let runs: ClusterRun[] | undefined;
      if (this.#o.compressed && status === Status.Data && this.#error === undefined) {
        runs = this.#clusterRuns(input!, count);
        for (let r = 0, pos = 0; r < runs.length; pos += runs[r++].count) {
          if (!runs[r].data || !this.#target.prepareCompressed) continue;
          const bytes = input!.subarray(pos * SECTOR, (pos + runs[r].count) * SECTOR);
          this.#target.prepareCompressed((sector + pos) * SECTOR, bytes);
        }
      }
      // Zero detection before waiting for our turn: it overlaps the writes of earlier requests.
      if (status === Status.Data && !this.#o.compressed && this.#error === undefined) {
        runs = this.#dataRuns(input!, sector, count, zeroes);
        if (zeroes && !view) fillKnown(buf!, runs, zeroes);
      }
      if (!this.#o.outOfOrder) {
        while (this.#writeOffset !== sector && this.#error === undefined) {
          await new Promise<void>((resolve) => this.#waiters.set(sector, resolve));
        }
        this.#waiters.delete(sector);
      }
      const pipelined = this.#target.writeConcurrent && !this.#o.outOfOrder && !this.#o.compressed;
      if (this.#error === undefined) {
        const writing = this.#write(sector, count, input, status, runs).then(
          () => undefined,
          (err) => new CopyError("writing", sector * SECTOR, strerror(err)),
        );
        if (pipelined) {
          // Up to WRITES_IN_FLIGHT requests write at once (pwrites on other
          // threads): the next may start once the one that many back is done.
          // Errors are recorded in offset order.
          const recent = this.#recentWrites;
          const previous = recent[recent.length - 1];
          // Until one write has finished, requests write alone: a target's first call
          // may take longer to reach it (loading its write side) and must not be overtaken.
          const gate = this.#targetWarm ? recent[recent.length - (WRITES_IN_FLIGHT - 1)] : writing;
          let done = () => {};
          recent.push(new Promise<void>((resolve) => (done = resolve)));
          if (recent.length > WRITES_IN_FLIGHT) recent.shift();
          await gate;
          this.#advance(sector + count);
          const failure = await writing;
          await previous;
          if (failure) this.#fail(failure);
          done();
        } else {
          const failure = await writing;
          if (failure) this.#fail(failure);
        }
      }
      view?.release();
      if (!this.#o.outOfOrder) this.#advance(sector + count);
    }
  }

  /** Lets the request that starts at `next` write (in-order mode). */
  #advance(next: number): void {
    if (this.#writeOffset >= next) return;
    this.#writeOffset = next;
    const wake = this.#waiters.get(next);
    if (wake) {
      this.#waiters.delete(next);
      wake();
    }
  }

  /** Reads `count` sectors at `sector`, crossing from one source into the next. */
  async #read(sector: number, count: number, buf: Uint8Array): Promise<void> {
    let pos = 0;
    let singleUntil = 0;
    while (count > 0) {
      const { index, start } = this.#part(sector);
      const src = this.#sources[index];
      const offset = (sector - start) * SECTOR;
      let n = Math.min(count, this.#sectors[index] - (sector - start));
      if (singleUntil > offset) n = 1;
      const chunk = buf.subarray(pos * SECTOR, (pos + n) * SECTOR);
      try {
        await src.read(offset, chunk);
      } catch (err) {
        if (!this.#o.salvage) throw err;
        if (n > 1) {
          singleUntil = offset + n * SECTOR;
          continue;
        }
        if (!this.#o.quiet) {
          this.#o.warn?.(`error while reading offset ${offset}: ${strerror(err)}`);
        }
        chunk.fill(0);
      }
      sector += n;
      count -= n;
      pos += n;
    }
  }

  async #write(
    sector: number,
    count: number,
    buf: Uint8Array | undefined,
    status: Status,
    runs?: ClusterRun[],
  ): Promise<void> {
    let pos = 0;
    let run = 0;
    const words = buf && status === Status.Data ? wordsOf(buf) : undefined;
    // A raw target takes all the writes of a request at once (on other threads).
    const concurrent = this.#o.compressed ? undefined : this.#target.writeConcurrent;
    const pending: Promise<void>[] | undefined = concurrent ? [] : undefined;
    while (count > 0) {
      let n = count;
      if (status !== Status.Backing) {
        let data = false;
        if (status === Status.Data) {
          if (this.#minSparse === 0 || this.#o.copyRange) {
            data = true;
          } else if (!this.#o.compressed) {
            const r = runs
              ? runs[run++]
              : dataRun(words!, pos, n, this.#minSparse, sector, this.#alignment);
            n = r.count;
            data = r.data;
          } else {
            runs ??= this.#clusterRuns(buf!, count);
            n = runs[run].count;
            data = runs[run++].data;
          }
        }
        const offset = sector * SECTOR;
        if (data) {
          const bytes = buf!.subarray(pos * SECTOR, (pos + n) * SECTOR);
          if (this.#o.compressed && this.#target.writeCompressed) {
            await this.#writeCompressed(offset, bytes);
          } else if (pending) {
            pending.push(concurrent!.call(this.#target, offset, bytes));
          } else {
            await this.#target.write(offset, bytes);
          }
        } else if (!this.#hasZeroInit) {
          if (pending) pending.push(this.#writeZeroes(offset, n * SECTOR));
          else await this.#writeZeroes(offset, n * SECTOR);
        }
      }
      sector += n;
      count -= n;
      pos += n;
    }
    if (pending) {
      // All settle before the buffer may go; the first failure in offset order is the error.
      const settled = await Promise.allSettled(pending);
      if (pending.length) this.#targetWarm = true;
      const failed = settled.find((r) => r.status === "rejected");
      if (failed) throw (failed as PromiseRejectedResult).reason;
    }
  }

  /**
   * How a data claim's bytes are had from its layer's copyMap: mapped when
   * they lie whole in its file, else the sector ranges that read as zeroes
   * (not read, not scanned). Undefined: read it all.
   */
  async #copyPlan(
    layer: { image: FormatImage; offset: number },
    count: number,
  ): Promise<{ view?: FileView; zeroes?: number[] } | undefined> {
    const { image, offset } = layer;
    const length = count * SECTOR;
    if (offset + length > image.size) return;
    let runs: CopyRun[];
    try {
      runs = await image.copyMap!(offset, length);
    } catch {
      return; // the read reports it
    }
    const host = runs[0].hostOffset;
    let inPlace = host !== undefined;
    for (let pos = 0, i = 0; i < runs.length && inPlace; pos += runs[i++].length) {
      inPlace = runs[i].hostOffset === host! + pos;
    }
    let view: FileView | undefined;
    // Whole words for the zero scan; a run of nothing but zeroes needs no bytes.
    if (inPlace && host! % 4 === 0 && image.file.view && runs.some((r) => !r.zero)) {
      view = await image.file.view(host!, length).catch(() => undefined);
    }
    if (runs.length === 1 && !runs[0].zero) return view && { view };
    const zeroes: number[] = [];
    let pos = 0;
    for (const r of runs) {
      // Whole sectors only.
      const first = Math.ceil(pos / SECTOR);
      const end = Math.floor((pos + r.length) / SECTOR);
      if (r.zero && end > first) {
        if (zeroes[zeroes.length - 1] === first) zeroes[zeroes.length - 1] = end;
        else zeroes.push(first, end);
      }
      pos += r.length;
    }
    if (pos !== length || !zeroes.length) {
      view?.release();
      return;
    }
    return { view, zeroes };
  }

  /** Reads the sectors of a claim outside its known zero ranges. */
  async #readBetween(sector: number, count: number, buf: Uint8Array, zeroes: number[]) {
    for (let pos = 0, k = 0; pos < count; k += 2) {
      const end = k < zeroes.length ? zeroes[k] : count;
      if (end > pos) await this.#read(sector + pos, end - pos, buf.subarray(pos * SECTOR));
      pos = k < zeroes.length ? zeroes[k + 1] : count;
    }
  }

  /** The writes (data or zero runs) `#write` makes of a data request, found ahead. */
  #dataRuns(
    buf: Uint8Array,
    sector: number,
    count: number,
    known?: number[],
  ): ClusterRun[] | undefined {
    if (this.#minSparse === 0 || this.#o.copyRange) return;
    return dataRuns(buf, sector, count, this.#minSparse, this.#alignment, known);
  }

  /**
   * Splits `count` sectors of `buf` (whole clusters, the last maybe short)
   * into runs of zero and non-zero clusters (-c: zero clusters are left out).
   */
  #clusterRuns(buf: Uint8Array, count: number): ClusterRun[] {
    if (this.#minSparse === 0 || this.#o.copyRange) return [{ count, data: true }];
    const runs: ClusterRun[] = [];
    for (let pos = 0; pos < count; pos += this.#clusterSectors) {
      const n = Math.min(this.#clusterSectors, count - pos);
      const data = !isZero(buf.subarray(pos * SECTOR, (pos + n) * SECTOR));
      const last = runs[runs.length - 1];
      if (last && last.data === data) last.count += n;
      else runs.push({ count: n, data });
    }
    return runs;
  }

  /** A run of clusters compressed: whole for targets that prepared it, else one cluster at a time. */
  async #writeCompressed(offset: number, bytes: Uint8Array): Promise<void> {
    const target = this.#target;
    if (target.prepareCompressed) return await target.writeCompressed!(offset, bytes);
    const cs = this.#clusterSectors * SECTOR;
    for (let pos = 0; pos < bytes.length; pos += cs) {
      await target.writeCompressed!(offset + pos, bytes.subarray(pos, pos + cs));
    }
  }

  async #writeZeroes(offset: number, length: number): Promise<void> {
    if (this.#target.writeZeroes) {
      return await this.#target.writeZeroes(offset, length, { mayUnmap: true });
    }
    const zeroes = new Uint8Array(Math.min(length, IO_BUF_SECTORS * SECTOR));
    for (let done = 0; done < length; done += zeroes.length) {
      await this.#target.write(
        offset + done,
        zeroes.subarray(0, Math.min(zeroes.length, length - done)),
      );
    }
  }
}
