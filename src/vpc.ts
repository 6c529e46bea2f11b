/**
 * The vpc format (Microsoft VHD: Virtual PC, Hyper-V, Disk2vhd): fixed
 * disks (raw data, footer at the end) and dynamic disks (footer copy at
 * the start, dynamic disk header, block allocation table, blocks of a
 * sector bitmap plus data). Layout from Microsoft's "Virtual Hard Disk
 * Image Format Specification"; sizing, messages and write behaviour as
 * qemu-img 7.2. Differencing disks open as dynamic ones: qemu 7.2 ignores
 * their parent locators, so unallocated blocks read as zeroes there too.
 */

import { Lock } from "./lock.ts";
import type {
  BlockStatus,
  CopyRun,
  CreateOptions,
  FormatDriver,
  FormatImage,
  FormatInfo,
  OpenOptions,
} from "./driver.ts";
import { CopyRunList } from "./driver.ts";
import { type BlockFile, readZeroFilled } from "./file.ts";
import { QimgError } from "./errors.ts";
import { be16, be32, be64, be64n, putBe16, putBe32, putBe64 } from "./bytes.ts";
import { ProtocolError, truncateFile } from "./protocol.ts";
import { type OptionDesc, SIZE_OPTION } from "./options.ts";
import { probeVpc } from "./format_probes.ts";

const SECTOR = 512;
const FOOTER_SIZE = 512;
const TYPE_FIXED = 2;
const TYPE_DYNAMIC = 3;
/** Seconds from the Unix epoch to 2000-01-01, the VHD time base. */
const VHD_EPOCH = 946684800;
const CHS_MAX_C = 65535;
const CHS_MAX_H = 16;
const CHS_MAX_S = 255;
/** 65535 x 16 x 255: the largest geometry; images of this geometry use current_size. */
const MAX_GEOMETRY = CHS_MAX_C * CHS_MAX_H * CHS_MAX_S;
/** qemu's limit: 2040 GiB in sectors. */
const MAX_SECTORS = 0xff000000;
const UNALLOCATED = 0xffffffff;
/** qemu's block size for the dynamic disks it creates. */
const CREATE_BLOCK_SIZE = 0x200000;
/** Reads at or past this offset fail in qemu's block layer (beyond BDRV_MAX_LENGTH). */
const MAX_READ_BIG = (1n << 63n) - (1n << 30n);

/** Creator applications whose images are sized by the footer's current_size, not CHS. */
const CURRENT_SIZE_CREATORS = ["win ", "qem2", "d2v ", "CTXS", "tap\0"];

/** qemu 7.2's `-o` table for vpc, in its order. */
export const VPC_CREATE_OPTIONS: OptionDesc[] = [
  SIZE_OPTION,
  {
    name: "subformat",
    type: "string",
    help: "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} ",
  },
  {
    name: "force_size",
    type: "bool",
    help:
      "Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation",
  },
];

/** One's complement of the byte sum (the footer's and the dynamic header's checksum). */
function checksum(b: Uint8Array): number {
  let sum = 0;
  for (const x of b) sum += x;
  return (~sum) >>> 0;
}

function ascii(b: Uint8Array, off: number, n: number): string {
  return String.fromCharCode(...b.subarray(off, off + n));
}

/** A CHS geometry. */
export interface Geometry {
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
}

/** The VHD specification's CHS calculation for `totalSectors` (may round down). */
export function chsGeometry(totalSectors: number): Geometry {
  const total = Math.min(totalSectors, MAX_GEOMETRY);
  let spt: number;
  let heads: number;
  let cth: number;
  if (total >= 65535 * 16 * 63) {
    spt = 255;
    heads = 16;
    cth = Math.floor(total / spt);
  } else {
    spt = 17;
    cth = Math.floor(total / spt);
    heads = Math.max(4, Math.ceil(cth / 1024));
    if (cth >= heads * 1024 || heads > 16) {
      spt = 31;
      heads = 16;
      cth = Math.floor(total / spt);
    }
    if (cth >= heads * 1024) {
      spt = 63;
      heads = 16;
      cth = Math.floor(total / spt);
    }
  }
  return { cylinders: Math.floor(cth / heads), heads, sectorsPerTrack: spt };
}

