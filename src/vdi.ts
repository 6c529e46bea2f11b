/**
 * The vdi format (VirtualBox Virtual Disk Image, header version 1.1): a
 * 512-byte little-endian header, a block map of 32-bit entries, then 1 MiB
 * data blocks in allocation order. Dynamic images allocate blocks on
 * write; static ones map block i to data block i from the start. Checks,
 * messages and allocation as qemu-img 7.2.
 */

import { Lock } from "./lock.ts";
import type {
  BlockStatus,
  CheckResult,
  CreateOptions,
  FormatDriver,
  FormatImage,
  FormatInfo,
  OpenOptions,
} from "./driver.ts";
import { type BlockFile, readZeroFilled } from "./file.ts";
import { EXIT, QimgError } from "./errors.ts";
import { le32, le64, putLe32, putLe64 } from "./bytes.ts";
import { ProtocolError, truncateFile } from "./protocol.ts";
import { type OptionDesc, SIZE_OPTION } from "./options.ts";
import { probeVdi } from "./format_probes.ts";

const SECTOR = 512;
const HEADER_SIZE = 512;
const SIGNATURE = 0xbeda107f;
const VERSION_1_1 = 0x00010001;
const TYPE_DYNAMIC = 1;
const TYPE_STATIC = 2;
const BLOCK_SIZE = 1 << 20;
/** Never allocated: reads as zeroes here. */
const UNALLOCATED = 0xffffffff;
/** Discarded: reads as zeroes. Entries below this are allocated. */
const DISCARDED = 0xfffffffe;
/** qemu's limit: the block map, sector-aligned, must fit in an int. */
const MAX_BLOCKS = (2 ** 31 - SECTOR) / 4;
const MAX_DISK_SIZE = MAX_BLOCKS * BLOCK_SIZE;
/** The banner qemu writes into the header's text field. */
const QEMU_TEXT = "<<< QEMU VM Virtual Disk Image >>>\n";

/** Header field offsets (VirtualBox's VDIHEADER1 after the 72-byte pre-header). */
const H = {
  signature: 64,
  version: 68,
  headerSize: 72,
  imageType: 76,
  offsetBmap: 340,
  offsetData: 344,
  sectorSize: 360,
  diskSize: 368,
  blockSize: 376,
  blocksInImage: 384,
  blocksAllocated: 388,
  uuidImage: 392,
  uuidLastSnap: 408,
  uuidLink: 424,
  uuidParent: 440,
} as const;

/** qemu 7.2's `-o` table for vdi, in its order. */
export const VDI_CREATE_OPTIONS: OptionDesc[] = [
  SIZE_OPTION,
  { name: "static", type: "bool", help: "VDI static (pre-allocated) image", default: "off" },
];

/** The header fields qimg uses. */
export interface VdiHeader {
  signature: number;
  version: number;
  imageType: number;
  offsetBmap: number;
  offsetData: number;
  sectorSize: number;
  diskSize: number;
  blockSize: number;
  blocksInImage: number;
  blocksAllocated: number;
  /** UUIDs in VirtualBox's text form. */
  uuidImage: string;
  uuidLastSnap: string;
  uuidLink: string;
  uuidParent: string;
}

/** A UUID stored as VirtualBox does (first three fields little-endian) in text form. */
function uuidText(b: Uint8Array, off: number): string {
  const h = (i: number) => b[off + i].toString(16).padStart(2, "0");
  const order = [3, 2, 1, 0, -1, 5, 4, -1, 7, 6, -1, 8, 9, -1, 10, 11, 12, 13, 14, 15];
  return order.map((i) => (i < 0 ? "-" : h(i))).join("");
}

/** Parses the 512-byte header. */
export function parseVdiHeader(b: Uint8Array): VdiHeader {
  return {
    signature: le32(b, H.signature),
    version: le32(b, H.version),
    imageType: le32(b, H.imageType),
    offsetBmap: le32(b, H.offsetBmap),
    offsetData: le32(b, H.offsetData),
    sectorSize: le32(b, H.sectorSize),
    diskSize: le64(b, H.diskSize),
    blockSize: le32(b, H.blockSize),
    blocksInImage: le32(b, H.blocksInImage),
    blocksAllocated: le32(b, H.blocksAllocated),
    uuidImage: uuidText(b, H.uuidImage),
    uuidLastSnap: uuidText(b, H.uuidLastSnap),
    uuidLink: uuidText(b, H.uuidLink),
    uuidParent: uuidText(b, H.uuidParent),
  };
}

