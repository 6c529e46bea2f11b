/**
 * The qcow2 header: fields, feature bits and header extensions
 * (docs/interop/qcow2.txt), validated in the order qemu validates them so a
 * broken image fails with qemu's message.
 */

import type { BlockFile } from "./file.ts";
import { QimgError } from "./errors.ts";
import { be16, be32, be64, text } from "./bytes.ts";

/** "QFI\xfb". */
export const QCOW2_MAGIC = 0x514649fb;
/** The fixed header of v3 up to and including compression_type and padding. */
export const QCOW2_HEADER_SIZE = 112;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;

/** Incompatible feature bits. */
export const INCOMPAT_DIRTY = 1n;
export const INCOMPAT_CORRUPT = 2n;
export const INCOMPAT_DATA_FILE = 4n;
export const INCOMPAT_COMPRESSION = 8n;
export const INCOMPAT_EXTL2 = 16n;
/** The incompatible features this implementation knows. */
export const INCOMPAT_MASK = 0x1fn;
/** Compatible feature bits. */
export const COMPAT_LAZY_REFCOUNTS = 1n;
/** Autoclear feature bits. */
export const AUTOCLEAR_BITMAPS = 1n;
export const AUTOCLEAR_DATA_FILE_RAW = 2n;

/** Header extension magics. */
export const EXT_END = 0;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_CRYPTO_HEADER = 0x0537be77;
export const EXT_BITMAPS = 0x23852875;
export const EXT_DATA_FILE = 0x44415441;

/** Limits qemu enforces on tables named in the header. */
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
export const SNAPSHOT_HEADER_SIZE = 40;
export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS;
/** qemu's BlockDriverState backing_format buffer is 16 bytes. */
const BACKING_FORMAT_MAX = 16;
/** qemu's backing_file buffer is 1024 bytes. */
const BACKING_FILE_MAX = 1024;
const INT_MAX = 0x7fffffff;
const INT64_MAX = 2n ** 63n - 1n;

/** Encryption methods. */
export const CRYPT_NONE = 0;
export const CRYPT_AES = 1;
export const CRYPT_LUKS = 2;

/** One entry of the feature name table extension. */
export interface FeatureName {
  /** 0 incompatible, 1 compatible, 2 autoclear. */
  type: number;
  bit: number;
  name: string;
}

/** A header extension qimg does not interpret, kept for rewriting the header. */
export interface UnknownExtension {
  magic: number;
  data: Uint8Array;
}

/** The parsed, validated qcow2 header. */
export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  clusterSize: number;
  /** Virtual size as stored (bytes). */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: "zlib" | "zstd";
  /** Header bytes between the known fields and header_length. */
  unknownHeaderFields: Uint8Array;
  /** Where extensions end: the backing file name, or the end of the first cluster. */
  extensionsEnd: number;
  /** From the backing format extension. */
  backingFormat?: string;
  /** From the backing file name field. */
  backingFile?: string;
  featureTable: FeatureName[];
  bitmaps?: { nbBitmaps: number; directorySize: number; directoryOffset: number };
  /** Bitmap extension present but the autoclear bit cleared: bitmaps are stale. */
  bitmapsInconsistent: boolean;
  cryptoHeader?: { offset: number; length: number };
  /** From the external data file name extension. */
  dataFile?: string;
  unknownExtensions: UnknownExtension[];
  /** Whether L2 entries are 16 bytes with subcluster bitmaps. */
  extendedL2: boolean;
  /** Entries per L2 table. */
  l2Size: number;
  /** Bytes per L2 entry (8, or 16 with extended L2). */
  l2EntrySize: number;
}

/** What reading a header needs besides the file. */
export interface ReadHeaderOptions {
  /** Opening read/write (corrupt images refuse that). */
  write?: boolean;
  /** Prints qemu's warnings (stale bitmaps), as FormatOpenOptions.warn. */
  warn?: (message: string, end?: string) => void;
  /** Opening for check (BDRV_O_CHECK): no reftable or snapshot table checks, check reports them. */
  check?: boolean;
}

