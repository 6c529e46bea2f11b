/**
 * The vmdk format driver (VMware Virtual Disk Format 1.1): hosted sparse
 * extents (KDMV, also streamOptimized with compressed grains and markers),
 * ESX sparse extents (COWD), flat extents, and text descriptors tying
 * extents together. Behaviour where the format leaves choices (limits,
 * messages, allocation order, the descriptor written) follows qemu-img 7.2.
 */

import { loadZlib, zlibSync } from "./zlib_loader.ts";
import { type BatchResult, CompressPool } from "./compress_pool.ts";
import type {
  BackingReader,
  BackingRef,
  BlockStatus,
  CheckResult,
  CreateOptions,
  FormatDriver,
  FormatImage,
  FormatInfo,
  OpenOptions,
} from "./driver.ts";
import { type BlockFile, readZeroFilled } from "./file.ts";
import type { JsonValue } from "./output.ts";
import { QimgError, SizeQueryError, strerror } from "./errors.ts";
import { strerrorNumber } from "./errno.ts";
import { alignUp, be32, le16, le32, putLe32 } from "./bytes.ts";
import { type OptionDesc, SIZE_OPTION } from "./options.ts";
import { createFile, truncateFile } from "./protocol.ts";
import { probeVmdk } from "./format_probes.ts";
import {
  buildDescriptor,
  cString,
  extentLines,
  parentFileNameHint,
  parseCreateType,
  readCid,
  replaceCid,
} from "./vmdk_descriptor.ts";

const SECTOR = 512;
/** qemu's largest image (BDRV_MAX_LENGTH: INT64_MAX aligned down to 1 GiB). */
const BDRV_MAX_BIG = (1n << 63n) - (1n << 30n);
const VMDK3_MAGIC = 0x434f5744; // "COWD"
const VMDK4_MAGIC = 0x4b444d56; // "KDMV"
const FLAG_NL_DETECT = 1 << 0;
const FLAG_RGD = 1 << 1;
const FLAG_ZERO_GRAIN = 1 << 2;
const FLAG_COMPRESS = 1 << 16;
const FLAG_MARKER = 1 << 17;
const COMPRESSION_DEFLATE = 1;
const MARKER_END_OF_STREAM = 0;
const MARKER_FOOTER = 3;
/** A grain table entry meaning "reads as zeroes" (zeroed-grain feature). */
const GTE_ZEROED = 1;
/** The descriptor area qemu reads and rewrites (20 sectors). */
const DESC_SIZE = 20 * SECTOR;
/** qemu reads at most this much of a descriptor (avoids unbounded allocation). */
const MAX_DESC = (1 << 20) - 1;
/** qemu's limit on grain directory entries. */
const MAX_L1_SIZE = 32 * 1024 * 1024;
/** qemu's limit on the grain size: 1 GiB. */
const MAX_GRAIN_SECTORS = 0x200000;
/** Grain offsets are 32-bit sector numbers. */
const EXTENT_MAX_SECTORS = 2 ** 32;
/** Descriptors nested through sparse extents with capacity 0. */
const MAX_NESTING = 8;
const U64 = (1n << 64n) - 1n;

/** One extent: a flat range of a file, or a sparse extent with its grain tables. */
interface Extent {
  file: BlockFile;
  flat: boolean;
  /** The extent line's type; "" for a monolithic sparse file opened directly. */
  type: string;
  sectors: number;
  startSector: number;
  endSector: number;
  flatStartOffset: number;
  compressed: boolean;
  hasMarker: boolean;
  hasZeroGrain: boolean;
  l1Offset: number;
  l1BackupOffset: number;
  /** The grain directory as read (entries past the end of the file read as zero). */
  l1: Uint32Array;
  l1Backup?: Uint32Array;
  l1Size: number;
  l1EntrySectors: number;
  l2Size: number;
  clusterSectors: number;
  nextClusterSector: number;
  l2Cache: Map<number, Uint32Array | BigUint64Array>;
  /** seSparse: 64-bit tables, grain tables and grains at these sectors. */
  se?: { l1: BigUint64Array; l2TablesOffset: bigint; clustersOffset: bigint };
}

/** Adler-32 of `d` (zlib's trailer), in blocks small enough for V8's small integers. */
function adler32(d: Uint8Array): number {
  let a = 1;
  let b = 0;
  for (let i = 0; i < d.length;) {
    const end = Math.min(i + 2048, d.length);
    for (; i < end; i++) {
      a += d[i];
      b += a;
    }
    a %= 65521;
    b %= 65521;
  }
  return ((b << 16) | a) >>> 0;
}

/** Length of `n` bytes as raw deflate stored blocks (at most 65535 bytes each). */
function storedLength(n: number): number {
  return n + 5 * Math.max(1, Math.ceil(n / 65535));
}

/** Writes `data` as raw deflate stored blocks at `at`; returns the end offset. */
function putStored(out: Uint8Array, at: number, data: Uint8Array): number {
  let pos = 0;
  do {
    const len = Math.min(65535, data.length - pos);
    out[at] = pos + len >= data.length ? 1 : 0;
    out[at + 1] = len & 0xff;
    out[at + 2] = len >> 8;
    out[at + 3] = ~len & 0xff;
    out[at + 4] = (~len >> 8) & 0xff;
    out.set(data.subarray(pos, pos + len), at + 5);
    at += 5 + len;
    pos += len;
  } while (pos < data.length);
  return at;
}

/** streamOptimized writes that may be outstanding (writeBehind): enough to keep both Workers busy. */
const BEHIND = 2;

/** Bytes of a compressed extent read ahead for the grains of one read request. */
interface GrainWindow {
  extent?: Extent;
  /** File offset of `bytes`. */
  start: number;
  /** Bytes of the file from `start` (never past its end). */
  bytes: Uint8Array;
  /** The file's size when `bytes` was read. */
  fileSize: number;
  /** The buffer under `bytes`. */
  store?: Uint8Array;
}

/** Where a guest offset lives. */
type Lookup =
  | { kind: "error" }
  | { kind: "unalloc" | "zeroed"; l2Offset?: number; l2Index?: number; l1Index?: number }
  | { kind: "ok"; hostOffset: number; l2Offset?: number; l2Index?: number; l1Index?: number };

function latin1(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i < b.length; i += 8192) {
    s += String.fromCharCode(...b.subarray(i, Math.min(b.length, i + 8192)));
  }
  return s;
}

/** Descriptor text as qemu sees its bytes: UTF-8 file names stay the names on disk (a BOM is kept). */
function utf8(b: Uint8Array): string {
  return new TextDecoder("utf-8", { ignoreBOM: true }).decode(b);
}

function fromLatin1(s: string): Uint8Array {
  const b = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) b[i] = s.charCodeAt(i) & 0xff;
  return b;
}

function le64n(b: Uint8Array, off: number): bigint {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getBigUint64(off, true);
}

/** Reads `length` bytes at `offset`; bytes past the end of the file read as zeroes (qemu's file layer). */
async function readAt(file: BlockFile, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  // qemu's block layer refuses requests outside int64 with EIO.
  if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > 2 ** 63) {
    throw new QimgError("Input/output error");
  }
  const size = await file.size();
  if (offset < size) await file.read(offset, buf.subarray(0, Math.min(length, size - offset)));
  return buf;
}

/** Reads `dst.length` bytes at `offset` into `dst`, zeroes past the end of the file. */
async function readInto(file: BlockFile, offset: number, dst: Uint8Array): Promise<void> {
  // qemu's block layer refuses requests outside int64 with EIO.
  if (!Number.isSafeInteger(offset) || offset < 0 || offset + dst.length > 2 ** 63) {
    throw new QimgError("Input/output error");
  }
  await readZeroFilled(file, offset, dst);
}

/** qemu's vmdk_read_desc: up to 1 MiB of text at `offset` (at least 4 bytes, zero-padded, for the magic). */
async function readDescText(file: BlockFile, offset: number): Promise<Uint8Array> {
  const size = await file.size();
  try {
    return await readAt(file, offset, Math.max(4, Math.min(size, MAX_DESC)));
  } catch (e) {
    throw new QimgError(`Could not read from file: ${strerror(e)}`);
  }
}

/** State gathered while opening: what vmdk_open fills in. */
interface OpenState {
  top: BlockFile;
  options: OpenOptions;
  extents: Extent[];
  createType?: string;
  /** qemu's bs->total_sectors: the extents' sizes summed in int64 (hostile ones wrap). */
  totalSectors: bigint;
  /** Files opened for extents (closed with the image, or on failure). */
  opened: BlockFile[];
}

function addExtent(
  st: OpenState,
  e: Omit<
    Extent,
    "startSector" | "endSector" | "l2Cache" | "nextClusterSector" | "l1" | "l1EntrySectors"
  >,
  fileSectors: number,
  exactSectors = BigInt(e.sectors),
): Extent {
  if (e.clusterSectors > MAX_GRAIN_SECTORS) {
    throw new QimgError("Invalid granularity, image may be corrupt");
  }
  if (e.l1Size > MAX_L1_SIZE) throw new QimgError("L1 size too big");
  const prev = st.extents[st.extents.length - 1];
  const startSector = prev ? prev.endSector : 0;
  const cs = e.flat ? e.sectors : e.clusterSectors;
  const granule = e.clusterSectors || 1;
  const extent: Extent = {
    ...e,
    clusterSectors: cs,
    l1EntrySectors: e.l2Size * e.clusterSectors,
    startSector,
    endSector: startSector + e.sectors,
    nextClusterSector: Math.ceil(fileSectors / granule) * granule,
    l1: new Uint32Array(0),
    l2Cache: new Map(),
  };
  st.totalSectors = BigInt.asIntN(64, st.totalSectors + exactSectors);
  st.extents.push(extent);
  return extent;
}