const NULL_UUID = "00000000-0000-0000-0000-000000000000";

function hex(n: number): string {
  return n.toString(16);
}

/** Zeroes padding new blocks (never written to). */
let zeroBlock: Uint8Array | undefined;

/** An open vdi image. */
export class VdiImage implements FormatImage {
  readonly file: BlockFile;
  readonly header: VdiHeader;
  readonly size: number;
  /** The header as stored, rewritten with new counts after allocations. */
  readonly #rawHeader: Uint8Array;
  /** The block map as far as the file holds it; entries past it read as 0, as qemu's zero-padded read. */
  readonly #bmap: Uint32Array;
  /** Entries set past the stored part of the map (hostile or truncated images). */
  readonly #beyond = new Map<number, number>();
  #lock = new Lock();

  constructor(file: BlockFile, raw: Uint8Array, header: VdiHeader, bmap: Uint32Array) {
    this.file = file;
    this.#rawHeader = raw;
    this.header = header;
    this.size = header.diskSize;
    this.#bmap = bmap;
  }

  #entry(block: number): number {
    return block < this.#bmap.length ? this.#bmap[block] : this.#beyond.get(block) ?? 0;
  }

  #host(offset: number): number {
    const entry = this.#entry(Math.floor(offset / BLOCK_SIZE));
    if (entry >= DISCARDED) return -1;
    return this.header.offsetData + entry * BLOCK_SIZE + offset % BLOCK_SIZE;
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    // Blocks past the end of the file read as zeroes without a read: a hostile
    // map's offsets reach beyond what the host may even seek to (EINVAL).
    const end = await this.file.size();
    for (let done = 0; done < buf.length;) {
      const guest = offset + done;
      let n = Math.min(buf.length - done, BLOCK_SIZE - guest % BLOCK_SIZE);
      const host = this.#host(guest);
      // Blocks that follow each other in the file are read at once.
      while (host >= 0 && done + n < buf.length && this.#host(guest + n) === host + n) {
        n = Math.min(buf.length - done, n + BLOCK_SIZE);
      }
      const dst = buf.subarray(done, done + n);
      if (host < 0 || host >= end) dst.fill(0);
      else await readZeroFilled(this.file, host, dst);
      done += n;
    }
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.#lock.run(async () => {
      let first = -1;
      let last = -1;
      for (let done = 0; done < data.length;) {
        const guest = offset + done;
        const inBlock = guest % BLOCK_SIZE;
        let n = Math.min(data.length - done, BLOCK_SIZE - inBlock);
        const block = Math.floor(guest / BLOCK_SIZE);
        const host = this.#host(guest);
        if (host >= 0) {
          // Blocks that follow each other in the file take the data in one write.
          while (done + n < data.length && this.#host(guest + n) === host + n) {
            n = Math.min(data.length - done, n + BLOCK_SIZE);
          }
          await this.file.write(host, data.subarray(done, done + n));
        } else {
          // New blocks go after the allocated ones, in order, written whole
          // (zero-padded) in one write; the map and header once per request.
          let count = 1;
          while (done + n < data.length && this.#host(guest + n) < 0) {
            n = Math.min(data.length - done, n + BLOCK_SIZE);
            count++;
          }
          const entry = this.header.blocksAllocated;
          for (let i = 0; i < count; i++) this.#setEntry(block + i, entry + i);
          this.header.blocksAllocated = (entry + count) >>> 0;
          // The zeroes around the data come from one shared buffer (no copy of the data).
          const at = this.header.offsetData + entry * BLOCK_SIZE;
          const tail = count * BLOCK_SIZE - inBlock - n;
          zeroBlock ??= new Uint8Array(BLOCK_SIZE);
          if (inBlock) await this.file.write(at, zeroBlock.subarray(0, inBlock));
          await this.file.write(at + inBlock, data.subarray(done, done + n));
          if (tail) await this.file.write(at + inBlock + n, zeroBlock.subarray(0, tail));
          if (first < 0) first = block;
          last = block + count - 1;
        }
        done += n;
      }
      if (first >= 0) await this.#writeMetadata(first, last);
    });
  }

  #setEntry(block: number, entry: number): void {
    if (block < this.#bmap.length) this.#bmap[block] = entry;
    else this.#beyond.set(block, entry);
  }

  /** Rewrites the header (new allocation count) and the block map sectors from `first` to `last`. */
  async #writeMetadata(first: number, last: number): Promise<void> {
    const raw = this.#rawHeader;
    putLe32(raw, H.blocksAllocated, this.header.blocksAllocated);
    putLe64(raw, H.diskSize, this.header.diskSize); // qemu stores the sector-rounded size
    await this.file.write(0, raw);
    const perSector = SECTOR / 4;
    const from = Math.floor(first / perSector);
    const to = Math.floor(last / perSector);
    const out = new Uint8Array((to - from + 1) * SECTOR);
    for (let i = 0; i < out.length / 4; i++) putLe32(out, i * 4, this.#entry(from * perSector + i));
    await this.file.write(this.header.offsetBmap + from * SECTOR, out);
  }

  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    const n = Math.min(length, BLOCK_SIZE - offset % BLOCK_SIZE);
    const host = this.#host(offset);
    if (host < 0) {
      // One answer for the whole run of unallocated blocks (bounded by `length`).
      let run = n;
      while (run < length && this.#host(offset + run) < 0) {
        run += Math.min(length - run, BLOCK_SIZE);
      }
      return { length: run, data: false, zero: true };
    }
    const where = { hostOffset: host, file: this.file.name };
    if (this.header.imageType !== TYPE_STATIC) {
      // Blocks that follow each other in the file answer as one run.
      let run = n;
      while (run < length && this.#host(offset + run) === host + run) {
        run += Math.min(length - run, BLOCK_SIZE);
      }
      return { length: run, data: true, zero: false, ...where };
    }
    // Static images: qemu asks the host file (BDRV_BLOCK_RECURSE), holes read as zeroes.
    const end = await this.file.size();
    if (host >= end) return { length: n, data: true, zero: true, ...where };
    const e = await this.file.extent(host, n);
    if (e.data) return { length: Math.min(n, e.length), data: true, zero: false, ...where };
    const len = host + e.length >= end ? n : Math.min(n, e.length);
    return { length: len, data: true, zero: true, ...where };
  }

  info(): Promise<FormatInfo> {
    return Promise.resolve({ clusterSize: this.header.blockSize });
  }

  /** qemu's vdi check: each allocated entry in range and used once, and the allocation count. */
  check(options: { repair?: "leaks" | "all" }): Promise<CheckResult> {
    if (options.repair) {
      throw new QimgError("This image format does not support checks", {
        exitCode: EXIT.CHECK_UNSUPPORTED,
      });
    }
    const counts = { corruptions: 0, allocated: 0 };
    const walk = (text: boolean) =>
      checkLines(
        this.#bmap,
        [...this.#beyond].sort((x, y) => x[0] - y[0]),
        this.header,
        counts,
        text,
      );
    for (const _ of walk(false));
    return Promise.resolve({
      corruptions: counts.corruptions,
      leaks: 0,
      checkErrors: 0,
      corruptionsFixed: 0,
      leaksFixed: 0,
      messages: [],
      // qemu lists every entry past the end of the file (hostile maps: 2^29): streamed.
      moreMessages: walk(true),
    });
  }

  flush(): Promise<void> {
    return this.file.flush();
  }

  close(): Promise<void> {
    return this.file.close();
  }
}