/**
 * qemu's sizing for a new image of `size` bytes (a multiple of 512): the
 * smallest geometry holding it, and the sectors that geometry gives; the
 * maximum geometry (or force_size) keeps the size as given.
 */
export function roundedImageSize(
  size: number,
  forceSize: boolean,
): { geometry: Geometry; sectors: number } {
  let g: Geometry = { cylinders: 0, heads: 0, sectorsPerTrack: 0 };
  if (forceSize) {
    g = { cylinders: CHS_MAX_C, heads: CHS_MAX_H, sectorsPerTrack: CHS_MAX_S };
  } else {
    const want = Math.min(MAX_GEOMETRY, Math.floor(size / SECTOR));
    // Geometry rounds down: try more sectors until it holds the size (a few steps).
    for (let i = 0; want > g.cylinders * g.heads * g.sectorsPerTrack; i++) {
      g = chsGeometry(want + i);
    }
  }
  const chs = g.cylinders * g.heads * g.sectorsPerTrack;
  if (chs === MAX_GEOMETRY) {
    const sectors = Math.floor(size / SECTOR);
    if (sectors > MAX_SECTORS) {
      throw new ProtocolError("Disk size is too large, max size is 2040 GiB", "EFBIG");
    }
    return { geometry: g, sectors };
  }
  return { geometry: g, sectors: chs };
}

/** The footer fields qimg uses. */
interface Footer {
  bytes: Uint8Array;
  dataOffset: number;
  creatorApp: string;
  currentSize: number;
  geometry: Geometry;
  type: number;
}

function parseFooter(b: Uint8Array): Footer {
  return {
    bytes: b,
    dataOffset: be64(b, 16),
    creatorApp: ascii(b, 28, 4),
    currentSize: be64(b, 48),
    geometry: { cylinders: be16(b, 56), heads: b[58], sectorsPerTrack: b[59] },
    type: be32(b, 60),
  };
}

/** An open vpc image. */
export class VpcImage implements FormatImage {
  readonly file: BlockFile;
  readonly size: number;
  readonly #footer: Footer;
  /** The block allocation table (dynamic disks only; entries in sectors). */
  readonly #bat: Uint32Array | undefined;
  readonly #batOffset: number;
  readonly #blockSize: number;
  readonly #bitmapSize: number;
  #freeOffset: number;
  #lastBitmap = -1;
  #lock = new Lock();

  constructor(
    file: BlockFile,
    footer: Footer,
    size: number,
    dyn?: {
      bat: Uint32Array;
      batOffset: number;
      blockSize: number;
      bitmapSize: number;
      freeOffset: number;
    },
  ) {
    this.file = file;
    this.#footer = footer;
    this.size = size;
    this.#bat = dyn?.bat;
    this.#batOffset = dyn?.batOffset ?? 0;
    this.#blockSize = dyn?.blockSize ?? 0;
    this.#bitmapSize = dyn?.bitmapSize ?? 0;
    this.#freeOffset = dyn?.freeOffset ?? 0;
  }

