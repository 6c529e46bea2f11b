/**
 * Image creation as qemu's bdrv_img_create: format and protocol lookup,
 * `-o` parsing against their merged option tables, size and backing
 * checks, the `Formatting ...` line, then the protocol file and the
 * format's own create. Used by `create` and by `convert` for its target.
 */

import type { FormatDriver } from "./driver.ts";
import type { BlockFile, OpenFileOptions } from "./file.ts";
import { DenoFile } from "./file.ts";
import { QimgError, strerror } from "./errors.ts";
import { findFormat, loadFormat } from "./formats.ts";
import {
  CREATE_OPTION_TABLES,
  emptyOptions,
  formatOptionHelp,
  formattingLine,
  isQemuCreatable,
  isQemuFormat,
  mergeOptionTables,
  type OptionDesc,
  type ParsedOptions,
  parseOptionList,
  setNumberOption,
  setOption,
} from "./options.ts";
import {
  createFile,
  findProtocol,
  parsePreallocation,
  PROTOCOL_CREATE_OPTIONS,
  ProtocolError,
} from "./protocol.ts";
import { openImageChain } from "./image.ts";
import { ImageLockError } from "./image_lock.ts";
import { qdictEntries } from "./output.ts";
import { hexSuffixWarning, strtosz } from "./size.ts";

const U64_MAX = (1n << 64n) - 1n;

/**
 * How to create an image: `qemu-img create`'s arguments as an object.
 *
 * @example Usage
 * ```ts
 * import { createImage, type CreateImageOptions } from "@qimg/qimg";
 * const path = await Deno.makeTempFile({ suffix: ".raw" });
 * const options: CreateImageOptions = {
 *   format: "raw",
 *   options: "size=2M,preallocation=full",
 *   onFormatting: (line) => console.log(line.trimEnd()),
 * };
 * await createImage(path, options); // Formatting '...', fmt=raw size=2097152 preallocation=full
 * ```
 */
export interface CreateImageOptions {
  /** The format (default `raw`). */
  format?: string;
  /** Virtual size in bytes; may come from `options` (`size=...`) instead. */
  size?: number | bigint;
  /** qemu's `-o` text (`a=b,c=d`, `,,` escapes a comma) or option values by name. */
  options?: string | Record<string, string | number | boolean>;
  /** A backing file name, stored as given (`-b`). */
  backingFile?: string;
  /** The backing file's format (`-F`). */
  backingFormat?: string;
  /** Do not open the backing file (`-u`). */
  unsafeBacking?: boolean;
  /** Receives the `Formatting '...', fmt=...` line (with its newline) before creation. */
  onFormatting?: (line: string) => void;
  /** Receives qemu's warnings (without the program name). */
  warn?: (message: string) => void;
}

/** Opens a host file for creation (the command's Io, or the local file system). */
export type CreateFileOpener = (path: string, options: OpenFileOptions) => Promise<BlockFile>;

/** A format's create table, and whether qimg can create it. */
function createTable(
  format: string,
  driver: FormatDriver | undefined,
): { table: OptionDesc[]; driver?: FormatDriver } {
  if (format === "file") return { table: PROTOCOL_CREATE_OPTIONS, driver };
  const table = driver?.createOptions ?? CREATE_OPTION_TABLES[format];
  if (table) return { table, driver };
  if (!driver && !isQemuFormat(format)) throw new QimgError(`Unknown file format '${format}'`);
  if (!isQemuCreatable(format)) {
    throw new QimgError(`Format driver '${format}' does not support image creation`);
  }
  throw new QimgError(`create -f ${format}: not supported yet`);
}

/**
 * qemu-img's `-o help` listing for `format`: the format's options, and
 * with a file name also its protocol's. Throws qemu's errors for unknown
 * formats and protocols.
 */
