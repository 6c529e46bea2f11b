/**
 * The vhdx format (Microsoft's Hyper-V Virtual Hard Disk v2, [MS-VHDX]):
 * a 1 MiB header section (file identifier, two headers chosen by sequence
 * number, two region tables), a log, the BAT (payload block entries with
 * a sector bitmap entry after every chunk), a metadata region (file
 * parameters, virtual disk size, page 83 id, sector sizes, parent
 * locator), and payload blocks. Every structure carries a CRC-32C.
 * Checks, messages and choices as qemu-img 7.2: differencing images do not
 * open (ENOTSUP), a pending log is replayed only by a writable open,
 * block status has no host offsets (qemu's vhdx reports all data).
 * Convert alone sees more (copyMap): zero-state blocks and holes of the
 * host file are neither read nor scanned, payload is mapped in place; as
 * a target, blocks are allocated in call order under a lock while data
 * transfers run on other threads (writeConcurrent).
 */

import { Lock } from "./lock.ts";
import type {
  BlockStatus,
  CheckResult,
  CopyRun,
  CreateOptions,
  FormatDriver,
  FormatImage,
  FormatInfo,
  OpenOptions,
} from "./driver.ts";
import { CopyRunList } from "./driver.ts";
import type { BlockFile } from "./file.ts";
import { IoError, QimgError } from "./errors.ts";
import { le16, le32, le64, putLe32, putLe64 } from "./bytes.ts";
import { truncateFile } from "./protocol.ts";
import type { OptionDesc } from "./options.ts";
import { probeVhdx } from "./format_probes.ts";
import { buildLogEntry, checksumValid, crc32c, findLogEntries, replayLog } from "./vhdx_log.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const HEADER1 = 64 * KiB;
const HEADER2 = 128 * KiB;
const REGION1 = 192 * KiB;
const REGION2 = 256 * KiB;
const HEADER_SIZE = 4 * KiB;
const REGION_SIZE = 64 * KiB;
const METADATA_TABLE = 64 * KiB;
/** Bytes of a header qemu compares when both copies carry the same sequence number. */
const HEADER_STRUCT = 80;
const BLOCK_MIN = MiB;
const BLOCK_MAX = 256 * MiB;
const MAX_IMAGE = 64 * 1024 * 1024 * MiB;
/** Sectors per chunk: 2^23 ([MS-VHDX] 2.5, the chunk ratio's numerator). */
const SECTORS_PER_CHUNK = 2 ** 23;
/** Reads at or past this offset fail in qemu's block layer. */
const MAX_OFFSET = 2 ** 63 - 2 ** 30;

/** Payload block states ([MS-VHDX] 2.5.1.1); 5 is v0.95's unmapped. */
const PAYLOAD_NOT_PRESENT = 0;
const PAYLOAD_ZERO = 2;
const PAYLOAD_FULLY_PRESENT = 6;
const ZERO_STATES = new Set([0, 1, 2, 3, 5]);

/** GUIDs as stored (Microsoft's mixed-endian layout). */
function guid(text: string): Uint8Array {
  const h = text.replaceAll("-", "");
  const b = Uint8Array.from(h.match(/../g)!.map((x) => parseInt(x, 16)));
  return new Uint8Array([b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], ...b.subarray(8)]);
}
const BAT_GUID = guid("2DC27766-F623-4200-9D64-115E9BFD4A08");
const METADATA_GUID = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E");
const FILE_PARAMETERS = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
const VIRTUAL_DISK_SIZE = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
const PAGE83 = guid("BECA12AB-B2E6-4523-93EF-C309E000C746");
const LOGICAL_SECTOR = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
const PHYSICAL_SECTOR = guid("CDA348C7-445D-4471-9CC9-E9885251C556");
const PARENT_LOCATOR = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
/** The metadata items qemu requires, in its presence-bit order; the parent locator is optional. */
const KNOWN_ITEMS = [
  FILE_PARAMETERS,
  VIRTUAL_DISK_SIZE,
  PAGE83,
  LOGICAL_SECTOR,
  PHYSICAL_SECTOR,
  PARENT_LOCATOR,
];
const REQUIRED_ITEMS = 5;
const ITEM_REQUIRED = 4;
const ITEM_VIRTUAL_DISK = 2;
const PARAM_LEAVE_ALLOCATED = 1;
const PARAM_HAS_PARENT = 2;

/** qemu 7.2's `-o` table for vhdx, in its order. */
export const VHDX_CREATE_OPTIONS: OptionDesc[] = [
  { name: "size", type: "size", help: "Virtual disk size; max of 64TB." },
  { name: "log_size", type: "size", help: "Log size; min 1MB.", default: "1048576" },
  {
    name: "block_size",
    type: "size",
    help: "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.",
    default: "0",
  },
  {
    name: "subformat",
    type: "string",
    help: "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'.",
  },
  {
    name: "block_state_zero",
    type: "bool",
    help:
      "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to 'off' when using 'qimg convert' with subformat=dynamic.",
  },
];