/** Reads the bytes at `offset`, zero-filling past the end of the file as qemu's file layer does. */
export async function readPadded(
  file: BlockFile,
  offset: number,
  length: number,
): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  await readZeroPadded(file, offset, buf);
  return buf;
}

/**
 * Fills `buf` from `offset`, with zeroes past the end of the file. qemu's
 * block layer never asks the OS for bytes past the end (where a filesystem
 * may answer EINVAL), and refuses requests past BDRV_MAX_LENGTH with EIO.
 */
export async function readZeroPadded(
  file: BlockFile,
  offset: number,
  buf: Uint8Array,
): Promise<void> {
  if (offset + buf.length > MAX_SAFE_OFFSET) {
    if (offset + buf.length > BDRV_MAX_LENGTH) throw new QimgError("Input/output error");
    buf.fill(0);
    return;
  }
  let n: number;
  try {
    n = await file.read(offset, buf);
  } catch (e) {
    if (offset < await file.size()) throw e;
    n = 0;
  }
  if (n < buf.length) buf.fill(0, n);
}

/** Offsets above 2^53 are not exact as numbers; no host file is that large. */
const MAX_SAFE_OFFSET = 2 ** 53;
/** qemu's BDRV_MAX_LENGTH: INT64_MAX aligned down to 1 GiB. */
const BDRV_MAX_LENGTH = 2 ** 63 - 2 ** 30;

/** The qcow2 magic check lives with the other probes. */
export { probeQcow2 } from "./format_probes.ts";

function u64(b: Uint8Array, off: number): bigint {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getBigUint64(off, false);
}

/** qemu's qcow2_validate_table: entry count bound, then offset aligned and end below INT64_MAX. */
function validateTable(
  offset: bigint,
  entries: number,
  entryLen: number,
  maxBytes: number,
  clusterSize: number,
  name: string,
): void {
  if (entries > Math.floor(maxBytes / entryLen)) throw new QimgError(`${name} too large`);
  if (INT64_MAX - BigInt(entries) * BigInt(entryLen) < offset || offset % BigInt(clusterSize)) {
    throw new QimgError(`${name} offset invalid`);
  }
}

function compressionName(type: number, incompat: bigint): "zlib" | "zstd" {
  if (type !== 0 && type !== 1) throw new QimgError(`qcow2: unknown compression type: ${type}`);
  const bit = (incompat & INCOMPAT_COMPRESSION) !== 0n;
  if (type === 0 && bit) {
    throw new QimgError("qcow2: Compression type incompatible feature bit must not be set");
  }
  if (type === 1 && !bit) {
    throw new QimgError("qcow2: Compression type incompatible feature bit must be set");
  }
  return type === 0 ? "zlib" : "zstd";
}

/** Parses the feature name table (48-byte entries; a nameless entry ends it). */
function parseFeatureTable(data: Uint8Array): FeatureName[] {
  const out: FeatureName[] = [];
  for (let i = 0; i < data.length; i += 48) {
    const e = new Uint8Array(48);
    e.set(data.subarray(i, i + 48));
    if (e[2] === 0) break;
    const raw = e.subarray(2, 48);
    const nul = raw.indexOf(0);
    out.push({ type: e[0], bit: e[1], name: text(nul < 0 ? raw : raw.subarray(0, nul)) });
  }
  return out;
}

/** qemu's "Unsupported qcow2 feature(s)" message, naming bits from the image's own table. */
export function unsupportedFeatureMessage(table: FeatureName[], mask: bigint): string {
  const names: string[] = [];
  for (const f of table) {
    if (f.type !== 0 || f.bit >= 64) continue;
    const bit = 1n << BigInt(f.bit);
    if (mask & bit) {
      names.push(f.name);
      mask &= ~bit;
    }
  }
  if (mask) names.push(`Unknown incompatible feature: ${mask.toString(16)}`);
  return `Unsupported qcow2 feature(s): ${names.join(", ")}`;
}

interface ExtensionResult {
  backingFormat?: string;
  featureTable: FeatureName[];
  bitmaps?: Qcow2Header["bitmaps"];
  bitmapsInconsistent: boolean;
  cryptoHeader?: Qcow2Header["cryptoHeader"];
  dataFile?: string;
  unknown: UnknownExtension[];
}

