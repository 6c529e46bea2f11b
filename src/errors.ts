/** Errors a user can cause, carrying qemu-img's text and exit code. */

/** Exit codes qemu-img uses beyond the generic 1. */
export const EXIT = {
  OK: 0,
  FAILURE: 1,
  /** compare: images differ (1) or an error occurred (2). */
  COMPARE_DIFFER: 1,
  COMPARE_ERROR: 2,
  /** check: corruptions (2), leaks only (3), check not supported (63). */
  CHECK_CORRUPT: 2,
  CHECK_LEAKS: 3,
  CHECK_UNSUPPORTED: 63,
} as const;

/**
 * An error with qemu-img's exact message (without the `qimg: ` prefix) and
 * the exit code qemu-img uses for it.
 *
 * @example Usage
 * ```ts
 * import { QimgError } from "@qimg/qimg";
 * const e = new QimgError("Image size must be less than 8 EiB!");
 * console.log(e.exitCode); // 1
 * ```
 */
export class QimgError extends Error {
  /** The process exit code qemu-img uses for this error. */
  readonly exitCode: number;
  /** Extra lines printed after the message, e.g. qemu-img's `Try ... --help` hint. */
  readonly hint?: string;
  /**
   * Makes an error with qemu-img's message and exit code.
   * @param message qemu-img's message text, without the program name.
   * @param options `exitCode` (default 1) and an optional `hint` line.
   */
  constructor(message: string, options: { exitCode?: number; hint?: string } = {}) {
    super(message);
    this.name = "QimgError";
    this.exitCode = options.exitCode ?? 1;
    this.hint = options.hint;
  }
}

/**
 * qemu's bdrv_getlength failing on an open image (hostile vmdk sizes): the
 * message is info's; map and convert word it their own way.
 */
export class SizeQueryError extends QimgError {
  /** The C errno (an int; 0 adds no text to info's message). */
  readonly errno: number;
  /** qemu's bdrv_nb_sectors, which convert sizes sources with (negative: its own failure). */
  readonly sectors: bigint;
  /**
   * @param message info's message.
   * @param errno the errno as C's int.
   * @param sectors the sector count the block layer holds.
   */
  constructor(message: string, errno: number, sectors: bigint) {
    super(message);
    this.errno = errno;
    this.sectors = sectors;
  }
}

/** The hint qemu-img prints under usage errors. */
export const HELP_HINT = "Try 'qimg --help' for more information";

/** A usage error: the message, then the `Try 'qimg --help'` line, exit 1. */
export function usageError(message: string): QimgError {
  return new QimgError(message, { hint: HELP_HINT });
}

/** Text of a system error as C's strerror() prints it, for the errno names Deno reports. */
export function strerror(err: unknown): string {
  if (err instanceof QimgError) return err.message;
  const code = (err as { code?: string })?.code;
  switch (code) {
    case "ENOENT":
      return "No such file or directory";
    case "EACCES":
      return "Permission denied";
    case "EISDIR":
      return "Is a directory";
    case "ENOTDIR":
      return "Not a directory";
    case "EEXIST":
      return "File exists";
    case "ENOSPC":
      return "No space left on device";
    case "EFBIG":
      return "File too large";
    case "EINVAL":
      return "Invalid argument";
    case "EROFS":
      return "Read-only file system";
    case "EPERM":
      return "Operation not permitted";
    case "ELOOP":
      return "Too many levels of symbolic links";
    case "ENAMETOOLONG":
      return "File name too long";
    case "EIO":
      return "Input/output error";
  }
  const name = (err as { name?: string })?.name;
  if (name === "NotFound") return "No such file or directory";
  if (name === "PermissionDenied") return "Permission denied";
  if (name === "IsADirectory") return "Is a directory";
  if (name === "NotCapable") return capabilityMessage(err);
  return err instanceof Error ? err.message : String(err);
}

/** Deno's "Requires read access to ..." message, kept to its first line. */
function capabilityMessage(err: unknown): string {
  const msg = err instanceof Error ? err.message : String(err);
  return msg.split("\n")[0];
}

/** True when `err` is a missing runtime permission (Deno's NotCapable). */
export function isPermissionError(err: unknown): boolean {
  return (err as { name?: string })?.name === "NotCapable";
}

/**
 * An I/O error (EIO) a format driver raises for data it cannot read
 * (corrupt metadata, undecodable compressed clusters). Like a host I/O
 * error it is not a QimgError: commands wrap it in their own qemu message
 * ("error while reading at byte N: Input/output error").
 */
export class IoError extends Error {
  /** The errno name, as Deno's and Node's I/O errors carry it. */
  readonly code = "EIO";
  /** What was wrong, for diagnostics (qemu's corruption event text). */
  readonly detail?: string;
  /** @param detail why the read failed. */
  constructor(detail?: string) {
    super("Input/output error");
    this.name = "IoError";
    this.detail = detail;
  }
}