export async function createOptionsHelp(format: string, filename?: string): Promise<string> {
  if (!findFormat(format) && !isQemuFormat(format)) {
    throw new QimgError(`Unknown file format '${format}'`);
  }
  // Only the driver asked for loads (start-up time).
  const { table } = createTable(format, await loadFormat(format));
  if (filename === undefined) {
    return `Supported ${format} options:\n${formatOptionHelp(table)}\n` +
      "The protocol level may support further options.\n" +
      "Specify the target filename to include those options.\n";
  }
  const { protocol } = findProtocol(filename);
  if (!protocol.createOptions) {
    throw new QimgError(`Protocol driver '${protocol.name}' does not support image creation`);
  }
  if (!protocol.local && protocol.createOptions.length === 0) {
    throw new QimgError(`${protocol.name} protocol: not supported yet`);
  }
  return `Supported options:\n${
    formatOptionHelp(mergeOptionTables(table, protocol.createOptions))
  }`;
}

function optionText(options: CreateImageOptions["options"]): string | undefined {
  if (options === undefined || typeof options === "string") return options;
  return Object.entries(options)
    .map(([k, v]) =>
      `${k}=${typeof v === "boolean" ? (v ? "on" : "off") : String(v).replaceAll(",", ",,")}`
    )
    .join(",");
}

/** What `prepareCreate` settled: everything but the writing. */
interface CreatePlan {
  format: string;
  driver?: FormatDriver;
  descs: OptionDesc[];
  parsed: ParsedOptions;
  path: string;
  size: bigint;
}

async function prepareCreate(
  filename: string,
  o: CreateImageOptions,
  openFile: CreateFileOpener,
): Promise<CreatePlan> {
  const format = o.format ?? "raw";
  if (!findFormat(format) && !isQemuFormat(format)) {
    throw new QimgError(`Unknown file format '${format}'`);
  }
  const { protocol, path } = findProtocol(filename);
  const { table, driver } = createTable(format, await loadFormat(format));
  if (!protocol.createOptions) {
    throw new QimgError(`Protocol driver '${protocol.name}' does not support image creation`);
  }
  if (!protocol.local) throw new QimgError(`${protocol.name} protocol: not supported yet`);
  const descs = mergeOptionTables(table, protocol.createOptions);
  const parsed = emptyOptions();
  const text = optionText(o.options);
  if (text !== undefined) parseOptionList(text, descs, parsed, o.warn);

  if (parsed.exact.size === undefined) {
    if (o.size !== undefined) setNumberOption(parsed, "size", BigInt(o.size));
  } else if (o.size !== undefined) {
    throw new QimgError("The image size must be specified only once");
  }
  if (o.backingFile !== undefined) {
    if (!descs.some((d) => d.name === "backing_file")) {
      throw new QimgError(`Backing file not supported for file format '${format}'`);
    }
    setOption(parsed, descs, "backing_file", o.backingFile);
  }
  if (o.backingFormat !== undefined) {
    if (!descs.some((d) => d.name === "backing_fmt")) {
      throw new QimgError(`Backing file format not supported for file format '${format}'`);
    }
    setOption(parsed, descs, "backing_fmt", o.backingFormat);
  }
  const backing = parsed.values.backing_file as string | undefined;
  if (backing !== undefined) {
    if (backing === filename) {
      throw new QimgError(
        "Error: Trying to create an image with the same filename as the backing file",
      );
    }
    if (backing === "") throw new QimgError("Expected backing file name, got empty string");
  }
  let size = parsed.exact.size;
  const backingFormat = parsed.values.backing_fmt as string | undefined;
  if (backing !== undefined && !o.unsafeBacking) {
    // qemu opens the backing chain even with a size given: it must open.
    const backingPath = resolveBacking(path, backing);
    let base;
    try {
      base = await openImageChain(backingPath, {
        format: backingFormat,
        openFile: (p, write) => openFile(p, { write }),
        // qemu-img create reads the backing file's size whoever uses it.
        forceShare: true,
      });
    } catch (e) {
      if (!(e instanceof QimgError)) throw e;
      const outer = `Could not open '${backingPath}': `;
      const inner = e.message.startsWith(outer) ? e.message.slice(outer.length) : e.message;
      throw new QimgError(inner, { hint: "Could not open backing image." });
    }
    try {
      if (backingFormat === undefined) {
        // qemu's hint has no newline of its own; qimg's error lines always end in one.
        throw new QimgError("Backing file specified without backing format", {
          hint: `Detected format of ${base.format}.`,
        });
      }
      if (size === undefined) {
        size = BigInt(base.size);
        setNumberOption(parsed, "size", size);
      }
    } finally {
      await base.close();
    }
  } else if (backing !== undefined && backingFormat === undefined) {
    throw new QimgError("Backing file specified without backing format");
  }
  // qemu keeps "no size" as (uint64_t)-1, so that exact size counts as none.
  if (size === undefined || size === U64_MAX) {
    throw new QimgError("Image creation needs a size parameter");
  }
  return { format, driver, descs, parsed, path, size };
}