/**
 * Walks the header extensions in `cluster` (the first cluster) from `start`
 * to `end`. With `lenient`, stops quietly at the first bad one (qemu does
 * that when it only wants the feature names for an error message).
 */
function readExtensions(
  cluster: Uint8Array,
  start: number,
  end: number,
  h: { cryptMethod: number; clusterSize: number; autoclear: bigint; version: number },
  lenient: boolean,
  warn?: (message: string, end?: string) => void,
): ExtensionResult {
  const r: ExtensionResult = { featureTable: [], unknown: [], bitmapsInconsistent: false };
  const fail = (msg: string): ExtensionResult => {
    if (lenient) return r;
    throw new QimgError(msg);
  };
  const bytes = (off: number, len: number) => {
    const b = new Uint8Array(len);
    b.set(cluster.subarray(off, off + len));
    return b;
  };
  let offset = start;
  while (offset < end) {
    const hdr = bytes(offset, 8);
    const magic = be32(hdr, 0);
    const len = be32(hdr, 4);
    offset += 8;
    if (offset > end || len > end - offset) return fail("Header extension too large");
    const data = bytes(offset, len);
    switch (magic) {
      case EXT_END:
        return r;
      case EXT_BACKING_FORMAT:
        if (len >= BACKING_FORMAT_MAX) {
          return fail(
            `ERROR: ext_backing_format: len=${len} too large (>=${BACKING_FORMAT_MAX})`,
          );
        }
        r.backingFormat = cString(data);
        break;
      case EXT_FEATURE_TABLE:
        r.featureTable = parseFeatureTable(data);
        break;
      case EXT_CRYPTO_HEADER:
        if (h.cryptMethod !== CRYPT_LUKS) {
          return fail("CRYPTO header extension only expected with LUKS encryption method");
        }
        if (len !== 16) {
          return fail(`CRYPTO header extension size ${len}, but expected size 16`);
        }
        r.cryptoHeader = { offset: be64(data, 0), length: be64(data, 8) };
        if (r.cryptoHeader.offset % h.clusterSize !== 0) {
          const o = u64(data, 0);
          return fail(
            `Encryption header offset '${o}' is not a multiple of cluster size '${h.clusterSize}'`,
          );
        }
        break;
      case EXT_BITMAPS: {
        if (len !== 24) return fail("bitmaps_ext: Invalid extension length");
        if (!(h.autoclear & AUTOCLEAR_BITMAPS)) {
          r.bitmapsInconsistent = true;
          if (!lenient) {
            warn?.(
              (h.version < 3
                ? "qimg: warning: This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent"
                : "qimg: warning: a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent") +
                "\nSome clusters may be leaked, run 'qimg check -r' on the image file to fix.",
              "", // qemu-img 7.2 ends this warning without a newline
            );
          }
          break;
        }
        const nb = be32(data, 0);
        if (be32(data, 4) !== 0) return fail("bitmaps_ext: Reserved field is not zero");
        const dirSize = u64(data, 8);
        const dirOffset = u64(data, 16);
        if (nb > MAX_BITMAPS) {
          return fail(
            `bitmaps_ext: Image has ${nb} bitmaps, exceeding the QEMU supported maximum of ${MAX_BITMAPS}`,
          );
        }
        if (nb === 0) return fail("found bitmaps extension with zero bitmaps");
        if (dirOffset % BigInt(h.clusterSize)) {
          return fail("bitmaps_ext: invalid bitmap directory offset");
        }
        if (dirSize > BigInt(MAX_BITMAP_DIRECTORY_SIZE)) {
          return fail(
            `bitmaps_ext: bitmap directory size (${dirSize}) exceeds the maximum supported size (${MAX_BITMAP_DIRECTORY_SIZE})`,
          );
        }
        r.bitmaps = {
          nbBitmaps: nb,
          directorySize: Number(dirSize),
          directoryOffset: Number(dirOffset),
        };
        break;
      }
      case EXT_DATA_FILE:
        r.dataFile = cString(data);
        break;
      default:
        r.unknown.push({ magic, data });
    }
    offset += (len + 7) & ~7;
  }
  return r;
}