/** Lines per chunk of a check's streamed output. */
const CHECK_CHUNK = 1 << 15;

/**
 * qemu's vdi check walk: each allocated entry in range and used once, and
 * the allocation count. Counts into `counts`; with `text`, yields the
 * lines, batched. Entries past the stored map read as 0 (qemu's
 * zero-padded read), so each after the first is the same duplicate line:
 * counted at once, printed in chunks.
 */
function* checkLines(
  bmap: Uint32Array,
  beyond: [number, number][],
  h: VdiHeader,
  counts: { corruptions: number; allocated: number },
  text: boolean,
): Generator<string> {
  const total = h.blocksInImage;
  const stored = Math.min(total, bmap.length);
  // Which data blocks are used, as bits: at most what the file's map holds, plus block 0.
  let highest = 0;
  for (let b = 0; b < stored; b++) if (bmap[b] < total && bmap[b] > highest) highest = bmap[b];
  for (const [, e] of beyond) if (e < total && e > highest) highest = e;
  const used = new Uint8Array((highest >>> 3) + 1);
  let corruptions = 0;
  let allocated = 0;
  let out = "";
  let lines = 0;
  const visit = (block: number, entry: number) => {
    if (entry >= DISCARDED) return;
    if (entry < total) {
      allocated++;
      if (!(used[entry >>> 3] & (1 << (entry & 7)))) used[entry >>> 3] |= 1 << (entry & 7);
      else {
        // qemu prints the entry twice (its message reads the entry back from its own map).
        if (text) out += `ERROR: block index ${entry} also used by ${entry}\n`;
        lines++;
        corruptions++;
      }
    } else {
      if (text) out += `ERROR: block index ${block} too large, is ${entry}\n`;
      lines++;
      corruptions++;
    }
  };
  for (let b = 0; b < stored; b++) {
    visit(b, bmap[b]);
    if (lines >= CHECK_CHUNK) {
      if (text) yield out;
      out = "";
      lines = 0;
    }
  }
  for (const [b, entry] of beyond) visit(b, entry);
  let tail = total - stored - beyond.length;
  if (tail > 0 && !(used[0] & 1)) {
    visit(stored, 0);
    tail--;
  }
  allocated += tail;
  corruptions += tail;
  if (text) {
    if (out) yield out;
    out = "";
    const line = "ERROR: block index 0 also used by 0\n";
    const chunk = line.repeat(Math.min(tail, CHECK_CHUNK));
    for (; tail >= CHECK_CHUNK; tail -= CHECK_CHUNK) yield chunk;
    if (tail) yield line.repeat(tail);
  }
  if (allocated !== h.blocksAllocated) {
    if (text) {
      yield `ERROR: allocated blocks mismatch, is ${allocated}, should be ${h.blocksAllocated}\n`;
    }
    corruptions++;
  }
  counts.corruptions = corruptions;
  counts.allocated = allocated;
}

