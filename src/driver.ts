/**
 * The driver interface every image format implements (types only).
 * Two halves, as in QEMU: a static FormatDriver per format, and a
 * FormatImage per open image. A missing optional member is the capability.
 */

import type { BlockFile, OpenFileOptions } from "./file.ts";
import type { OptionDesc, OptionValues } from "./options.ts";
import type { JsonValue } from "./output.ts";

/** What one layer knows about a run of guest bytes. */
export interface BlockStatus {
  /** Length of the run in bytes; > 0 and possibly longer than asked. */
  length: number;
  /** Allocated in this layer. */
  data: boolean;
  /** Reads as zeroes. Neither data nor zero: ask the backing file. */
  zero: boolean;
  /** Where the bytes live in `file` (map's "offset"). */
  hostOffset?: number;
  /** The host file holding the bytes, when hostOffset is set. */
  file?: string;
  /** Stored compressed. */
  compressed?: boolean;
}

/** A backing file reference as stored in an image. */
export interface BackingRef {
  /** The name exactly as stored. */
  name: string;
  /** The format as stored, if any. */
  format?: string;
}

/** Format-specific facts for `info` (keys in qemu's order). */
export interface FormatInfo {
  /** Cluster size in bytes, when the format has one. */
  clusterSize?: number;
  /** Whether the image was not closed cleanly. */
  dirty?: boolean;
  /** qemu's `format-specific` object: `{ type, data }`. */
  formatSpecific?: { type: string; data: Record<string, JsonValue> };
  /** Whether the image is encrypted. */
  encrypted?: boolean;
}

/**
 * Result of a metadata consistency check, as qemu's BdrvCheckResult.
 *
 * @example Usage
 * ```ts
 * import { type CheckResult, openImage } from "@qimg/qimg";
 * const path = await Deno.makeTempFile({ suffix: ".raw" });
 * await using image = await openImage(path);
 * const result: CheckResult | undefined = await image.check().catch(() => undefined);
 * console.log(result?.corruptions ?? "raw has no check");
 * ```
 */
export interface CheckResult {
  /** Metadata errors that can make data wrong. */
  corruptions: number;
  /** Clusters allocated but not referenced (space lost, data safe). */
  leaks: number;
  /** Errors that stopped the check itself (e.g. I/O errors). */
  checkErrors: number;
  /** Corruptions repaired (with `repair`). */
  corruptionsFixed: number;
  /** Leaks repaired (with `repair`). */
  leaksFixed: number;
  /** Offset just past the last used byte of the image file. */
  imageEndOffset?: number;
  /** Clusters of the virtual disk. */
  totalClusters?: number;
  /** Clusters of the virtual disk that are allocated. */
  allocatedClusters?: number;
  /** Allocated clusters not contiguous with their predecessor. */
  fragmentedClusters?: number;
  /** Allocated clusters stored compressed. */
  compressedClusters?: number;
  /** Lines the check prints while it runs (qemu's fprintf(stderr) lines). */
  messages: string[];
  /**
   * More such lines, too many to hold (a hostile vdi map's): text chunks of
   * whole lines, produced as they are printed, after `messages`.
   */
  moreMessages?: Iterable<string>;
}

/** An internal snapshot, as qemu's QEMUSnapshotInfo. */
export interface SnapshotInfo {
  id: string;
  name: string;
  vmStateSize: bigint;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  /** Absent when not recorded. */
  icount?: bigint;
}

/** Options for opening an image. */
export interface OpenOptions {
  /** Open for writing. */
  write?: boolean;
  /** Open for `check` (qemu's BDRV_O_CHECK): tables check reports on are not validated. */
  check?: boolean;
  /** Share locks (-U); accepted, qimg takes no locks. */
  forceShare?: boolean;
  /** Opens further host files a format refers to (qcow2's external data file). */
  openFile?: (path: string, write: boolean) => Promise<BlockFile>;
  /** Metadata only, as qemu-img info's BDRV_O_NO_IO: no data file, no decryption. */
  noIo?: boolean;
  /**
   * Prints qemu's warnings raised while opening, each ended by `end`
   * (default a newline; qemu ends one of them with nothing).
   */
  warn?: (message: string, end?: string) => void;
}

