/**
 * qcow2 `check -r`: the writes behind the check walk's repairs. The walk
 * (qcow2_refcount.ts) decides what to fix and prints qemu's lines; this
 * sets refcounts through the existing refcount blocks, rewrites
 * OFLAG_COPIED in L1 and L2 entries, and discards clusters whose refcount
 * drops to 0 as qemu does.
 */

import type { BlockFile } from "./file.ts";
import type { Qcow2Header } from "./qcow2_header.ts";
import { Qcow2Refcounts } from "./qcow2_write.ts";

/** What `check -r` may fix: leaks only, or also corruptions. */
export type RepairMode = "leaks" | "all";

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
