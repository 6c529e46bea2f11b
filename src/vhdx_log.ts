/**
 * The VHDX log ([MS-VHDX] 2.3): a circular buffer of entries, each a
 * header, zero and data descriptors, and 4 KiB data sectors. An image
 * whose header names a log GUID may hold metadata writes not yet applied;
 * they are found as the chain of valid entries with the highest sequence
 * number and replayed in order. Also the CRC-32C every VHDX structure uses.
 */

import type { BlockFile } from "./file.ts";
import { le32, le64 } from "./bytes.ts";

const SECTOR = 4096;
const ENTRY_HEADER = 64;
const DESCRIPTOR = 32;
const SIG_ENTRY = 0x65676f6c; // "loge"
const SIG_ZERO = 0x6f72657a; // "zero"
const SIG_DESC = 0x63736564; // "desc"
const SIG_DATA = 0x61746164; // "data"
/** Largest log qimg scans (the header's field is 32 bits: 4 GiB). */
const MAX_LOG = 2 ** 32;
/** Writes past qemu's block layer limit fail (BDRV_MAX_LENGTH). */
const MAX_WRITE = 2 ** 63 - 2 ** 30;

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[i] = c >>> 0;
  }
  return t;
})();

/** Tables for eight bytes a step (slicing-by-8): table k is a byte's CRC k zero bytes later. */
const CRC_SLICES = (() => {
  const t = new Uint32Array(8 * 256);
  t.set(CRC_TABLE);
  for (let k = 1; k < 8; k++) {
    for (let i = 0; i < 256; i++) {
      const prev = t[(k - 1) * 256 + i];
      t[k * 256 + i] = (prev >>> 8) ^ CRC_TABLE[prev & 0xff];
    }
  }
  return t;
})();

/** Continues a CRC-32C register over `b[from, to)`. */
function crcRange(c: number, b: Uint8Array, from: number, to: number): number {
  const t = CRC_SLICES;
  let i = from;
  for (; i + 8 <= to; i += 8) {
    const a = c ^ (b[i] | (b[i + 1] << 8) | (b[i + 2] << 16) | (b[i + 3] << 24));
    c = t[1792 + (a & 0xff)] ^ t[1536 + ((a >>> 8) & 0xff)] ^ t[1280 + ((a >>> 16) & 0xff)] ^
      t[1024 + (a >>> 24)] ^ t[768 + b[i + 4]] ^ t[512 + b[i + 5]] ^ t[256 + b[i + 6]] ^
      t[b[i + 7]];
  }
  for (; i < to; i++) c = t[(c ^ b[i]) & 0xff] ^ (c >>> 8);
  return c;
}

/** Continues a CRC-32C over `b` (start with 0xffffffff, finish with `^ 0xffffffff`), the 4 bytes at `skip` as zeroes. */
function crcUpdate(c: number, b: Uint8Array, skip = -1): number {
  if (skip < 0 || skip >= b.length) return crcRange(c, b, 0, b.length);
  c = crcRange(c, b, 0, skip);
  const zeros = Math.min(4, b.length - skip);
  for (let i = 0; i < zeros; i++) c = CRC_TABLE[c & 0xff] ^ (c >>> 8);
  return crcRange(c, b, skip + zeros, b.length);
}

/** CRC-32C (Castagnoli) of `b`, with the 4 bytes at `skip` counted as zeroes (the checksum field). */
export function crc32c(b: Uint8Array, skip = -1): number {
  return (crcUpdate(0xffffffff, b, skip) ^ 0xffffffff) >>> 0;
}

/** Whether the little-endian checksum at `at` matches the CRC-32C of `b`. */
export function checksumValid(b: Uint8Array, at: number): boolean {
  return crc32c(b, at) === le32(b, at);
}

/** A write a log entry describes: the data sector at `logPos` in the log, or `zeroLength` zero bytes, at `offset`. */
export interface LogWrite {
  offset: number;
  /** Where the sector's middle 4084 bytes lie in the log (its first 8 and last 4 are in `edges`). */
  logPos?: number;
  edges?: Uint8Array;
  zeroLength?: number;
}

/** One valid log entry. */
interface Entry {
  sequence: bigint;
  flushedFileOffset: number;
  lastFileOffset: number;
  /** Every data sector carries the entry's sequence number. */
  intact: boolean;
  writes: LogWrite[];
}

/** Where the log lies and which GUID its entries carry. */
interface Log {
  offset: number;
  length: number;
  guid: Uint8Array;
}

function guidEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/** Reads `n` bytes of the circular log at `pos` (wrapping at its end); zeroes past the file. */
async function readLog(file: BlockFile, log: Log, pos: number, n: number): Promise<Uint8Array> {
  const out = new Uint8Array(n);
  for (let done = 0; done < n;) {
    const at = (pos + done) % log.length;
    const len = Math.min(n - done, log.length - at);
    await file.read(log.offset + at, out.subarray(done, done + len));
    done += len;
  }
  return out;
}

/**
 * The CRC register's change over one zero sector, a linear map: the image
 * of each bit. Built on first use: 128 Ki table steps are too many for the
 * start of every command that loads this module.
 */