/** Options for creating an image. */
export interface CreateOptions {
  /** Virtual size in bytes. */
  size: number;
  /** Values parsed from `-o` against the driver's createOptions. */
  options: OptionValues;
  /** Opens further host files the format creates (qcow2's external data file). */
  openFile?: (path: string, options: OpenFileOptions) => Promise<BlockFile>;
  /** Removes host files of a failed create (qemu deletes them). */
  removeFile?: (path: string) => Promise<void>;
}

/** One open image of one format: answers for its own layer only. */
export interface FormatImage {
  /** Virtual size in bytes. */
  readonly size: number;
  /** The backing file as stored, if any. */
  readonly backing?: BackingRef;
  /** The host file this image lives in. */
  readonly file: BlockFile;
  /**
   * Reads guest bytes into `buf`. Ranges this layer does not hold are
   * filled from `backingRead` when given, else with zeroes.
   */
  read(offset: number, buf: Uint8Array, backingRead?: BackingReader): Promise<void>;
  /** Block status of this layer at `offset`. */
  blockStatus(offset: number, length: number): Promise<BlockStatus>;
  /**
   * For convert only: how a range blockStatus calls data lies in this
   * layer, where that is finer than blockStatus may say (vhdx: qemu's
   * map shows it all as data, without offsets). Runs that read as zeroes
   * are neither read nor scanned, runs with a `hostOffset` in `file` are
   * mapped; what is written stays decided by blockStatus and the bytes.
   */
  copyMap?(offset: number, length: number): Promise<CopyRun[]>;
  /** Format-specific facts for info. */
  info(): Promise<FormatInfo>;
  /**
   * The persistent dirty bitmaps stored in this image. Absent, or resolving
   * to undefined, when the image cannot store any (raw, qcow2 v2).
   */
  persistentBitmaps?(): Promise<PersistentBitmap[] | undefined>;
  /** Makes written data and metadata durable. */
  flush(): Promise<void>;
  /** Closes the image and its file. */
  close(): Promise<void>;
  /** Writes guest bytes. */
  write?(offset: number, data: Uint8Array, backingRead?: BackingReader): Promise<void>;
  /**
   * As `write`, but the data may go to the file on another thread after the
   * metadata work, beside later calls' transfers (allocation stays in call
   * order): convert's bulk copy. May be absent.
   */
  writeConcurrent?(offset: number, data: Uint8Array, backingRead?: BackingReader): Promise<void>;
  /**
   * Makes a range read as zeroes; `mayUnmap` lets it deallocate (qemu's
   * BDRV_REQ_MAY_UNMAP); `backingRead` fills the rest of a partly zeroed
   * cluster that this layer does not hold yet.
   */
  writeZeroes?(
    offset: number,
    length: number,
    options?: { mayUnmap?: boolean; backingRead?: BackingReader },
  ): Promise<void>;
  /**
   * Writes one cluster compressed (`convert -c`): `offset` is cluster-aligned
   * and `data` a whole cluster (shorter only at the end of the image). A
   * zero-length write at offset 0 ends the stream (qemu aligns the file end).
   */
  writeCompressed?(offset: number, data: Uint8Array): Promise<void>;
  /** Starts compressing a whole cluster ahead (other threads) for the writeCompressed that follows. */
  prepareCompressed?(offset: number, data: Uint8Array): void;
  /** Checks metadata consistency; repairs when `repair` is set. */
  check?(options: { repair?: "leaks" | "all" }): Promise<CheckResult>;
  /** The internal snapshots, in table order. */
  snapshots?(): Promise<SnapshotInfo[]>;
  /** Creates an internal snapshot of the current state (snapshot -c). */
  createSnapshot?(name: string): Promise<void>;
  /** Reverts the guest to the snapshot with this ID or name (snapshot -a). */
  applySnapshot?(name: string): Promise<void>;
  /** Deletes the first snapshot with this name (snapshot -d). */
  deleteSnapshot?(name: string): Promise<void>;
  /**
   * A read-only view of the guest as it was at one of `snapshots()`
   * (convert -l/-s); closing the view leaves this image open.
   */
  atSnapshot?(snapshot: SnapshotInfo): Promise<FormatImage>;
  /**
   * A read-only view of the guest as it was at `snapshot` (one of
   * `snapshots()`), as qemu's bdrv_snapshot_load_tmp: measure -l, convert -l.
   */
  atSnapshot?(snapshot: SnapshotInfo): Promise<FormatImage>;
  /**
   * Changes the stored backing file reference (rebase, amend); an empty or
   * undefined name removes it. Writes no guest data.
   */
  setBacking?(name: string | undefined, format: string | undefined): Promise<void>;
  /**
   * Drops all of this layer's data, so it reads through to its backing file
   * (commit without -d, qemu's bdrv_make_empty). With `dryRun`, only throws
   * where it cannot, writing nothing.
   */
  makeEmpty?(options?: { dryRun?: boolean }): Promise<void>;
  /**
   * Changes format options (`amend -o`, values parsed against the driver's
   * amend table); `status` reports progress of long operations.
   */
  amend?(
    options: OptionValues,
    status?: (done: number, total: number) => void,
    /** The layers below, for a size change (as resize's options). */
    below?: { backingSize?: number; backingRead?: BackingReader },
  ): Promise<void>;
  /** Changes the virtual size. */
  resize?(
    size: number,
    options: {
      preallocation?: string;
      shrink?: boolean;
      /** The backing file's length: a longer one must not show through the grown range. */
      backingSize?: number;
      backingRead?: BackingReader;
    },
  ): Promise<void>;
}

