/**
 * The protocol level under a format, as qemu's file-posix and friends:
 * which protocol a file name names (`file:`, `nbd:`...), its create
 * options, and how a host file is created and truncated, including
 * preallocation and qemu's first-block allocation.
 */

import type { BlockFile } from "./file.ts";
import { type OptionDesc, SIZE_OPTION } from "./options.ts";
import { QimgError, strerror } from "./errors.ts";

/** The file protocol's create options, in qemu 7.2's table order. */
export const PROTOCOL_CREATE_OPTIONS: OptionDesc[] = [
  SIZE_OPTION,
  { name: "nocow", type: "bool", help: "Turn off copy-on-write (valid only on btrfs)" },
  {
    name: "preallocation",
    type: "string",
    help: "Preallocation mode (allowed values: off, falloc, full)",
  },
  {
    name: "extent_size_hint",
    type: "size",
    help: "Extent size hint for the image file, 0 to disable",
  },
];

/** Create options of protocols created through qemu's generic "simple" path (nbd, iscsi...). */
const SIMPLE_CREATE_OPTIONS: OptionDesc[] = [
  SIZE_OPTION,
  { name: "preallocation", type: "string", help: "Preallocation mode (allowed values: off)" },
];

/** A protocol qemu 7.2 knows, as far as qimg needs to tell them apart. */
export interface Protocol {
  /** The driver name qemu prints ("vvfat" for the `fat:` prefix). */
  name: string;
  /** Create options; absent when qemu cannot create through it. */
  createOptions?: OptionDesc[];
  /** Whether qimg implements it (only local files). */
  local: boolean;
}

const FILE_PROTOCOL: Protocol = {
  name: "file",
  createOptions: PROTOCOL_CREATE_OPTIONS,
  local: true,
};

/** Protocol prefixes of Debian's qemu-img 7.2, by prefix. */
const PROTOCOLS: Record<string, Protocol> = {
  file: FILE_PROTOCOL,
  fat: { name: "vvfat", local: false },
  ftp: { name: "ftp", local: false },
  ftps: { name: "ftps", local: false },
  http: { name: "http", local: false },
  https: { name: "https", local: false },
  blkdebug: { name: "blkdebug", local: false },
  blkverify: { name: "blkverify", local: false },
  "null-co": { name: "null-co", local: false },
  "null-aio": { name: "null-aio", local: false },
  gluster: { name: "gluster", createOptions: [], local: false },
  "gluster+tcp": { name: "gluster", createOptions: [], local: false },
  "gluster+unix": { name: "gluster", createOptions: [], local: false },
  "gluster+rdma": { name: "gluster", createOptions: [], local: false },
  rbd: { name: "rbd", createOptions: [], local: false },
  ssh: { name: "ssh", createOptions: [], local: false },
  nfs: { name: "nfs", createOptions: [], local: false },
};
for (
  const p of ["nbd", "nbd+tcp", "nbd+unix", "host_device", "host_cdrom", "iscsi", "iser", "nvme"]
) {
  PROTOCOLS[p] = {
    name: p === "nbd+tcp" || p === "nbd+unix" ? "nbd" : p,
    createOptions: SIMPLE_CREATE_OPTIONS,
    local: false,
  };
}

/**
 * The protocol a file name selects, as qemu's bdrv_find_protocol: a
 * `name:` prefix before any `/` names one, anything else is a local file.
 * `path` is the host path for the file protocol (`file:` stripped).
 */
export function findProtocol(filename: string): { protocol: Protocol; path: string } {
  const stop = filename.search(/[:/]/);
  if (stop < 0 || filename[stop] !== ":") return { protocol: FILE_PROTOCOL, path: filename };
  const prefix = filename.slice(0, stop);
  const protocol = PROTOCOLS[prefix];
  if (!protocol) throw new QimgError(`Unknown protocol '${prefix}'`);
  return { protocol, path: prefix === "file" ? filename.slice(stop + 1) : filename };
}

/** qemu's PreallocMode values, in its order. */
export const PREALLOC_MODES = ["off", "metadata", "falloc", "full"] as const;
/** One of qemu's preallocation modes. */
export type PreallocMode = typeof PREALLOC_MODES[number];

/** Parses a `preallocation=` option value as the file protocol does. */
export function parsePreallocation(value: string | undefined): PreallocMode {
  if (value === undefined) return "off";
  if (!(PREALLOC_MODES as readonly string[]).includes(value)) {
    throw new QimgError(`invalid parameter value: ${value}`);
  }
  return value as PreallocMode;
}

/** A failed host-file operation: qemu's message plus the errno it came from. */
export class ProtocolError extends QimgError {
  /** The errno name (`EFBIG`, `EINVAL`, ...), when known. */
  readonly errno?: string;
  constructor(message: string, errno?: string) {
    super(message);
    this.name = "ProtocolError";
    this.errno = errno;
  }
}

