/**
 * Creating, applying and deleting qcow2 internal snapshots
 * (docs/interop/qcow2.txt, "Snapshots"). Refcounts count paths: every L1
 * table (the active one and each snapshot's) adds one reference to each L2
 * table it points at and, through it, to each data cluster. OFLAG_COPIED
 * marks active-tree entries whose refcount is exactly 1.
 *
 * The steps follow qemu's order (so clusters are allocated where qemu
 * allocates them): create copies the L1, takes the references, then
 * rewrites the snapshot table to new clusters; delete rewrites the table,
 * then drops the references and the snapshot's L1.
 */

import type { BlockFile } from "./file.ts";
import { QimgError } from "./errors.ts";
import { be16, be32, putBe16, putBe32, putBe64 } from "./bytes.ts";
import {
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  type Qcow2Header,
  readPadded,
} from "./qcow2_header.ts";
import {
  compressedDescriptor,
  entryOffset,
  OFLAG_COMPRESSED_HI,
  OFLAG_COPIED_HI,
} from "./qcow2_cluster.ts";
import { getRefcount, Qcow2Refcounts, setRefcount } from "./qcow2_refcounts.ts";
import {
  MAX_SNAPSHOTS,
  type Qcow2Snapshot,
  readSnapshotTable,
  SNAPSHOT_ENTRY_SIZE,
  validateSnapshotL1,
} from "./qcow2_snapshot.ts";

/** Header offsets: nb_snapshots (u32) then snapshots_offset (u64). */
const HDR_NB_SNAPSHOTS = 60;
/** Header offsets: l1_size (u32) then l1_table_offset (u64). */
const HDR_L1_SIZE = 36;
/** The extra data qemu 7.2 writes: vm_state_size_large, disk_size, icount. */
const KNOWN_EXTRA = 24;
const L1_OFFSET_MASK = 0x00fffffffffffe00n;

/** A table entry to write: the parsed fields plus extra data qemu does not know. */
interface Entry {
  sn: Qcow2Snapshot;
  unknownExtra: Uint8Array;
}

/** Wall clock as seconds and nanoseconds. */
export interface WallClock {
  sec: number;
  nsec: number;
}

function wallClock(): WallClock {
  const ms = Date.now();
  return { sec: Math.floor(ms / 1000), nsec: (ms % 1000) * 1000000 };
}

/** The snapshot operations on one open image's file and (mutable) header. */
class SnapshotWriter {
  readonly file: BlockFile;
  readonly h: Qcow2Header;
  readonly cs: number;
  refs!: Qcow2Refcounts;

  constructor(file: BlockFile, header: Qcow2Header) {
    this.file = file;
    this.h = header;
    this.cs = header.clusterSize;
  }

  /** `unsupported`: the message for images with an external data file (qemu's ENOTSUP). */
  async init(unsupported: string): Promise<void> {
    if (this.h.incompatibleFeatures & INCOMPAT_DATA_FILE) throw new QimgError(unsupported);
    // qemu repairs an image left dirty (lazy refcounts) before changing it.
    if (this.h.incompatibleFeatures & INCOMPAT_DIRTY) {
      throw new QimgError("snapshots of dirty qcow2 images (lazy refcounts): not supported yet");
    }
    if (!this.file.writable) throw new QimgError("Permission denied: image opened read-only");
    this.refs = await Qcow2Refcounts.open(this.file, this.h);
    await this.#skipUsed();
  }