/** Reads a grain directory; entries past the end of the file are zero, as qemu reads them. */
async function readDirectory(
  file: BlockFile,
  offset: number,
  entries: number,
): Promise<Uint32Array> {
  const size = await file.size();
  if (!Number.isSafeInteger(offset) || offset < 0 || offset >= 2 ** 63) {
    throw new QimgError("Input/output error");
  }
  const inFile = Math.max(0, Math.min(entries, Math.floor((size - offset) / 4) + 1));
  const buf = await readAt(file, offset, inFile * 4);
  const out = new Uint32Array(inFile);
  for (let i = 0; i < inFile; i++) out[i] = le32(buf, i * 4);
  return out;
}

async function initTables(extent: Extent): Promise<void> {
  const name = extent.file.name;
  try {
    extent.l1 = await readDirectory(extent.file, extent.l1Offset, extent.l1Size);
  } catch (e) {
    throw new QimgError(`Could not read l1 table from extent '${name}': ${strerror(e)}`);
  }
  if (extent.l1BackupOffset) {
    try {
      extent.l1Backup = await readDirectory(extent.file, extent.l1BackupOffset, extent.l1Size);
    } catch (e) {
      throw new QimgError(`Could not read l1 backup table from extent '${name}': ${strerror(e)}`);
    }
  }
}

/** Sector count of a file as qemu's block layer sees it (whole sectors, rounded up). */
async function fileSectors(file: BlockFile): Promise<number> {
  return Math.ceil(await file.size() / SECTOR);
}

/** Past any file qimg can read: offsets above 2^53 read as zeroes there anyway. */
const FAR = 2 ** 52;

/** Signed 64-bit shift left by 9, as qemu's `x << 9` on a u64 field: -1 when negative. */
function sectorsToBytes(v: bigint): number {
  const b = BigInt.asIntN(64, v << 9n);
  return b < 0n ? -1 : b > BigInt(Number.MAX_SAFE_INTEGER) ? FAR : Number(b);
}

async function openVmfsSparse(st: OpenState, file: BlockFile): Promise<void> {
  const h = await readAt(file, 4, 40);
  const granularity = le32(h, 12);
  const l1Size = le32(h, 20);
  const e = addExtent(st, {
    file,
    flat: false,
    type: "",
    sectors: le32(h, 8),
    flatStartOffset: 0,
    compressed: false,
    hasMarker: false,
    hasZeroGrain: false,
    l1Offset: le32(h, 16) * SECTOR,
    l1BackupOffset: 0,
    l1Size,
    l2Size: 4096,
    clusterSectors: granularity,
  }, await fileSectors(file));
  // qemu divides by the grain size (and crashes on zero); refuse it instead.
  if (granularity === 0) throw new QimgError("L1 entry size is invalid");
  await initTables(e);
}

async function openVmdk4(st: OpenState, file: BlockFile, depth: number): Promise<void> {
  let h = await readAt(file, 4, 75);
  const capacity0 = le64n(h, 8);
  const descOffset = le64n(h, 24);
  if (capacity0 === 0n && descOffset !== 0n) {
    // A sparse extent holding only a descriptor: the extents are listed there.
    if (depth >= MAX_NESTING) throw new QimgError("Too many levels of nested descriptors");
    const at = sectorsToBytes(descOffset);
    if (at < 0) throw new QimgError("Could not read from file: Invalid argument");
    const buf = await readDescText(file, at);
    await openDescriptor(st, cString(utf8(buf)), depth + 1);
    return;
  }
  st.createType ??= "monolithicSparse";
  if (le64n(h, 52) === U64) {
    // streamOptimized written as a stream: the footer's header holds the grain directory.
    const footerAt = (await fileSectors(st.top)) * SECTOR - 1536;
    if (footerAt < 0) throw new QimgError("Failed to read footer: Invalid argument");
    const f = await readAt(file, footerAt, 1536);
    if (
      be32(f, 512) !== VMDK4_MAGIC || le32(f, 8) !== 0 || le32(f, 12) !== MARKER_FOOTER ||
      le64n(f, 1024) !== 0n || le32(f, 1032) !== 0 || le32(f, 1036) !== MARKER_END_OF_STREAM
    ) {
      throw new QimgError("Invalid footer");
    }
    h = f.subarray(516, 516 + 75);
  }
  const version = le32(h, 0);
  const flags = le32(h, 4);
  const capacity = le64n(h, 8);
  const granularity = le64n(h, 16);
  const gtes = le32(h, 40);
  const rgdOffset = le64n(h, 44);
  const gdOffset = le64n(h, 52);
  const grainOffset = le64n(h, 60);
  const compressed = le16(h, 73) === COMPRESSION_DEFLATE;
  if (version > 3) throw new QimgError(`Unsupported VMDK version ${version}`);
  if (version === 3 && st.options.write && !compressed) {
    throw new QimgError("VMDK version 3 must be read only");
  }
  if (gtes > 512) throw new QimgError("L2 table size too big");
  const l1EntrySectors = BigInt.asUintN(32, BigInt(gtes) * granularity);
  if (l1EntrySectors === 0n) throw new QimgError("L1 entry size is invalid");
  const l1Size = Number(
    BigInt.asUintN(32, BigInt.asUintN(64, capacity + l1EntrySectors - 1n) / l1EntrySectors),
  );
  const l1BackupOffset = flags & FLAG_RGD ? sectorsToBytes(rgdOffset) : 0;
  const sectors = await fileSectors(file);
  if (BigInt(sectors) < grainOffset) {
    const bytes = BigInt.asIntN(64, grainOffset * 512n);
    throw new QimgError(`File truncated, expecting at least ${bytes} bytes`);
  }
  if (granularity > BigInt(MAX_GRAIN_SECTORS)) {
    throw new QimgError("Invalid granularity, image may be corrupt");
  }
  if (l1Size > MAX_L1_SIZE) throw new QimgError("L1 size too big");
  const e = addExtent(
    st,
    {
      file,
      flat: false,
      type: "",
      sectors: Number(capacity),
      flatStartOffset: 0,
      compressed,
      hasMarker: (flags & FLAG_MARKER) !== 0,
      hasZeroGrain: (flags & FLAG_ZERO_GRAIN) !== 0,
      l1Offset: sectorsToBytes(gdOffset),
      l1BackupOffset,
      l1Size,
      l2Size: gtes,
      clusterSectors: Number(granularity),
    },
    sectors,
    capacity,
  );
  if (compressed) st.createType = "streamOptimized";
  await initTables(e);
}

/**
 * What qemu's block layer makes of the summed sector count once the image
 * is open: the byte size, an open failure (its byte count, wrapping,
 * above the limit), or a size query failing later with `errno` (negative
 * counts give their negation cut to an int, counts past INT64_MAX / 512
 * EFBIG). Sizes qimg cannot hold exactly fail the open.
 */
function blockLayerSize(total: bigint): { size: number; errno?: number } {
  // BDRV_SECTOR_SIZE is unsigned in C: the product wraps as a uint64.
  if (BigInt.asUintN(64, total * 512n) > BDRV_MAX_BIG) {
    throw new QimgError("Could not refresh total sector count: File too large");
  }
  if (total < 0n) return { size: 0, errno: Number(BigInt.asIntN(32, BigInt.asIntN(64, -total))) };
  if (total > ((1n << 63n) - 1n) / 512n) return { size: 0, errno: 27 }; // EFBIG
  const size = Number(total * 512n);
  if (BigInt(size) !== total * 512n) throw new QimgError("Image size too large");
  return { size };
}

/** Exact above 2^53 (hostile capacities): the human renderer prints numbers as JS does. */
const jsonInt = (v: number) => Number.isSafeInteger(v) ? v : BigInt(v);

const hex16 = (v: bigint) => "0x" + v.toString(16).padStart(16, "0");

/**
 * An ESXi seSparse extent (read-only, as in qemu, which checks the
 * undocumented headers strictly): 64-bit grain directory and tables.
 */
