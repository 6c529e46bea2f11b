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

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[i] = c >>> 0;
  }
  return t;
})();

/** CRC-32C (Castagnoli) of `b`, with the 4 bytes at `skip` counted as zeroes (the checksum field). */
export function crc32c(b: Uint8Array, skip = -1): number {
  let c = 0xffffffff;
  for (let i = 0; i < b.length; i++) {
    const x = skip >= 0 && i >= skip && i < skip + 4 ? 0 : b[i];
    c = CRC_TABLE[(c ^ x) & 0xff] ^ (c >>> 8);
  }
  return (c ^ 0xffffffff) >>> 0;
}

/** Whether the little-endian checksum at `at` matches the CRC-32C of `b`. */
export function checksumValid(b: Uint8Array, at: number): boolean {
  return crc32c(b, at) === le32(b, at);
}

/** A write a log entry describes: `data` at `offset`, or `zeroLength` zero bytes there. */
export interface LogWrite {
  offset: number;
  data?: Uint8Array;
  zeroLength?: number;
}

/** One valid log entry. */
interface Entry {
  sequence: bigint;
  length: number;
  flushedFileOffset: number;
  lastFileOffset: number;
  /** Every data sector carries the entry's sequence number. */
  intact: boolean;
  writes: LogWrite[];
}

function guidEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/** Reads `n` bytes of the circular log at `pos` (wrapping at its end); zeroes past the file. */
async function readLog(
  file: BlockFile,
  log: { offset: number; length: number },
  pos: number,
  n: number,
): Promise<Uint8Array> {
  const out = new Uint8Array(n);
  for (let done = 0; done < n;) {
    const at = (pos + done) % log.length;
    const len = Math.min(n - done, log.length - at);
    await file.read(log.offset + at, out.subarray(done, done + len));
    done += len;
  }
  return out;
}

/** Parses and validates the entry at `pos`, or undefined when it is not a valid entry of this log. */
async function readEntry(
  file: BlockFile,
  log: { offset: number; length: number; guid: Uint8Array },
  pos: number,
): Promise<Entry | undefined> {
  const head = await readLog(file, log, pos, SECTOR);
  if (le32(head, 0) !== SIG_ENTRY) return undefined;
  const length = le32(head, 8);
  const count = le32(head, 24);
  if (length < SECTOR || length % SECTOR || length > log.length) return undefined;
  if (!guidEqual(head.subarray(32, 48), log.guid)) return undefined;
  const descSectors = Math.ceil((ENTRY_HEADER + count * DESCRIPTOR) / SECTOR);
  if (descSectors * SECTOR > length) return undefined;
  const raw = await readLog(file, log, pos, length);
  if (!checksumValid(raw, 4)) return undefined;
  const sequence = new DataView(raw.buffer).getBigUint64(16, true);
  if (sequence === 0n) return undefined;
  const flushedFileOffset = le64(raw, 48);
  const lastFileOffset = le64(raw, 56);
  const writes: LogWrite[] = [];
  let dataSector = descSectors;
  let intact = true;
  for (let i = 0; i < count; i++) {
    const d = raw.subarray(ENTRY_HEADER + i * DESCRIPTOR, ENTRY_HEADER + (i + 1) * DESCRIPTOR);
    const dv = new DataView(d.buffer, d.byteOffset, DESCRIPTOR);
    if (dv.getBigUint64(24, true) !== sequence || le64(d, 16) % SECTOR) return undefined;
    const sig = le32(d, 0);
    if (sig === SIG_ZERO) {
      if (le64(d, 8) % SECTOR) return undefined;
      writes.push({ offset: le64(d, 16), zeroLength: le64(d, 8) });
    } else if (sig === SIG_DESC) {
      if ((dataSector + 1) * SECTOR > length) return undefined;
      const s = raw.subarray(dataSector * SECTOR, (dataSector + 1) * SECTOR);
      const sv = new DataView(s.buffer, s.byteOffset, SECTOR);
      const seq = (BigInt(sv.getUint32(4, true)) << 32n) | BigInt(sv.getUint32(4092, true));
      // qemu finds a data sector of another sequence only while replaying: the replay fails.
      if (seq !== sequence) intact = false;
      // The sector's first 8 and last 4 bytes live in the descriptor (they hold the sequence).
      const data = new Uint8Array(SECTOR);
      data.set(d.subarray(8, 16), 0);
      data.set(s.subarray(8, 4092), 8);
      data.set(d.subarray(4, 8), 4092);
      writes.push({ offset: le64(d, 16), data });
      dataSector++;
    } else {
      return undefined;
    }
  }
  return { sequence, length, flushedFileOffset, lastFileOffset, writes, intact };
}

/**
 * Finds the active sequence of a log as qemu 7.2 does: from each sector,
 * a run of valid entries (the second may have any sequence number, each
 * later one the previous plus one); the run whose first entry has the
 * highest sequence number wins. Returns its entries in order (empty when
 * there is nothing to replay).
 */
export async function findLogEntries(
  file: BlockFile,
  log: { offset: number; length: number; guid: Uint8Array },
): Promise<Entry[]> {
  if (log.length < SECTOR || log.length > MAX_LOG || log.length % SECTOR) return [];
  // Past the end of the file the log reads as zeroes: no entry starts there.
  const inFile = Math.min(log.length, (await file.size()) - log.offset);
  if (!Number.isFinite(log.offset) || inFile <= 0) return [];
  let best: Entry[] = [];
  for (let start = 0; start < inFile;) {
    const first = await readEntry(file, log, start);
    if (!first) {
      start += SECTOR;
      continue;
    }
    const chain = [first];
    let pos = start + first.length;
    for (let used = first.length; used < log.length;) {
      const next = await readEntry(file, log, pos % log.length);
      const prev = chain[chain.length - 1].sequence;
      if (!next || (chain.length > 1 && next.sequence !== prev + 1n)) break;
      chain.push(next);
      pos += next.length;
      used += next.length;
    }
    if (!best.length || first.sequence > best[0].sequence) best = chain;
    // A run that wrapped round the end of the log ends the scan.
    if (pos >= log.length) break;
    start = pos;
  }
  return best;
}

/**
 * Applies the entries' writes in order, growing the file to each entry's
 * last file offset (rounded up to 1 MiB, as qemu). False, with nothing
 * more written, when an entry says the file was longer than it is
 * (a truncated image).
 */
export async function replayLog(file: BlockFile, entries: Entry[]): Promise<boolean> {
  for (const e of entries) {
    if (!(e.flushedFileOffset <= await file.size()) || !e.intact) return false;
    for (const w of e.writes) {
      if (w.data) await file.write(w.offset, w.data);
      else if (w.zeroLength) {
        const chunk = new Uint8Array(Math.min(w.zeroLength, 1 << 20));
        for (let done = 0; done < w.zeroLength; done += chunk.length) {
          const n = Math.min(chunk.length, w.zeroLength - done);
          await file.write(w.offset + done, chunk.subarray(0, n));
        }
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