/** Opens a vdi image on `file`, with qemu-img 7.2's checks and messages. */
export async function openVdi(file: BlockFile, _options: OpenOptions = {}): Promise<VdiImage> {
  const raw = new Uint8Array(HEADER_SIZE);
  await readZeroFilled(file, 0, raw);
  const h = parseVdiHeader(raw);
  const diskSize = le64(raw, H.diskSize);
  if (diskSize > MAX_DISK_SIZE) {
    const exact = BigInt.asUintN(64, new DataView(raw.buffer).getBigUint64(H.diskSize, true));
    throw new QimgError(
      `Unsupported VDI image size (size is 0x${exact.toString(16)}, max supported is 0x${
        hex(MAX_DISK_SIZE)
      })`,
    );
  }
  // VBoxManage convertfromraw can write odd sizes: qemu rounds up to whole sectors.
  h.diskSize = Math.ceil(diskSize / SECTOR) * SECTOR;
  const room = h.blocksInImage * h.blockSize;
  if (h.signature !== SIGNATURE) {
    throw new QimgError(
      `Image not in VDI format (bad signature ${hex(h.signature).padStart(8, "0")})`,
    );
  } else if (h.version !== VERSION_1_1) {
    throw new QimgError(
      `unsupported VDI image (version ${h.version >>> 16}.${h.version & 0xffff})`,
    );
  } else if (h.offsetBmap % SECTOR) {
    throw new QimgError(
      `unsupported VDI image (unaligned block map offset 0x${hex(h.offsetBmap)})`,
    );
  } else if (h.offsetData % SECTOR) {
    throw new QimgError(`unsupported VDI image (unaligned data offset 0x${hex(h.offsetData)})`);
  } else if (h.sectorSize !== SECTOR) {
    throw new QimgError(`unsupported VDI image (sector size ${h.sectorSize} is not ${SECTOR})`);
  } else if (h.blockSize !== BLOCK_SIZE) {
    throw new QimgError(
      `unsupported VDI image (block size ${h.blockSize} is not ${BLOCK_SIZE})`,
    );
  } else if (h.diskSize > room) {
    throw new QimgError(
      `unsupported VDI image (disk size ${h.diskSize}, image bitmap has room for ${room})`,
    );
  } else if (h.uuidLink !== NULL_UUID) {
    throw new QimgError("unsupported VDI image (non-NULL link UUID)");
  } else if (h.uuidParent !== NULL_UUID) {
    throw new QimgError("unsupported VDI image (non-NULL parent UUID)");
  } else if (h.blocksInImage > MAX_BLOCKS) {
    throw new QimgError(
      `unsupported VDI image (too many blocks ${h.blocksInImage}, max is ${MAX_BLOCKS})`,
    );
  }
  // The map holds blocksInImage entries; only what the file holds is read
  // (qemu reads zeroes past its end), so a hostile count allocates nothing.
  const fileSize = await file.size();
  const mapBytes = Math.ceil(h.blocksInImage * 4 / SECTOR) * SECTOR;
  const present = Math.max(0, Math.min(mapBytes, fileSize - h.offsetBmap));
  const count = Math.min(h.blocksInImage, Math.ceil(present / 4));
  const bytes = new Uint8Array(Math.ceil(count * 4 / SECTOR) * SECTOR);
  await readZeroFilled(file, h.offsetBmap, bytes);
  const bmap = new Uint32Array(count);
  for (let i = 0; i < count; i++) bmap[i] = le32(bytes, i * 4);
  return new VdiImage(file, raw, h, bmap);
}