let zeroSectorCols: Uint32Array | undefined;

/** `crcUpdate(c, 4096 zero bytes)`, fast: the entry lengths of a hostile log may run far past the file. */
function zeroSector(c: number): number {
  if (!zeroSectorCols) {
    zeroSectorCols = new Uint32Array(32);
    const zeros = new Uint8Array(SECTOR);
    for (let bit = 0; bit < 32; bit++) {
      zeroSectorCols[bit] = crcUpdate((1 << bit) >>> 0, zeros) >>> 0;
    }
  }
  let out = 0;
  for (let bit = 0; bit < 32; bit++) if ((c >>> bit) & 1) out ^= zeroSectorCols[bit];
  return out;
}

/** What reading at one log position found, and where the next read starts. */
type Found = { entry?: Entry; next: number };

/**
 * The entry at `pos`, as qemu 7.2 reads it: a header that is not one of
 * this log's (or breaks the sequence `after` + 1) moves on one sector; a
 * bad checksum moves past the sectors read; an invalid descriptor in an
 * entry with a valid header is an error for the whole log (null).
 * Descriptors and data sectors are read a sector at a time, so a hostile
 * length or count costs what the file holds, not what it claims.
 */
async function readEntry(
  file: BlockFile,
  log: Log,
  pos: number,
  after: bigint,
  fileSize: number,
): Promise<Found | null> {
  const skip = { next: (pos + SECTOR) % log.length };
  const head = await readLog(file, log, pos, ENTRY_HEADER);
  const hv = new DataView(head.buffer);
  const length = le32(head, 8);
  const count = le32(head, 24);
  const sequence = hv.getBigUint64(16, true);
  if (
    le32(head, 0) !== SIG_ENTRY || length > log.length || length % SECTOR || sequence === 0n ||
    !guidEqual(head.subarray(32, 48), log.guid) || count * DESCRIPTOR > length
  ) return skip;
  if (after > 0n && sequence !== after + 1n) return skip;
  // qemu counts the header as one descriptor slot.
  const descSectors = Math.ceil((count + 1) / (SECTOR / DESCRIPTOR));
  const total = length / SECTOR;
  let crc = 0xffffffff;
  const writes: LogWrite[] = [];
  let at = pos;
  let slot = 2; // the header fills the first two 32-byte slots
  for (let k = 0; k < descSectors; k++) {
    const sector = await readLog(file, log, at, SECTOR);
    crc = crcUpdate(crc, sector, k === 0 ? 4 : -1);
    for (; slot < SECTOR / DESCRIPTOR; slot++) {
      const i = k * (SECTOR / DESCRIPTOR) + slot - 2;
      if (i >= count) break;
      const d = sector.subarray(slot * DESCRIPTOR, (slot + 1) * DESCRIPTOR);
      const dv = new DataView(d.buffer, d.byteOffset, DESCRIPTOR);
      const offset = dv.getBigUint64(16, true);
      if (dv.getBigUint64(24, true) !== sequence || offset % BigInt(SECTOR)) return null;
      const sig = le32(d, 0);
      if (sig === SIG_ZERO) {
        if (dv.getBigUint64(8, true) % BigInt(SECTOR)) return null;
        writes.push({ offset: le64(d, 16), zeroLength: le64(d, 8) });
      } else if (sig === SIG_DESC) {
        const edges = new Uint8Array(12);
        edges.set(d.subarray(8, 16), 0);
        edges.set(d.subarray(4, 8), 8);
        writes.push({ offset: le64(d, 16), edges });
      } else {
        return null;
      }
    }
    slot = 0;
    at = (at + SECTOR) % log.length;
  }
  // The data sectors: the checksum covers them all; the k-th belongs to the k-th data descriptor.
  let intact = true;
  const data = writes.filter((w) => w.edges);
  for (let k = 0; k < total - descSectors; k++) {
    if (log.offset + at >= fileSize && k >= data.length) {
      // A zero sector past the end of the file: no read, 32 steps instead of 4096.
      crc = zeroSector(crc);
      at = (at + SECTOR) % log.length;
      continue;
    }
    const sector = await readLog(file, log, at, SECTOR);
    crc = crcUpdate(crc, sector);
    if (k < data.length) {
      const sv = new DataView(sector.buffer);
      const seq = (BigInt(sv.getUint32(4, true)) << 32n) | BigInt(sv.getUint32(4092, true));
      // qemu finds a data sector of another sequence only while replaying: the replay fails.
      if (seq !== sequence) intact = false;
      data[k].logPos = at;
    }
    at = (at + SECTOR) % log.length;
  }
  if ((crc ^ 0xffffffff) >>> 0 !== le32(head, 4)) return { next: at };
  // A data descriptor without its sector fails qemu's replay.
  if (data.some((w) => w.logPos === undefined)) intact = false;
  const entry = {
    sequence,
    flushedFileOffset: le64(head, 48),
    lastFileOffset: le64(head, 56),
    writes,
    intact,
  };
  return { entry, next: at };
}