/** One run of a {@link FormatImage.copyMap} answer. */
export interface CopyRun {
  /** Length in bytes; the runs cover the range asked, in order. */
  length: number;
  /** Reads as zeroes. */
  zero: boolean;
  /** Where the bytes lie as they are in the layer's file (on a zero run: a hole there). */
  hostOffset?: number;
}

/**
 * Builds a copyMap answer in order, merging neighbours: zero runs without a
 * host offset, and runs that continue each other in the host file.
 */
export class CopyRunList {
  readonly runs: CopyRun[] = [];

  /** Adds `length` bytes: zeroes or data for read() (no `hostOffset`), or bytes lying at `hostOffset`. */
  add(length: number, zero: boolean, hostOffset?: number): void {
    const last = this.runs[this.runs.length - 1];
    const follows = last && last.zero === zero && (
      hostOffset === undefined
        ? zero && last.hostOffset === undefined
        : last.hostOffset !== undefined && last.hostOffset + last.length === hostOffset
    );
    if (follows) last.length += length;
    else this.runs.push(hostOffset === undefined ? { length, zero } : { length, zero, hostOffset });
  }

  /** Adds the host file's bytes at [at, at + length): its holes as zeroes, its data where it lies. */
  async addHost(file: BlockFile, at: number, length: number): Promise<void> {
    for (const end = at + length; at < end;) {
      const e = await file.extent(at, end - at);
      const n = Math.min(e.length, end - at);
      this.add(n, !e.data, at);
      at += n;
    }
  }
}

/** Reads guest bytes from the layers below an image. */
export type BackingReader = (offset: number, buf: Uint8Array) => Promise<void>;

/** Size estimate for `measure`. */
export interface MeasureResult {
  required: number;
  fullyAllocated: number;
  bitmaps?: number;
}

/** One image format: a static table, as QEMU's BlockDriver. */
export interface FormatDriver {
  /** The name as qemu spells it (`vpc`, not `vhd`). */
  readonly name: string;
  /** Scores the first bytes of a file 0-100 (raw answers 1, the fallback). */
  probe?(head: Uint8Array, filename: string): number;
  /** Opens an image on a host file. */
  open(file: BlockFile, options: OpenOptions): Promise<FormatImage>;
  /** Creates an image on a new (empty, writable) host file. */
  create?(file: BlockFile, options: CreateOptions): Promise<void>;
  /** The `-o` options `create` takes, in qemu's order. */
  readonly createOptions?: OptionDesc[];
  /** The `-o` options `amend` takes. */
  readonly amendOptions?: OptionDesc[];
  /** Estimates the file size for an image of `size` holding `allocated` guest bytes. */
  measure?(size: number, options: OptionValues, source?: MeasureSource): Promise<MeasureResult>;
  /** Whether images of this format can have a backing file. */
  readonly supportsBacking?: boolean;
}

/** What measure needs to know about a source image. */
export interface MeasureSource {
  /** Walks the source's allocated extents. */
  extents(): AsyncIterable<{ offset: number; length: number; data: boolean; zero: boolean }>;
  /**
   * The source's persistent dirty bitmaps; absent when its format cannot
   * store them (qemu then prints no `bitmaps size`).
   */
  bitmaps?: PersistentBitmap[];
}

/** A persistent dirty bitmap, as far as measuring its copy needs. */
export interface PersistentBitmap {
  name: string;
  /** Bytes of guest data per bit. */
  granularity: number;
}