/** A C string: up to the first NUL. */
function cString(b: Uint8Array): string {
  const nul = b.indexOf(0);
  return text(nul < 0 ? b : b.subarray(0, nul));
}

/**
 * Reads and validates the header of a qcow2 image, with its extensions and
 * backing file name. Throws QimgError with qemu's text for anything qemu
 * refuses at open time (tables are checked for bounds, not read).
 */
export async function readQcow2Header(
  file: BlockFile,
  options: ReadHeaderOptions = {},
): Promise<Qcow2Header> {
  const b = await readPadded(file, 0, QCOW2_HEADER_SIZE);
  if (be32(b, 0) !== QCOW2_MAGIC) throw new QimgError("Image is not in qcow2 format");
  const version = be32(b, 4);
  if (version < 2 || version > 3) {
    throw new QimgError(`Unsupported qcow2 version ${version}`, { exitCode: 1 });
  }
  const clusterBits = be32(b, 20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new QimgError(`Unsupported cluster size: 2^${clusterBits}`);
  }
  const clusterSize = 2 ** clusterBits;
  let incompat = 0n, compat = 0n, autoclear = 0n, refcountOrder = 4, headerLength = 72;
  if (version === 3) {
    incompat = u64(b, 72);
    compat = u64(b, 80);
    autoclear = u64(b, 88);
    refcountOrder = be32(b, 96);
    headerLength = be32(b, 100);
    if (headerLength < 104) throw new QimgError("qcow2 header too short");
  }
  if (headerLength > clusterSize) throw new QimgError("qcow2 header exceeds cluster size");
  const cluster = await readPadded(file, 0, clusterSize);
  const unknownHeaderFields = headerLength > QCOW2_HEADER_SIZE
    ? cluster.slice(QCOW2_HEADER_SIZE, headerLength)
    : new Uint8Array(0);
  const backingFileOffset64 = u64(b, 8);
  if (backingFileOffset64 > BigInt(clusterSize)) throw new QimgError("Invalid backing file offset");
  const backingFileOffset = Number(backingFileOffset64);
  const extensionsEnd = backingFileOffset ? backingFileOffset : clusterSize;
  const compressionType = compressionName(headerLength > 104 ? b[104] : 0, incompat);
  const cryptMethod = be32(b, 32);
  const extContext = { cryptMethod, clusterSize, autoclear, version };

  const unknownIncompat = incompat & ~INCOMPAT_MASK;
  if (unknownIncompat) {
    const ext = readExtensions(cluster, headerLength, extensionsEnd, extContext, true);
    throw new QimgError(unsupportedFeatureMessage(ext.featureTable, unknownIncompat));
  }
  // check -r opens corrupt images for writing to repair them (qemu's BDRV_O_CHECK).
  if ((incompat & INCOMPAT_CORRUPT) && options.write && !options.check) {
    throw new QimgError("qcow2: Image is corrupt; cannot be opened read/write");
  }
  const extendedL2 = (incompat & INCOMPAT_EXTL2) !== 0n;
  const subclusterSize = extendedL2 ? clusterSize / 32 : clusterSize;
  if (subclusterSize < 512) throw new QimgError(`Unsupported subcluster size: ${subclusterSize}`);
  if (refcountOrder > 6) {
    throw new QimgError("Reference count entry width too large; may not exceed 64 bits");
  }
  const refcountTableOffset = u64(b, 48);
  const refcountTableClusters = be32(b, 56);
  if (refcountTableClusters === 0 && !options.check) {
    throw new QimgError("Image does not contain a reference count table");
  }
  validateTable(
    refcountTableOffset,
    refcountTableClusters,
    clusterSize,
    MAX_REFTABLE_BYTES,
    clusterSize,
    "Reference count table",
  );
  const nbSnapshots = be32(b, 60);
  const snapshotsOffset = u64(b, 64);
  if (!options.check) {
    validateTable(
      snapshotsOffset,
      nbSnapshots,
      SNAPSHOT_HEADER_SIZE,
      SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
      clusterSize,
      "Snapshot table",
    );
  }
  const l1Size = be32(b, 36);
  const l1TableOffset = u64(b, 40);
  validateTable(l1TableOffset, l1Size, 8, MAX_L1_BYTES, clusterSize, "Active L1 table");

  const size64 = u64(b, 24);
  const l2EntrySize = extendedL2 ? 16 : 8;
  const l2Size = clusterSize / l2EntrySize;
  const bytesPerL1 = BigInt(clusterSize) * BigInt(l2Size);
  // qemu's size_to_l1 rounds up in uint64 arithmetic, which wraps for sizes near 2^64.
  const l1Needed = BigInt.asUintN(64, size64 + bytesPerL1 - 1n) / bytesPerL1;
  if (l1Needed > BigInt(INT_MAX)) throw new QimgError("Image is too big");
  if (BigInt(l1Size) < l1Needed) throw new QimgError("L1 table is too small");
  if (cryptMethod > CRYPT_LUKS) {
    throw new QimgError(`Unsupported encryption method ${cryptMethod | 0}`);
  }

  const ext = readExtensions(
    cluster,
    headerLength,
    extensionsEnd,
    extContext,
    false,
    options.warn,
  );

  let backingFile: string | undefined;
  if (backingFileOffset !== 0) {
    const len = be32(b, 16);
    if (len > Math.min(BACKING_FILE_MAX - 1, clusterSize - backingFileOffset)) {
      throw new QimgError("Backing file name too long");
    }
    backingFile = cString(cluster.subarray(backingFileOffset, backingFileOffset + len));
  }
  // The block layer refreshes the size after the driver opened: this comes last.
  if (size64 > INT64_MAX) {
    throw new QimgError("Could not refresh total sector count: File too large");
  }

  return {
    version,
    backingFileOffset,
    backingFileSize: be32(b, 16),
    clusterBits,
    clusterSize,
    // The block layer counts whole sectors.
    size: Number(size64 / 512n) * 512,
    cryptMethod,
    l1Size,
    l1TableOffset: Number(l1TableOffset),
    refcountTableOffset: Number(refcountTableOffset),
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset: Number(snapshotsOffset),
    incompatibleFeatures: incompat,
    compatibleFeatures: compat,
    autoclearFeatures: autoclear,
    refcountOrder,
    headerLength,
    compressionType,
    unknownHeaderFields,
    extensionsEnd,
    backingFormat: ext.backingFormat,
    backingFile,
    featureTable: ext.featureTable,
    bitmaps: ext.bitmaps,
    bitmapsInconsistent: ext.bitmapsInconsistent,
    cryptoHeader: ext.cryptoHeader,
    dataFile: ext.dataFile,
    unknownExtensions: ext.unknown,
    extendedL2,
    l2Size,
    l2EntrySize,
  } as Qcow2Header;
}