/** Creates a vdi image as qemu-img 7.2: dynamic, or static (`static=on`) with every block mapped. */
export async function createVdi(file: BlockFile, options: CreateOptions): Promise<void> {
  const isStatic = options.options.static === true;
  const size = Math.ceil(options.size / SECTOR) * SECTOR;
  if (size > MAX_DISK_SIZE) {
    throw new QimgError(
      `Unsupported VDI image size (size is 0x${hex(size)}, max supported is 0x${
        hex(MAX_DISK_SIZE)
      })`,
    );
  }
  const blocks = Math.ceil(size / BLOCK_SIZE);
  const mapBytes = Math.ceil(blocks * 4 / SECTOR) * SECTOR;
  const raw = new Uint8Array(HEADER_SIZE);
  raw.set(new TextEncoder().encode(QEMU_TEXT), 0);
  putLe32(raw, H.signature, SIGNATURE);
  putLe32(raw, H.version, VERSION_1_1);
  putLe32(raw, H.headerSize, 0x180);
  putLe32(raw, H.imageType, isStatic ? TYPE_STATIC : TYPE_DYNAMIC);
  putLe32(raw, H.offsetBmap, HEADER_SIZE);
  putLe32(raw, H.offsetData, HEADER_SIZE + mapBytes);
  putLe32(raw, H.sectorSize, SECTOR);
  putLe64(raw, H.diskSize, size);
  putLe32(raw, H.blockSize, BLOCK_SIZE);
  putLe32(raw, H.blocksInImage, blocks);
  if (isStatic) putLe32(raw, H.blocksAllocated, blocks);
  raw.set(uuidV4(), H.uuidImage);
  raw.set(uuidV4(), H.uuidLastSnap);
  await file.write(0, raw);
  if (mapBytes) {
    const map = new Uint8Array(mapBytes);
    for (let i = 0; i < blocks; i++) putLe32(map, i * 4, isStatic ? i : UNALLOCATED);
    await file.write(HEADER_SIZE, map);
  }
  if (isStatic) {
    try {
      await truncateFile(file, HEADER_SIZE + mapBytes + blocks * BLOCK_SIZE);
    } catch (e) {
      if (e instanceof ProtocolError) {
        throw new ProtocolError(`Failed to statically allocate file${e.message}`, e.errno);
      }
      throw e;
    }
  }
}

/** A random (version 4) UUID in VirtualBox's byte order. */
function uuidV4(): Uint8Array {
  const u = crypto.getRandomValues(new Uint8Array(16));
  u[6] = (u[6] & 0x0f) | 0x40;
  u[8] = (u[8] & 0x3f) | 0x80;
  // The first three fields are stored little-endian.
  return new Uint8Array([u[3], u[2], u[1], u[0], u[5], u[4], u[7], u[6], ...u.subarray(8)]);
}

/** The vdi format driver. */
export const vdiDriver: FormatDriver = {
  name: "vdi",
  probe: probeVdi,
  open: openVdi,
  create: createVdi,
  createOptions: VDI_CREATE_OPTIONS,
};