/** Linux errno numbers Deno reports only as "(os error N)". */
const ERRNO_NAMES: Record<number, string> = {
  1: "EPERM",
  2: "ENOENT",
  5: "EIO",
  13: "EACCES",
  21: "EISDIR",
  22: "EINVAL",
  27: "EFBIG",
  28: "ENOSPC",
  30: "EROFS",
};

/** The errno name behind a runtime error. */
export function errnoOf(e: unknown): string | undefined {
  const code = (e as { code?: string })?.code;
  if (code) return code;
  const m = /\(os error (\d+)\)/.exec(e instanceof Error ? e.message : String(e));
  return m ? ERRNO_NAMES[Number(m[1])] : undefined;
}

/** `context: strerror(errno)` as qemu's error_setg_errno, keeping the errno. */
export function protocolError(context: string, e: unknown): ProtocolError {
  if (e instanceof ProtocolError) return e;
  const errno = errnoOf(e);
  return new ProtocolError(`${context}: ${strerror(errno ? { code: errno } : e)}`, errno);
}

const SECTOR = 512n;
const MAX_BLOCKSIZE = 4096;
const OFF_T_MAX = (1n << 63n) - 1n;

async function ftruncate(file: BlockFile, size: bigint): Promise<void> {
  // off_t is signed 64-bit: qemu's ftruncate of a negative length fails with EINVAL.
  if (size > OFF_T_MAX || size < 0n) {
    throw new ProtocolError("Could not resize file: Invalid argument", "EINVAL");
  }
  try {
    await file.truncate(Number(size));
  } catch (e) {
    throw protocolError("Could not resize file", e);
  }
}

/**
 * qemu writes zeroes over the first block of a file it grows from empty,
 * so later alignment probing reads real data: 4 KiB, or 512 bytes when
 * the file is smaller than that (which may make it 512 bytes long).
 */
async function allocateFirstBlock(file: BlockFile, size: bigint): Promise<void> {
  const n = size < BigInt(MAX_BLOCKSIZE) ? 512 : MAX_BLOCKSIZE;
  try {
    await file.write(0, new Uint8Array(n));
  } catch {
    // qemu ignores failures here: it is only an optimisation.
  }
}

/** posix_fallocate: reserve blocks for new space past the end, else write zeroes there. */
async function reserve(file: BlockFile, offset: number, length: number): Promise<void> {
  if (file.allocate) {
    try {
      return await file.allocate(offset, length);
    } catch {
      // fall through to zeroes
    }
  }
  await writeZeroBytes(file, offset, length);
}

async function writeZeroBytes(file: BlockFile, offset: number, length: number): Promise<void> {
  const chunk = new Uint8Array(Math.min(length, 1 << 20));
  for (let done = 0; done < length; done += chunk.length) {
    await file.write(offset + done, chunk.subarray(0, Math.min(chunk.length, length - done)));
  }
}

/**
 * Sets a host file's length as qemu's file-posix truncate does:
 * `off` truncates (allocating the first block of a file grown from empty),
 * `falloc` reserves the new range, `full` writes zeroes over it;
 * preallocating a shrink, or with `metadata`, fails with qemu's message.
 */
export async function truncateFile(
  file: BlockFile,
  size: bigint | number,
  prealloc: PreallocMode = "off",
): Promise<void> {
  const target = BigInt(size);
  const current = BigInt(await file.size());
  if (current > target && prealloc !== "off") {
    throw new ProtocolError("Cannot use preallocation for shrinking files", "ENOTSUP");
  }
  switch (prealloc) {
    case "off":
      await ftruncate(file, target);
      if (current === 0n && target > 0n) await allocateFirstBlock(file, target);
      return;
    case "falloc":
      if (target === current) return;
      try {
        await reserve(file, Number(current), Number(target - current));
      } catch (e) {
        throw protocolError("Could not preallocate new data", e);
      }
      if (current === 0n) await allocateFirstBlock(file, target);
      return;
    case "full":
      await ftruncate(file, target);
      try {
        if (target > current) {
          await writeZeroBytes(file, Number(current), Number(target - current));
        }
        await file.flush();
      } catch (e) {
        throw protocolError("Could not write zeros for preallocation", e);
      }
      return;
    default:
      throw new ProtocolError(`Unsupported preallocation mode: ${prealloc}`, "ENOTSUP");
  }
}

/**
 * Fills a newly created (empty) host file as qemu's file-posix create:
 * the length rounded up to whole 512-byte sectors, then preallocated.
 */
export async function createFile(
  file: BlockFile,
  size: bigint | number,
  prealloc: PreallocMode = "off",
): Promise<void> {
  const s = BigInt(size);
  // ROUND_UP in int64: sizes near 2^63 wrap negative and ftruncate refuses them.
  const rounded = BigInt.asIntN(64, (s + SECTOR - 1n) / SECTOR * SECTOR);
  await ftruncate(file, 0n);
  await truncateFile(file, rounded, prealloc);
}
