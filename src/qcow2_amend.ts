/**
 * Rewriting a qcow2 image's header (as qemu's qcow2_update_header): the
 * backing file reference for rebase, options for amend.
 */

import type { BlockFile } from "./file.ts";
import { QimgError } from "./errors.ts";
import { putBe32, putBe64 } from "./bytes.ts";
import {
  AUTOCLEAR_BITMAPS,
  CRYPT_LUKS,
  EXT_BACKING_FORMAT,
  EXT_BITMAPS,
  EXT_CRYPTO_HEADER,
  EXT_DATA_FILE,
  EXT_FEATURE_TABLE,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  type Qcow2Header,
} from "./qcow2_header.ts";
import { setRefcount } from "./qcow2_write.ts";

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

/** qemu's backing file name buffer holds 1023 bytes. */
const BACKING_NAME_MAX = 1023;

/** An errno-style failure of the header rewrite (the caller adds its context). */
export class HeaderError extends Error {}

/**
 * The first cluster as qemu writes it from `h`: fields, extensions in
 * qemu's order, end marker, backing file name, zeroes to the cluster end.
 * Throws HeaderError("No space left on device") when it does not fit.
 */
export function headerCluster(h: Qcow2Header): Uint8Array {
  const cs = h.clusterSize;
  const b = new Uint8Array(cs);
  const enc = new TextEncoder();
  putBe32(b, 0, 0x514649fb);
  putBe32(b, 4, h.version);
  putBe32(b, 20, h.clusterBits);
  putBe64(b, 24, h.size);
  putBe32(b, 32, h.cryptMethod);
  putBe32(b, 36, h.l1Size);
  putBe64(b, 40, h.l1TableOffset);
  putBe64(b, 48, h.refcountTableOffset);
  putBe32(b, 56, h.refcountTableClusters);
  putBe32(b, 60, h.nbSnapshots);
  putBe64(b, 64, h.snapshotsOffset);
  let pos = 72;
  if (h.version === 3) {
    putBe64(b, 72, h.incompatibleFeatures);
    putBe64(b, 80, h.compatibleFeatures);
    putBe64(b, 88, h.autoclearFeatures);
    putBe32(b, 96, h.refcountOrder);
    const length = 112 + h.unknownHeaderFields.length;
    putBe32(b, 100, length);
    b[104] = h.compressionType === "zstd" ? 1 : 0;
    b.set(h.unknownHeaderFields, 112);
    pos = length;
  }
  const noSpace = () => new HeaderError("No space left on device");
  const ext = (magic: number, data: Uint8Array) => {
    const padded = Math.ceil(data.length / 8) * 8;
    if (pos + 8 + padded > cs) throw noSpace();
    putBe32(b, pos, magic);
    putBe32(b, pos + 4, data.length);
    b.set(data, pos + 8);
    pos += 8 + padded;
  };
  if (h.backingFormat !== undefined) ext(EXT_BACKING_FORMAT, enc.encode(h.backingFormat));
  if (h.dataFile !== undefined) ext(EXT_DATA_FILE, enc.encode(h.dataFile));
  if (h.cryptoHeader) {
    const d = new Uint8Array(16);
    putBe64(d, 0, h.cryptoHeader.offset);
    putBe64(d, 8, h.cryptoHeader.length);
    ext(EXT_CRYPTO_HEADER, d);
  }
  // As qemu 7.2 (and create): no feature table in clusters of 4 KiB and less.
  if (h.version === 3 && cs > 4096) {
    const table = new Uint8Array(FEATURE_NAMES.length * 48);
    FEATURE_NAMES.forEach(([type, bit, name], i) => {
      table[i * 48] = type;
      table[i * 48 + 1] = bit;
      table.set(enc.encode(name), i * 48 + 2);
    });
    ext(EXT_FEATURE_TABLE, table);
  }
  if (h.version === 3 && h.bitmaps && (h.autoclearFeatures & AUTOCLEAR_BITMAPS)) {
    const d = new Uint8Array(24);
    putBe32(d, 0, h.bitmaps.nbBitmaps);
    putBe64(d, 8, h.bitmaps.directorySize);
    putBe64(d, 16, h.bitmaps.directoryOffset);
    ext(EXT_BITMAPS, d);
  }
  for (const u of h.unknownExtensions) ext(u.magic, u.data);
  if (pos + 8 > cs) throw noSpace();
  pos += 8; // end of extensions
  if (h.backingFile !== undefined) {
    const name = enc.encode(h.backingFile);
    if (pos + name.length > cs) throw noSpace();
    putBe64(b, 8, pos);
    putBe32(b, 16, name.length);
    b.set(name, pos);
  }
  return b;
}