async function openSeSparse(st: OpenState, file: BlockFile): Promise<void> {
  if (st.options.write) throw new QimgError("No write support for seSparse images available");
  const h = await readAt(file, 0, SECTOR);
  const f = (i: number) => le64n(h, i * 8);
  if (f(0) !== 0xcafebaben) throw new QimgError(`Bad const header magic: ${hex16(f(0))}`);
  if (f(1) !== 0x0000000200000001n) throw new QimgError(`Unsupported version: ${hex16(f(1))}`);
  if (f(3) !== 8n) throw new QimgError(`Unsupported grain size: ${f(3)}`);
  if (f(4) !== 64n) throw new QimgError(`Unsupported grain table size: ${f(4)}`);
  if (f(5) !== 0n) throw new QimgError(`Unsupported flags: ${hex16(f(5))}`);
  if (f(6) || f(7) || f(8) || f(9)) {
    throw new QimgError(
      `Unsupported reserved bits: ${hex16(f(6))} ${hex16(f(7))} ${hex16(f(8))} ${hex16(f(9))}`,
    );
  }
  if (h.subarray(208).some((b) => b !== 0)) {
    throw new QimgError("Unsupported non-zero const header padding");
  }
  let v: Uint8Array;
  try {
    const at = sectorsToBytes(f(10));
    v = await readAt(file, at < 0 ? -1 : at, SECTOR);
  } catch (e) {
    throw new QimgError(`Could not read volatile header from file '${file.name}': ${strerror(e)}`);
  }
  const magic = le64n(v, 0);
  if (magic !== 0xcafecafen) throw new QimgError(`Bad volatile header magic: ${hex16(magic)}`);
  if (le64n(v, 24) !== 0n) throw new QimgError("Image is dirty, Replaying journal not supported");
  if (v.subarray(32).some((b) => b !== 0)) {
    throw new QimgError("Unsupported non-zero volatile header padding");
  }
  const capacity = f(2);
  const l1Size = Number(BigInt.asUintN(32, f(17) * 512n / 8n));
  if (l1Size > MAX_L1_SIZE) throw new QimgError("L1 size too big");
  const e = addExtent(st, {
    file,
    flat: false,
    type: "",
    sectors: Number(capacity),
    flatStartOffset: 0,
    compressed: false,
    hasMarker: false,
    hasZeroGrain: false,
    l1Offset: sectorsToBytes(f(16)),
    l1BackupOffset: 0,
    l1Size,
    l2Size: 4096,
    clusterSectors: 8,
  }, await fileSectors(file));
  let l1: BigUint64Array;
  try {
    if (e.l1Offset < 0) throw new QimgError("Input/output error");
    const size = await file.size();
    const inFile = Math.max(0, Math.min(l1Size, Math.floor((size - e.l1Offset) / 8) + 1));
    const buf = await readAt(file, e.l1Offset, inFile * 8);
    l1 = new BigUint64Array(inFile);
    for (let i = 0; i < inFile; i++) l1[i] = le64n(buf, i * 8);
  } catch (err) {
    throw new QimgError(`Could not read l1 table from extent '${file.name}': ${strerror(err)}`);
  }
  e.se = { l1, l2TablesOffset: f(18), clustersOffset: f(24) };
}

async function openSparse(st: OpenState, file: BlockFile, depth: number): Promise<void> {
  const head = new Uint8Array(4);
  await file.read(0, head);
  const magic = be32(head, 0);
  if (magic === VMDK3_MAGIC) return await openVmfsSparse(st, file);
  if (magic === VMDK4_MAGIC) return await openVmdk4(st, file, depth);
  throw new QimgError("Image not in VMDK format");
}

async function openDescriptor(st: OpenState, desc: string, depth: number): Promise<void> {
  st.createType = parseCreateType(desc);
  for (const line of extentLines(desc)) {
    const path = st.top.resolve(line.fileName);
    if (!st.options.openFile) throw new QimgError(`Could not open '${path}': no file access`);
    let file: BlockFile;
    try {
      file = await st.options.openFile(path, st.options.write ?? false);
    } catch (e) {
      throw new QimgError(`Could not open '${path}': ${strerror(e)}`);
    }
    st.opened.push(file);
    const flat = line.type === "FLAT" || line.type === "VMFS";
    if (flat) {
      addExtent(st, {
        file,
        flat: true,
        type: line.type,
        sectors: line.sectors,
        flatStartOffset: line.flatOffset * SECTOR,
        compressed: false,
        hasMarker: false,
        hasZeroGrain: false,
        l1Offset: 0,
        l1BackupOffset: 0,
        l1Size: 0,
        l2Size: 0,
        clusterSectors: 0,
      }, await fileSectors(file));
    } else if (line.type === "SPARSE" || line.type === "VMFSSPARSE") {
      await openSparse(st, file, depth);
    } else if (line.type === "SESPARSE") {
      await openSeSparse(st, file);
    } else {
      throw new QimgError(`Unsupported extent type '${line.type}'`);
    }
    st.extents[st.extents.length - 1].type = line.type;
  }
}

/** A BlockFile standing for the whole image: the descriptor file, sized with all extent files. */
function imageFile(top: BlockFile, extents: Extent[]): BlockFile {
  return {
    get name() {
      return top.name;
    },
    get writable() {
      return top.writable;
    },
    size: () => top.size(),
    async allocated() {
      let total = await top.allocated();
      const seen = new Set<BlockFile>([top]);
      for (const e of extents) {
        if (seen.has(e.file)) continue;
        seen.add(e.file);
        total += await e.file.allocated();
      }
      return total;
    },
    read: (o, b) => top.read(o, b),
    write: (o, d) => top.write(o, d),
    truncate: (s) => top.truncate(s),
    flush: () => top.flush(),
    close: () => top.close(),
    resolve: (n) => top.resolve(n),
    extent: (o, l) => top.extent(o, l),
  };
}

/** An open vmdk image. */
export class VmdkImage implements FormatImage {
  readonly file: BlockFile;
  readonly backing?: BackingRef;
  readonly extents: Extent[];
  readonly createType: string;
  readonly cid: number;
  readonly parentCid: number;
  #top: BlockFile;
  #opened: BlockFile[];
  #descOffset: number;
  #size: number;
  #sizeErrno?: number;
  /** qemu's bs->total_sectors (negative for some hostile sizes). */
  #totalSectors: number;
  #cidUpdated = false;
  #cidChecked = false;
  #lock: Promise<void> = Promise.resolve();
  #openFile?: OpenOptions["openFile"];
  /** streamOptimized: Workers deflating grains. */
  #pool?: CompressPool;
  /** streamOptimized: the buffer runs of grains are laid out in, and copies of data written behind. */
  #streamOut?: Uint8Array;
  #copies: Uint8Array[] = [];
  /** streamOptimized writes returned early, still compressing or being stored. */
  #behind: { done: Promise<void>; offset: number }[] = [];
  /** A write behind failed and its caller (a later write) was told. */
  #behindReported = false;
  /** Buffers of finished reads' grain windows, for the next ones (less to zero and collect). */
  #windows: Uint8Array[] = [];
  /** The last grain inflated (sequential reads take it piece by piece). */
  #grain?: { extent: Extent; offset: number; data: Uint8Array };
  #pending?: { e: Extent; clusterGuest: number; buf: Uint8Array; filled: number };

  constructor(
    top: BlockFile,
    st: OpenState,
    fields: {
      descOffset: number;
      cid: number;
      parentCid: number;
      backing?: string;
      size: number;
      sizeErrno?: number;
      totalSectors: number;
    },
  ) {
    this.#top = top;
    this.#opened = st.opened;
    this.extents = st.extents;
    this.createType = st.createType ?? "monolithicSparse";
    this.#descOffset = fields.descOffset;
    this.cid = fields.cid;
    this.parentCid = fields.parentCid;
    this.#size = fields.size;
    this.#sizeErrno = fields.sizeErrno;
    this.#totalSectors = fields.totalSectors;
    if (fields.backing !== undefined) this.backing = { name: fields.backing, format: "vmdk" };
    this.file = imageFile(top, this.extents);
    if (!(st.options.check && st.options.write)) this.check = () => this.#check();
    this.#openFile = st.options.openFile;
  }

  /**
   * The virtual size; qemu opens some hostile sizes but fails to tell them
   * (info prints that error, check walks the sector count regardless).
   */
  get size(): number {
    if (this.#sizeErrno === undefined) return this.#size;
    const e = this.#sizeErrno;
    throw new SizeQueryError(
      `Can't get image size '${this.#top.name}'${e ? ": " + strerrorNumber(e) : ""}`,
      e,
      BigInt(this.#totalSectors),
    );
  }

  #find(sector: number): Extent | undefined {
    // Extents are few; a linear scan is what qemu does too.
    return this.extents.find((e) => sector < e.endSector);
  }

  async #l2(e: Extent, l2Offset: number): Promise<Uint32Array | BigUint64Array> {
    let t = e.l2Cache.get(l2Offset);
    if (t) return t;
    const width = e.se ? 8 : 4;
    const buf = await readAt(e.file, l2Offset * SECTOR, e.l2Size * width);
    if (e.se) {
      const w = new BigUint64Array(e.l2Size);
      for (let i = 0; i < e.l2Size; i++) w[i] = le64n(buf, i * 8);
      t = w;
    } else {
      const n = new Uint32Array(e.l2Size);
      for (let i = 0; i < e.l2Size; i++) n[i] = le32(buf, i * 4);
      t = n;
    }
    if (e.l2Cache.size >= 64) e.l2Cache.delete(e.l2Cache.keys().next().value!);
    e.l2Cache.set(l2Offset, t);
    return t;
  }

