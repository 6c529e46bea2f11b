/**
 * Writing a qcow2 header cluster as qemu's qcow2_update_header does, and the
 * backing file change (rebase, commit) that needs nothing more: kept apart
 * from amend and the write side so `rebase -u` loads little at start-up.
 */

import type { BlockFile } from "./file.ts";
import { QimgError } from "./errors.ts";
import { putBe32, putBe64 } from "./bytes.ts";
import {
  AUTOCLEAR_BITMAPS,
  EXT_BACKING_FORMAT,
  EXT_BITMAPS,
  EXT_CRYPTO_HEADER,
  EXT_DATA_FILE,
  EXT_FEATURE_TABLE,
  featureNameTable,
  type Qcow2Header,
} from "./qcow2_header.ts";

/** qemu's backing file name buffer holds 1023 bytes. */
const BACKING_NAME_MAX = 1023;

const NO_SPACE = "No space left on device";

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
  const noSpace = () => new HeaderError(NO_SPACE);
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
    const table = featureNameTable();
    ext(EXT_FEATURE_TABLE, table);
  }
  // A v2 header has no autoclear bits: qemu still writes the extension of
  // the bitmaps it holds (amend to compat=0.10), which then read as stale.
  if (h.bitmaps && (h.version < 3 || (h.autoclearFeatures & AUTOCLEAR_BITMAPS))) {
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
  // The header keeps its bitmaps extension (headerCluster): bitmaps stay valid.
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
  // qemu-img rebase words ENOSPC its own way.
  const why = e.message === NO_SPACE ? "No space left in the file header" : e.message;
  return new QimgError(`Could not change the backing file to '${name ?? "(null)"}': ${why}`);
}