/** What `info` shows of a LUKS header (qemu's QCryptoBlockInfoLUKS), keys in QAPI order. */
export type LuksInfo = Record<
  string,
  string | number | boolean | Record<string, number | boolean>[]
>;

const LUKS_MAGIC = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe];
const LUKS_HEADER_SIZE = 592;
const LUKS_SLOTS = 8;
const LUKS_SLOT_ACTIVE = 0x00ac71f3;
const LUKS_SECTOR = 512;
const LUKS_STRIPES = 4000;
const LUKS_HASHES = ["md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160"];

/** Cipher names by LUKS name and key size in bytes, as qemu maps them. */
const LUKS_CIPHERS: Record<string, Record<number, string>> = {
  aes: { 16: "aes-128", 24: "aes-192", 32: "aes-256" },
  serpent: { 16: "serpent-128", 24: "serpent-192", 32: "serpent-256" },
  twofish: { 16: "twofish-128", 24: "twofish-192", 32: "twofish-256" },
  cast5: { 16: "cast5-128" },
};

/**
 * Parses the LUKS1 header a qcow2 image keeps in its full disk encryption
 * header extension, for `info` (no key is needed or derived).
 */
export async function readLuksInfo(file: BlockFile, header: Qcow2Header): Promise<LuksInfo> {
  const ext = header.cryptoHeader;
  if (!ext) throw new QimgError(`Missing CRYPTO header for crypt method ${header.cryptMethod}`);
  if (ext.length < LUKS_HEADER_SIZE) {
    throw new QimgError("Request for data outside of extension header");
  }
  const b = await readPadded(file, ext.offset, LUKS_HEADER_SIZE);
  if (!LUKS_MAGIC.every((m, i) => b[i] === m)) {
    throw new QimgError("Volume is not in LUKS format");
  }
  const version = (b[6] << 8) | b[7];
  if (version !== 1) throw new QimgError(`LUKS version ${version} is not supported`);
  const cipherName = cString(b.subarray(8, 40));
  const cipherMode = cString(b.subarray(40, 72));
  const hashSpec = cString(b.subarray(72, 104));
  const payloadOffset = be32(b, 104);
  const keyBytes = be32(b, 108);
  const mkIterations = be32(b, 164);
  const uuid = cString(b.subarray(168, 208));
  const dash = cipherMode.indexOf("-");
  const mode = dash < 0 ? cipherMode : cipherMode.slice(0, dash);
  const ivgen = dash < 0 ? "plain" : cipherMode.slice(dash + 1);
  const colon = ivgen.indexOf(":");
  for (let i = 0; i < LUKS_SLOTS; i++) {
    const stripes = be32(b, 208 + i * 48 + 44);
    if (stripes !== LUKS_STRIPES) {
      throw new QimgError(`Keyslot ${i} is corrupted (stripes ${stripes} != ${LUKS_STRIPES})`);
    }
  }
  // XTS keys hold two cipher keys.
  const cipherKey = mode === "xts" ? Math.floor(keyBytes / 2) : keyBytes;
  const alg = LUKS_CIPHERS[cipherName]?.[cipherKey];
  if (!alg) {
    throw new QimgError(
      `Algorithm '${cipherName}' with key size ${cipherKey} bytes not supported`,
    );
  }
  if (!LUKS_HASHES.includes(hashSpec)) {
    throw new QimgError(`Hash algorithm '${hashSpec}' not supported`);
  }
  const slots: Record<string, number | boolean>[] = [];
  for (let i = 0; i < LUKS_SLOTS; i++) {
    const at = 208 + i * 48;
    const active = be32(b, at) === LUKS_SLOT_ACTIVE;
    const slot: Record<string, number | boolean> = { active };
    if (active) {
      slot.iters = be32(b, at + 4);
      slot.stripes = be32(b, at + 44);
    }
    slot["key-offset"] = be32(b, at + 40) * LUKS_SECTOR;
    slots.push(slot);
  }
  const info: LuksInfo = {
    format: "luks",
    "cipher-alg": alg,
    "cipher-mode": mode,
    "ivgen-alg": colon < 0 ? ivgen : ivgen.slice(0, colon),
  };
  if (colon >= 0) info["ivgen-hash-alg"] = ivgen.slice(colon + 1);
  info["hash-alg"] = hashSpec;
  info["payload-offset"] = payloadOffset * LUKS_SECTOR;
  info["master-key-iters"] = mkIterations;
  info.uuid = uuid;
  info.slots = slots;
  return info;
}

