/**
 * qcow2 `check -r`: the writes behind the check walk's repairs. The walk
 * (qcow2_refcount.ts) decides what to fix and prints qemu's lines; this
 * sets refcounts through the existing refcount blocks, rewrites
 * OFLAG_COPIED in L1 and L2 entries, and discards clusters whose refcount
 * drops to 0 as qemu does.
 */

import type { BlockFile } from "./file.ts";
import type { CheckResult } from "./driver.ts";
import { CheckFailedError, checkQcow2 } from "./qcow2_refcount.ts";
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY, type Qcow2Header } from "./qcow2_header.ts";
import { putBe32, putBe64 } from "./bytes.ts";
import { Qcow2Refcounts, setRefcount } from "./qcow2_refcounts.ts";

/** The in-memory refcounts the check computed (its IMRT). */
export interface ComputedRefcounts {
  counts: { [i: number]: number; length: number };
  /** Clusters covered (the image's end while rebuilding). */
  length: number;
  grow(length: number): void;
}

/** What `check -r` may fix: leaks only, or also corruptions. */
export type RepairMode = "leaks" | "all";

/**
 * `check -r` of a qcow2 image: the check walk with repairs. As qemu, a
 * repair without errors left clears the corrupt bit, and the dirty bit
 * (lazy refcounts) goes once the check ran, as qemu clears it on close.
 */
export async function repairQcow2(
  file: BlockFile,
  header: Qcow2Header,
  options: { hasDataFile: boolean; mode: RepairMode },
): Promise<CheckResult> {
  const repair = new Qcow2Repairer(file, header, options.mode);
  let result: CheckResult;
  try {
    result = await checkQcow2(file, header, { hasDataFile: options.hasDataFile, repair });
  } catch (e) {
    if (e instanceof CheckFailedError) await repair.clearBits(INCOMPAT_DIRTY);
    throw e;
  }
  const ok = !result.corruptions && !result.checkErrors;
  await repair.clearBits(ok ? INCOMPAT_DIRTY | INCOMPAT_CORRUPT : INCOMPAT_DIRTY);
  return result;
}

/** The write side of a repairing check. */
export class Qcow2Repairer {
  readonly mode: RepairMode;
  readonly #file: BlockFile;
  readonly #header: Qcow2Header;
  #refs?: Qcow2Refcounts;

  constructor(file: BlockFile, header: Qcow2Header, mode: RepairMode) {
    this.#file = file;
    this.#header = header;
    this.mode = mode;
  }

  /** Sets the refcount of cluster `index` from `from` to `to` (its block exists: `from` > 0). */
  async setRefcount(index: number, from: number, to: number): Promise<void> {
    this.#refs ??= await Qcow2Refcounts.open(this.#file, this.#header);
    await this.#refs.change(index, to - from);
    if (to === 0) {
      // qemu discards freed clusters; where no hole can be punched it leaves the bytes.
      const cs = this.#header.clusterSize;
      await this.#file.discard?.(index * cs, cs);
    }
  }

  /**
   * Writes fresh refcount structures holding `imrt` (qemu's
   * rebuild_refcount_structure): refblocks first, each in the first free
   * cluster of the computed refcounts, then the reftable; the header then
   * points at the new table. The old structures are left for the caller's
   * second pass to free as leaks. Returns the new table's place.
   */
  async rebuild(imrt: ComputedRefcounts): Promise<{ offset: number; clusters: number }> {
    const h = this.#header;
    const cs = h.clusterSize;
    const order = h.refcountOrder;
    const per = cs * 8 / 2 ** order;
    const table: number[] = [];
    const used = (c: number) => c < imrt.length && imrt.counts[c] !== 0;
    /** First-fit in the computed refcounts, growing the image at its end. */
    const alloc = (n: number, from: number): number => {
      let c = from;
      let run = 0;
      for (; c < imrt.length && run < n; c++) run = used(c) ? 0 : run + 1;
      if (run < n) imrt.grow(c + n - run);
      const start = c - run;
      for (let i = 0; i < n; i++) imrt.counts[start + i] = 1;
      return start;
    };
    /** Writes the refblocks covering used clusters in [first, end); true when the table grew. */
    const writeBlocks = async (first: number, end: number): Promise<boolean> => {
      let grown = false;
      let free = 0;
      for (let c = first; c < end; c++) {
        if (!used(c)) continue;
        const t = Math.floor(c / per);
        const start = t * per;
        if (!table[t]) {
          // Never inside a refblock already written.
          free = Math.max(free, start);
          const block = alloc(1, free);
          free = block;
          if (block >= end) end = block + 1;
          if (table.length <= t) {
            const entries = Math.ceil((t + 1) * 8 / cs) * cs / 8;
            while (table.length < entries) table.push(0);
            grown = true;
          }
          table[t] = block * cs;
        }
        const data = new Uint8Array(cs);
        for (let i = 0; i < per && start + i < imrt.length; i++) {
          const v = imrt.counts[start + i];
          if (v) setRefcount(data, i, order, v);
        }
        await this.#file.write(table[t], data);
        c = start + per - 1;
      }
      return grown;
    };
    await writeBlocks(0, imrt.length);
    let offset = 0;
    let clusters = 0;
    let grown = true;
    while (grown) {
      clusters = Math.ceil(table.length * 8 / cs);
      offset = alloc(clusters, 0) * cs;
      grown = await writeBlocks(offset / cs, offset / cs + clusters);
    }
    const raw = new Uint8Array(table.length * 8);
    table.forEach((e, i) => putBe64(raw, i * 8, e));
    await this.#file.write(offset, raw);
    const hdr = new Uint8Array(12);
    putBe64(hdr, 0, offset);
    putBe32(hdr, 8, clusters);
    await this.#file.write(48, hdr);
    await this.#file.flush();
    h.refcountTableOffset = offset;
    h.refcountTableClusters = clusters;
    this.#refs = undefined;
    return { offset, clusters };
  }

  /** Clears incompatible-feature bits in the header (dirty, corrupt). */
  async clearBits(bits: bigint): Promise<void> {
    const h = this.#header;
    if (!(h.incompatibleFeatures & bits)) return;
    h.incompatibleFeatures &= ~bits;
    const b = new Uint8Array(8);
    putBe64(b, 0, h.incompatibleFeatures);
    await this.#file.write(72, b);
    await this.#file.flush();
  }

  /** Writes the changed refcount blocks, so that re-reading them sees the fixes. */
  async flush(): Promise<void> {
    await this.#refs?.cache.flush();
  }

  /** Rewrites L1 entry `i` of the table at `l1Offset`. */
  async writeL1Entry(l1Offset: bigint, i: number, entry: bigint): Promise<void> {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, entry);
    await this.#file.write(Number(l1Offset) + i * 8, b);
  }

  /** Rewrites a whole L2 table. */
  async writeL2(offset: bigint, table: Uint8Array): Promise<void> {
    await this.#file.write(Number(offset), table);
  }
}
