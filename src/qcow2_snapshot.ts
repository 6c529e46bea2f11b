/**
 * qcow2 internal snapshots: the snapshot table (docs/interop/qcow2.txt,
 * "Snapshots"), validated against qemu's limits with qemu's messages, the
 * listing `snapshot -l` and `info` print, and the L1 table of a snapshot
 * for reading the guest as it was (convert -l / -s).
 */

import type { BlockFile } from "./file.ts";
import type { JsonValue } from "./output.ts";
import type { SnapshotInfo } from "./driver.ts";
import { QimgError, strerror } from "./errors.ts";
import { be16, be32, be64n } from "./bytes.ts";
import { type Qcow2Header, readPadded } from "./qcow2_header.ts";
import { sizeToStr } from "./size.ts";

/** The fixed part of a snapshot table entry. */
export const SNAPSHOT_ENTRY_SIZE = 40;
/** Extra data qemu knows: vm_state_size_large, disk_size, icount. */
const KNOWN_EXTRA = 24;
/** qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA. */
export const MAX_SNAPSHOT_EXTRA_DATA = 1024;
/** qemu's QCOW_MAX_SNAPSHOTS and QCOW_MAX_SNAPSHOTS_SIZE. */
export const MAX_SNAPSHOTS = 65536;
export const MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS;
/** qemu's QCOW_MAX_L1_SIZE (bytes). */
const MAX_L1_BYTES = 32 * 1024 * 1024;
const INT_MAX = 0x7fffffff;
const INT64_MAX = 2n ** 63n - 1n;
const NO_ICOUNT = 2n ** 64n - 1n;

/** One entry of the snapshot table. */
export interface Qcow2Snapshot extends SnapshotInfo {
  /** Host offset of the snapshot's L1 table, exactly as stored. */
  l1TableOffset: bigint;
  l1Size: number;
  /** Unique ID and name, as C strings (cut at a NUL). */
  id: string;
  name: string;
  vmStateSize: bigint;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  /** Virtual disk size at the snapshot (the image's size when not stored). */
  diskSize: bigint;
  /** Instruction count, absent when not stored (qemu's -1). */
  icount?: bigint;
  extraDataSize: number;
}

/** The parsed snapshot table. */
export interface SnapshotTable {
  snapshots: Qcow2Snapshot[];
  /** Bytes the table spans from its offset. */
  size: number;
}

/** Reads through a window, so thousands of small entries cost few reads. */
class WindowReader {
  #file: BlockFile;
  #start = 0;
  #data: Uint8Array = new Uint8Array(0);
  constructor(file: BlockFile) {
    this.#file = file;
  }
  async bytes(offset: number, length: number): Promise<Uint8Array> {
    if (offset >= this.#start && offset + length <= this.#start + this.#data.length) {
      return this.#data.subarray(offset - this.#start, offset - this.#start + length);
    }
    const span = Math.max(length, 64 * 1024);
    this.#data = await readPadded(this.#file, offset, span);
    this.#start = offset;
    return this.#data.subarray(0, length);
  }
}

/** A C string from stored bytes: up to the first NUL, UTF-8. */
function cString(b: Uint8Array): string {
  const nul = b.indexOf(0);
  return new TextDecoder().decode(nul < 0 ? b : b.subarray(0, nul));
}

/** What goes wrong reading a snapshot table, for open (thrown) and check (reported). */
export class SnapshotTableError extends QimgError {
  /** qemu's errno for the failure, as strerror text ("File too large"). */
  readonly errno: string;
  constructor(message: string, errno: string, hint?: string) {
    super(message, { hint });
    this.errno = errno;
  }
}

/**
 * Reads the snapshot table as qemu's qcow2_read_snapshots does at open:
 * entries 8-byte aligned, extra data at most 1 KiB, the whole table at most
 * 64 MiB. `nbSnapshots` and `offset` must have been validated (count at
 * most 65536, offset aligned), which bounds the loop.
 */
