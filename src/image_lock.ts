/**
 * Image locking as qemu 7.2's file protocol does it, so that qimg and QEMU
 * refuse each other's images the same way. Each open image file holds
 * shared byte-range locks (Linux OFD locks): byte 100+bit for each
 * permission it uses, byte 200+bit for each permission it does not share
 * with other users. Opening tests the opposite bytes: whoever holds
 * 200+bit denies that permission; whoever holds 100+bit uses a permission
 * this open does not share. The bytes lie past any real header: the locks
 * only signal, they never stop I/O.
 *
 * Runtime-neutral: the locks themselves come from a file's `lockBytes`
 * (src/file.ts, only with the ffi permission); files without it lock nothing.
 */

import { QimgError } from "./errors.ts";

/** Reading gives consistent data (qemu's BLK_PERM_CONSISTENT_READ). */
export const PERM_CONSISTENT_READ = 0x1;
/** Writing changes the data. */
export const PERM_WRITE = 0x2;
/** Writing data that is there already (qemu's WRITE_UNCHANGED). */
export const PERM_WRITE_UNCHANGED = 0x4;
/** Changing the file's size. */
export const PERM_RESIZE = 0x8;
const PERM_BITS = 4;

/** qemu's names, as in its messages. */
const PERM_NAMES = ["consistent read", "write", "write unchanged", "resize"];

const PERM_BYTE = 100;
const UNSHARED_BYTE = 200;

/** What one open of a host file uses and refuses to others (bit sets of PERM_*). */
export interface LockPerms {
  /** Permissions this open uses. */
  perm: number;
  /** Permissions this open denies to everyone else. */
  unshared: number;
}

/** A file that can hold byte locks (src/file.ts's DenoFile with ffi). */
export interface ByteLockable {
  /** Name in qemu's hint. */
  readonly name: string;
  /**
   * Holds shared locks on exactly the bytes in `hold` (others it held
   * before are released), then returns the first byte of `probe` another
   * open of the file holds, or undefined.
   */
  lockBytes?(hold: readonly number[], probe: readonly number[]): Promise<number | undefined>;
}

/** How an image layer is opened, as far as its locks go. */
export interface LayerLockOptions {
  /** Opened for writing. */
  write?: boolean;
  /** Metadata only (`info`): the data is not read, so no consistent read. */
  noIo?: boolean;
  /** `-U`: share everything (read-only opens only). */
  forceShare?: boolean;
  /** A backing file below the top image. */
  backing?: boolean;
  /**
   * The data must not change while open (convert's source): writers are
   * refused even on raw images, which otherwise share everything.
   */
  stable?: boolean;
  /**
   * The format passes its user's permissions straight to the file (raw);
   * other formats keep metadata in it and refuse writers and resizers.
   */
  passThrough?: boolean;
}

/**
 * The locks qemu-img 7.2 takes on a layer's host file: the command's own
 * (read: consistent read; write: also write and resize; a backing file:
 * consistent read, no writers), plus, under a format with metadata, its
 * own needs (consistent read unless metadata-only, write and resize when
 * writable) and the refusal of other writers and resizers. `-U` drops
 * every refusal.
 */
export function layerLocks(o: LayerLockOptions): LockPerms {
  let perm = o.write
    ? PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE
    : o.noIo && !o.backing
    ? 0
    : PERM_CONSISTENT_READ;
  let unshared = (o.backing || o.stable) && !o.forceShare ? PERM_WRITE | PERM_RESIZE : 0;
  if (!o.passThrough) {
    if (!o.noIo) perm |= PERM_CONSISTENT_READ;
    if (o.write) perm |= PERM_WRITE | PERM_RESIZE;
    if (!o.forceShare) unshared |= PERM_WRITE | PERM_RESIZE;
  }
  return { perm, unshared };
}

/** What file creation holds while it writes a new image (qemu's file protocol create). */
export const CREATE_LOCKS: LockPerms = { perm: PERM_WRITE | PERM_RESIZE, unshared: PERM_RESIZE };

function bits(set: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < PERM_BITS; i++) if (set & (1 << i)) out.push(i);
  return out;
}

/**
 * Takes `perms` on `file` and tests them against every other open:
 * throws qemu's `Failed to get "write" lock` (a permission someone denies)
 * or `Failed to get shared "write" lock` (someone uses what this open
 * denies), with its hint. Files that cannot lock pass.
 */
export async function lockFile(file: ByteLockable, perms: LockPerms): Promise<void> {
  if (!file.lockBytes) return;
  const used = bits(perms.perm);
  const denied = bits(perms.unshared);
  const hold = [...used.map((b) => PERM_BYTE + b), ...denied.map((b) => UNSHARED_BYTE + b)];
  const probe = [...used.map((b) => UNSHARED_BYTE + b), ...denied.map((b) => PERM_BYTE + b)];
  const taken = await file.lockBytes(hold, probe);
  if (taken === undefined) return;
  const message = taken >= UNSHARED_BYTE
    ? `Failed to get "${PERM_NAMES[taken - UNSHARED_BYTE]}" lock`
    : `Failed to get shared "${PERM_NAMES[taken - PERM_BYTE]}" lock`;
  throw new ImageLockError(message, { hint: `${LOCK_HINT}${file.name}]?` });
}

const LOCK_HINT = "Is another process using the image [";

/** Whether `e` is a lock refusal, also after an opener put the file's name before it. */
export function isImageLockError(e: unknown): e is QimgError {
  return e instanceof ImageLockError ||
    (e instanceof QimgError && e.hint?.startsWith(LOCK_HINT) === true);
}

/** Another process uses the image in a way this open cannot share. */
export class ImageLockError extends QimgError {}

/** Releases every lock `file` holds (before it is opened again with other permissions). */
export async function unlockFile(file: ByteLockable): Promise<void> {
  await file.lockBytes?.([], []);
}