  /** Whether the footer says fixed: data at its guest offset in the file. */
  get #fixed(): boolean {
    return this.#footer.type === TYPE_FIXED;
  }

  /** Host offset of guest `offset`, or -1 when its block is not allocated. */
  #hostOffset(offset: number): number {
    if (!this.#bat || this.#blockSize === 0) return -1;
    const index = Math.floor(offset / this.#blockSize);
    if (index >= this.#bat.length || this.#bat[index] === UNALLOCATED) return -1;
    return this.#bat[index] * SECTOR + this.#bitmapSize + offset % this.#blockSize;
  }

  /** Bytes from `offset` to the end of its block (the whole rest for fixed disks). */
  #inBlock(offset: number, length: number): number {
    if (this.#blockSize === 0) return length;
    return Math.min(length, this.#blockSize - offset % this.#blockSize);
  }

  async read(offset: number, buf: Uint8Array): Promise<void> {
    if (this.#fixed) return await readZeroFilled(this.file, offset, buf);
    for (let done = 0; done < buf.length;) {
      const n = this.#inBlock(offset + done, buf.length - done);
      const host = this.#hostOffset(offset + done);
      const dst = buf.subarray(done, done + n);
      if (host < 0) dst.fill(0);
      else await readZeroFilled(this.file, host, dst);
      done += n;
    }
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    if (this.#fixed) return this.file.write(offset, data);
    return this.#lock.run(async () => {
      for (let done = 0; done < data.length;) {
        const guest = offset + done;
        const n = this.#inBlock(guest, data.length - done);
        let host = this.#hostOffset(guest);
        if (host < 0) {
          host = await this.#allocate(guest);
        } else {
          // qemu marks every sector of a block used, once per block it writes to.
          const bitmap = host - this.#bitmapSize - guest % this.#blockSize;
          if (bitmap !== this.#lastBitmap) {
            this.#lastBitmap = bitmap;
            await this.file.write(bitmap, new Uint8Array(this.#bitmapSize).fill(0xff));
          }
        }
        await this.file.write(host, data.subarray(done, done + n));
        done += n;
      }
    });
  }

  /** Appends a block for guest `offset` where the footer was, moves the footer, updates the BAT. */
  async #allocate(offset: number): Promise<number> {
    const bat = this.#bat;
    if (!bat || this.#blockSize === 0) throw new QimgError("Invalid argument");
    const index = Math.floor(offset / this.#blockSize);
    if (index >= bat.length) throw new QimgError("Invalid argument");
    const start = this.#freeOffset;
    bat[index] = start / SECTOR;
    await this.file.write(start, new Uint8Array(this.#bitmapSize).fill(0xff));
    this.#freeOffset = start + this.#bitmapSize + this.#blockSize;
    await this.file.write(this.#freeOffset, this.#footer.bytes);
    const entry = new Uint8Array(4);
    putBe32(entry, 0, bat[index]);
    await this.file.write(this.#batOffset + 4 * index, entry);
    return this.#hostOffset(offset);
  }

  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    if (this.#fixed) {
      // qemu asks the host file (BDRV_BLOCK_RECURSE): holes read as zeroes.
      return { ...(await this.#hostStatus(offset, length)), data: true };
    }
    const host = this.#hostOffset(offset);
    if (host >= 0) {
      return {
        length: this.#inBlock(offset, length),
        data: true,
        zero: false,
        hostOffset: host,
        file: this.file.name,
      };
    }
    let n = 0;
    while (n < length && this.#hostOffset(offset + n) < 0) {
      n += this.#inBlock(offset + n, length - n);
    }
    return { length: Math.min(n, length), data: false, zero: true };
  }

  /**
   * Convert's finer view (blockStatus must call whole blocks data, as
   * qemu's): holes of the host file inside a block read as zeroes, so they
   * are neither read nor scanned (qemu-img's convert leaves a block's zero
   * runs unwritten, as holes); the rest lies as it is at its host offset.
   */
  async copyMap(offset: number, length: number): Promise<CopyRun[]> {
    if (this.#fixed) return [{ length, zero: false, hostOffset: offset }];
    const list = new CopyRunList();
    for (let done = 0; done < length;) {
      const n = this.#inBlock(offset + done, length - done);
      const host = this.#hostOffset(offset + done);
      if (host < 0) list.add(n, true);
      else await list.addHost(this.file, host, n);
      done += n;
    }
    return list.runs;
  }

  async #hostStatus(
    offset: number,
    length: number,
  ): Promise<{ length: number; zero: boolean; hostOffset: number; file: string }> {
    const where = { hostOffset: offset, file: this.file.name };
    const end = await this.file.size();
    if (offset >= end) return { length, zero: true, ...where };
    const e = await this.file.extent(offset, length);
    if (e.data) return { length: Math.min(length, e.length), zero: false, ...where };
    return {
      length: offset + e.length >= end ? length : Math.min(length, e.length),
      zero: true,
      ...where,
    };
  }

  info(): Promise<FormatInfo> {
    // qemu reports the block size as cluster size, except for fixed disks.
    return Promise.resolve(
      this.#fixed || this.#blockSize === 0 ? {} : { clusterSize: this.#blockSize },
    );
  }

  flush(): Promise<void> {
    return this.file.flush();
  }

  close(): Promise<void> {
    return this.file.close();
  }
}

/** Opens a vpc image on `file`, with qemu-img 7.2's checks and messages. */
export async function openVpc(file: BlockFile, _options: OpenOptions = {}): Promise<VpcImage> {
  // qemu's block layer counts whole sectors: a file's length rounds up to 512.
  const fileSize = Math.ceil(await file.size() / SECTOR) * SECTOR;
  let raw = new Uint8Array(FOOTER_SIZE);
  await readZeroFilled(file, 0, raw);
  let dynamic = true;
  if (ascii(raw, 0, 8) !== "conectix") {
    if (fileSize < FOOTER_SIZE) throw new QimgError("File too small for a VHD header");
    // A fixed disk has its footer only at the end.
    raw = new Uint8Array(FOOTER_SIZE);
    await readZeroFilled(file, fileSize - FOOTER_SIZE, raw);
    // Only a fixed disk may have its footer at the end alone.
    if (ascii(raw, 0, 8) !== "conectix" || be32(raw, 60) !== TYPE_FIXED) {
      throw new QimgError("invalid VPC image");
    }
    dynamic = false;
  }
  const stored = be32(raw, 64);
  const probe = raw.slice();
  putBe32(probe, 64, 0);
  if (checksum(probe) !== stored) throw new QimgError("Incorrect header checksum");
  const footer = parseFooter(raw);

  // Virtual PC sizes disks by their geometry; Hyper-V, Disk2vhd, Xen and
  // qemu's force_size by current_size; so does the maximum geometry.
  const g = footer.geometry;
  let sectors = g.cylinders * g.heads * g.sectorsPerTrack;
  if (CURRENT_SIZE_CREATORS.includes(footer.creatorApp) || sectors === MAX_GEOMETRY) {
    sectors = Math.floor(footer.currentSize / SECTOR);
  }
  // qemu fails with EFBIG and no message of its own: the block layer adds the file name.
  if (sectors > MAX_SECTORS) throw new QimgError(`Could not open '${file.name}': File too large`);
  const size = sectors * SECTOR;
  if (!dynamic) return new VpcImage(file, footer, size);

  // Exact 64-bit offsets: qemu's block layer fails requests ending past its limit (EIO).
  if (be64n(footer.bytes, 16) + 1024n > MAX_READ_BIG) {
    throw new QimgError("Error reading dynamic VHD header");
  }
  const hdr = new Uint8Array(1024);
  // Past the end of the file it reads as zeroes (the host may not even seek there).
  if (footer.dataOffset < fileSize) await readZeroFilled(file, footer.dataOffset, hdr);
  if (ascii(hdr, 0, 8) !== "cxsparse") throw new QimgError("Invalid header magic");
  const blockSize = be32(hdr, 32);
  if (blockSize < SECTOR || (blockSize & (blockSize - 1)) !== 0) {
    throw new QimgError(`Invalid block size ${blockSize}`);
  }
  const bitmapSize = Math.ceil(blockSize / (8 * SECTOR) / SECTOR) * SECTOR;
  const entries = be32(hdr, 28);
  if (Math.floor(size / blockSize) > 0xffffffff) throw new QimgError("Too many blocks");
  if (entries * blockSize < size) throw new QimgError("Page table too small");
  // qemu keeps the count in a C int: above INT_MAX it prints negative.
  if (entries > 0x1fffffff) {
    throw new QimgError(`Max Table Entries too large (${entries | 0})`);
  }
  const batOffset = be64(hdr, 16);
  const batBytes = entries * 4;
  if (be64n(hdr, 16) + BigInt(batBytes) > MAX_READ_BIG) {
    throw new QimgError("Error reading pagetable");
  }
  // The table cannot lie past the end of the file (qemu refuses that below),
  // so its size is bounded by the file's before anything is allocated.
  const tableEnd = Math.ceil((batOffset + batBytes) / SECTOR) * SECTOR;
  if (tableEnd > fileSize) throw truncated();
  const table = new Uint8Array(batBytes);
  await readZeroFilled(file, batOffset, table);
  const bat = new Uint32Array(entries);
  let freeOffset = tableEnd;
  for (let i = 0; i < entries; i++) {
    bat[i] = be32(table, i * 4);
    if (bat[i] !== UNALLOCATED) {
      freeOffset = Math.max(freeOffset, bat[i] * SECTOR + bitmapSize + blockSize);
    }
  }
  if (freeOffset > fileSize) throw truncated();
  return new VpcImage(file, footer, size, { bat, batOffset, blockSize, bitmapSize, freeOffset });
}

function truncated(): QimgError {
  return new QimgError(
    "block-vpc: free_data_block_offset points after the end of file. The image has been truncated.",
  );
}

/** Creates a vpc image as qemu-img 7.2: dynamic (default) or fixed, CHS-rounded unless force_size. */
export async function createVpc(file: BlockFile, options: CreateOptions): Promise<void> {
  const o = options.options;
  const subformat = (o.subformat as string | undefined) ?? "dynamic";
  if (subformat !== "dynamic" && subformat !== "fixed") {
    throw new QimgError(`Parameter 'subformat' does not accept value '${subformat}'`);
  }
  const forceSize = o.force_size === true;
  // qemu silently rounds up to whole sectors, then to whole CHS geometry.
  let size = Math.ceil(options.size / SECTOR) * SECTOR;
  const rounded = roundedImageSize(size, forceSize);
  if (!forceSize) size = rounded.sectors * SECTOR;
  const { geometry, sectors } = roundedImageSize(size, forceSize);

  const footer = new Uint8Array(FOOTER_SIZE);
  footer.set(new TextEncoder().encode("conectix"), 0);
  putBe32(footer, 8, 2); // features: reserved bit, always set
  putBe32(footer, 12, 0x00010000);
  putBe64(footer, 16, subformat === "dynamic" ? FOOTER_SIZE : 0xffffffffffffffffn);
  putBe32(footer, 24, Math.floor(Date.now() / 1000) - VHD_EPOCH);
  footer.set(new TextEncoder().encode(forceSize ? "qem2" : "qemu"), 28);
  putBe16(footer, 32, 5); // Virtual PC 2007's version, as qemu writes
  putBe16(footer, 34, 3);
  footer.set(new TextEncoder().encode("Wi2k"), 36);
  putBe64(footer, 40, size);
  putBe64(footer, 48, size);
  putBe16(footer, 56, geometry.cylinders);
  footer[58] = geometry.heads;
  footer[59] = geometry.sectorsPerTrack;
  putBe32(footer, 60, subformat === "dynamic" ? TYPE_DYNAMIC : TYPE_FIXED);
  footer.set(crypto.getRandomValues(new Uint8Array(16)), 68);
  footer[68 + 6] = (footer[68 + 6] & 0x0f) | 0x40; // a version 4 UUID
  footer[68 + 8] = (footer[68 + 8] & 0x3f) | 0x80;
  putBe32(footer, 64, checksum(footer));

  if (subformat === "fixed") {
    await truncateFile(file, size + FOOTER_SIZE);
    await file.write(size, footer);
    return;
  }
  const perBlock = CREATE_BLOCK_SIZE / SECTOR;
  const entries = Math.ceil(sectors / perBlock);
  const batBytes = Math.ceil(entries * 4 / SECTOR) * SECTOR;
  await file.write(0, footer);
  await file.write(3 * SECTOR + batBytes, footer);
  if (batBytes) await file.write(3 * SECTOR, new Uint8Array(batBytes).fill(0xff));
  const hdr = new Uint8Array(1024);
  hdr.set(new TextEncoder().encode("cxsparse"), 0);
  // All 64 bits set: the specification says 0xFFFFFFFF, Microsoft's tools want all ones.
  putBe64(hdr, 8, 0xffffffffffffffffn);
  putBe64(hdr, 16, 3 * SECTOR);
  putBe32(hdr, 24, 0x00010000);
  putBe32(hdr, 28, entries);
  putBe32(hdr, 32, CREATE_BLOCK_SIZE);
  putBe32(hdr, 36, checksum(hdr));
  await file.write(SECTOR, hdr);
}

/** The vpc format driver. */
export const vpcDriver: FormatDriver = {
  name: "vpc",
  probe: probeVpc,
  open: openVpc,
  create: createVpc,
  createOptions: VPC_CREATE_OPTIONS,
};