function resolveBacking(image: string, backing: string): string {
  if (backing.startsWith("/")) return backing;
  const slash = image.lastIndexOf("/");
  return slash < 0 ? backing : image.slice(0, slash + 1) + backing;
}

/**
 * Creates a disk image as `qemu-img create` does: checks the format,
 * options, size and backing file, reports the `Formatting` line, creates
 * the host file and lets the format write its metadata. Errors carry
 * qemu's text without the file name qemu-img puts before them.
 *
 * @param filename The image to create (a local path, or `file:` + path).
 * @param options Format (default raw), size, `-o` options, backing file.
 * @returns When the image is written and closed.
 * @example Usage
 * ```ts
 * import { createImage, openImage } from "@qimg/qimg";
 * const path = await Deno.makeTempFile({ suffix: ".raw" });
 * await createImage(path, { format: "raw", size: 1 << 20 });
 * await using image = await openImage(path, { format: "raw" });
 * console.log(image.size); // 1048576
 * ```
 */
export function createImage(
  filename: string,
  options: CreateImageOptions = {},
): Promise<void> {
  return createImageWith(filename, options, (p, o) => DenoFile.open(p, o));
}

/** `createImage` with the host files opened by `openFile` (a command's Io). */
export async function createImageWith(
  filename: string,
  options: CreateImageOptions,
  openFile: CreateFileOpener,
  removeFile?: (path: string) => Promise<void>,
): Promise<void> {
  const plan = await prepareCreate(filename, options, openFile);
  const create = plan.format === "file" ? (await loadFormat("raw"))?.create : plan.driver?.create;
  if (!create) throw new QimgError(`create -f ${plan.format}: not supported yet`);
  options.onFormatting?.(formattingLine(filename, plan.format, plan.descs, plan.parsed));
  // qemu hands the options to the protocol as text again (in QDict order),
  // so hex sizes with a suffix warn a second time.
  for (const [name, text] of qdictEntries(plan.parsed.given)) {
    const d = plan.descs.find((x) => x.name === name);
    if (d?.type === "size" && strtosz(String(text)).hexWithSuffix) {
      options.warn?.(hexSuffixWarning(String(text)));
    }
  }
  // The protocol checks its own options before it touches the file.
  const protocolPrealloc = plan.descs.find((d) => d.name === "preallocation") ===
      PROTOCOL_CREATE_OPTIONS.find((d) => d.name === "preallocation")
    ? parsePreallocation(plan.parsed.values.preallocation as string | undefined)
    : undefined;

  let file: BlockFile;
  try {
    file = await openFile(plan.path, { create: true, write: true });
  } catch (e) {
    if (e instanceof ImageLockError) throw e;
    throw new QimgError(`Could not create '${plan.path}': ${strerror(e)}`);
  }
  try {
    // Formats that pass preallocation to the host file (vmdk, vpc, vhdx,
    // vdi, ...) meet file-posix's refusal first: it has no metadata mode.
    if (protocolPrealloc === "metadata") {
      throw new ProtocolError("Unsupported preallocation mode: metadata", "ENOTSUP");
    }
    if (protocolPrealloc === undefined) await createFile(file, 0n);
    await create(file, {
      size: Number(plan.size),
      options: plan.parsed.values,
      openFile,
      removeFile,
    });
  } catch (e) {
    if (e instanceof ProtocolError && e.errno === "EFBIG") {
      // qemu reads cluster_size with its default, so qcow2 always gets the hint.
      const clusterSize = plan.parsed.exact.cluster_size ??
        BigInt(plan.descs.find((d) => d.name === "cluster_size")?.default ?? 0);
      const hint = clusterSize ? " (try using a larger cluster size)" : "";
      throw new QimgError(`The image size is too large for file format '${plan.format}'${hint}`);
    }
    throw e;
  } finally {
    await file.close();
  }
}
