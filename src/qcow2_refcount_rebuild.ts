/**
 * Rewriting a qcow2 image's refcount structures: a new refcount width
 * (`amend -o refcount_bits=N`, as qemu's qcow2_change_refcount_order), and
 * progress across the several operations one amend may run.
 *
 * The width change reads the old refcounts in passes over the old refcount
 * table. The first passes allocate (through the old structures) a new
 * refcount block for every new-width block that holds a nonzero refcount,
 * then the new table, until a pass allocates nothing more; the last pass
 * fills and writes the new blocks. Then the new table is written, the
 * header switches to it and the new width, and the old blocks and table are
 * freed in the new structures. A crash before the switch leaves the old
 * structures valid (the new clusters leaked); after it, the new ones.
 */

import type { BlockFile } from "./file.ts";
import { QimgError } from "./errors.ts";
import { putBe64 } from "./bytes.ts";
import type { Qcow2Header } from "./qcow2_header.ts";
import { getRefcount, Qcow2Refcounts, setRefcount } from "./qcow2_refcounts.ts";

/** Progress of one operation: `done` of `total` units. */
export type OperationStatus = (done: number, total: number) => void;

/**
 * Combines the progress of `operations` successive operations into one
 * meter, as qemu's amend helper: finished operations count with their
 * size, operations still to come are projected at the average size so far.
 * Returns a status function for each operation, by name.
 */
export function amendProgress(
  status: OperationStatus,
  operations: number,
): (name: string) => OperationStatus {
  let last: string | undefined;
  let offsetCompleted = 0;
  let completed = 0;
  let lastWork = 0;
  return (name) => (done, work) => {
    if (name !== last) {
      if (last !== undefined) {
        offsetCompleted += lastWork;
        completed++;
      }
      last = name;
    }
    lastWork = work;
    const current = offsetCompleted + work;
    const ops = Math.max(operations, completed + 1);
    const projected = Math.floor(current * (ops - completed - 1) / (completed + 1));
    status(offsetCompleted + done, current + projected);
  };
}

/**
 * Changes the refcount width of the image to 2^`order` bits, rewriting the
 * refcount blocks and table; `h` takes the new table and width. The header
 * is written by `writeHeader` (the caller's, with every field of `h`).
 */
