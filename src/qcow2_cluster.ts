/**
 * qcow2 address translation: L1 table -> L2 tables (cached) -> host
 * clusters, with extended L2 entries (32 subclusters per cluster), zero
 * clusters, compressed cluster descriptors and external data files.
 */

import type { BlockFile } from "./file.ts";
import { IoError } from "./errors.ts";
import { MetadataCache } from "./cache.ts";
import { type Qcow2Header, readPadded } from "./qcow2_header.ts";

/** What one (sub)cluster is, as QEMU's QCow2SubclusterType. */
export type SubclusterType =
  | "normal"
  | "compressed"
  | "zero-plain"
  | "zero-alloc"
  | "unallocated-plain"
  | "unallocated-alloc";

/** A run of guest bytes that one L2 table maps the same way. */
export interface ClusterRun {
  type: SubclusterType;
  /** Guest bytes from the asked offset (> 0). */
  length: number;
  /** Host offset of the first byte, for normal, zero-alloc and unallocated-alloc runs. */
  hostOffset?: number;
  /** For compressed runs (always within one cluster): where the compressed bytes are. */
  compressed?: CompressedDescriptor;
}

/** Where a compressed cluster's bytes live. */
export interface CompressedDescriptor {
  hostOffset: number;
  /** Bytes to read (whole sectors, less the offset into the first). */
  size: number;
}

/** Bit 63 of L1/L2 entries: refcount is exactly one. */
export const OFLAG_COPIED_HI = 0x80000000;
/** Bit 62 of L2 entries: compressed cluster. */
export const OFLAG_COMPRESSED_HI = 0x40000000;
/** Bit 0 of L2 entries: reads as zeroes (v3, without extended L2). */
export const OFLAG_ZERO = 1;

/**
 * An L2 table is corrupt where qemu would call qcow2_signal_corruption;
 * reads fail with EIO as in qemu, the detail says why.
 */
export class Qcow2CorruptionError extends IoError {}

/** Host offset bits 9-55 of an L1 or L2 entry (`hi`, `lo`: its two big-endian halves). */
export function entryOffset(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
}

/** C's "%#x": no prefix for zero. */
function hex(n: number): string {
  return n === 0 ? "0" : "0x" + n.toString(16);
}

/** Decodes a compressed L2 entry (bits 0-61). */
export function compressedDescriptor(
  hi: number,
  lo: number,
  clusterBits: number,
): CompressedDescriptor {
  const entry = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo >>> 0);
  const shift = BigInt(62 - (clusterBits - 8));
  const hostOffset = Number(entry & ((1n << shift) - 1n));
  const sectors = Number((entry >> shift) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1;
  return { hostOffset, size: sectors * 512 - (hostOffset & 511) };
}

/** Default bound of the L2 cache, as qemu's DEFAULT_L2_CACHE_MAX_SIZE. */
export const L2_CACHE_BYTES = 32 * 1024 * 1024;

/** Reads the active L1 table (big-endian entries as stored; past the file end reads zeroes). */
export function readL1Table(file: BlockFile, header: Qcow2Header): Promise<Uint8Array> {
  return readPadded(file, header.l1TableOffset, header.l1Size * 8);
}

/**
 * Maps guest offsets to host clusters for one image. Holds the L1 table and
 * an LRU cache of L2 tables; the same reader serves check and snapshots
 * (pass another L1 table to walk a snapshot's mapping).
 */
export class ClusterMapper {
  readonly header: Qcow2Header;
  readonly file: BlockFile;
  /** The L1 table as stored (big-endian u64 entries). */
  l1: Uint8Array;
  readonly l2Cache: MetadataCache;
  /** Whether data lives in an external data file (offset 0 + COPIED is then a real cluster). */
  readonly hasDataFile: boolean;
  #l1View: DataView;