  /**
   * Moves the free index past the clusters in use, a refcount block at a
   * time with indexOf, where findFree would test them one by one (slow
   * while its code is cold at start-up); it then starts at the same cluster.
   */
  async #skipUsed(): Promise<void> {
    const refs = this.refs;
    const order = this.h.refcountOrder;
    if (order < 3 || order > 5) return;
    const per = this.cs * 8 / 2 ** order;
    for (;;) {
      const t = Math.floor(refs.freeIndex / per);
      const offset = refs.table[t] ?? 0;
      if (!offset) return;
      const b = await refs.cache.get(offset);
      const width = 2 ** (order - 3);
      if (b.byteOffset % width) return;
      const entries = order === 3
        ? b
        : order === 4
        ? new Uint16Array(b.buffer, b.byteOffset, per)
        : new Uint32Array(b.buffer, b.byteOffset, per);
      const k = entries.indexOf(0, refs.freeIndex - t * per);
      if (k >= 0) {
        refs.freeIndex = t * per + k;
        return;
      }
      refs.freeIndex = (t + 1) * per;
    }
  }

  /** The table with each entry's unknown extra data, re-read raw. */
  async entries(): Promise<Entry[]> {
    const table = await readSnapshotTable(this.file, this.h);
    if (table.size === 0) return [];
    const raw = await readPadded(this.file, this.h.snapshotsOffset, table.size);
    const out: Entry[] = [];
    let pos = 0;
    for (const sn of table.snapshots) {
      pos = Math.ceil(pos / 8) * 8;
      const extra = be32(raw, pos + 36);
      const idSize = be16(raw, pos + 12);
      const nameSize = be16(raw, pos + 14);
      const start = pos + SNAPSHOT_ENTRY_SIZE;
      const unknownExtra = extra > KNOWN_EXTRA
        ? raw.slice(start + KNOWN_EXTRA, start + extra)
        : new Uint8Array(0);
      out.push({ sn, unknownExtra });
      pos = start + extra + idSize + nameSize;
    }
    return out;
  }

  /**
   * Adds `addend` references to the tree under an L1 table (0: only
   * recompute) and sets OFLAG_COPIED where a refcount is 1, as qemu's
   * qcow2_update_snapshot_refcount. Changed L2 tables are written back;
   * the caller writes the L1 (`l1` is updated in place). Entries are
   * handled in table order, but a refcount block is looked up once for a
   * run of entries it covers (no await per cluster: start-up time).
   */
  async updateTree(l1: Uint8Array, addend: number): Promise<void> {
    const cs = this.cs;
    const esize = this.h.l2EntrySize;
    const rc = new BlockCursor(this.refs, this.h);
    const v1 = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    for (let i = 0; i < l1.length / 8; i++) {
      const l1e = v1.getBigUint64(i * 8);
      const l2Offset = Number(l1e & L1_OFFSET_MASK);
      if (!l2Offset) continue;
      const l2 = await readPadded(this.file, l2Offset, cs);
      const v2 = new DataView(l2.buffer, l2.byteOffset, l2.byteLength);
      let modified = false;
      const entries = cs / esize;
      for (let j = 0; j < entries; j++) {
        // Runs of entries in the held block go without a call per entry.
        const run = rc.run(v2, esize, j, entries, addend, this.#freed);
        if (run.modified) modified = true;
        j = run.stop;
        if (j >= entries) break;
        const hi = v2.getUint32(j * esize);
        const lo = v2.getUint32(j * esize + 4);
        if (hi & OFLAG_COMPRESSED_HI) {
          if (addend) {
            await rc.release();
            const d = compressedDescriptor(hi, lo, this.h.clusterBits);
            await this.changeRange(d.hostOffset & ~511, d.size + (d.hostOffset & 511), addend);
          }
          continue;
        }
        const offset = entryOffset(hi, lo);
        if (!offset) continue;
        let rcount = this.#changeAndGet(rc, offset / cs, addend);
        if (typeof rcount !== "number") rcount = await rcount;
        const want = rcount === 1 ? (hi | OFLAG_COPIED_HI) >>> 0 : (hi & ~OFLAG_COPIED_HI) >>> 0;
        if (want !== hi) {
          v2.setUint32(j * esize, want);
          modified = true;
        }
      }
      await rc.release();
      if (modified) {
        // A lowered refcount is on disk before COPIED is set on its strength.
        if (addend < 0) await this.refs.cache.flush();
        await this.file.write(l2Offset, l2);
      }
      const n = await this.#changeAndGet(rc, l2Offset / cs, addend);
      const hi = v1.getUint32(i * 8);
      v1.setUint32(i * 8, n === 1 ? (hi | OFLAG_COPIED_HI) >>> 0 : (hi & ~OFLAG_COPIED_HI) >>> 0);
    }
    await rc.release();
  }

  /**
   * change(index, addend) then the new refcount, in the block `rc` holds
   * when it covers `index` (awaiting only to switch blocks); clusters
   * without a block take the general path, which may allocate one.
   */
  #changeAndGet(rc: BlockCursor, index: number, addend: number): number | Promise<number> {
    const done = rc.change(index, addend);
    if (done === undefined) return this.#changeSlow(rc, index, addend);
    if (typeof done !== "number") return done.then(() => this.#changeAndGet(rc, index, addend));
    if (done === 0 && addend < 0) this.#freed.push(index);
    return done;
  }

  async #changeSlow(rc: BlockCursor, index: number, addend: number): Promise<number> {
    await rc.release();
    if (addend) await this.change(index, addend);
    return await this.refs.get(index);
  }

  async readActiveL1(): Promise<Uint8Array> {
    return await readPadded(this.file, this.h.l1TableOffset, this.h.l1Size * 8);
  }

  /**
   * Moves the active L1 table to new clusters holding `entries` entries (the
   * old ones, then zeroes). The new table is on disk before the header
   * points at it, and the old clusters are freed after: a kill leaks at worst.
   * The old clusters are not punched (qemu discards only snapshot clusters).
   */
  async growActiveL1(entries: number): Promise<void> {
    const h = this.h;
    const l1 = new Uint8Array(entries * 8);
    l1.set(await this.readActiveL1());
    const offset = await this.refs.allocClusters(Math.ceil(entries * 8 / this.cs));
    await this.refs.cache.flush();
    await this.file.write(offset, l1);
    await this.file.flush();
    const hdr = new Uint8Array(12);
    putBe32(hdr, 0, entries);
    putBe64(hdr, 4, offset);
    await this.file.write(HDR_L1_SIZE, hdr);
    await this.file.flush();
    const oldOffset = h.l1TableOffset;
    const oldSize = h.l1Size;
    h.l1Size = entries;
    h.l1TableOffset = offset;
    if (oldSize) await this.refs.changeRange(oldOffset, oldSize * 8, -1);
  }

  async writeActiveL1(l1: Uint8Array): Promise<void> {
    await this.refs.cache.flush();
    await this.file.write(this.h.l1TableOffset, l1);
  }

  /**
   * Changes a refcount; a cluster that becomes free is discarded (punched),
   * as qemu's pass-discard-snapshot does by default.
   */
  async change(index: number, delta: number): Promise<void> {
    await this.refs.change(index, delta);
    if (delta < 0 && await this.refs.get(index) === 0) this.#freed.push(index);
  }

  /** Clusters freed so far, punched together at the end (qemu queues its discards). */
  #freed: number[] = [];

  /** Punches the freed clusters, adjacent ones as one range (small clusters fill whole blocks). */
  async #discard(): Promise<void> {
    const free: number[] = [];
    // A refcount block at a time (BlockCursor), not an await per cluster.
    const rc = new BlockCursor(this.refs, this.h);
    for (const c of new Set(this.#freed)) {
      let n = Number.isInteger(c) ? rc.change(c, 0) : undefined;
      if (n !== undefined && typeof n !== "number") n = (await n, rc.change(c, 0));
      if (typeof n !== "number") n = await this.refs.get(c);
      if (n === 0) free.push(c);
    }
    this.#freed = [];
    free.sort((a, b) => a - b);
    for (let i = 0; i < free.length;) {
      let j = i + 1;
      while (j < free.length && free[j] === free[j - 1] + 1) j++;
      await this.file.discard?.(free[i] * this.cs, (j - i) * this.cs);
      i = j;
    }
  }

  async changeRange(offset: number, length: number, delta: number): Promise<void> {
    const last = Math.floor((offset + length - 1) / this.cs);
    for (let c = Math.floor(offset / this.cs); c <= last; c++) await this.change(c, delta);
  }

  /** Frees the clusters bytes [offset, offset + length) span. */
  async free(offset: number, length: number): Promise<void> {
    if (length > 0) await this.changeRange(offset, length, -1);
  }

  /** Writes the table to new clusters, points the header at it, frees the old one. */
  async writeTable(entries: Entry[]): Promise<void> {
    const parts: Uint8Array[] = [];
    let size = 0;
    const enc = new TextEncoder();
    for (const { sn, unknownExtra } of entries) {
      const id = enc.encode(sn.id);
      const name = enc.encode(sn.name);
      const extraSize = KNOWN_EXTRA + unknownExtra.length;
      const len = SNAPSHOT_ENTRY_SIZE + extraSize + id.length + name.length;
      const b = new Uint8Array(Math.ceil(len / 8) * 8);
      putBe64(b, 0, sn.l1TableOffset);
      putBe32(b, 8, sn.l1Size);
      putBe16(b, 12, id.length);
      putBe16(b, 14, name.length);
      putBe32(b, 16, sn.dateSec);
      putBe32(b, 20, sn.dateNsec);
      putBe64(b, 24, sn.vmClockNsec);
      putBe32(b, 32, Number(sn.vmStateSize & 0xffffffffn));
      putBe32(b, 36, extraSize);
      putBe64(b, 40, sn.vmStateSize);
      putBe64(b, 48, sn.diskSize);
      putBe64(b, 56, sn.icount ?? 2n ** 64n - 1n);
      b.set(unknownExtra, 64);
      b.set(id, 64 + unknownExtra.length);
      b.set(name, 64 + unknownExtra.length + id.length);
      // The last entry is not padded on disk (the table ends where it ends).
      parts.push(b);
      size += b.length;
    }
    if (parts.length) size -= parts[parts.length - 1].length - lastLength(entries);
    const oldOffset = this.h.snapshotsOffset;
    const oldSize = (await readSnapshotTable(this.file, this.h)).size;
    let offset = 0;
    if (size > 0) {
      offset = await this.refs.allocClusters(Math.ceil(size / this.cs));
      const raw = new Uint8Array(size);
      let pos = 0;
      for (const p of parts) {
        raw.set(p.subarray(0, Math.min(p.length, size - pos)), pos);
        pos += p.length;
      }
      await this.refs.cache.flush();
      await this.file.write(offset, raw);
    }
    const hdr = new Uint8Array(12);
    putBe32(hdr, 0, entries.length);
    putBe64(hdr, 4, offset);
    await this.file.write(HDR_NB_SNAPSHOTS, hdr);
    this.h.nbSnapshots = entries.length;
    this.h.snapshotsOffset = offset;
    if (oldOffset && oldSize) await this.free(oldOffset, oldSize);
  }

  async finish(): Promise<void> {
    await this.refs.cache.flush();
    await this.#discard();
    await this.file.flush();
  }
}