/** One entry of the bitmap directory. */
export interface BitmapDirEntry {
  name: string;
  tableOffset: number;
  tableSize: number;
  /** Bit 0 in use, bit 1 auto, bit 2 extra data compatible. */
  flags: number;
  type: number;
  granularityBits: number;
}

const BME_MAX_TABLE_SIZE = 0x8000000;
const BME_MAX_PHYS_SIZE = 0x20000000;
const BME_MIN_GRANULARITY_BITS = 9;
const BME_MAX_GRANULARITY_BITS = 31;
const BME_MAX_NAME_SIZE = 1023;
const BME_RESERVED_FLAGS = ~7 >>> 0;
const BT_DIRTY_TRACKING_BITMAP = 1;

/** Whether a directory entry satisfies qemu's constraints (check_dir_entry). */
function bitmapEntryValid(e: BitmapDirEntry, header: Qcow2Header): boolean {
  if (
    e.tableSize === 0 || e.tableOffset === 0 || e.tableOffset % header.clusterSize ||
    e.tableSize > BME_MAX_TABLE_SIZE || e.granularityBits > BME_MAX_GRANULARITY_BITS ||
    e.granularityBits < BME_MIN_GRANULARITY_BITS || (e.flags & BME_RESERVED_FLAGS) ||
    e.type !== BT_DIRTY_TRACKING_BITMAP
  ) return false;
  const physBytes = e.tableSize * header.clusterSize;
  // The table must cover the disk: one bit per granule.
  return physBytes <= BME_MAX_PHYS_SIZE &&
    header.size <= physBytes * 8 * 2 ** e.granularityBits;
}