export async function changeRefcountOrder(
  file: BlockFile,
  h: Qcow2Header,
  order: number,
  writeHeader: () => Promise<void>,
  status: OperationStatus,
): Promise<void> {
  const cs = h.clusterSize;
  const oldOrder = h.refcountOrder;
  const refs = await Qcow2Refcounts.open(file, h);
  // The old table as it grows while the passes allocate (a pass reads it live).
  const oldTable = refs.table;
  const oldPer = cs * 8 / 2 ** oldOrder;
  const newPer = cs * 8 / 2 ** order;
  const newBits = 2 ** order;
  const perTableCluster = cs / 8;
  const newTable: number[] = [];
  let newTableSize = 0;
  let tableOffset = 0;
  let tableAllocated = 0;

  /**
   * One pass over the old table: `finish(index, block, empty)` for every
   * new-width block as it completes (`block` filled only when `fill`).
   */
  const walk = async (
    index: number,
    total: number,
    fill: boolean,
    finish: (i: number, block: Uint8Array, empty: boolean) => Promise<void>,
  ) => {
    let block = new Uint8Array(cs);
    let n = 0;
    let empty = true;
    let next = 0;
    /** Appends `count` refcounts of `value` to the new blocks. */
    const put = async (value: number, count = 1) => {
      while (count > 0) {
        if (n === newPer) {
          await finish(next++, block, empty);
          // An empty block is all zeroes still: only a filled one is replaced.
          if (!empty && fill) block = new Uint8Array(cs);
          n = 0;
          empty = true;
        }
        const k = Math.min(count, newPer - n);
        if (fill && value) { for (let j = n; j < n + k; j++) setRefcount(block, j, order, value); }
        if (value) empty = false;
        n += k;
        count -= k;
      }
    };
    for (let t = 0; t < oldTable.length; t++) {
      status(index * oldTable.length + t, total * oldTable.length);
      const offset = oldTable[t];
      if (!offset) {
        await put(0, oldPer);
        continue;
      }
      const old = await refs.cache.get(offset);
      for (let j = 0; j < oldPer; j++) {
        const value = getRefcount(old, j, oldOrder);
        if (newBits < 64 && value >= 2 ** newBits) {
          const at = (t * oldPer + j) * cs;
          throw new QimgError(
            `Cannot decrease refcount entry width to ${newBits} bits: Cluster at offset ` +
              `0x${at.toString(16)} has a refcount of ${value}`,
          );
        }
        await put(value);
      }
    }
    if (n > 0) await finish(next++, block, empty);
    status((index + 1) * oldTable.length, total * oldTable.length);
  };

  // Allocation passes, until one allocates nothing.
  let walkIndex = 0;
  let allocated: boolean;
  try {
    do {
      allocated = false;
      const total = Math.max(walkIndex + 2, 3);
      await walk(walkIndex++, total, false, async (i, _block, empty) => {
        if (empty) return;
        if (i >= newTableSize) {
          newTableSize = Math.ceil((i + 1) / perTableCluster) * perTableCluster;
          if (newTableSize * 8 > 8 * 1024 * 1024) {
            throw new QimgError(
              "This operation would make the refcount table grow beyond the maximum size supported by QEMU, aborting",
            );
          }
        }
        if (!newTable[i]) {
          newTable[i] = await refs.allocClusters(1);
          allocated = true;
        }
      });
      if (allocated) {
        if (tableOffset) await refs.changeRange(tableOffset, tableAllocated * 8, -1);
        tableOffset = await refs.allocClusters(newTableSize * 8 / cs);
        tableAllocated = newTableSize;
      }
    } while (allocated);
  } catch (e) {
    // Nothing switched yet: give back what the passes allocated.
    for (const offset of newTable) if (offset) await refs.change(offset / cs, -1);
    if (tableOffset) await refs.changeRange(tableOffset, tableAllocated * 8, -1);
    await refs.cache.flush();
    await file.flush();
    throw e;
  }
  await refs.cache.flush();
  await file.flush();

  // The last pass writes the new blocks.
  await walk(walkIndex, walkIndex + 1, true, async (i, block, empty) => {
    if (newTable[i]) await file.write(newTable[i], block);
    else if (!empty) throw new Error("qcow2: refcount block not allocated");
  });
  const raw = new Uint8Array(tableAllocated * 8);
  for (let i = 0; i < tableAllocated; i++) putBe64(raw, i * 8, newTable[i] ?? 0);
  await file.write(tableOffset, raw);
  await file.flush();

  const oldBlocks = oldTable.slice();
  const oldTableOffset = h.refcountTableOffset;
  const oldTableClusters = h.refcountTableClusters;
  h.refcountOrder = order;
  h.refcountTableOffset = tableOffset;
  h.refcountTableClusters = tableAllocated * 8 / cs;
  await writeHeader();

  // The old structures are now leaked clusters of the new ones.
  const now = await Qcow2Refcounts.open(file, h);
  for (const offset of oldBlocks) if (offset) await now.change(offset / cs, -1);
  await now.changeRange(oldTableOffset, oldTableClusters * cs, -1);
  await now.cache.flush();
  await file.flush();
}

/**
 * Repairs an image left dirty (lazy refcounts) before it is opened for
 * writing, as qemu does on a read-write open: a check that fixes leaks and
 * refcount errors (its lines go to `warn`, as qemu prints them), then the
 * dirty bit is cleared. Fails as qemu when errors are left.
 */
export async function repairDirty(
  file: BlockFile,
  h: Qcow2Header,
  options: { hasDataFile: boolean; warn?: (message: string) => void },
): Promise<void> {
  const { repairQcow2 } = await import("./qcow2_repair.ts");
  let result;
  try {
    result = await repairQcow2(file, h, { hasDataFile: options.hasDataFile, mode: "all" });
  } catch (e) {
    const lines = (e as { messages?: string[] }).messages ?? [];
    for (const m of lines) options.warn?.(m);
    throw new QimgError(`Could not repair dirty image: ${e instanceof Error ? e.message : e}`);
  }
  for (const m of result.messages) options.warn?.(m);
  if (result.checkErrors) throw new QimgError("Could not repair dirty image");
}
