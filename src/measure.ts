/**
 * qcow2's size estimate for `measure`, per the qcow2 spec's layout: one
 * header cluster, L2 tables for every guest cluster, the L1 table, and
 * refcount blocks and table covering all of it (themselves included),
 * plus the clusters the source's data needs. Kept apart from the qcow2
 * driver so the driver's table only has to point at `measureQcow2`.
 */

import type { MeasureResult, MeasureSource, PersistentBitmap } from "./driver.ts";
import type { OptionValues } from "./options.ts";
import { QimgError } from "./errors.ts";
import { parsePreallocation } from "./protocol.ts";

const DEFAULT_CLUSTER_SIZE = 65536;
const MIN_CLUSTER_SIZE = 512;
const MAX_CLUSTER_SIZE = 2 * 1024 * 1024;
/** Extended L2 entries need subclusters of at least 512 bytes: 32 per cluster. */
const MIN_EXTL2_CLUSTER_SIZE = 16384;
const L1E_SIZE = 8;
const REFTABLE_ENTRY_SIZE = 8;
/** qemu refuses L1 tables over 32 MiB. */
const MAX_L1_SIZE = 32 * 1024 * 1024;
/** Size of a bitmap directory entry without its name. */
const BITMAP_DIR_ENTRY_SIZE = 24;
const BITMAP_TABLE_ENTRY_SIZE = 8;

/** The qcow2 layout choices that change its metadata size. */
export interface Qcow2Geometry {
  clusterSize: number;
  /** log2 of the refcount width in bits (16 bits: 4). */
  refcountOrder: number;
  extendedL2: boolean;
}

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}

/**
 * Bytes of refcount blocks and table needed to count `clusters` host
 * clusters, found as qemu does: iterate until the refcount metadata also
 * counts itself.
 */
export function refcountMetadataSize(
  clusters: number,
  clusterSize: number,
  refcountOrder: number,
): number {
  const blocksPerTableCluster = clusterSize / REFTABLE_ENTRY_SIZE;
  const refcountsPerBlock = (clusterSize * 8) / 2 ** refcountOrder;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last;
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / refcountsPerBlock);
    table = Math.ceil(blocks / blocksPerTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * clusterSize;
}

/** File size of a fully allocated qcow2 image of `size` guest bytes. */
export function fullyAllocatedSize(size: number, g: Qcow2Geometry): number {
  const cs = g.clusterSize;
  const aligned = roundUp(size, cs);
  const l2eSize = g.extendedL2 ? 16 : 8;
  let meta = cs; // header
  const nl2e = roundUp(aligned / cs, cs / l2eSize);
  meta += nl2e * l2eSize;
  const nl1e = roundUp((nl2e * l2eSize) / cs, cs / L1E_SIZE);
  meta += nl1e * L1E_SIZE;
  meta += refcountMetadataSize(Math.floor((meta + aligned) / cs), cs, g.refcountOrder);
  return meta + aligned;
}

/**
 * Space for copies of `bitmaps` of an image of `size` bytes: each bitmap's
 * data and table, plus the directory, in whole clusters.
 */
export function bitmapsSize(
  bitmaps: PersistentBitmap[],
  size: number,
  clusterSize: number,
): number {
  let total = 0;
  let dir = 0;
  for (const b of bitmaps) {
    const bytes = Math.ceil(Math.ceil(size / b.granularity) / 8);
    const clusters = Math.ceil(bytes / clusterSize);
    total += clusters * clusterSize + roundUp(clusters * BITMAP_TABLE_ENTRY_SIZE, clusterSize);
    dir += roundUp(BITMAP_DIR_ENTRY_SIZE + new TextEncoder().encode(b.name).length, 8);
  }
  return total + roundUp(dir, clusterSize);
}

/**
 * Reads the geometry from `-o` values with qemu's checks and messages, in
 * qemu's order: extended_l2, cluster_size, compat, refcount_bits.
 */