/**
 * Reads and checks the bitmap directory, as qemu does while opening an image
 * with the bitmaps extension (nothing to read when the bitmaps are stale).
 */
export async function readBitmapDirectory(
  file: BlockFile,
  header: Qcow2Header,
): Promise<BitmapDirEntry[]> {
  const ext = header.bitmaps;
  if (!ext || header.bitmapsInconsistent) return [];
  if (ext.directorySize === 0) throw new QimgError("Requested bitmap directory size is zero");
  if (ext.directorySize > MAX_BITMAP_DIRECTORY_SIZE) {
    throw new QimgError("Requested bitmap directory size is too big");
  }
  const dir = await readPadded(file, ext.directoryOffset, ext.directorySize).catch((e) => {
    throw new QimgError(`Failed to read bitmap directory: ${(e as Error).message}`);
  });
  const out: BitmapDirEntry[] = [];
  const broken = () => new QimgError("Broken bitmap directory");
  for (let pos = 0; pos < dir.length;) {
    if (pos + 24 > dir.length) throw broken();
    if (out.length + 1 > ext.nbBitmaps) {
      throw new QimgError("More bitmaps found than specified in header extension");
    }
    const nameSize = be16(dir, pos + 18);
    const extra = be32(dir, pos + 20);
    const size = (24 + extra + nameSize + 7) & ~7;
    if (pos + size > dir.length) throw broken();
    if (extra !== 0) throw new QimgError("Bitmap extra data is not supported");
    const e: BitmapDirEntry = {
      tableOffset: be64(dir, pos),
      tableSize: be32(dir, pos + 8),
      flags: be32(dir, pos + 12),
      type: dir[pos + 16],
      granularityBits: dir[pos + 17],
      name: text(dir.subarray(pos + 24, pos + 24 + nameSize)),
    };
    if (!bitmapEntryValid(e, header) || nameSize > BME_MAX_NAME_SIZE) {
      throw new QimgError(`Bitmap '${e.name}' doesn't satisfy the constraints`);
    }
    out.push(e);
    pos += size;
  }
  if (out.length !== ext.nbBitmaps) {
    throw new QimgError("Less bitmaps found than specified in header extension");
  }
  return out;
}

/** The feature name table qemu 7.2 writes into v3 images: [type, bit, name]. */
const FEATURE_NAMES: [number, number, string][] = [
  [0, 0, "dirty bit"],
  [0, 1, "corrupt bit"],
  [0, 2, "external data file"],
  [0, 3, "compression type"],
  [0, 4, "extended L2 entries"],
  [1, 0, "lazy refcounts"],
  [2, 0, "bitmaps"],
  [2, 1, "raw external data"],
];

/**
 * The feature name table extension's payload as qemu 7.2 writes it (create
 * and amend): 48-byte entries of type, bit and a NUL-padded name.
 */
export function featureNameTable(): Uint8Array {
  const enc = new TextEncoder();
  const table = new Uint8Array(FEATURE_NAMES.length * 48);
  FEATURE_NAMES.forEach(([type, bit, name], i) => {
    table[i * 48] = type;
    table[i * 48 + 1] = bit;
    table.set(enc.encode(name), i * 48 + 2);
  });
  return table;
}