function putLe16(b: Uint8Array, off: number, value: number): void {
  b[off] = value & 0xff;
  b[off + 1] = (value >>> 8) & 0xff;
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

function isPow2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

function ascii(b: Uint8Array, off: number, n: number): string {
  return String.fromCharCode(...b.subarray(off, off + n));
}

/**
 * Reads at `offset`; past the end of the file reads as zeroes, as qemu's
 * file layer (offsets above 2^53 arrive as Infinity and read as zeroes).
 */
async function readAt(file: BlockFile, offset: number, buf: Uint8Array): Promise<void> {
  if (offset >= await file.size()) return void buf.fill(0);
  if (!(offset + buf.length <= MAX_OFFSET)) throw new RangeError("beyond the block layer");
  const n = await file.read(offset, buf);
  if (n < buf.length) buf.fill(0, n);
}

/** qemu's block layer fails reads that end past its limit (an offset above 2^63 included) with EIO. */
function beyondBlockLayer(offset: bigint, length: number): void {
  if (offset + BigInt(length) > BigInt(MAX_OFFSET)) throw new IoError("beyond the block layer");
}

/** One header copy. */
interface Header {
  raw: Uint8Array;
  sequence: bigint;
  logGuid: Uint8Array;
  logLength: number;
  logOffset: number;
}

function parseHeader(raw: Uint8Array): Header | undefined {
  if (!checksumValid(raw, 4)) return undefined;
  if (ascii(raw, 0, 4) !== "head" || le16(raw, 66) !== 1) return undefined;
  return {
    raw,
    sequence: new DataView(raw.buffer, raw.byteOffset).getBigUint64(8, true),
    logGuid: raw.slice(48, 64),
    logLength: le32(raw, 68),
    logOffset: le64(raw, 72), /* Infinity above 2^53: fails later checks */
  };
}

/** A region of the file qemu registers to refuse overlaps. */
interface Region {
  start: number;
  end: number;
}

/** Sets the little-endian checksum at `at` over `b`. */
function seal(b: Uint8Array, at: number): void {
  putLe32(b, at, 0);
  putLe32(b, at, crc32c(b));
}

/** The open-time facts of an image. */
interface Layout extends HeaderState {
  regions: Region[];
  batOffset: number;
  blockSize: number;
  size: number;
  chunkRatio: number;
  batEntries: number;
}

/** An open vhdx image. */
export class VhdxImage implements FormatImage {
  readonly file: BlockFile;
  readonly size: number;
  readonly #l: Layout;
  /** BAT entries as stored: low and high 32 bits. Entries past the stored part read as 0. */
  readonly #lo: Uint32Array;
  readonly #hi: Uint32Array;
  readonly #beyond: Map<number, [number, number]>;
  #logReplayed: boolean;
  #firstWrite = true;
  /** The next log entry's sequence number and position, as qemu keeps them per open. */
  #logSequence = 1n;
  #logWrite = 0;
  #lock = new Lock();
  /** writeConcurrent's transfers still running: the latest (settled, never failing) per BAT entry. */
  #transfers = new Map<number, Promise<void>>();
  #fileEnd: number | undefined;

  constructor(file: BlockFile, l: Layout, bat: Bat, replayed: boolean) {
    this.file = file;
    this.#l = l;
    this.size = l.size;
    this.#lo = bat.lo;
    this.#hi = bat.hi;
    this.#beyond = bat.beyond;
    this.#logReplayed = replayed;
  }

  #entry(i: number): [number, number] {
    return i < this.#lo.length ? [this.#lo[i], this.#hi[i]] : this.#beyond.get(i) ?? [0, 0];
  }

  /** The BAT's entries in index order, as [index, lo, hi] (entries not stored are 0). */
  *#entries(): Generator<[number, number, number]> {
    for (let i = 0; i < this.#lo.length; i++) yield [i, this.#lo[i], this.#hi[i]];
    const rest = [...this.#beyond.keys()].filter((i) => i < this.#l.batEntries);
    for (const i of rest.sort((a, b) => a - b)) yield [i, ...this.#beyond.get(i)!];
  }

  #setEntry(i: number, lo: number, hi: number): void {
    if (i < this.#lo.length) {
      this.#lo[i] = lo;
      this.#hi[i] = hi;
    } else this.#beyond.set(i, [lo, hi]);
  }

  /** BAT index of the payload block holding guest `offset` (sector bitmap entries interleaved). */
  #batIndex(offset: number): number {
    const block = Math.floor(offset / this.#l.blockSize);
    return block + Math.floor(block / this.#l.chunkRatio);
  }

  /** State and host offset (bytes; Infinity when past 2^53) of BAT entry `i`. */
  #state(i: number): { state: number; host: number } {
    const [lo, hi] = this.#entry(i);
    return { state: lo & 7, host: hi * 2 ** 32 + ((lo & 0xfff00000) >>> 0) };
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    if (this.#transfers.size) await this.#drain();
    const bs = this.#l.blockSize;
    for (let done = 0; done < buf.length;) {
      const guest = offset + done;
      const inBlock = guest % bs;
      const n = Math.min(buf.length - done, bs - inBlock);
      const dst = buf.subarray(done, done + n);
      const { state, host } = this.#state(this.#batIndex(guest));
      if (ZERO_STATES.has(state)) dst.fill(0);
      else if (state === PAYLOAD_FULLY_PRESENT) {
        // qemu reads from the file's start when the entry's offset is 0.
        await readAt(this.file, host === 0 ? 0 : host + inBlock, dst);
      } else throw new IoError(`payload block state ${state}`);
      done += n;
    }
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.#lock.run(async () => {
      await this.#drain();
      await this.#place(offset, data, (_index, host, bytes) => this.#put(host, bytes));
    });
  }

  /**
   * As write, with the data transfers on other threads (convert's bulk
   * copy): blocks are allocated and the BAT logged under the lock in call
   * order; a transfer into a block waits for the earlier ones into it.
   */
  async writeConcurrent(offset: number, data: Uint8Array): Promise<void> {
    const file = this.file;
    if (!file.writeConcurrent) return await this.write(offset, data);
    const transfers: Promise<void>[] = [];
    await this.#lock.run(() =>
      this.#place(offset, data, (index, host, bytes) => {
        const before = this.#transfers.get(index);
        const t = before
          ? before.then(() => file.writeConcurrent!(host, bytes))
          : file.writeConcurrent!(host, bytes);
        const settled = t.catch(() => {});
        this.#transfers.set(index, settled);
        settled.then(() => {
          if (this.#transfers.get(index) === settled) this.#transfers.delete(index);
        });
        transfers.push(t);
        return Promise.resolve();
      })
    );
    await Promise.all(transfers);
  }

  /** Waits for writeConcurrent's transfers still running. */
  async #drain(): Promise<void> {
    while (this.#transfers.size) await Promise.all(this.#transfers.values());
  }

  /** Allocates the blocks of a write (logging their BAT entries), handing the data to `put`. */
  async #place(
    offset: number,
    data: Uint8Array,
    put: (index: number, host: number, bytes: Uint8Array) => Promise<void>,
  ): Promise<void> {
    if (this.#firstWrite) {
      this.#firstWrite = false;
      await updateHeaders(this.file, this.#l, { newDataGuid: true });
    }
    const bs = this.#l.blockSize;
    for (let done = 0; done < data.length;) {
      const guest = offset + done;
      const inBlock = guest % bs;
      const n = Math.min(data.length - done, bs - inBlock);
      const index = this.#batIndex(guest);
      let { state, host } = this.#state(index);
      if (ZERO_STATES.has(state)) {
        // A new block at the 1 MiB-aligned end of the file; the grown file reads as zeroes.
        host = Math.ceil((await this.#end()) / MiB) * MiB;
        await this.file.truncate(host + bs);
        this.#fileEnd = host + bs;
        state = PAYLOAD_FULLY_PRESENT;
        await put(index, host + inBlock, data.subarray(done, done + n));
        await this.#writeEntry(index, host, state);
      } else if (state === PAYLOAD_FULLY_PRESENT) {
        if (host < MiB) throw new IoError("payload block in the header section");
        await put(index, host + inBlock, data.subarray(done, done + n));
      } else throw new IoError(`payload block state ${state}`);
      done += n;
    }
  }

  /** The host file's size: read once, then kept as this open's writes change it. */
  async #end(): Promise<number> {
    return this.#fileEnd ??= await this.file.size();
  }

  /** Writes metadata or data at `at` (the file's size kept). */
  async #put(at: number, bytes: Uint8Array): Promise<void> {
    const end = await this.#end();
    await this.file.write(at, bytes);
    this.#fileEnd = Math.max(end, at + bytes.length);
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    // qemu's vhdx cannot write zeroes: its block layer writes zeroed
    // buffers, which allocates blocks that read as zeroes already. One
    // section of the lock: blocks are allocated in call order among
    // writeConcurrent's (convert calls them in guest order).
    return this.#lock.run(async () => {
      await this.#drain();
      const chunk = new Uint8Array(Math.min(length, 1 << 20));
      for (let done = 0; done < length; done += chunk.length) {
        const n = Math.min(chunk.length, length - done);
        await this.#place(offset + done, chunk.subarray(0, n), (_i, at, b) => this.#put(at, b));
      }
    });
  }

  /**
   * Stores BAT entry `index` through the log, as [MS-VHDX] 2.3 asks for
   * metadata: a log entry with the entry's 4 KiB BAT sector under a new
   * log GUID, then the sector in place, then the log marked empty again
   * (qemu's order; entries stay in the log region, stale).
   */
  async #writeEntry(index: number, host: number, state: number): Promise<void> {
    const lo = ((host % 2 ** 32) | state) >>> 0;
    const hi = Math.floor(host / 2 ** 32);
    this.#setEntry(index, lo, hi);
    const at = this.#l.batOffset + index * 8;
    const sectorAt = at - at % 4096;
    const sector = new Uint8Array(4096);
    if (sectorAt < await this.#end()) await readAt(this.file, sectorAt, sector);
    putLe32(sector, at % 4096, lo);
    putLe32(sector, at % 4096 + 4, hi);
    const header = this.#l.headers[this.#l.current]!;
    if (header.logLength < 8192) throw Object.assign(new Error("no log"), { code: "EINVAL" });
    const guid = randomGuid();
    await updateHeaders(this.file, this.#l, { logGuid: guid });
    const entry = buildLogEntry({
      guid,
      sequence: this.#logSequence,
      tail: this.#logWrite,
      fileSize: await this.#end(),
      offset: sectorAt,
      sector,
    });
    await this.#put(header.logOffset + this.#logWrite, entry);
    await this.file.flush();
    await this.#put(sectorAt, sector);
    // The header copies updateHeaders keeps are what the file holds unless this overwrote one.
    if (sectorAt < HEADER2 + HEADER_SIZE) this.#l.known = false;
    await this.file.flush();
    await updateHeaders(this.file, this.#l, { logGuid: new Uint8Array(16) });
    this.#logSequence++;
    // Entries go round the log, each naming itself as the tail (the log is empty again).
    this.#logWrite = (this.#logWrite + entry.length) % header.logLength;
  }

  /**
   * Convert's finer view (blockStatus must say "all data" as qemu's does):
   * blocks in a zero state and holes of the host file read as zeroes;
   * fully present blocks lie as they are at their host offset.
   */
  async copyMap(offset: number, length: number): Promise<CopyRun[]> {
    const list = new CopyRunList();
    const bs = this.#l.blockSize;
    for (let done = 0; done < length;) {
      const guest = offset + done;
      const inBlock = guest % bs;
      const n = Math.min(length - done, bs - inBlock);
      const { state, host } = this.#state(this.#batIndex(guest));
      if (ZERO_STATES.has(state)) list.add(n, true);
      else if (state === PAYLOAD_FULLY_PRESENT && host >= MiB && host + bs <= MAX_OFFSET) {
        await list.addHost(this.file, host + inBlock, n);
      } else list.add(n, false); // read() decides: offset 0 reads the file's start, other states fail
      done += n;
    }
    return list.runs;
  }

  blockStatus(_offset: number, length: number): Promise<BlockStatus> {
    // qemu's vhdx has no block status: the block layer calls everything data, with no offset.
    return Promise.resolve({ length, data: true, zero: false });
  }

  info(): Promise<FormatInfo> {
    return Promise.resolve({ clusterSize: this.#l.blockSize });
  }

  check(_options: { repair?: "leaks" | "all" }): Promise<CheckResult> {
    const result: CheckResult = {
      corruptions: 0,
      leaks: 0,
      checkErrors: 0,
      corruptionsFixed: 0,
      leaksFixed: 0,
      messages: [],
    };
    // A log replayed by this (writable) open counts as one repaired corruption, once.
    if (this.#logReplayed) {
      result.corruptionsFixed++;
      this.#logReplayed = false;
    }
    return this.file.size().then((fileSize) => {
      const errors = checkBatEntries(this.#l, this.#entries(), fileSize, true);
      result.messages = errors.map((m) => `qimg: ${m}`);
      result.corruptions = errors.length;
      return result;
    });
  }

  async flush(): Promise<void> {
    await this.#drain();
    await this.file.flush();
  }

  async close(): Promise<void> {
    await this.#drain();
    await this.file.close();
  }
}

/** Which header copy is current. */
interface HeaderState {
  headers: [Header | undefined, Header | undefined];
  current: 0 | 1;
  /** Both copies' `raw` are the file's 4 KiB as they stand (updateHeaders wrote them; nothing else since). */
  known?: boolean;
}

/**
 * Writes the non-current header with the next sequence number, twice
 * (so both copies are current), as [MS-VHDX] 2.2.2.1 asks: a new file
 * write GUID, a new data write GUID for guest-visible writes, and the
 * log GUID when given.
 */
async function updateHeaders(
  file: BlockFile,
  l: HeaderState,
  o: { newDataGuid?: boolean; logGuid?: Uint8Array },
): Promise<void> {
  const session = randomGuid();
  const dataGuid = o.newDataGuid ? randomGuid() : undefined;
  for (let k = 0; k < 2; k++) {
    const active = l.headers[l.current]!;
    const other = (1 - l.current) as 0 | 1;
    // The header's fields over the slot's own reserved bytes, which the checksum also covers.
    const at = other === 0 ? HEADER1 : HEADER2;
    const kept = l.known ? l.headers[other]?.raw : undefined;
    const raw = kept ? kept.slice() : new Uint8Array(HEADER_SIZE);
    if (!kept) await readAt(file, at, raw);
    raw.set(active.raw.subarray(0, HEADER_STRUCT));
    new DataView(raw.buffer).setBigUint64(8, active.sequence + 1n, true);
    raw.set(session, 16);
    if (dataGuid) raw.set(dataGuid, 32);
    if (o.logGuid) raw.set(o.logGuid, 48);
    seal(raw, 4);
    await file.write(at, raw.subarray(0, HEADER_STRUCT));
    l.headers[other] = parseHeader(raw);
    l.current = other;
  }
  l.known = true;
  await file.flush();
}

/** `%lu`/`%.lu` as C prints them (a precision of 0 prints nothing for 0). */
function overlapMessage(start: number, end: number, r: Region): string {
  return `VHDX region ${start}-${end} overlaps with region ${r.start}-${r.end === 0 ? "" : r.end}`;
}

function overlapping(regions: Region[], start: number, length: number): Region | undefined {
  const end = start + length;
  // qemu keeps its list newest first.
  return regions.findLast((r) => !(start >= r.end || end <= r.start));
}

/**
 * qemu's check of fully present BAT entries: offsets that overflow or lie
 * past the end of the file, and payload blocks overlapping the log, BAT
 * or metadata. Returns the messages; `all` keeps going after the first.
 */
function checkBatEntries(
  l: Layout,
  entries: Iterable<[number, number, number]>,
  fileSize: number,
  all: boolean,
): string[] {
  const out: string[] = [];
  let payblocks = l.chunkRatio;
  for (const [i, lo, hi] of entries) {
    if ((lo & 7) !== PAYLOAD_FULLY_PRESENT) continue;
    const offset = hi * 2 ** 32 + ((lo & 0xfff00000) >>> 0);
    // qemu sizes the last block by the virtual size, indexing with the BAT index.
    const rest = l.size - i * l.blockSize;
    const blockLength = rest < 0 ? l.blockSize : Math.min(l.blockSize, rest);
    if (hi >= 0x80000000 || offset > 2 ** 63 - 1 - l.blockSize) {
      out.push(`VHDX BAT entry ${i} offset overflow.`);
      if (!all) break;
    }
    if (offset >= fileSize) {
      out.push(
        `VHDX BAT entry ${i} start offset ${
          bigOffset(lo, hi)
        } points after end of file (${fileSize}). Image has probably been truncated.`,
      );
      if (!all) break;
    } else if (offset + blockLength > fileSize) {
      out.push(
        `VHDX BAT entry ${i} end offset ${
          offset + blockLength - 1
        } points after end of file (${fileSize}). Image has probably been truncated.`,
      );
      if (!all) break;
    }
    if (payblocks-- > 0) {
      const r = overlapping(l.regions, offset, l.blockSize);
      if (r) {
        out.push(overlapMessage(offset, offset + l.blockSize, r));
        if (!all) break;
      }
    } else {
      payblocks = l.chunkRatio;
    }
  }
  return out;
}

function bigOffset(lo: number, hi: number): string {
  return ((BigInt(hi) << 32n) | BigInt((lo & 0xfff00000) >>> 0)).toString();
}

function randomGuid(): Uint8Array {
  const u = crypto.getRandomValues(new Uint8Array(16));
  u[6] = (u[6] & 0x0f) | 0x40;
  u[8] = (u[8] & 0x3f) | 0x80;
  return u;
}

/** Opens a vhdx image on `file`, with qemu-img 7.2's checks and messages. */
export async function openVhdx(file: BlockFile, options: OpenOptions = {}): Promise<VhdxImage> {
  const errno = (text: string) => new QimgError(`Could not open '${file.name}': ${text}`);
  const einval = () => errno("Invalid argument");
  const enotsup = () => errno("Operation not supported");
  try {
    const sig = new Uint8Array(8);
    await readAt(file, 0, sig);
    if (ascii(sig, 0, 8) !== "vhdxfile") throw einval();

    // Headers: both copies, the valid one with the higher sequence number.
    const h1 = new Uint8Array(HEADER_SIZE);
    const h2 = new Uint8Array(HEADER_SIZE);
    await readAt(file, HEADER1, h1);
    await readAt(file, HEADER2, h2);
    const headers: [Header | undefined, Header | undefined] = [parseHeader(h1), parseHeader(h2)];
    let current: 0 | 1;
    if (headers[0] && !headers[1]) current = 0;
    else if (!headers[0] && headers[1]) current = 1;
    else if (!headers[0] || !headers[1]) throw new QimgError("No valid VHDX header found");
    else if (headers[0].sequence > headers[1].sequence) current = 0;
    else if (headers[1].sequence > headers[0].sequence) current = 1;
    else if (equal(h1.subarray(0, HEADER_STRUCT), h2.subarray(0, HEADER_STRUCT))) {
      current = 0; // Disk2vhd writes two identical headers
    } else throw new QimgError("No valid VHDX header found");
    const header = headers[current]!;
    const regions: Region[] = [{
      start: header.logOffset,
      end: header.logOffset + header.logLength,
    }];

    // The log: pending entries are replayed by a writable open, refused otherwise.
    let pending: NonNullable<Awaited<ReturnType<typeof findLogEntries>>> = [];
    const log = { offset: header.logOffset, length: header.logLength, guid: header.logGuid };
    if (!(header.logOffset >= MiB) || header.logOffset % MiB || le16(header.raw, 64) !== 0) {
      throw einval();
    }
    if (header.logGuid.some((x) => x !== 0) && header.logLength !== 0) {
      if (header.logLength % MiB) throw einval();
      const found = await findLogEntries(file, log);
      if (!found) throw einval();
      pending = found;
      if (pending.length && !options.write) {
        throw new QimgError(
          `VHDX image file '${file.name}' opened read-only, but contains a log that needs to be replayed`,
          { hint: `To replay the log, run:\nqimg check -r all '${file.name}'` },
        );
      }
    }
    const hs: HeaderState = { headers, current };
    if (pending.length) {
      if (!(await replayLog(file, log, pending))) throw einval();
      await updateHeaders(file, hs, { logGuid: new Uint8Array(16) });
    }
    const l = await readLayout(file, hs, regions, einval, enotsup, options.warn);

    const size = await file.size();
    const bat = await readBat(file, l, size);
    if (!options.check) {
      const entries: [number, number, number][] = [];
      for (let i = 0; i < bat.lo.length; i++) entries.push([i, bat.lo[i], bat.hi[i]]);
      for (const [i, [lo, hi]] of [...bat.beyond].sort((x, y) => x[0] - y[0])) {
        entries.push([i, lo, hi]);
      }
      const errors = checkBatEntries(l, entries, size, false);
      if (errors.length) {
        options.warn?.(`qimg: ${errors[0]}`);
        throw einval();
      }
    }
    return new VhdxImage(file, l, bat, pending.length > 0);
  } catch (e) {
    // qemu's block layer refuses requests past its limit with EINVAL.
    if (e instanceof RangeError) throw einval();
    if (e instanceof IoError) throw errno("Input/output error");
    throw e;
  }
}

/** A BAT in memory: entries of the guest's blocks densely, nonzero ones past them sparsely. */
interface Bat {
  lo: Uint32Array;
  hi: Uint32Array;
  beyond: Map<number, [number, number]>;
}

/**
 * Reads the BAT. Entries the guest's blocks use are kept densely; the
 * rest (qemu counts more when its 32-bit block count wraps, as for empty
 * images) are scanned for nonzero entries only, skipping holes, so an
 * image's BAT costs what the file holds. Past the end of the file entries read as 0.
 */
async function readBat(file: BlockFile, l: Layout, fileSize: number): Promise<Bat> {
  const blocks = Math.ceil(l.size / l.blockSize);
  const used = Math.min(l.batEntries, blocks + Math.floor(blocks / l.chunkRatio));
  const inFile = (n: number) => Math.max(0, Math.min(n, Math.floor((fileSize - l.batOffset) / 8)));
  const dense = inFile(used);
  const raw = new Uint8Array(dense * 8);
  await readAt(file, l.batOffset, raw);
  const lo = new Uint32Array(dense);
  const hi = new Uint32Array(dense);
  const rv = new DataView(raw.buffer);
  for (let i = 0; i < dense; i++) {
    lo[i] = rv.getUint32(i * 8, true);
    hi[i] = rv.getUint32(i * 8 + 4, true);
  }
  const beyond = new Map<number, [number, number]>();
  const end = inFile(l.batEntries);
  const CHUNK = MiB / 8;
  for (let i = dense; i < end;) {
    const at = l.batOffset + i * 8;
    const e = await file.extent(at, (end - i) * 8);
    const n = Math.min(end - i, CHUNK, Math.max(1, Math.floor(e.length / 8)));
    if (e.data) {
      const b = new Uint8Array(n * 8);
      await readAt(file, at, b);
      const v = new DataView(b.buffer);
      for (let k = 0; k < n; k++) {
        const x = v.getUint32(k * 8, true);
        const y = v.getUint32(k * 8 + 4, true);
        if (x || y) beyond.set(i + k, [x, y]);
      }
    }
    i += n;
  }
  return { lo, hi, beyond };
}

/** Region table, metadata and BAT geometry, as qemu validates them. */
async function readLayout(
  file: BlockFile,
  hs: HeaderState,
  regions: Region[],
  einval: () => QimgError,
  enotsup: () => QimgError,
  warn?: (message: string) => void,
): Promise<Layout> {
  const rt = new Uint8Array(REGION_SIZE);
  await readAt(file, REGION1, rt);
  if (!checksumValid(rt, 4) || ascii(rt, 0, 4) !== "regi") throw einval();
  const count = le32(rt, 8);
  if (count > 2047) throw einval();
  let bat: { offset: number; length: number; exact: bigint } | undefined;
  let meta: { offset: number; length: number; exact: bigint } | undefined;
  for (let i = 0; i < count; i++) {
    const e = rt.subarray(16 + i * 32, 48 + i * 32);
    const offset = le64(e, 16);
    const exact = new DataView(e.buffer, e.byteOffset + 16, 8).getBigUint64(0, true);
    const length = le32(e, 24);
    const r = overlapping(regions, offset, length);
    if (r) {
      warn?.(`qimg: ${overlapMessage(offset, offset + length, r)}`);
      throw einval();
    }
    regions.push({ start: offset, end: offset + length });
    const id = e.subarray(0, 16);
    if (equal(id, BAT_GUID)) {
      if (bat) throw einval();
      bat = { offset, length, exact };
    } else if (equal(id, METADATA_GUID)) {
      if (meta) throw einval();
      meta = { offset, length, exact };
    } else if (le32(e, 28) & 1) throw enotsup();
  }
  if (!bat || !meta) throw einval();

  const table = new Uint8Array(METADATA_TABLE);
  beyondBlockLayer(meta.exact, METADATA_TABLE);
  await readAt(file, meta.offset, table);
  if (ascii(table, 0, 8) !== "metadata") throw einval();
  const items = le16(table, 10);
  if (items * 32 > METADATA_TABLE - 32) throw einval();
  const found: ({ offset: number; length: number } | undefined)[] = [];
  for (let i = 0; i < items; i++) {
    const e = table.subarray(32 + i * 32, 64 + i * 32);
    const k = KNOWN_ITEMS.findIndex((g) => equal(g, e.subarray(0, 16)));
    if (k >= 0) {
      if (found[k]) throw einval();
      found[k] = { offset: le32(e, 16), length: le32(e, 20) };
    } else if (le32(e, 24) & ITEM_REQUIRED) throw enotsup();
  }
  for (let k = 0; k < REQUIRED_ITEMS; k++) if (!found[k]) throw enotsup();
  const item = async (k: number, n: number) => {
    const b = new Uint8Array(n);
    beyondBlockLayer(meta!.exact + BigInt(found[k]!.offset), n);
    await readAt(file, meta!.offset + found[k]!.offset, b);
    return b;
  };
  const params = await item(0, 8);
  const blockSize = le32(params, 0);
  if (le32(params, 4) & PARAM_HAS_PARENT) {
    // qemu 7.2 does not read differencing images.
    throw found[5] ? enotsup() : einval();
  }
  const sizeBytes = await item(1, 8);
  const virtualSize = new DataView(sizeBytes.buffer).getBigUint64(0, true);
  const logical = le32(await item(3, 4), 0);
  await item(4, 4);
  if (blockSize < BLOCK_MIN || blockSize > BLOCK_MAX) throw einval();
  if (logical !== 512) throw enotsup();
  if (!isPow2(blockSize)) throw einval();
  const chunkRatio = SECTORS_PER_CHUNK * logical / blockSize;
  // qemu counts sectors from the size, and blocks in 32 bits.
  const sectorsSize = Number(virtualSize / BigInt(logical) * BigInt(logical));
  const bs = BigInt(blockSize);
  const dataBlocks = Number(BigInt.asUintN(64, virtualSize + bs - 1n) / bs % (1n << 32n));
  const batEntries = (dataBlocks + Math.floor(((dataBlocks - 1) >>> 0) / chunkRatio)) % 2 ** 32;
  if (batEntries > Math.floor(bat.length / 8)) throw einval();
  if (!(sectorsSize <= MAX_OFFSET)) throw einval();
  beyondBlockLayer(bat.exact, bat.length); // qemu reads the whole BAT region next
  return {
    ...hs,
    regions,
    batOffset: bat.offset,
    blockSize,
    size: sectorsSize,
    chunkRatio,
    batEntries,
  };
}

/** Creates a vhdx image as qemu-img 7.2: dynamic (default) or fixed, ZERO blocks unless block_state_zero=off. */
export async function createVhdx(file: BlockFile, options: CreateOptions): Promise<void> {
  const o = options.options;
  const size = Math.ceil(options.size / 512) * 512;
  const subformat = (o.subformat as string | undefined) ?? "dynamic";
  if (subformat !== "dynamic" && subformat !== "fixed") {
    throw new QimgError(`Parameter 'subformat' does not accept value '${subformat}'`);
  }
  if (size > MAX_IMAGE) throw new QimgError("Image size too large; max of 64TB");
  let logSize = MiB;
  if (o.log_size !== undefined) {
    logSize = Math.ceil((o.log_size as number) / MiB) * MiB;
    if (logSize > 0xffffffff) throw new QimgError("Log size must be smaller than 4 GB");
  }
  if (logSize < MiB) throw new QimgError("Log size must be a multiple of 1 MB");
  const zeroBlocks = o.block_state_zero !== false;
  let blockSize = o.block_size === undefined
    ? 0
    : Math.min(Math.ceil((o.block_size as number) / MiB) * MiB, BLOCK_MAX);
  if (blockSize === 0) {
    blockSize = size > 32 * 1024 * 1024 * MiB
      ? 64 * MiB
      : size > 100 * 1024 * MiB
      ? 32 * MiB
      : size > 1024 * MiB
      ? 16 * MiB
      : 8 * MiB;
  }
  if (!isPow2(blockSize)) throw new QimgError("Block size must be a power of two");
  const fixed = subformat === "fixed";

  // File identifier: signature and creator.
  const id = new Uint8Array(8 + 2 * 12);
  id.set(new TextEncoder().encode("vhdxfile"), 0);
  const creator = "QEMU v7.2.22";
  for (let i = 0; i < creator.length; i++) putLe16(id, 8 + 2 * i, creator.charCodeAt(i));
  await file.write(0, id);

  // Headers: random sequence number (32 bits, as qemu's g_random_int), the second one higher.
  const seq = crypto.getRandomValues(new Uint32Array(1))[0];
  const hdr = new Uint8Array(HEADER_SIZE);
  hdr.set(new TextEncoder().encode("head"), 0);
  hdr.set(randomGuid(), 16);
  hdr.set(randomGuid(), 32);
  putLe16(hdr, 66, 1);
  putLe32(hdr, 68, logSize);
  putLe64(hdr, 72, MiB);
  for (const [at, s] of [[HEADER1, seq], [HEADER2, seq + 1]]) {
    putLe64(hdr, 8, s);
    seal(hdr, 4);
    await file.write(at, hdr.subarray(0, HEADER_STRUCT));
  }

  // Region table, BAT geometry.
  const chunkRatio = SECTORS_PER_CHUNK * 512 / blockSize;
  const dataBlocks = Math.ceil(size / blockSize);
  const batEntries = dataBlocks + Math.floor(((dataBlocks - 1) >>> 0) / chunkRatio);
  const batLength = Math.ceil(batEntries * 8 / MiB) * MiB;
  const batOffset = Math.ceil((MiB + logSize) / MiB) * MiB;
  const metaOffset = Math.ceil((batOffset + batLength) / MiB) * MiB;
  const rt = new Uint8Array(REGION_SIZE);
  rt.set(new TextEncoder().encode("regi"), 0);
  putLe32(rt, 8, 2);
  rt.set(BAT_GUID, 16);
  putLe64(rt, 32, batOffset);
  putLe32(rt, 40, batLength);
  rt.set(METADATA_GUID, 48);
  putLe64(rt, 64, metaOffset);
  putLe32(rt, 72, MiB);
  seal(rt, 4);

  // The BAT; data starts 5 MiB after it (room for metadata).
  const dataStart = batOffset + batLength + 5 * MiB;
  await truncateFile(file, fixed ? dataStart + size : dataStart);
  if (fixed || zeroBlocks) {
    const bat = new Uint8Array(batLength);
    const state = zeroBlocks ? PAYLOAD_ZERO : fixed ? PAYLOAD_FULLY_PRESENT : PAYLOAD_NOT_PRESENT;
    for (let b = 0; b < dataBlocks; b++) {
      const index = b + Math.floor(b / chunkRatio);
      const host = state === PAYLOAD_FULLY_PRESENT
        ? Math.ceil((dataStart + b * blockSize) / MiB) * MiB
        : 0;
      putLe64(bat, index * 8, BigInt(host) | BigInt(state));
    }
    await file.write(batOffset, bat);
  }
  await file.write(REGION1, rt);
  await file.write(REGION2, rt);

  // Metadata table and its five items.
  const table = new Uint8Array(METADATA_TABLE);
  table.set(new TextEncoder().encode("metadata"), 0);
  putLe16(table, 10, 5);
  const itemsAt = [0, 8, 16, 32, 36];
  const lengths = [8, 8, 16, 4, 4];
  KNOWN_ITEMS.slice(0, 5).forEach((g, i) => {
    const e = 32 + i * 32;
    table.set(g, e);
    putLe32(table, e + 16, METADATA_TABLE + itemsAt[i]);
    putLe32(table, e + 20, lengths[i]);
    putLe32(table, e + 24, i === 0 ? ITEM_REQUIRED : ITEM_REQUIRED | ITEM_VIRTUAL_DISK);
  });
  await file.write(metaOffset, table);
  const items = new Uint8Array(40);
  putLe32(items, 0, blockSize);
  putLe32(items, 4, fixed ? PARAM_LEAVE_ALLOCATED : 0);
  putLe64(items, 8, size);
  items.set(randomGuid(), 16);
  putLe32(items, 32, 512);
  putLe32(items, 36, 512);
  await file.write(metaOffset + METADATA_TABLE, items);
}

/** The vhdx format driver. */
export const vhdxDriver: FormatDriver = {
  name: "vhdx",
  probe: probeVhdx,
  open: openVhdx,
  create: createVhdx,
  createOptions: VHDX_CREATE_OPTIONS,
};