export async function readSnapshotTable(
  file: BlockFile,
  header: Qcow2Header,
  where: { nbSnapshots: number; offset: number } = {
    nbSnapshots: header.nbSnapshots,
    offset: header.snapshotsOffset,
  },
): Promise<SnapshotTable> {
  const snapshots: Qcow2Snapshot[] = [];
  if (where.nbSnapshots === 0) return { snapshots, size: 0 };
  if (where.nbSnapshots > MAX_SNAPSHOTS) throw new Error("snapshot count not validated");
  const reader = new WindowReader(file);
  const read = async (offset: number, length: number) => {
    try {
      return await reader.bytes(offset, length);
    } catch (e) {
      const text = strerror(e);
      throw new SnapshotTableError(`Failed to read snapshot table: ${text}`, text);
    }
  };
  const base = where.offset;
  let pos = 0; // relative to base
  for (let i = 0; i < where.nbSnapshots; i++) {
    pos = Math.ceil(pos / 8) * 8;
    const h = await read(base + pos, SNAPSHOT_ENTRY_SIZE);
    pos += SNAPSHOT_ENTRY_SIZE;
    const extraDataSize = be32(h, 36);
    const idSize = be16(h, 12);
    const nameSize = be16(h, 14);
    if (extraDataSize > MAX_SNAPSHOT_EXTRA_DATA) {
      throw new SnapshotTableError(
        `Too much extra metadata in snapshot table entry ${i}`,
        "File too large",
        "You can force-remove this extra metadata with qimg check -r all",
      );
    }
    const known = Math.min(KNOWN_EXTRA, extraDataSize);
    const extra = new Uint8Array(KNOWN_EXTRA);
    extra.set(await read(base + pos, known));
    pos += extraDataSize;
    const idBytes = await read(base + pos, idSize);
    const id = cString(idBytes);
    pos += idSize;
    const name = cString(await read(base + pos, nameSize));
    pos += nameSize;
    snapshots.push({
      l1TableOffset: be64n(h, 0),
      l1Size: be32(h, 8),
      id,
      name,
      vmStateSize: extraDataSize >= 8 ? be64n(extra, 0) : BigInt(be32(h, 32)),
      dateSec: be32(h, 16),
      dateNsec: be32(h, 20),
      vmClockNsec: be64n(h, 24),
      diskSize: extraDataSize >= 16 ? be64n(extra, 8) : BigInt(header.size),
      icount: extraDataSize >= 24 && be64n(extra, 16) !== NO_ICOUNT ? be64n(extra, 16) : undefined,
      extraDataSize,
    });
    if (pos > MAX_SNAPSHOTS_SIZE || pos > INT_MAX) {
      throw new SnapshotTableError(
        "Snapshot table is too big",
        "File too large",
        `You can force-remove all ${
          where.nbSnapshots - i
        } overhanging snapshots with qimg check -r all`,
      );
    }
  }
  return { snapshots, size: pos };
}

/** C's `%-Ns`: pads by bytes, as the terminal gets them. */
function padEnd(s: string, width: number): string {
  const n = new TextEncoder().encode(s).length;
  return n >= width ? s : s + " ".repeat(width - n);
}

function padStart(s: string, width: number): string {
  const n = new TextEncoder().encode(s).length;
  return n >= width ? s : " ".repeat(width - n) + s;
}

/** A C string copied into a buffer of `size` bytes (qemu's pstrcpy into QEMUSnapshotInfo). */
function clip(s: string, size: number): string {
  const b = new TextEncoder().encode(s);
  return b.length < size ? s : new TextDecoder().decode(b.subarray(0, size - 1));
}

function two(n: number): string {
  return String(n).padStart(2, "0");
}

/** qemu's header line of a snapshot listing (bdrv_snapshot_dump(NULL)). */
export const SNAPSHOT_LIST_HEADER =
  "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT";