  constructor(
    file: BlockFile,
    header: Qcow2Header,
    l1: Uint8Array,
    options: { hasDataFile?: boolean; cache?: MetadataCache; cacheBytes?: number } = {},
  ) {
    this.file = file;
    this.header = header;
    this.l1 = l1;
    this.#l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    this.hasDataFile = options.hasDataFile ?? false;
    const size = header.clusterSize;
    this.l2Cache = options.cache ?? new MetadataCache({
      load: (offset) => readPadded(file, offset, size),
      // Only the write side (qcow2_write.ts) marks tables dirty.
      writeBack: (offset, data) => file.write(offset, data),
    }, { maxBytes: options.cacheBytes ?? L2_CACHE_BYTES });
  }

  /** Replaces the L1 table (resize moved it to a larger one). */
  setL1(l1: Uint8Array): void {
    this.l1 = l1;
    this.#l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  }

  /** Guest bytes one L2 table maps. */
  get l2Span(): number {
    return this.header.clusterSize * this.header.l2Size;
  }

  /** The L2 table offset in L1 entry `index` (0: none). */
  l2Offset(index: number): number {
    if (index >= this.header.l1Size) return 0;
    return entryOffset(this.#l1View.getUint32(index * 8), this.#l1View.getUint32(index * 8 + 4));
  }

  /** The L2 table at host offset `offset`, from the cache. */
  l2Table(offset: number): Promise<Uint8Array> {
    return this.l2Cache.get(offset);
  }

  /**
   * Looks up `guestOffset` and returns the longest run, up to `maxBytes` and
   * within one L2 table, that maps the same way (contiguous on the host for
   * allocated types). Compressed runs cover at most one cluster.
   */
  async lookup(guestOffset: number, maxBytes: number): Promise<ClusterRun> {
    const h = this.header;
    const cs = h.clusterSize;
    const span = this.l2Span;
    const l1Index = Math.floor(guestOffset / span);
    const inTable = guestOffset - l1Index * span;
    const limit = Math.min(maxBytes, span - inTable);
    const l2Offset = this.l2Offset(l1Index);
    if (l2Offset === 0) return { type: "unallocated-plain", length: limit };
    if (l2Offset % cs) {
      throw new Qcow2CorruptionError(
        `L2 table offset ${hex(l2Offset)} unaligned (L1 index: ${hex(l1Index)})`,
      );
    }
    const table = await this.l2Table(l2Offset);
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const ext = h.extendedL2;
    const scSize = ext ? cs / 32 : cs;
    const esize = h.l2EntrySize;
    let l2Index = Math.floor(inTable / cs);
    let sc = ext ? Math.floor((inTable % cs) / scSize) : 0;

    // Type and host offset of (l2Index, sc).
    let hostBase = 0;
    const typeAt = (i: number, s: number): SubclusterType => {
      const hi = view.getUint32(i * esize);
      const lo = view.getUint32(i * esize + 4);
      if (hi & OFLAG_COMPRESSED_HI) {
        if (this.hasDataFile) {
          throw new Qcow2CorruptionError(
            "Compressed cluster entry found in image with external data file",
          );
        }
        hostBase = 0;
        return "compressed";
      }
      hostBase = entryOffset(hi, lo);
      if (!ext) {
        if (lo & OFLAG_ZERO) return hostBase ? "zero-alloc" : "zero-plain";
        if (hostBase === 0 && !(this.hasDataFile && (hi & OFLAG_COPIED_HI))) {
          return "unallocated-plain";
        }
        return "normal";
      }
      const bitmapHi = view.getUint32(i * esize + 8); // zero bits 32-63
      const bitmapLo = view.getUint32(i * esize + 12); // allocation bits 0-31
      const zero = (bitmapHi >>> s) & 1;
      const alloc = (bitmapLo >>> s) & 1;
      const allocated = hostBase !== 0 || (this.hasDataFile && (hi & OFLAG_COPIED_HI) !== 0);
      if (allocated) {
        if (zero && alloc) throw invalidEntry(l2Offset, i);
        return zero ? "zero-alloc" : alloc ? "normal" : "unallocated-alloc";
      }
      if (alloc) throw invalidEntry(l2Offset, i);
      return zero ? "zero-plain" : "unallocated-plain";
    };

    const first = typeAt(l2Index, sc);
    // Zero flags are a v3 feature: qemu calls one in a v2 image corruption.
    if (h.version < 3 && (first === "zero-plain" || first === "zero-alloc")) {
      throw new Qcow2CorruptionError(
        `Zero cluster entry found in pre-v3 image (L2 offset: ${hex(l2Offset)}, L2 index: ${
          hex(l2Index)
        })`,
      );
    }
    const withHost = first === "normal" || first === "zero-alloc" || first === "unallocated-alloc";
    if (withHost && hostBase % cs) {
      throw new Qcow2CorruptionError(
        `Cluster allocation offset ${hex(hostBase)} unaligned (L2 offset: ${
          hex(l2Offset)
        }, L2 index: ${hex(l2Index)})`,
      );
    }
    const startInUnit = inTable % scSize;
    if (first === "compressed") {
      const hi = view.getUint32(l2Index * esize);
      const lo = view.getUint32(l2Index * esize + 4);
      return {
        type: first,
        length: Math.min(limit, cs - (inTable % cs)),
        compressed: compressedDescriptor(hi, lo, h.clusterBits),
      };
    }
    const hostOffset = withHost ? hostBase + sc * scSize + startInUnit : undefined;
    let length = scSize - startInUnit;
    // Extend unit by unit while type (and host contiguity) hold.
    let expected = withHost ? hostBase + (sc + 1) * scSize : 0;
    const perCluster = ext ? 32 : 1;
    if (!ext) {
      // Runs of empty or of contiguous plain entries, compared without typeAt:
      // map and convert walk every entry of an image this way (start-up time).
      // Anything else stops here and goes through typeAt below.
      // Small functions of their own: the engine compiles a hot loop with
      // all of its function, and lookup's is large (convert -B: ~5 ms).
      const end = Math.min(h.l2Size, l2Index + 1 + Math.ceil((limit - length) / cs));
      const next = first === "unallocated-plain"
        ? emptyEntries(view, l2Index + 1, end)
        : first === "normal"
        ? contiguousEntries(view, l2Index + 1, end, expected, cs)
        : l2Index + 1;
      length += (next - l2Index - 1) * cs;
      if (first === "normal") expected += (next - l2Index - 1) * cs;
      l2Index = next - 1;
    }
    while (length < limit) {
      sc++;
      if (sc === perCluster) {
        sc = 0;
        l2Index++;
        if (l2Index >= h.l2Size) break;
      }
      const t = typeAt(l2Index, sc);
      if (t !== first) break;
      if (withHost) {
        if (hostBase + sc * scSize !== expected) break;
        expected += scSize;
      }
      length += scSize;
    }
    return { type: first, length: Math.min(length, limit), hostOffset };
  }
}

/** The first entry from `from` (before `end`) of a standard L2 table that is not empty. */
function emptyEntries(view: DataView, from: number, end: number): number {
  let i = from;
  while (i < end && view.getUint32(i * 8) === 0 && view.getUint32(i * 8 + 4) === 0) i++;
  return i;
}

/**
 * The first entry from `from` (before `end`) of a standard L2 table that
 * does not map plain data at `expected` onwards, a cluster each.
 */
function contiguousEntries(
  view: DataView,
  from: number,
  end: number,
  expected: number,
  cs: number,
): number {
  let i = from;
  for (; i < end; i++, expected += cs) {
    const hi = view.getUint32(i * 8);
    const lo = view.getUint32(i * 8 + 4);
    if (hi & OFLAG_COMPRESSED_HI || lo & OFLAG_ZERO || entryOffset(hi, lo) !== expected) break;
  }
  return i;
}

function invalidEntry(l2Offset: number, index: number): Qcow2CorruptionError {
  // qemu's text, two spaces and all.
  return new Qcow2CorruptionError(
    `Invalid cluster entry found  (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(index)})`,
  );
}