/**
 * One refcount block held for a run of changes (Qcow2Refcounts.change's
 * rules, without an await per cluster). Held changes reach the cache by
 * release(), which must come before anything else touches the refcounts.
 */
class BlockCursor {
  readonly #refs: Qcow2Refcounts;
  readonly #cs: number;
  readonly #order: number;
  readonly #perBlock: number;
  #t = -1;
  #offset = 0;
  #block: Uint8Array | undefined;
  #dirty = false;

  constructor(refs: Qcow2Refcounts, h: Qcow2Header) {
    this.#refs = refs;
    this.#cs = h.clusterSize;
    this.#order = h.refcountOrder;
    this.#perBlock = h.clusterSize * 8 / 2 ** h.refcountOrder;
  }

  /**
   * Adds `delta` to cluster `index`'s refcount and returns the new value;
   * a promise when the block must be loaded first (then call again);
   * undefined when no block covers the cluster.
   */
  change(index: number, delta: number): number | Promise<void> | undefined {
    const t = Math.floor(index / this.#perBlock);
    if (t !== this.#t) {
      const offset = this.#refs.table[t] ?? 0;
      if (!offset) return undefined;
      return this.#load(t, offset);
    }
    const b = this.#block!;
    const i = index % this.#perBlock;
    const old = getRefcount(b, i, this.#order);
    if (!delta) return old;
    const value = old + delta;
    if (value < 0 || value > this.#refs.max) {
      return this.release().then(() => {
        throw new QimgError(
          value < 0
            ? "qcow2: refcount underflow"
            : "qcow2: refcount overflow (Numerical result out of range)",
        );
      });
    }
    setRefcount(b, i, this.#order, value);
    this.#dirty = true;
    if (value === 0) {
      const refs = this.#refs;
      if (index < refs.freeIndex) refs.freeIndex = index;
      if (refs.freeByte && Math.floor(refs.freeByte / this.#cs) === index) refs.freeByte = 0;
    }
    return value;
  }

  /**
   * Handles entries `from`.. of an L2 table (`v2`) as updateTree does while
   * they are plain, aligned and in the held block; returns where it stopped
   * (the entry that needs the general path) and whether it changed a flag.
   */
  run(
    v2: DataView,
    esize: number,
    from: number,
    n: number,
    delta: number,
    freed: number[],
  ): { stop: number; modified: boolean } {
    const b = this.#block;
    let modified = false;
    if (!b) return { stop: from, modified };
    const cs = this.#cs;
    const per = this.#perBlock;
    const order = this.#order;
    const max = this.#refs.max;
    const first = this.#t * per;
    let j = from;
    for (; j < n; j++) {
      const hi = v2.getUint32(j * esize);
      if (hi & OFLAG_COMPRESSED_HI) {
        if (delta) break;
        continue;
      }
      const lo = v2.getUint32(j * esize + 4);
      const offset = (hi & 0x00ffffff) * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
      if (!offset) continue;
      const i = offset / cs - first;
      if (!(i >= 0 && i < per && Number.isInteger(i))) break;
      let value = order === 4 ? (b[2 * i] << 8) | b[2 * i + 1] : getRefcount(b, i, order);
      if (delta) {
        value += delta;
        if (value < 0 || value > max) break;
        if (order === 4) {
          b[2 * i] = value >> 8;
          b[2 * i + 1] = value & 0xff;
        } else setRefcount(b, i, order, value);
        this.#dirty = true;
        if (value === 0) {
          const index = first + i;
          if (delta < 0) freed.push(index);
          const refs = this.#refs;
          if (index < refs.freeIndex) refs.freeIndex = index;
          if (refs.freeByte && Math.floor(refs.freeByte / cs) === index) refs.freeByte = 0;
        }
      }
      const want = value === 1 ? (hi | OFLAG_COPIED_HI) >>> 0 : (hi & ~OFLAG_COPIED_HI) >>> 0;
      if (want !== hi) {
        v2.setUint32(j * esize, want);
        modified = true;
      }
    }
    return { stop: j, modified };
  }

  async #load(t: number, offset: number): Promise<void> {
    await this.release();
    this.#block = await this.#refs.cache.get(offset);
    this.#t = t;
    this.#offset = offset;
  }

  /** Hands the held block's changes to the cache and lets it go. */
  async release(): Promise<void> {
    const b = this.#block;
    const offset = this.#offset;
    const dirty = this.#dirty;
    this.#t = -1;
    this.#block = undefined;
    this.#dirty = false;
    if (b && dirty) await this.#refs.cache.put(offset, b, { dirty: true });
  }
}

function lastLength(entries: Entry[]): number {
  const { sn, unknownExtra } = entries[entries.length - 1];
  const enc = new TextEncoder();
  return SNAPSHOT_ENTRY_SIZE + KNOWN_EXTRA + unknownExtra.length + enc.encode(sn.id).length +
    enc.encode(sn.name).length;
}

/** qemu's find_snapshot_by_id_or_name: an ID match first, then a name match. */
function findByIdOrName(list: Qcow2Snapshot[], s: string): number {
  const byId = list.findIndex((sn) => sn.id === s);
  return byId >= 0 ? byId : list.findIndex((sn) => sn.name === s);
}

/**
 * `snapshot -c NAME`: a snapshot of the active L1 with the next free
 * numeric ID. Returns the new table.
 */
export async function createSnapshot(
  file: BlockFile,
  header: Qcow2Header,
  name: string,
  now: WallClock = wallClock(),
): Promise<Qcow2Snapshot[]> {
  const w = new SnapshotWriter(file, header);
  await w.init("-95 (Operation not supported)");
  const entries = await w.entries();
  if (entries.length >= MAX_SNAPSHOTS) throw new QimgError("-27 (File too large)");
  // qemu's find_new_snapshot_id: one past the largest numeric ID.
  let max = 0;
  for (const { sn } of entries) {
    const n = Number.parseInt(sn.id, 10);
    if (Number.isFinite(n) && n > max) max = n;
  }
  const id = String(max + 1);
  const l1 = await w.readActiveL1();
  const l1Size = header.l1Size;
  const l1Offset = l1Size
    ? await w.refs.allocClusters(Math.ceil(l1Size * 8 / header.clusterSize))
    : 0;
  if (l1Size) {
    await w.refs.cache.flush();
    await file.write(l1Offset, l1);
  }
  try {
    await w.updateTree(l1, 1);
  } catch (e) {
    // qemu reports a refcount that cannot grow as EINVAL.
    if (e instanceof QimgError && e.message.includes("refcount overflow")) {
      await w.finish();
      throw new QimgError("-22 (Invalid argument)");
    }
    throw e;
  }
  // The active L1 without COPIED flags before the refcounts of 2 that clear
  // them: a kill between leaves refcount 1 without the flag (harmless), never
  // the flag on a cluster the snapshot shares.
  await file.write(header.l1TableOffset, l1);
  await w.refs.cache.flush();
  const sn: Qcow2Snapshot = {
    l1TableOffset: BigInt(l1Offset),
    l1Size,
    id,
    name,
    vmStateSize: 0n,
    dateSec: now.sec,
    dateNsec: now.nsec,
    vmClockNsec: 0n,
    diskSize: BigInt(header.size),
    // qemu-img 7.2 stores an instruction count of 0.
    icount: 0n,
    extraDataSize: KNOWN_EXTRA,
  };
  entries.push({ sn, unknownExtra: new Uint8Array(0) });
  await w.writeTable(entries);
  await w.finish();
  return entries.map((e) => e.sn);
}

/**
 * `snapshot -a NAME`: the active L1 becomes a copy of the snapshot's
 * (found by ID, then by name); the old active tree loses its references.
 */
export async function applySnapshot(
  file: BlockFile,
  header: Qcow2Header,
  name: string,
  options: { resize?: (size: number) => Promise<void> } = {},
): Promise<void> {
  let w = new SnapshotWriter(file, header);
  await w.init("Failed to load snapshot: Operation not supported");
  const list = (await w.entries()).map((e) => e.sn);
  const i = findByIdOrName(list, name);
  if (i < 0) throw new QimgError("Failed to load snapshot: No such file or directory");
  const sn = list[i];
  validateSnapshotL1(sn, header.clusterSize);
  if (sn.diskSize !== BigInt(header.size)) {
    if (!options.resize) {
      throw new QimgError("applying a snapshot of another disk size: not supported yet");
    }
    // The active layer takes the snapshot's size first (a shrink frees what
    // lies past it), as qemu's snapshot_goto; refcounts are read anew after.
    await options.resize(Number(sn.diskSize));
    w = new SnapshotWriter(file, header);
    await w.init("Failed to load snapshot: Operation not supported");
  }
  // A snapshot taken before a shrink keeps its longer L1 table (a shrink
  // keeps l1_size): the active table grows to exactly its length first.
  if (sn.l1Size > header.l1Size) await w.growActiveL1(sn.l1Size);
  const snL1 = new Uint8Array(header.l1Size * 8);
  snL1.set(await readPadded(file, Number(sn.l1TableOffset), sn.l1Size * 8));
  // The snapshot's own L1 gets its COPIED flags recomputed (it carries the
  // active table's from when it was taken) and is written back when they
  // changed, as qemu does; nothing reads flags there, so order is free.
  const own = snL1.slice(0, sn.l1Size * 8);
  await w.updateTree(own, 1);
  if (own.some((b, k) => b !== snL1[k])) {
    await w.refs.cache.flush();
    await file.write(Number(sn.l1TableOffset), own);
  }
  const old = await w.readActiveL1();
  // Without COPIED flags until the refcounts settle: a kill in between then
  // leaves leaks and flags that lag (harmless), never a COPIED entry whose
  // cluster a snapshot shares (the snapshot's table may carry the flags).
  const unflagged = snL1.slice();
  const v = new DataView(unflagged.buffer);
  for (let i = 0; i < unflagged.length; i += 8) v.setUint32(i, v.getUint32(i) & 0x7fffffff);
  await w.writeActiveL1(unflagged);
  await w.updateTree(old, -1);
  await w.updateTree(snL1, 0);
  await w.writeActiveL1(snL1);
  await w.finish();
}

/** `snapshot -d NAME`: removes the first snapshot with that name. */
export async function deleteSnapshot(
  file: BlockFile,
  header: Qcow2Header,
  name: string,
): Promise<Qcow2Snapshot[]> {
  const w = new SnapshotWriter(file, header);
  await w.init("snapshot not found");
  const entries = await w.entries();
  const i = entries.findIndex((e) => e.sn.name === name);
  if (i < 0) throw new QimgError("snapshot not found");
  const [{ sn }] = entries.splice(i, 1);
  await w.writeTable(entries);
  const l1 = await readPadded(file, Number(sn.l1TableOffset), sn.l1Size * 8);
  await w.updateTree(l1, -1);
  await w.free(Number(sn.l1TableOffset), sn.l1Size * 8);
  const active = await w.readActiveL1();
  await w.updateTree(active, 0);
  await w.writeActiveL1(active);
  await w.finish();
  return entries.map((e) => e.sn);
}

/**
 * Rewrites the snapshot table with every entry's v3 extra data (64-bit VM
 * state size, disk size, instruction count), as an upgrade to compat=1.1
 * needs when a snapshot lacks it: the new table goes to new clusters, the
 * header then points at it, the old one is freed (a kill leaks at worst).
 */
export async function rewriteSnapshotTable(file: BlockFile, header: Qcow2Header): Promise<void> {
  const w = new SnapshotWriter(file, header);
  await w.init("-95 (Operation not supported)");
  await w.writeTable(await w.entries());
  await w.finish();
}