/** One line of a snapshot listing, as qemu's bdrv_snapshot_dump (date in local time). */
export function snapshotLine(sn: SnapshotInfo): string {
  const d = new Date(sn.dateSec * 1000);
  const date = `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ` +
    `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
  const secs = sn.vmClockNsec / 1000000000n;
  const ms = Number((sn.vmClockNsec / 1000000n) % 1000n);
  const clock = `${two(Number(secs / 3600n))}:${two(Number((secs / 60n) % 60n))}:${
    two(Number(secs % 60n))
  }.${String(ms).padStart(3, "0")}`;
  const icount = sn.icount === undefined ? "" : BigInt.asIntN(64, sn.icount).toString();
  return padEnd(clip(sn.id, 128), 9) + " " + padEnd(clip(sn.name, 256), 16) + " " +
    padStart(sizeToStr(sn.vmStateSize), 8) + padStart(date, 20) + padStart(clock, 13) +
    padStart(icount, 11);
}

/** The "Snapshot list:" block of `snapshot -l` and `info` (empty without snapshots). */
export function renderSnapshotList(snapshots: SnapshotInfo[]): string {
  if (snapshots.length === 0) return "";
  return "Snapshot list:\n" + SNAPSHOT_LIST_HEADER + "\n" +
    snapshots.map((s) => snapshotLine(s) + "\n").join("");
}

/** qemu's SnapshotInfo objects for `info --output=json` (members in QAPI order). */
export function snapshotsToJson(snapshots: SnapshotInfo[]): JsonValue[] {
  return snapshots.map((sn) => ({
    id: clip(sn.id, 128),
    name: clip(sn.name, 256),
    "vm-state-size": BigInt.asIntN(64, sn.vmStateSize),
    "date-sec": sn.dateSec,
    "date-nsec": sn.dateNsec,
    "vm-clock-sec": sn.vmClockNsec / 1000000000n,
    "vm-clock-nsec": sn.vmClockNsec % 1000000000n,
    icount: sn.icount === undefined ? undefined : BigInt.asIntN(64, sn.icount),
  }));
}

/** Back from `snapshotsToJson` objects, for the human rendering of an info result. */
export function snapshotsFromJson(value: JsonValue | undefined): SnapshotInfo[] {
  const list = Array.isArray(value) ? value : [];
  return list.map((v) => {
    const o = v as Record<string, JsonValue>;
    return {
      id: String(o.id),
      name: String(o.name),
      vmStateSize: BigInt.asUintN(64, BigInt(o["vm-state-size"] as bigint)),
      dateSec: Number(o["date-sec"]),
      dateNsec: Number(o["date-nsec"]),
      vmClockNsec: BigInt(o["vm-clock-sec"] as bigint) * 1000000000n +
        BigInt(o["vm-clock-nsec"] as bigint),
      icount: o.icount === undefined ? undefined : BigInt.asUintN(64, BigInt(o.icount as bigint)),
    };
  });
}

/**
 * Finds a snapshot as qemu's find_snapshot_by_id_and_name: both given must
 * both match; otherwise by whichever is given. -1 when none matches.
 */
export function findSnapshot(
  snapshots: SnapshotInfo[],
  by: { id?: string; name?: string },
): number {
  return snapshots.findIndex((s) =>
    (by.id === undefined || s.id === by.id) && (by.name === undefined || s.name === by.name) &&
    (by.id !== undefined || by.name !== undefined)
  );
}

/** qemu's qcow2_validate_table for a snapshot's L1 table, with its messages. */
export function validateSnapshotL1(sn: Qcow2Snapshot, clusterSize: number): void {
  if (sn.l1Size > MAX_L1_BYTES / 8) throw new QimgError("Snapshot L1 table too large");
  if (
    INT64_MAX - BigInt(sn.l1Size) * 8n < sn.l1TableOffset || sn.l1TableOffset % BigInt(clusterSize)
  ) {
    throw new QimgError("Snapshot L1 table offset invalid");
  }
}

/**
 * The header and L1 table to map the guest as it was at `sn`, as qemu's
 * qcow2_snapshot_load_tmp: the L1 is validated and read; the virtual size
 * stays the image's. Build a ClusterMapper over the result.
 */
export async function loadSnapshotL1(
  file: BlockFile,
  header: Qcow2Header,
  sn: Qcow2Snapshot,
): Promise<{ header: Qcow2Header; l1: Uint8Array }> {
  validateSnapshotL1(sn, header.clusterSize);
  const offset = Number(sn.l1TableOffset);
  let l1: Uint8Array;
  try {
    l1 = await readPadded(file, offset, sn.l1Size * 8);
  } catch {
    throw new QimgError("Failed to read l1 table for snapshot");
  }
  return { header: { ...header, l1Size: sn.l1Size, l1TableOffset: offset }, l1 };
}