export function qcow2Geometry(options: OptionValues): Qcow2Geometry & { version: 2 | 3 } {
  const extendedL2 = options.extended_l2 === true;
  const clusterSize = Number(options.cluster_size ?? DEFAULT_CLUSTER_SIZE);
  if (
    !isPowerOfTwo(clusterSize) || clusterSize < MIN_CLUSTER_SIZE || clusterSize > MAX_CLUSTER_SIZE
  ) {
    throw new QimgError("Cluster size must be a power of two between 512 and 2048k");
  }
  if (extendedL2 && clusterSize < MIN_EXTL2_CLUSTER_SIZE) {
    throw new QimgError(
      `Extended L2 entries are only supported with cluster sizes of at least ${MIN_EXTL2_CLUSTER_SIZE} bytes`,
    );
  }
  let version: 2 | 3 = 3;
  if (options.compat !== undefined) {
    if (options.compat === "0.10") version = 2;
    else if (options.compat === "1.1") version = 3;
    else throw new QimgError(`Invalid compatibility level: '${options.compat}'`);
  }
  const bits = Number(options.refcount_bits ?? 16);
  if (bits > 64 || !isPowerOfTwo(bits)) {
    throw new QimgError("Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (version < 3 && bits !== 16) {
    throw new QimgError(
      "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
    );
  }
  return { clusterSize, refcountOrder: Math.log2(bits), extendedL2, version };
}

/**
 * qcow2's `measure`: the file size a new qcow2 image needs (`required`)
 * and would have fully allocated. `options.size` is the requested size
 * (qemu checks the L1 limit on it); with a source, `size` is the source's
 * size and its data extents decide what is required.
 *
 * @param size Guest size in bytes: the source's, or the requested one.
 * @param options Parsed `-o` values (qcow2 and file protocol options).
 * @param source The image to be converted, when measuring one.
 * @returns Required and fully allocated sizes, and bitmaps when qemu prints them.
 */
export async function measureQcow2(
  size: number,
  options: OptionValues,
  source?: MeasureSource,
): Promise<MeasureResult> {
  const g = qcow2Geometry(options);
  const cs = g.clusterSize;
  const prealloc = parsePreallocation(
    options.preallocation === undefined ? undefined : String(options.preallocation),
  );
  const hasBacking = options.backing_file !== undefined;
  if (options["encrypt.format"] === "luks") {
    if (options["encrypt.key-secret"] === undefined) {
      throw new QimgError("Parameter 'encrypt.key-secret' is required for cipher");
    }
    throw new QimgError("measure of LUKS-encrypted qcow2: not supported yet");
  }
  let virtualSize = roundUp(Number(options.size ?? 0), cs);
  const l2eSize = g.extendedL2 ? 16 : 8;
  const l2Tables = Math.ceil(virtualSize / cs / (cs / l2eSize));
  if (l2Tables * L1E_SIZE > MAX_L1_SIZE) {
    throw new QimgError("The image size is too large (try using a larger cluster size)");
  }
  let required = 0;
  if (source) {
    virtualSize = roundUp(size, cs);
    if (hasBacking) {
      // The new backing file may share nothing with the source: count it all.
      required = virtualSize;
    } else {
      // Every cluster holding source data, counted once.
      let countedEnd = 0;
      for await (const e of source.extents()) {
        if (e.zero || !e.data) continue;
        const from = Math.max(e.offset - (e.offset % cs), countedEnd);
        const to = roundUp(e.offset + e.length, cs);
        if (to > from) {
          required += to - from;
          countedEnd = to;
        }
      }
    }
  }
  if (prealloc === "full" || prealloc === "falloc") required = virtualSize;
  const fullyAllocated = fullyAllocatedSize(virtualSize, g);
  const result: MeasureResult = {
    required: fullyAllocated - virtualSize + required,
    fullyAllocated,
  };
  if (g.version >= 3 && source?.bitmaps) {
    result.bitmaps = bitmapsSize(source.bitmaps, size, cs);
  }
  return result;
}