/**
 * Changes the backing file reference (qemu's bdrv_change_backing_file):
 * `name` empty or undefined removes it (and the format). Updates `h` only
 * when the new header was written.
 */
export async function changeBacking(
  file: BlockFile,
  h: Qcow2Header,
  name: string | undefined,
  format: string | undefined,
): Promise<void> {
  const enc = new TextEncoder();
  if (name && enc.encode(name).length > BACKING_NAME_MAX) {
    throw new HeaderError("Invalid argument");
  }
  if (h.dataFile !== undefined && name && (h.autoclearFeatures & 2n)) {
    throw new HeaderError("Invalid argument");
  }
  const next: Qcow2Header = {
    ...h,
    backingFile: name || undefined,
    backingFormat: name ? format : undefined,
  };
  const cluster = headerCluster(next);
  await file.write(0, cluster);
  await file.flush();
  h.backingFile = next.backingFile;
  h.backingFormat = next.backingFormat;
  h.backingFileOffset = next.backingFile ? Number(new DataView(cluster.buffer).getBigUint64(8)) : 0;
  h.backingFileSize = next.backingFile ? enc.encode(next.backingFile).length : 0;
}

/** Wraps a HeaderError as qemu's rebase/amend message. */
export function backingChangeError(name: string | undefined, e: unknown): unknown {
  if (!(e instanceof HeaderError)) return e;
  return new QimgError(`Could not change the backing file to '${name ?? "(null)"}': ${e.message}`);
}

/**
 * Why qemu's make_completely_empty cannot empty this image (qemu then
 * discards cluster by cluster, which qimg does not do yet), or undefined.
 */
export function makeEmptyObstacle(h: Qcow2Header): string | undefined {
  const l1Clusters = Math.ceil(h.l1Size * 8 / h.clusterSize);
  const blockEntries = h.clusterSize * 8 / (1 << h.refcountOrder);
  if (
    h.version < 3 || h.nbSnapshots > 0 || (h.bitmaps && h.bitmaps.nbBitmaps > 0) ||
    3 + l1Clusters > blockEntries || h.cryptMethod === CRYPT_LUKS ||
    (h.incompatibleFeatures & INCOMPAT_DATA_FILE)
  ) {
    return "emptying this qcow2 image";
  }
  return undefined;
}

/**
 * Empties a qcow2 v3 image as qemu's make_completely_empty (commit without
 * -d): header, a one-cluster refcount table, one refcount block and a
 * zeroed L1 table at cluster 3; the file ends there.
 */
export async function makeCompletelyEmpty(file: BlockFile, h: Qcow2Header): Promise<void> {
  const cs = h.clusterSize;
  const l1Clusters = Math.ceil(h.l1Size * 8 / cs);
  const zeroes = (offset: number, length: number) =>
    length > 0 ? file.write(offset, new Uint8Array(length)) : Promise.resolve();
  // qemu marks the image dirty while its refcounts are being rebuilt.
  const incompat = new Uint8Array(8);
  putBe64(incompat, 0, h.incompatibleFeatures | INCOMPAT_DIRTY);
  await file.write(72, incompat);
  await file.flush();
  await zeroes(h.l1TableOffset, l1Clusters * cs);
  await zeroes(cs, 2 * cs);
  const fields = new Uint8Array(20);
  putBe64(fields, 0, 3 * cs);
  putBe64(fields, 8, cs);
  putBe32(fields, 16, 1);
  await file.write(40, fields);
  const entry = new Uint8Array(8);
  putBe64(entry, 0, 2 * cs);
  await file.write(cs, entry);
  await file.truncate((3 + l1Clusters) * cs);
  await zeroes(3 * cs, l1Clusters * cs);
  const block = new Uint8Array(cs);
  for (let i = 0; i < 3 + l1Clusters; i++) setRefcount(block, i, h.refcountOrder, 1);
  await file.write(2 * cs, block);
  await file.flush();
  putBe64(incompat, 0, h.incompatibleFeatures);
  await file.write(72, incompat);
  await file.flush();
  h.l1TableOffset = 3 * cs;
  h.refcountTableOffset = cs;
  h.refcountTableClusters = 1;
}