  /** qemu's get_cluster_offset without allocation; `offset` is a guest byte offset. */
  async #lookup(e: Extent, offset: number): Promise<Lookup> {
    if (e.flat) return { kind: "ok", hostOffset: e.flatStartOffset };
    const rel = offset - e.startSector * SECTOR;
    const l1Index = Math.floor(Math.floor(rel / SECTOR) / e.l1EntrySectors);
    if (l1Index >= e.l1Size) return { kind: "error" };
    if (e.se) return await this.#seLookup(e, rel, l1Index);
    const l2Offset = l1Index < e.l1.length ? e.l1[l1Index] : 0;
    if (!l2Offset) return { kind: "unalloc" };
    let table: Uint32Array;
    try {
      table = await this.#l2(e, l2Offset) as Uint32Array;
    } catch {
      return { kind: "error" };
    }
    const l2Index = Math.floor(Math.floor(rel / SECTOR) / e.clusterSectors) % e.l2Size;
    const gte = table[l2Index];
    const where = { l1Index, l2Offset, l2Index };
    if (e.hasZeroGrain && gte === GTE_ZEROED) return { kind: "zeroed", ...where };
    if (!gte) return { kind: "unalloc", ...where };
    return { kind: "ok", hostOffset: gte * SECTOR, ...where };
  }

  /** seSparse entries: a tagged grain table index, tagged grain numbers. */
  async #seLookup(e: Extent, rel: number, l1Index: number): Promise<Lookup> {
    const se = e.se!;
    const dir = l1Index < se.l1.length ? se.l1[l1Index] : 0n;
    if (dir === 0n) return { kind: "unalloc" };
    if ((dir & 0xffffffff00000000n) !== 0x1000000000000000n) return { kind: "error" };
    const l2Sectors = BigInt(e.l2Size * 8 / SECTOR);
    const l2 = se.l2TablesOffset + (dir & 0xffffffffn) * l2Sectors;
    if (l2 > 0xffffffffn) return { kind: "error" };
    let table: BigUint64Array;
    try {
      table = await this.#l2(e, Number(l2)) as BigUint64Array;
    } catch {
      return { kind: "error" };
    }
    const l2Index = Math.floor(Math.floor(rel / SECTOR) / e.clusterSectors) % e.l2Size;
    const v = table[l2Index];
    switch (v >> 60n) {
      case 0n:
        return v === 0n ? { kind: "unalloc" } : { kind: "error" };
      case 1n: // unmapped
      case 2n:
        return { kind: "zeroed" };
      case 3n: {
        const grain = ((v & 0x0fff000000000000n) >> 48n) | ((v & 0x0000ffffffffffffn) << 12n);
        const sector = se.clustersOffset + grain * BigInt(e.clusterSectors);
        const host = sector * 512n;
        if (host > BigInt(Number.MAX_SAFE_INTEGER)) return { kind: "error" };
        return { kind: "ok", hostOffset: Number(host) };
      }
      default:
        return { kind: "error" };
    }
  }

  async read(offset: number, buf: Uint8Array, backingRead?: BackingReader): Promise<void> {
    if (this.#behind.length) await this.#drain();
    if (this.#pending) await this.#locked(() => this.#flushPending());
    let done = 0;
    // Compressed grains of this request come out of one larger read of the file.
    const window: GrainWindow = { start: 0, bytes: new Uint8Array(0), fileSize: 0 };
    while (done < buf.length) {
      const guest = offset + done;
      const e = this.#find(Math.floor(guest / SECTOR));
      if (!e) throw new QimgError("Input/output error");
      const l = await this.#lookup(e, guest);
      const cb = e.clusterSectors * SECTOR;
      const inCluster = (guest - e.startSector * SECTOR) % cb;
      let n = Math.min(buf.length - done, cb - inCluster);
      if (l.kind === "ok" && !e.flat && !e.compressed) {
        // Grains that follow each other in the file are read at once.
        const end = Math.min(buf.length - done, e.endSector * SECTOR - guest);
        while (n < end) {
          const next = await this.#lookup(e, guest + n);
          if (next.kind !== "ok" || next.hostOffset !== l.hostOffset + inCluster + n) break;
          n = Math.min(end, n + cb);
        }
      }
      const dst = buf.subarray(done, done + n);
      if (l.kind === "ok") {
        if (!e.compressed) await readInto(e.file, l.hostOffset + inCluster, dst);
        else {
          window.extent ??= e;
          if (window.extent !== e) Object.assign(window, { extent: e, bytes: new Uint8Array(0) });
          const data = await this.#readGrain(e, l.hostOffset, window, buf.length - done);
          if (inCluster + dst.length > data.length) throw new QimgError("Invalid argument");
          dst.set(data.subarray(inCluster, inCluster + dst.length));
        }
      } else if (l.kind === "error") {
        throw new QimgError("Input/output error");
      } else if (backingRead && l.kind !== "zeroed") {
        if (!await this.#cidValid()) throw new QimgError("Invalid argument");
        await backingRead(guest, dst);
      } else {
        dst.fill(0);
      }
      done += n;
    }
    if (window.store) this.#giveWindow(window.store);
  }

  #takeWindow(length: number): Uint8Array {
    const i = this.#windows.findIndex((b) => b.length >= length);
    return i < 0 ? new Uint8Array(length) : this.#windows.splice(i, 1)[0];
  }

  #giveWindow(buf: Uint8Array): void {
    if (this.#windows.length < 16) this.#windows.push(buf);
  }

  /**
   * One compressed grain, inflated (zlib stream, after a grain marker when
   * the extent has them). Its bytes come from `window`, refilled with what
   * the rest of the request (`ahead` guest bytes) likely needs when short.
   */
  async #readGrain(
    e: Extent,
    hostOffset: number,
    window: GrainWindow,
    ahead: number,
  ): Promise<Uint8Array> {
    await loadZlib();
    if (this.#grain?.offset === hostOffset && this.#grain.extent === e) return this.#grain.data;
    const cb = e.clusterSectors * SECTOR;
    // Two grains' worth, as qemu reads (marker + data may exceed one), but
    // never past the end of the file: hostile grain sizes reach 1 GiB.
    let end = window.start + window.bytes.length;
    const inWindow = hostOffset >= window.start &&
      (hostOffset + cb * 2 <= end || (end === window.fileSize && hostOffset < end));
    if (!inWindow) {
      if (!Number.isSafeInteger(hostOffset) || hostOffset + cb * 2 > 2 ** 63) {
        throw new QimgError("Input/output error");
      }
      window.fileSize = await e.file.size();
      // Stream grains take about half their guest size (random data all of it): refills are cheap.
      const want = cb * 2 + Math.min(ahead >> 1, 1 << 20);
      const length = Math.max(0, Math.min(want, window.fileSize - hostOffset));
      if (!window.store || window.store.length < length) {
        if (window.store) this.#giveWindow(window.store);
        window.store = this.#takeWindow(length);
      }
      window.start = hostOffset;
      window.bytes = window.store.subarray(0, length);
      await readZeroFilled(e.file, hostOffset, window.bytes);
      end = hostOffset + window.bytes.length;
    }
    const avail = Math.max(12, Math.min(cb * 2, window.fileSize - hostOffset));
    let raw = window.bytes.subarray(hostOffset - window.start, hostOffset - window.start + avail);
    if (raw.length < avail) {
      // Past the end of the file: zeroes, as qemu's block layer reads there.
      const padded = new Uint8Array(avail);
      padded.set(raw);
      raw = padded;
    }
    let input = raw.subarray(0, Math.min(raw.length, cb));
    if (e.hasMarker) {
      const size = le32(raw, 8);
      if (!size || size > cb * 2) throw new QimgError("Invalid argument");
      input = raw.subarray(12, Math.min(raw.length, 12 + size));
    }
    let out: Uint8Array;
    try {
      // One output chunk a little larger than a grain: no concatenation of 16 KiB pieces.
      const chunk = Math.min(cb + 1024, 4 << 20);
      out = zlibSync().inflateSync(input, { maxOutputLength: cb + 1024, chunkSize: chunk });
    } catch {
      throw new QimgError("Invalid argument");
    }
    if (out.length > cb) throw new QimgError("Invalid argument");
    this.#grain = { extent: e, offset: hostOffset, data: out };
    return out;
  }

  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    if (this.#behind.length) await this.#drain();
    if (this.#pending) await this.#locked(() => this.#flushPending());
    const e = this.#find(Math.floor(offset / SECTOR));
    if (!e) throw new QimgError("Input/output error");
    const cb = e.clusterSectors * SECTOR;
    const rel = offset - e.startSector * SECTOR;
    const inCluster = rel % cb;
    const first = await this.#lookup(e, offset);
    let n = Math.min(length, cb - inCluster);
    if (first.kind === "error") throw new QimgError("Input/output error");
    if (e.flat && first.kind === "ok") {
      return await this.#flatStatus(e, first.hostOffset + inCluster, n);
    }
    if (first.kind === "unalloc" && first.l2Offset === undefined && !e.se) {
      // No grain table here: the run goes on over all following empty directory entries.
      const l1Sectors = e.l1EntrySectors;
      let index = Math.floor(rel / SECTOR / l1Sectors) + 1;
      while (index < e.l1Size && !(index < e.l1.length ? e.l1[index] : 0)) index++;
      const end = Math.min(e.endSector * SECTOR, (e.startSector + index * l1Sectors) * SECTOR);
      return { length: Math.max(n, Math.min(length, end - offset)), data: false, zero: false };
    }
    // Extend over following grains of the same kind (one grain table at most).
    const l1End = Math.min(
      e.endSector * SECTOR,
      e.startSector * SECTOR +
        (Math.floor(rel / SECTOR / e.l1EntrySectors) + 1) * e.l1EntrySectors * SECTOR,
    );
    while (n < length && offset + n < l1End) {
      const next = await this.#lookup(e, offset + n);
      if (next.kind !== first.kind) break;
      if (next.kind === "ok" && first.kind === "ok") {
        if (e.compressed || next.hostOffset !== first.hostOffset + inCluster + n) break;
      }
      n = Math.min(length, n + cb);
    }
    switch (first.kind) {
      case "unalloc":
        return { length: n, data: false, zero: false };
      case "zeroed":
        return { length: n, data: false, zero: true };
      default:
        if (e.compressed) return { length: n, data: true, zero: false, compressed: true };
        return {
          length: n,
          data: true,
          zero: false,
          hostOffset: first.hostOffset + inCluster,
          file: e.file.name,
        };
    }
  }

  /** A flat extent's status comes from its file (qemu's BDRV_BLOCK_RECURSE): holes read as zeroes. */
  async #flatStatus(e: Extent, hostOffset: number, n: number): Promise<BlockStatus> {
    const where = { hostOffset, file: e.file.name };
    const end = await e.file.size();
    // Past the end, or before the start (a flat offset that wrapped), reads as zeroes.
    if (hostOffset >= end || hostOffset < 0) return { length: n, data: true, zero: true, ...where };
    const h = await e.file.extent(hostOffset, n);
    if (h.data) return { length: Math.min(n, h.length), data: true, zero: false, ...where };
    // A hole running to the end of the file answers for the rest (qemu's EOF rule).
    const len = hostOffset + h.length >= end ? n : Math.min(n, h.length);
    return { length: len, data: true, zero: true, ...where };
  }

  info(): Promise<FormatInfo> {
    const extents: JsonValue[] = this.extents.map((e) => {
      const x: Record<string, JsonValue> = {
        filename: e.file.name,
        format: e.type,
        "virtual-size": jsonInt(e.sectors * SECTOR),
      };
      if (e.compressed) x.compressed = true;
      if (!e.flat) x["cluster-size"] = e.clusterSectors * SECTOR;
      return x;
    });
    const first = this.extents[0];
    // qemu reports a cluster size only when all extents are alike and sparse.
    const alike = first !== undefined &&
      this.extents.every((e) =>
        e.flat === first.flat && e.compressed === first.compressed &&
        (e.flat || e.clusterSectors === first.clusterSectors)
      );
    return Promise.resolve({
      clusterSize: alike && !first.flat ? first.clusterSectors * SECTOR : undefined,
      formatSpecific: {
        type: "vmdk",
        data: {
          cid: this.cid,
          "parent-cid": this.parentCid,
          "create-type": this.createType,
          extents,
        },
      },
    });
  }

  /**
   * Checks the metadata. Absent when opened to repair (check -r): qemu's
   * vmdk check cannot repair and qemu-img then says checks are unsupported.
   */
  check?: (options: { repair?: "leaks" | "all" }) => Promise<CheckResult>;

  /** qemu's vmdk_co_check: every allocated grain must start inside its file. */
  async #check(): Promise<CheckResult> {
    const result: CheckResult = {
      corruptions: 0,
      leaks: 0,
      checkErrors: 0,
      corruptionsFixed: 0,
      leaksFixed: 0,
      messages: [],
    };
    const total = this.#totalSectors;
    const fail = (message: string, error: string) => {
      result.messages.push(message);
      result.corruptions++;
      const err = new QimgError(error) as QimgError & { messages: string[] };
      err.messages = result.messages;
      throw err;
    };
    for (const e of this.extents) {
      let sector = e.startSector;
      while (sector < e.endSector && sector < total) {
        if (!e.flat && !e.se) {
          // Whole unallocated grain tables are skipped at once: qemu finds nothing there.
          const rel = sector - e.startSector;
          const l1Index = Math.floor(rel / e.l1EntrySectors);
          if (l1Index < e.l1Size && !(l1Index < e.l1.length ? e.l1[l1Index] : 0)) {
            const next = e.startSector + (l1Index + 1) * e.l1EntrySectors;
            sector = e.startSector + alignUp(next - e.startSector, e.clusterSectors);
            continue;
          }
        }
        const l = await this.#lookup(e, sector * SECTOR);
        if (l.kind === "error") {
          fail(
            `ERROR: could not get cluster_offset for sector ${sector}`,
            "Operation not permitted",
          );
        }
        if (l.kind === "ok" && l.hostOffset >= await e.file.size()) {
          fail(`ERROR: cluster offset for sector ${sector} points after EOF`, "Invalid argument");
        }
        sector += e.clusterSectors;
      }
    }
    return result;
  }

  /** Runs metadata-changing work one at a time (qemu's per-image CoMutex). */
  #locked<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#lock.then(fn);
    this.#lock = run.then(() => {}, () => {});
    return run;
  }

  /** Writes guest bytes, allocating grains at the end of their extent file as qemu does. */
  write(offset: number, data: Uint8Array, backingRead?: BackingReader): Promise<void> {
    return this.#writeBehind(offset, data) ??
      this.#locked(() => this.#write(offset, data, backingRead));
  }

  /** Whole grains of `data` in halves to the compression Workers (grain results in order). */
  #deflate(data: Uint8Array, cb: number): Promise<BatchResult>[] {
    this.#pool ??= new CompressPool("zlib-stream");
    const pool = this.#pool;
    const half = Math.ceil(data.length / cb / 2) * cb;
    return [data.subarray(0, half), data.subarray(half)].filter((d) => d.length)
      .map((d) => pool.compressBatch(d, cb));
  }

  /**
   * streamOptimized, two or more whole grains: returns at once, the grains
   * already on their way to the compression Workers, and stores them in
   * turn once compressed, so that the Workers always have the next grains
   * while the file is written. At most BEHIND writes are outstanding; an
   * error comes back from a later write, flush or close.
   */
  #writeBehind(offset: number, data: Uint8Array): Promise<void> | undefined {
    const e = this.#find(Math.floor(offset / SECTOR));
    if (!e || e.flat || !e.compressed || !e.hasMarker) return;
    const cb = e.clusterSectors * SECTOR;
    const wholeBytes = Math.floor(data.length / cb) * cb;
    if ((offset - e.startSector * SECTOR) % cb || wholeBytes < 2 * cb) return;
    if (offset + data.length > e.endSector * SECTOR) return;
    // The caller reuses its buffer once this returns.
    let whole = this.#copies.pop();
    if (!whole || whole.length < data.length) whole = new Uint8Array(data.length);
    const copy = whole.subarray(0, data.length);
    copy.set(data);
    const job = Promise.all(this.#deflate(copy.subarray(0, wholeBytes), cb));
    job.catch(() => {});
    const done = this.#locked(async () => {
      const batches = await job;
      try {
        if (this.#pending) return await this.#write(offset, copy);
        const deflated = batches.flat();
        let pos = 0;
        while (pos < wholeBytes) {
          const l = await this.#lookup(e, offset + pos);
          if (l.kind === "error" || (l.kind !== "ok" && l.l2Offset === undefined)) {
            throw new QimgError("Invalid argument");
          }
          if (l.kind === "ok") throw new QimgError("Input/output error");
          const rest = copy.subarray(pos, wholeBytes);
          pos += await this.#streamRun(e, l, offset + pos, rest, deflated.slice(pos / cb));
          await this.#updateCid();
        }
        if (pos < copy.length) await this.#write(offset + pos, copy.subarray(pos));
      } finally {
        for (const b of batches) this.#pool?.recycle(b);
        this.#copies.push(whole!);
      }
    });
    done.catch(() => {});
    this.#behind.push({ done, offset });
    if (this.#behind.length <= BEHIND) return Promise.resolve();
    return this.#behind.shift()!.done.catch((err) => {
      this.#behindReported = true;
      throw err;
    });
  }

  /** Waits for the writes still going on behind; throws the first error. */
  async #drain(): Promise<void> {
    while (this.#behind.length) {
      const { done, offset } = this.#behind.shift()!;
      // No caller saw this one fail: as the copy would have said it.
      await done.catch((err) => {
        throw new QimgError(`error while writing at byte ${offset}: ${strerror(err)}`);
      });
    }
  }

  async #write(offset: number, data: Uint8Array, backingRead?: BackingReader): Promise<void> {
    if (Math.ceil(offset / SECTOR) > this.size / SECTOR) {
      throw new QimgError("Input/output error");
    }
    let done = 0;
    while (done < data.length) {
      const guest = offset + done;
      const e = this.#find(Math.floor(guest / SECTOR));
      if (!e) throw new QimgError("Input/output error");
      const cb = e.clusterSectors * SECTOR;
      const inCluster = (guest - e.startSector * SECTOR) % cb;
      let n = Math.min(data.length - done, cb - inCluster);
      const piece = data.subarray(done, done + n);
      const l = await this.#lookup(e, guest);
      if (l.kind === "error") throw new QimgError("Invalid argument");
      if (e.flat && l.kind === "ok") {
        await e.file.write(l.hostOffset + inCluster, piece);
      } else if (e.compressed) {
        if (l.kind === "ok") throw new QimgError("Input/output error");
        if (
          !this.#pending && inCluster === 0 && e.hasMarker && l.l2Offset !== undefined &&
          data.length - done >= 2 * cb
        ) {
          n = await this.#streamRun(e, l, guest, data.subarray(done));
        } else await this.#writeStream(e, guest, inCluster, piece);
      } else {
        n = await this.#sparseRun(e, l, guest, inCluster, data.subarray(done), backingRead);
      }
      done += n;
      await this.#updateCid();
    }
  }

  /**
   * streamOptimized takes whole grains only. qemu-img always sends those
   * (compressed writes); other writers may send a grain in pieces, so a
   * partial grain waits here, zero-filled, until it is whole or another
   * grain is written (appends stay in guest order).
   */
  async #writeStream(e: Extent, guest: number, inCluster: number, piece: Uint8Array) {
    const cb = e.clusterSectors * SECTOR;
    const clusterGuest = guest - inCluster;
    const grainLength = Math.min(cb, e.endSector * SECTOR - clusterGuest);
    const p = this.#pending;
    if (p && p.clusterGuest !== clusterGuest) await this.#flushPending();
    if (!this.#pending && inCluster === 0 && piece.length === grainLength) {
      const l = await this.#lookup(e, guest);
      return await this.#writeGrain(e, l, guest, 0, piece);
    }
    this.#pending ??= { e, clusterGuest, buf: new Uint8Array(grainLength), filled: 0 };
    const q = this.#pending;
    q.buf.set(piece, inCluster);
    q.filled += piece.length;
    if (q.filled >= grainLength) await this.#flushPending();
  }

  async #flushPending(): Promise<void> {
    const q = this.#pending;
    if (!q) return;
    this.#pending = undefined;
    const l = await this.#lookup(q.e, q.clusterGuest);
    if (l.kind === "ok") throw new QimgError("Input/output error");
    await this.#writeGrain(q.e, l, q.clusterGuest, 0, q.buf);
  }

  /**
   * Writes the start of `rest` (at `guest`, `inCluster` into its grain) over
   * a run of grains of one grain table; returns the bytes written. Grains
   * already allocated and contiguous in the file take the data in place in
   * one write. New grains are allocated together at the end of the file
   * (partial ones completed from the backing file or zeroes) in one write,
   * then their grain table entries, and the redundant table's, in one write
   * each: qemu writes every grain and every entry on its own, data first.
   */
  async #sparseRun(
    e: Extent,
    first: Lookup,
    guest: number,
    inCluster: number,
    rest: Uint8Array,
    backingRead?: BackingReader,
  ): Promise<number> {
    if (first.kind === "error") throw new QimgError("Invalid argument");
    const isNew = first.kind !== "ok";
    if (isNew && first.l2Offset === undefined) {
      // No grain table for this range (qemu leaves that undefined).
      throw new QimgError("Invalid argument");
    }
    if (isNew && e.nextClusterSector >= EXTENT_MAX_SECTORS) throw new QimgError("Invalid argument");
    const cb = e.clusterSectors * SECTOR;
    const clusterGuest = guest - inCluster;
    const base = e.startSector * SECTOR;
    const tableSpan = e.l1EntrySectors * SECTOR;
    const tableEnd = Math.min(
      e.endSector * SECTOR,
      base + (Math.floor((clusterGuest - base) / tableSpan) + 1) * tableSpan,
    );
    const end = Math.min(guest + rest.length, tableEnd);
    // New grains stop where grain offsets would no longer fit (qemu's check per grain).
    const room = isNew
      ? Math.ceil((EXTENT_MAX_SECTORS - e.nextClusterSector) / e.clusterSectors)
      : Infinity;
    let grains = 1;
    let last: Lookup = first;
    while (clusterGuest + grains * cb < end && grains < room) {
      const next = await this.#lookup(e, clusterGuest + grains * cb);
      if (isNew) {
        if (next.kind !== "unalloc" && next.kind !== "zeroed") break;
      } else if (
        next.kind !== "ok" ||
        next.hostOffset !== (first as { hostOffset: number }).hostOffset + grains * cb
      ) {
        break;
      }
      last = next;
      grains++;
    }
    const bytes = Math.min(end, clusterGuest + grains * cb, guest + rest.length) - guest;
    const piece = rest.subarray(0, bytes);
    if (first.kind === "ok") {
      await e.file.write(first.hostOffset + inCluster, piece);
      return bytes;
    }
    const span = grains * cb;
    const tail = span - inCluster - bytes;
    let out = piece;
    if (inCluster > 0 || tail > 0) {
      out = new Uint8Array(span);
      if (backingRead && !await this.#cidValid()) throw new QimgError("Invalid argument");
      if (backingRead && inCluster > 0 && first.kind !== "zeroed") {
        await backingRead(clusterGuest, out.subarray(0, inCluster));
      }
      if (backingRead && tail > 0 && last.kind !== "zeroed") {
        await backingRead(guest + bytes, out.subarray(span - tail));
      }
      out.set(piece, inCluster);
    } else if (backingRead && !await this.#cidValid()) {
      throw new QimgError("Invalid argument");
    }
    const sector = e.nextClusterSector;
    e.nextClusterSector += grains * e.clusterSectors;
    await e.file.write(sector * SECTOR, out);
    const values = Array.from({ length: grains }, (_, i) => sector + i * e.clusterSectors);
    await this.#setGtes(e, first, values);
    return bytes;
  }

  /**
   * Stores consecutive grain table entries from `first`'s (all in its
   * table) in one write, and in one more the redundant table's.
   */
  async #setGtes(e: Extent, first: Lookup, values: number[]): Promise<void> {
    if (first.kind === "error" || first.l2Offset === undefined) return;
    const entries = new Uint8Array(values.length * 4);
    const l2Index = first.l2Index!;
    const table = e.l2Cache.get(first.l2Offset) as Uint32Array | undefined;
    values.forEach((value, i) => {
      putLe32(entries, i * 4, value);
      if (table) table[l2Index + i] = value;
    });
    await e.file.write(first.l2Offset * SECTOR + l2Index * 4, entries);
    const backup = e.l1Backup?.[first.l1Index!];
    if (e.l1BackupOffset && backup !== undefined) {
      await e.file.write(backup * SECTOR + l2Index * 4, entries);
    }
  }

  /**
   * streamOptimized: the whole grains at the start of `rest` (`guest` is
   * grain-aligned; all new, in one grain table) deflated on the
   * compression Workers (byte for byte as qemu), two halves at once, laid out back to back
   * behind their grain markers in one write, then their table entries in
   * one write (qemu deflates, writes and enters each grain on its own).
   * Returns the bytes written.
   */
  async #streamRun(
    e: Extent,
    first: Lookup,
    guest: number,
    rest: Uint8Array,
    ready?: BatchResult,
  ): Promise<number> {
    const cb = e.clusterSectors * SECTOR;
    const base = e.startSector * SECTOR;
    const tableSpan = e.l1EntrySectors * SECTOR;
    const tableEnd = Math.min(
      e.endSector * SECTOR,
      base + (Math.floor((guest - base) / tableSpan) + 1) * tableSpan,
    );
    let grains = Math.floor(Math.min(rest.length, tableEnd - guest) / cb);
    for (let i = 1; i < grains; i++) {
      const next = await this.#lookup(e, guest + i * cb);
      if (next.kind !== "unalloc" && next.kind !== "zeroed") grains = i;
    }
    const data = rest.subarray(0, grains * cb);
    const batches = ready ? [] : await Promise.all(this.#deflate(data, cb));
    const deflated = ready ?? batches.flat();
    // Each grain: a marker (guest sector, size) and a zlib stream, from a sector boundary.
    const sectors: number[] = [];
    const sizes: number[] = [];
    let next = e.nextClusterSector;
    let overflow = false;
    for (let i = 0; i < grains; i++) {
      if (next >= EXTENT_MAX_SECTORS) {
        overflow = true;
        grains = i;
        break;
      }
      const raw = deflated[i];
      // Grains that do not shrink: a zlib stream of stored blocks (as zlib makes of them).
      const size = raw ? raw.length : 2 + storedLength(cb) + 4;
      sectors.push(next);
      sizes.push(size);
      next = Math.ceil((next * SECTOR + 12 + size) / SECTOR);
    }
    if (grains === 0) throw new QimgError("Invalid argument");
    const start = sectors[0];
    // qemu zero-fills each grain's whole cluster before writing it: the last one shows.
    const length = Math.max((sectors[grains - 1] - start) * SECTOR + cb, (next - start) * SECTOR);
    // One buffer for every run (runs are stored one at a time): less garbage, less memory.
    if (!this.#streamOut || this.#streamOut.length < length) {
      this.#streamOut = new Uint8Array(length);
    }
    const out = this.#streamOut.subarray(0, length);
    out.fill(0);
    const view = new DataView(out.buffer, out.byteOffset, out.length);
    for (let i = 0; i < grains; i++) {
      const at = (sectors[i] - start) * SECTOR;
      view.setBigUint64(at, BigInt(Math.floor((guest + i * cb) / SECTOR)), true);
      view.setUint32(at + 8, sizes[i], true);
      const raw = deflated[i];
      if (raw) {
        out.set(raw, at + 12);
        continue;
      }
      const grain = data.subarray(i * cb, (i + 1) * cb);
      // zlib header: deflate, 32 KiB window, fastest level (stored blocks).
      out[at + 12] = 0x78;
      out[at + 13] = 0x01;
      view.setUint32(putStored(out, at + 14, grain), adler32(grain), false);
    }
    await e.file.write(start * SECTOR, out);
    e.nextClusterSector = next;
    await this.#setGtes(e, first, sectors);
    if (overflow) throw new QimgError("Invalid argument");
    return grains * cb;
  }

  /** streamOptimized: a whole grain, deflated behind a grain marker, appended. */
  async #writeGrain(
    e: Extent,
    l: Lookup,
    guest: number,
    inCluster: number,
    piece: Uint8Array,
  ): Promise<void> {
    const cb = e.clusterSectors * SECTOR;
    if (l.kind === "error" || l.kind === "ok" || l.l2Offset === undefined) {
      throw new QimgError("Invalid argument");
    }
    if (
      inCluster || piece.length > cb ||
      (piece.length < cb && guest + piece.length !== e.endSector * SECTOR) || !e.hasMarker
    ) {
      throw new QimgError("Invalid argument");
    }
    if (e.nextClusterSector >= EXTENT_MAX_SECTORS) throw new QimgError("Invalid argument");
    const sector = e.nextClusterSector;
    const deflated = (await loadZlib()).deflateSync(piece);
    // qemu first zero-fills the whole cluster it allocated, then writes the grain over it.
    const out = new Uint8Array(Math.max(cb, 12 + deflated.length));
    new DataView(out.buffer).setBigUint64(0, BigInt(Math.floor(guest / SECTOR)), true);
    putLe32(out, 8, deflated.length);
    out.set(deflated, 12);
    await e.file.write(sector * SECTOR, out);
    e.nextClusterSector = Math.ceil((sector * SECTOR + 12 + deflated.length) / SECTOR);
    await this.#setGte(e, l, sector);
  }

  async #setGte(e: Extent, l: Lookup, value: number): Promise<void> {
    if (l.kind === "error" || l.l2Offset === undefined) return;
    const entry = new Uint8Array(4);
    putLe32(entry, 0, value);
    await e.file.write(l.l2Offset * SECTOR + l.l2Index! * 4, entry);
    const backup = e.l1Backup?.[l.l1Index!];
    if (e.l1BackupOffset && backup !== undefined) {
      await e.file.write(backup * SECTOR + l.l2Index! * 4, entry);
    }
    (e.l2Cache.get(l.l2Offset) as Uint32Array | undefined)?.set([value], l.l2Index!);
  }

  /**
   * qemu reads through to the parent only while the parent's CID is the
   * parentCID recorded here: a parent written since reads as an error.
   */
  async #cidValid(): Promise<boolean> {
    if (this.#cidChecked || !this.backing) return true;
    let file: BlockFile | undefined;
    try {
      file = await this.#openFile!(this.#top.resolve(this.backing.name), false);
      const magic = be32(await readAt(file, 0, 4), 0);
      const sparse = magic === VMDK3_MAGIC || magic === VMDK4_MAGIC;
      const area = await readAt(file, sparse ? 0x200 : 0, DESC_SIZE);
      area[DESC_SIZE - 1] = 0;
      if (readCid(cString(latin1(area)), false) !== this.parentCid) return false;
    } catch {
      return false;
    } finally {
      await file?.close().catch(() => {});
    }
    this.#cidChecked = true;
    return true;
  }

  /** qemu rewrites the CID (a random one) on the first write after opening. */
  async #updateCid(): Promise<void> {
    if (this.#cidUpdated) return;
    this.#cidUpdated = true;
    const top = this.#top;
    const buf = await readAt(top, this.#descOffset, DESC_SIZE);
    buf[DESC_SIZE - 1] = 0;
    const desc = cString(latin1(buf));
    const updated = replaceCid(desc, randomCid());
    if (updated === undefined) throw new QimgError("Invalid argument");
    const bytes = fromLatin1(updated).subarray(0, DESC_SIZE - 1);
    buf.set(bytes, 0);
    buf[bytes.length] = 0;
    // The block layer cuts writes at its sector-rounded size of the file.
    const limit = alignUp(await top.size(), SECTOR) - this.#descOffset;
    if (limit > 0) await top.write(this.#descOffset, buf.subarray(0, Math.min(DESC_SIZE, limit)));
  }

  /**
   * As qemu's block layer: the range is cut at the largest grain size into
   * an unaligned head, an aligned middle and a tail; each piece whose grains
   * are all whole grains of zeroed-grain extents becomes GTE 1 entries, the
   * others are written as zeroes.
   */
  writeZeroes(offset: number, length: number): Promise<void> {
    return this.#locked(() => this.#writeZeroes(offset, length));
  }

  async #writeZeroes(offset: number, length: number): Promise<void> {
    const align = Math.max(
      0,
      ...this.extents.filter((e) => !e.flat).map((e) => e.clusterSectors * SECTOR),
    );
    const pieces: [number, number][] = [];
    if (align === 0) {
      pieces.push([offset, length]);
    } else {
      const end = offset + length;
      const headEnd = Math.min(end, alignUp(offset, align));
      const tailStart = Math.max(headEnd, end - (end % align));
      if (headEnd > offset) pieces.push([offset, headEnd - offset]);
      if (tailStart > headEnd) pieces.push([headEnd, tailStart - headEnd]);
      if (end > tailStart) pieces.push([tailStart, end - tailStart]);
    }
    for (const [at, len] of pieces) await this.#zeroPiece(at, len);
  }

  async #zeroPiece(offset: number, length: number): Promise<void> {
    const zeroGrains = await this.#zeroGrainPlan(offset, length);
    if (zeroGrains) {
      for (const { e, l } of zeroGrains) {
        if (l.kind !== "zeroed") await this.#setGte(e, l, GTE_ZEROED);
      }
      if (zeroGrains.length) await this.#updateCid();
      return;
    }
    const chunk = new Uint8Array(Math.min(length, 1 << 20));
    for (let done = 0; done < length; done += chunk.length) {
      await this.#write(offset + done, chunk.subarray(0, Math.min(chunk.length, length - done)));
    }
  }

  async #zeroGrainPlan(offset: number, length: number) {
    const plan: { e: Extent; l: Lookup }[] = [];
    for (let at = offset; at < offset + length;) {
      const e = this.#find(Math.floor(at / SECTOR));
      if (!e || e.flat || !e.hasZeroGrain) return undefined;
      const cb = e.clusterSectors * SECTOR;
      if ((at - e.startSector * SECTOR) % cb || offset + length - at < cb) return undefined;
      const l = await this.#lookup(e, at);
      if (l.kind === "error" || l.l2Offset === undefined) return undefined;
      if (e.compressed && l.kind === "ok") return undefined;
      plan.push({ e, l });
      at += cb;
    }
    return plan;
  }

  /** The compressed-cluster entry point of convert -c; an empty write ends the stream. */
  writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    return this.#locked(() => this.#writeCompressed(offset, data));
  }

  async #writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    if (data.length === 0) {
      await this.#flushPending();
      for (const f of new Set(this.extents.map((e) => e.file))) {
        const size = await f.size();
        if (size % SECTOR) await f.truncate(alignUp(size, SECTOR));
      }
      return;
    }
    await this.#write(offset, data);
  }

  async flush(): Promise<void> {
    await this.#drain();
    await this.#locked(() => this.#flushPending());
    for (const f of new Set([this.#top, ...this.extents.map((e) => e.file)])) await f.flush();
  }

  async close(): Promise<void> {
    try {
      // A failure a caller was told of already is not told again.
      await this.#drain().catch((err) => {
        if (!this.#behindReported) throw err;
      });
      await this.#locked(() => this.#flushPending());
    } finally {
      await Promise.allSettled(this.#behind.splice(0).map((b) => b.done));
      this.#pool?.close();
      for (const f of this.#opened) await f.close();
      await this.#top.close();
    }
  }
}

function randomCid(): number {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

/** Opens a vmdk image on `file`: a sparse file, or a descriptor naming its extents. */
export async function openVmdk(file: BlockFile, options: OpenOptions = {}): Promise<VmdkImage> {
  const st: OpenState = { top: file, options, extents: [], opened: [], totalSectors: 0n };
  try {
    const buf = await readDescText(file, 0);
    const magic = be32(buf, 0);
    let descOffset = 0;
    if (magic === VMDK3_MAGIC || magic === VMDK4_MAGIC) {
      await openSparse(st, file, 0);
      descOffset = 0x200;
    } else {
      await openDescriptor(st, cString(utf8(buf)), 0);
    }
    // parentFileNameHint and the CIDs come from the descriptor area at descOffset.
    const area = await readAt(file, descOffset, DESC_SIZE);
    const hintText = cString(utf8(area));
    const hint = parentFileNameHint(hintText);
    const invalid = () => new QimgError(`Could not open '${file.name}': Invalid argument`);
    if (hint === null) throw invalid();
    area[DESC_SIZE - 1] = 0;
    const cidText = cString(latin1(area));
    const cid = readCid(cidText, false);
    const parentCid = readCid(cidText, true);
    if (cid === undefined || parentCid === undefined) throw invalid();
    const { size, errno } = blockLayerSize(st.totalSectors);
    return new VmdkImage(file, st, {
      descOffset,
      cid,
      parentCid,
      backing: hint || undefined,
      size,
      sizeErrno: errno,
      totalSectors: Number(st.totalSectors),
    });
  } catch (e) {
    for (const f of st.opened) await f.close().catch(() => {});
    throw e;
  }
}

/** vmdk's create options in qemu 7.2's table order. */
export const VMDK_CREATE_OPTIONS: OptionDesc[] = [
  SIZE_OPTION,
  {
    name: "adapter_type",
    type: "string",
    help: "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
  },
  { name: "backing_file", type: "string", help: "File name of a base image" },
  { name: "backing_fmt", type: "string", help: "Must be 'vmdk' if present" },
  { name: "compat6", type: "bool", help: "VMDK version 6 image", default: "off" },
  { name: "hwversion", type: "string", help: "VMDK hardware version", default: "undefined" },
  { name: "toolsversion", type: "string", help: "VMware guest tools version" },
  {
    name: "subformat",
    type: "string",
    help:
      "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ",
  },
  {
    name: "zeroed_grain",
    type: "bool",
    help: "Enable efficient zero writes using the zeroed-grain GTE feature",
  },
];

const SUBFORMATS = [
  "monolithicSparse",
  "monolithicFlat",
  "twoGbMaxExtentSparse",
  "twoGbMaxExtentFlat",
  "streamOptimized",
];
const ADAPTER_TYPES = ["ide", "buslogic", "lsilogic", "legacyESX"];
/** VMDK's constant split size for twoGbMaxExtent* subformats. */
const SPLIT_SIZE = 0x80000000;

/** The header and empty tables of a new hosted sparse extent, as qemu's vmdk_init_extent. */
function sparseExtentLayout(size: number, compress: boolean, zeroedGrain: boolean) {
  const capacity = Math.floor(size / SECTOR);
  const granularity = 128;
  const gtes = 512;
  const grains = Math.ceil(capacity / granularity);
  const gtSize = Math.ceil((gtes * 4) / SECTOR);
  const gtCount = Math.ceil(grains / gtes);
  const gdSectors = Math.ceil((gtCount * 4) / SECTOR);
  const descOffset = 1;
  const descSize = 20;
  const rgdOffset = descOffset + descSize;
  const gdOffset = rgdOffset + gdSectors + gtSize * gtCount;
  const grainOffset = alignUp(gdOffset + gdSectors + gtSize * gtCount, granularity);
  const h = new Uint8Array(SECTOR);
  const v = new DataView(h.buffer);
  v.setUint32(0, VMDK4_MAGIC, false);
  v.setUint32(4, compress ? 3 : zeroedGrain ? 2 : 1, true);
  v.setUint32(
    8,
    FLAG_RGD | FLAG_NL_DETECT | (compress ? FLAG_COMPRESS | FLAG_MARKER : 0) |
      (zeroedGrain ? FLAG_ZERO_GRAIN : 0),
    true,
  );
  v.setBigUint64(12, BigInt(capacity), true);
  v.setBigUint64(20, BigInt(granularity), true);
  v.setBigUint64(28, BigInt(descOffset), true);
  v.setBigUint64(36, BigInt(descSize), true);
  v.setUint32(44, gtes, true);
  v.setBigUint64(48, BigInt(rgdOffset), true);
  v.setBigUint64(56, BigInt(gdOffset), true);
  v.setBigUint64(64, BigInt(grainOffset), true);
  h.set([0x0a, 0x20, 0x0d, 0x0a], 73);
  v.setUint16(77, compress ? COMPRESSION_DEFLATE : 0, true);
  return { header: h, gdSectors, gtSize, gtCount, rgdOffset, gdOffset, grainOffset };
}

async function initSparseExtent(
  file: BlockFile,
  size: number,
  compress: boolean,
  zeroedGrain: boolean,
): Promise<void> {
  const l = sparseExtentLayout(size, compress, zeroedGrain);
  // Only the header's 79 bytes are written; the rest of sector 0 stays a hole.
  await file.write(0, l.header.subarray(0, 79));
  await file.truncate(l.grainOffset * SECTOR);
  const gd = new Uint8Array(l.gdSectors * SECTOR);
  for (
    const [at, first] of [[l.rgdOffset, l.rgdOffset + l.gdSectors], [
      l.gdOffset,
      l.gdOffset + l.gdSectors,
    ]]
  ) {
    for (let i = 0; i < l.gtCount; i++) putLe32(gd, i * 4, first + i * l.gtSize);
    await file.write(at * SECTOR, gd);
  }
}

function decompose(filename: string): { path: string; prefix: string; postfix: string } {
  let cut = filename.lastIndexOf("/");
  if (cut < 0) cut = filename.lastIndexOf("\\");
  if (cut < 0) cut = filename.lastIndexOf(":");
  const path = cut < 0 ? "" : filename.slice(0, cut + 1);
  const base = filename.slice(cut + 1);
  const dot = base.lastIndexOf(".");
  return dot < 0
    ? { path, prefix: base, postfix: "" }
    : { path, prefix: base.slice(0, dot), postfix: base.slice(dot) };
}

function basename(path: string): string {
  const trimmed = path.replace(/\/+$/, "");
  return trimmed.slice(trimmed.lastIndexOf("/") + 1) || path;
}

/** Creates a vmdk image: qemu's vmdk_co_create_opts and its descriptor. */
async function createVmdk(file: BlockFile, options: CreateOptions): Promise<void> {
  const o = options.options;
  // qemu checks these options before it creates the file: a refusal leaves none.
  const refuse = async (message: string): Promise<never> => {
    await options.removeFile?.(file.name).catch(() => {});
    throw new QimgError(message);
  };
  const backingFmt = o.backing_fmt as string | undefined;
  if (backingFmt !== undefined && backingFmt !== "vmdk") {
    await refuse("backing_file must be a vmdk image");
  }
  if (file.name === "") throw new QimgError("No filename provided");
  const { path, prefix, postfix } = decompose(file.name);
  const size = alignUp(options.size, SECTOR);
  const adapter = (o.adapter_type as string | undefined) ?? "ide";
  if (!ADAPTER_TYPES.includes(adapter)) {
    await refuse(`invalid parameter value: ${adapter}`);
  }
  const subformat = (o.subformat as string | undefined) ?? "monolithicSparse";
  if (!SUBFORMATS.includes(subformat)) {
    await refuse(`invalid parameter value: ${subformat}`);
  }
  let hwVersion = o.hwversion as string | undefined;
  if (hwVersion === "undefined") hwVersion = undefined;
  const backing = o.backing_file as string | undefined;
  const zeroedGrain = o.zeroed_grain === true;
  if (o.compat6 === true) {
    if (hwVersion !== undefined) {
      await refuse("compat6 cannot be enabled with hwversion set");
    }
    hwVersion = "6";
  }
  hwVersion ??= "4";
  const toolsVersion = (o.toolsversion as string | undefined) ?? "2147483647";
  const heads = adapter === "ide" ? 16 : 255;
  const split = subformat.startsWith("twoGbMaxExtent");
  const flat = subformat === "monolithicFlat" || subformat === "twoGbMaxExtentFlat";
  const compress = subformat === "streamOptimized";
  if (flat && backing !== undefined) await refuse("Flat image can't have backing file");
  if (flat && zeroedGrain) await refuse("Flat image can't enable zeroed grain");

  const lineFor = (sectors: number, name: string) =>
    flat
      ? `RW ${sectors} FLAT "${basename(name)}" 0\n`
      : `RW ${sectors} SPARSE "${basename(name)}"\n`;
  let lines = "";
  const extentSize = split ? SPLIT_SIZE : size;
  let created = !split && !flat ? extentSize : 0;
  if (!split && !flat) {
    await initSparseExtent(file, created, compress, zeroedGrain);
    lines += lineFor(Math.ceil(created / SECTOR), file.name);
  }
  let parentCid = 0xffffffff;
  let parentHint = "";
  if (backing !== undefined) {
    parentCid = await backingCid(file, backing, options);
    parentHint = `parentFileNameHint="${backing}"`;
  }
  if (!options.openFile) throw new QimgError("Could not create extent files");
  for (let idx = 1; created < size; idx++) {
    const cur = Math.min(size - created, extentSize);
    const rel = split
      ? `${prefix}-${flat ? "f" : "s"}${String(idx).padStart(3, "0")}${postfix}`
      : `${prefix}-flat${postfix}`;
    const name = path + rel;
    const ext = await options.openFile(name, { create: true, write: true });
    try {
      // Each extent file is made as qemu's file protocol makes a file (first block allocated).
      await createFile(ext, 0);
      if (flat) await truncateFile(ext, cur);
      else await initSparseExtent(ext, cur, compress, zeroedGrain);
    } finally {
      await ext.close();
    }
    lines += lineFor(Math.ceil(cur / SECTOR), name);
    created += cur;
  }
  const desc = buildDescriptor({
    cid: randomCid(),
    parentCid,
    createType: subformat,
    parentHint,
    extentLines: lines,
    hwVersion,
    cylinders: Math.floor(size / (63 * heads * SECTOR)),
    heads,
    adapterType: adapter,
    toolsVersion,
  });
  const bytes = new TextEncoder().encode(desc);
  const descOffset = !split && !flat ? 0x200 : 0;
  await file.write(descOffset, bytes);
  if (descOffset === 0) await file.truncate(bytes.length);
}

/**
 * The format qemu would probe for a non-vmdk backing file, for create's
 * message (a few magics; the registry cannot be imported from here).
 */
function guessFormat(head: Uint8Array): string {
  const ascii = latin1(head.subarray(0, 16));
  if (ascii.startsWith("QFI\xfb")) return head[7] === 1 ? "qcow" : "qcow2";
  if (ascii.startsWith("QED\0")) return "qed";
  if (ascii.startsWith("conectix")) return "vpc";
  if (ascii.startsWith("vhdxfile")) return "vhdx";
  if (ascii.startsWith("LUKS\xba\xbe")) return "luks";
  if (ascii.startsWith("WithoutFreeSpace") || ascii.startsWith("WithouFreSpacExt")) {
    return "parallels";
  }
  if (head.length >= 0x44 && le32(head, 0x40) === 0xbeda107f) return "vdi";
  return "raw";
}

/** The CID of the vmdk image `backing` names (create's parentCID). */
async function backingCid(
  file: BlockFile,
  backing: string,
  options: CreateOptions,
): Promise<number> {
  const path = file.resolve(backing);
  let bf: BlockFile;
  try {
    bf = await options.openFile!(path, { write: false });
  } catch (e) {
    throw new QimgError(`Could not open '${path}': ${strerror(e)}`);
  }
  const head = new Uint8Array(2048);
  const n = await bf.read(0, head).catch(() => 0);
  if (!probeVmdk(head.subarray(0, n))) {
    await bf.close();
    throw new QimgError(
      `Invalid backing file format: ${guessFormat(head.subarray(0, n))}. Must be vmdk`,
    );
  }
  let image: VmdkImage;
  try {
    image = await openVmdk(bf, { openFile: (p, w) => options.openFile!(p, { write: w }) });
  } catch (e) {
    await bf.close();
    throw e;
  }
  await image.close();
  return image.cid;
}

/** The vmdk format driver. */
export const vmdkDriver: FormatDriver = {
  name: "vmdk",
  probe: (head) => probeVmdk(head),
  open: openVmdk,
  create: createVmdk,
  createOptions: VMDK_CREATE_OPTIONS,
  supportsBacking: true,
};