/**
 * Finds the active sequence of a log as qemu 7.2 does: from each position,
 * a run of valid entries (the second may have any sequence number, each
 * later one the previous plus one); the run whose first entry has the
 * highest sequence number wins; the scan ends when the read position
 * wraps. Returns its entries in order (empty when there is nothing to
 * replay), or null when an entry's descriptors are invalid (qemu's EINVAL).
 */
export async function findLogEntries(file: BlockFile, log: Log): Promise<Entry[] | null> {
  if (log.length < SECTOR || log.length > MAX_LOG || log.length % SECTOR) return [];
  const fileSize = await file.size();
  // Past the end of the file the log reads as zeroes: no entry starts there.
  if (!Number.isFinite(log.offset) || log.offset >= fileSize) return [];
  let best: Entry[] = [];
  for (let pos = 0;;) {
    const tail = pos;
    // Sectors past the end of the file read as zeroes: skip them at once.
    if (log.offset + pos >= fileSize) break;
    const first = await readEntry(file, log, pos, 0n, fileSize);
    if (!first) return null;
    pos = first.next;
    if (first.entry) {
      const chain = [first.entry];
      for (let after = 0n;;) {
        const next = await readEntry(file, log, pos, after, fileSize);
        if (!next) return null;
        pos = next.next;
        if (!next.entry) break;
        chain.push(next.entry);
        after = next.entry.sequence;
      }
      if (!best.length || chain[0].sequence > best[0].sequence) best = chain;
    }
    // qemu loops forever on an entry spanning the whole log with a bad checksum: qimg stops.
    if (pos <= tail) break;
  }
  return best;
}

/**
 * Applies the entries' writes in order, growing the file to each entry's
 * last file offset (rounded up to 1 MiB, as qemu). False, with nothing
 * more written, when an entry says the file was longer than it is
 * (a truncated image).
 */
export async function replayLog(file: BlockFile, log: Log, entries: Entry[]): Promise<boolean> {
  for (const e of entries) {
    if (!(e.flushedFileOffset <= await file.size()) || !e.intact) return false;
    for (const w of e.writes) {
      if (!(w.offset + (w.zeroLength ?? SECTOR) <= MAX_WRITE)) return false;
      if (w.edges) {
        const data = await readLog(file, log, w.logPos!, SECTOR);
        data.set(w.edges.subarray(0, 8), 0);
        data.set(w.edges.subarray(8, 12), 4092);
        await file.write(w.offset, data);
      } else if (w.zeroLength) {
        // Zeroes past the end of the file are a truncate, not a write.
        const size = await file.size();
        const end = w.offset + w.zeroLength;
        const inFile = Math.max(0, Math.min(end, size) - w.offset);
        const chunk = new Uint8Array(Math.min(inFile, 1 << 20));
        for (let done = 0; done < inFile; done += chunk.length) {
          const n = Math.min(chunk.length, inFile - done);
          await file.write(w.offset + done, chunk.subarray(0, n));
        }
        if (end > size) await file.truncate(end);
      }
    }
    // qemu grows the file only to a last offset that is not 1 MiB-aligned.
    const last = e.lastFileOffset;
    if (Number.isFinite(last) && await file.size() < last && last % (1 << 20)) {
      await file.truncate(Math.ceil(last / (1 << 20)) * (1 << 20));
    }
  }
  await file.flush();
  return true;
}

/**
 * A one-sector log entry ([MS-VHDX] 2.3.1): the header, one data
 * descriptor and its data sector, writing `sector` (4 KiB) at `offset`.
 * The sector's first 8 and last 4 bytes go into the descriptor, the
 * sequence number into the data sector's first and last words.
 */
export function buildLogEntry(o: {
  guid: Uint8Array;
  sequence: bigint;
  tail: number;
  fileSize: number;
  offset: number;
  sector: Uint8Array;
}): Uint8Array {
  const entry = new Uint8Array(2 * SECTOR);
  const v = new DataView(entry.buffer);
  v.setUint32(0, SIG_ENTRY, true);
  v.setUint32(8, entry.length, true);
  v.setUint32(12, o.tail, true);
  v.setBigUint64(16, o.sequence, true);
  v.setUint32(24, 1, true);
  entry.set(o.guid, 32);
  v.setBigUint64(48, BigInt(o.fileSize), true);
  v.setBigUint64(56, BigInt(o.fileSize), true);
  const d = ENTRY_HEADER;
  v.setUint32(d, SIG_DESC, true);
  entry.set(o.sector.subarray(4092, 4096), d + 4);
  entry.set(o.sector.subarray(0, 8), d + 8);
  v.setBigUint64(d + 16, BigInt(o.offset), true);
  v.setBigUint64(d + 24, o.sequence, true);
  v.setUint32(SECTOR, SIG_DATA, true);
  v.setUint32(SECTOR + 4, Number(o.sequence >> 32n), true);
  entry.set(o.sector.subarray(8, 4092), SECTOR + 8);
  v.setUint32(SECTOR + 4092, Number(o.sequence & 0xffffffffn), true);
  v.setUint32(4, crc32c(entry), true);
  return entry;
}
