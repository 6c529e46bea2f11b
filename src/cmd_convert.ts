/**
 * `qimg convert`: parses qemu-img 7.2's options, checks them in qemu's
 * order with its messages, creates or opens the target and runs the copy
 * engine in convert.ts.
 */

import type { Io } from "./command.ts";
import { notSupportedYet, optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { QimgError, SizeQueryError, strerror } from "./errors.ts";
import { strerrorNumber } from "./errno.ts";
import { Image } from "./image.ts";
import { ImageLockError } from "./image_lock.ts";
import { loadFormat } from "./formats.ts";
import type { FormatDriver } from "./driver.ts";
import {
  accumulateOptions,
  CREATE_OPTION_TABLES,
  emptyOptions,
  isHelpOption,
  mergeOptionTables,
  type OptionValues,
  parseOptionList,
} from "./options.ts";
import { createImageWith, createOptionsHelp } from "./create.ts";
import { PROTOCOL_CREATE_OPTIONS } from "./protocol.ts";
import { cvtnum } from "./size.ts";
import { isCacheMode, openForCommand, processObject } from "./cmd_util.ts";
import { convert, imageTarget, MAX_PARALLEL, MAX_SPARSE, unsafeCacheIo } from "./convert.ts";
import { Progress } from "./progress.ts";
import { throttledTarget } from "./throttle.ts";
import type { BlockFile } from "./file.ts";
import type { BitmapDirEntry, Qcow2Header } from "./qcow2_header.ts";
import type { BitmapContent } from "./qcow2_bitmap.ts";

const LONG = [
  { name: "help", arg: "none", val: "h" },
  { name: "object", arg: "required", val: "object" },
  { name: "image-opts", arg: "none", val: "image-opts" },
  { name: "force-share", arg: "none", val: "U" },
  { name: "target-image-opts", arg: "none", val: "target-image-opts" },
  { name: "salvage", arg: "none", val: "salvage" },
  { name: "target-is-zero", arg: "none", val: "target-is-zero" },
  { name: "bitmaps", arg: "none", val: "bitmaps" },
  { name: "skip-broken-bitmaps", arg: "none", val: "skip-broken-bitmaps" },
] as const;

/** C's strtol/strtoul with base 0 over the whole string (qemu_strtol); undefined when invalid. */
export function parseCInteger(text: string): bigint | undefined {
  const m = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(text);
  if (!m) return undefined;
  const [, sign, digits] = m;
  let v: bigint;
  if (/^0[xX]/.test(digits)) v = BigInt(digits);
  else if (digits.length > 1 && digits[0] === "0") v = BigInt("0o" + digits.slice(1));
  else v = BigInt(digits);
  return sign === "-" ? -v : v;
}

/** Formats that can write compressed clusters in qemu 7.2 (block_driver_can_compress). */
const COMPRESSING_FORMATS = ["qcow", "qcow2", "vmdk"];

function canCompress(driver: FormatDriver): boolean {
  const flag = (driver as { supportsCompression?: boolean }).supportsCompression;
  return flag ?? COMPRESSING_FORMATS.includes(driver.name);
}

/**
 * The image as it was at an internal snapshot, read-only (qemu's
 * bdrv_snapshot_load_tmp): a bare name is tried as an ID, then as a name.
 * The returned image shares the layers of `image` (close `image` only).
 */
export async function loadSnapshot(
  image: Image,
  spec: string | { id?: string; name?: string },
): Promise<Image> {
  const top = image.chain[0];
  if (!top.image.snapshots || !top.image.atSnapshot) {
    throw new QimgError(
      `Failed to load snapshot: Block format '${image.format}' used by device '' does not support temporarily loading internal snapshots`,
    );
  }
  const list = await top.image.snapshots();
  const found = typeof spec === "string"
    ? list.find((s) => s.id === spec) ?? list.find((s) => s.name === spec)
    : list.find((s) =>
      (spec.id === undefined || s.id === spec.id) &&
      (spec.name === undefined || s.name === spec.name)
    );
  if (!found) throw new QimgError("Failed to load snapshot: Can't find snapshot");
  const view = await top.image.atSnapshot(found);
  return new Image([{ ...top, image: view }, ...image.chain.slice(1)]);
}

/** What a qcow2 image (Qcow2Image) holds for its persistent bitmaps. */
interface BitmapHolder {
  file: BlockFile;
  header: Qcow2Header;
  bitmapDirectory: BitmapDirEntry[];
}

/**
 * The persistent bitmaps of the source's top layer with their bits, in
 * directory order, checked as qemu's convert_check_bitmaps: only qcow2
 * keeps them; an in-use (inconsistent) one fails unless
 * `--skip-broken-bitmaps` is given.
 */
async function sourceBitmaps(image: Image, skipBroken: boolean): Promise<BitmapContent[]> {
  if (image.format !== "qcow2") throw new QimgError("Source lacks bitmap support");
  const top = image.chain[0].image as unknown as BitmapHolder;
  const { readBitmaps } = await import("./qcow2_bitmap.ts");
  const all = await readBitmaps(top.file, top.header, top.bitmapDirectory);
  // qemu keeps loaded bitmaps newest first: the directory's last entry comes first.
  const broken = [...all].reverse().find((b) => b.inUse);
  if (broken && !skipBroken) {
    throw new QimgError(`Cannot copy inconsistent bitmap '${broken.name}'`, {
      hint: "Try --skip-broken-bitmaps, or use 'qimg bitmap --remove' to delete it",
    });
  }
  return all;
}

/**
 * Copies `bitmaps` into the qcow2 `target` after the data, as qemu's
 * convert_copy_bitmaps: newest first, in-use ones skipped with a warning,
 * each merged into a new bitmap of the same name, granularity and state
 * (which needs disks of one size); stored in directory order as qemu does
 * on close.
 */
async function copyBitmaps(
  bitmaps: BitmapContent[],
  sourceSize: number,
  target: Image,
  warn: (message: string) => void,
): Promise<void> {
  const copied: BitmapContent[] = [];
  for (const b of [...bitmaps].reverse()) {
    if (b.inUse) {
      warn(`Skipping inconsistent bitmap '${b.name}'`);
      continue;
    }
    if (target.size !== sourceSize) {
      throw new QimgError(
        `Failed to populate bitmap ${b.name}: Bitmaps are of different sizes (destination size is ${target.size}, source size is ${sourceSize}) and can't be merged`,
      );
    }
    copied.unshift(b);
  }
  if (copied.length === 0) return;
  // Stored as the target closes, with any bitmaps it has (qcow2.ts).
  const top = target.chain[0].image as unknown as {
    addBitmaps(list: BitmapContent[]): Promise<void>;
  };
  await top.addBitmaps(copied);
}

/** Creates an image file for `dd`: a new image of `size` bytes, errors without the file name. */
export function createTargetFile(
  io: Io,
  path: string,
  format: string,
  size: number,
): Promise<void> {
  return createImageWith(path, { format, size }, (p, o) => io.openFile(p, o));
}

/** Runs `convert`. */
export async function run(args: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(
    args,
    ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:",
    [...LONG],
    "convert",
  );
  let fmt: string | undefined;
  let outFmt: string | undefined;
  let cache = "unsafe";
  let srcCache = "writeback";
  let outBase: string | undefined;
  let backingFmt: string | undefined;
  let snapshotName: string | undefined;
  let snapshotOpts: Record<string, string> | undefined;
  let createOptions: string | undefined;
  let imageOpts = false;
  let targetImageOpts = false;
  let skipCreate = false;
  let progress = false;
  let quiet = false;
  let explicitSparse = false;
  let minSparse = 4096;
  let compressed = false;
  let copyRange = false;
  let salvage = false;
  let targetIsZero = false;
  let bitmaps = false;
  let skipBroken = false;
  let parallel = 8;
  let outOfOrder = false;
  let forceShare = false;
  let rateLimit = 0;
  const warn = (m: string) => io.stderr(`qimg: ${m}\n`);
  for (const o of options) {
    const arg = o.arg ?? "";
    switch (o.opt) {
      case "h":
        return (await import("./cmd_util.ts")).printHelp(io);
      case "f":
        fmt = arg;
        break;
      case "O":
        outFmt = arg;
        break;
      case "B":
        outBase = arg;
        break;
      case "C":
        copyRange = true;
        break;
      case "c":
        compressed = true;
        break;
      case "F":
        backingFmt = arg;
        break;
      case "o":
        createOptions = accumulateOptions(createOptions, arg);
        break;
      case "l":
        if (arg.startsWith("snapshot.")) {
          snapshotOpts = {};
          for (const part of arg.split(",")) {
            const eq = part.indexOf("=");
            const key = eq < 0 ? part : part.slice(0, eq);
            if (key !== "snapshot.id" && key !== "snapshot.name") {
              throw new QimgError(
                `Invalid parameter '${key}'\nqimg: Failed in parsing snapshot param '${arg}'`,
              );
            }
            snapshotOpts[key] = eq < 0 ? "on" : part.slice(eq + 1);
          }
        } else {
          snapshotName = arg;
        }
        break;
      case "S": {
        const v = Number(cvtnum("buffer size for sparse output", arg, { warn }));
        if (v % 512 !== 0 || v > MAX_SPARSE) {
          throw new QimgError(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to " +
              `${MAX_SPARSE}. Select 0 to disable sparse detection (fully allocates output).`,
          );
        }
        minSparse = v;
        explicitSparse = true;
        break;
      }
      case "p":
        progress = true;
        break;
      case "t":
        cache = arg;
        break;
      case "T":
        srcCache = arg;
        break;
      case "q":
        quiet = true;
        break;
      case "n":
        skipCreate = true;
        break;
      case "m": {
        const v = parseCInteger(arg);
        if (v === undefined || v < 1n || v > BigInt(MAX_PARALLEL)) {
          throw new QimgError(
            `Invalid number of coroutines. Allowed number of coroutines is between 1 and ${MAX_PARALLEL}`,
          );
        }
        parallel = Number(v);
        break;
      }
      case "W":
        outOfOrder = true;
        break;
      case "U":
        forceShare = true;
        break;
      case "r":
        rateLimit = Number(cvtnum("rate limit", arg, { warn }));
        break;
      case "object":
        if (processObject(arg, io)) return 0;
        break;
      case "image-opts":
        imageOpts = true;
        break;
      case "salvage":
        salvage = true;
        break;
      case "target-image-opts":
        targetImageOpts = true;
        break;
      case "target-is-zero":
        targetIsZero = true;
        break;
      case "bitmaps":
        bitmaps = true;
        break;
      case "skip-broken-bitmaps":
        skipBroken = true;
        break;
      default:
        throw optionError(o);
    }
  }

  if (outFmt === undefined && !targetImageOpts) outFmt = "raw";
  if (skipBroken && !bitmaps) {
    throw new QimgError("Use of --skip-broken-bitmaps requires --bitmaps");
  }
  if (compressed && copyRange) throw new QimgError("Cannot enable copy offloading when -c is used");
  if (explicitSparse && copyRange) {
    throw new QimgError("Cannot enable copy offloading when -S is used");
  }
  if (copyRange && salvage) throw new QimgError("Cannot use copy offloading in salvaging mode");
  if (targetImageOpts && !skipCreate) {
    throw new QimgError("--target-image-opts requires use of -n flag");
  }
  if (skipCreate && createOptions !== undefined) {
    throw new QimgError("-o has no effect when skipping image creation");
  }
  if (targetIsZero && !skipCreate) throw new QimgError("--target-is-zero requires use of -n flag");

  const srcNames = operands.slice(0, -1);
  const outName = operands.length >= 2 ? operands[operands.length - 1] : undefined;
  if (createOptions !== undefined && isHelpOption(createOptions)) {
    if (outFmt === undefined) throw new QimgError("Option help requires a format be specified");
    io.stdout(await createOptionsHelp(outFmt, outName));
    return 0;
  }
  if (srcNames.length < 1 || outName === undefined) {
    throw new QimgError("Must specify image file name");
  }
  if (!isCacheMode(srcCache)) throw new QimgError(`Invalid source cache option: ${srcCache}`);

  const meter = new Progress(progress && !quiet, 1, (t) => io.stdout(t));
  meter.listen(io);
  meter.print(0, 100);
  const sources: Image[] = [];
  const opened: Image[] = [];
  let target: Image | undefined;
  let exitCode = 1;
  try {
    for (const name of srcNames) {
      const image = await openForCommand(name, io, {
        format: fmt,
        imageOpts,
        forceShare,
        stable: true,
      });
      opened.push(image);
      try {
        // qemu sizes each source as it opens it: a hostile vmdk's sector count can be negative.
        void image.size;
      } catch (e) {
        if (!(e instanceof SizeQueryError && e.sectors < 0n)) throw e;
        throw new QimgError(`Could not get size of ${name}: ${strerrorNumber(e.errno)}`);
      }
      sources.push(image);
    }
    if (snapshotOpts) {
      sources[0] = await loadSnapshot(sources[0], {
        id: snapshotOpts["snapshot.id"],
        name: snapshotOpts["snapshot.name"],
      });
    } else if (snapshotName !== undefined) {
      if (sources.length > 1) {
        throw new QimgError("No support for concatenating multiple snapshot");
      }
      sources[0] = await loadSnapshot(sources[0], snapshotName);
    }
    const total = sources.reduce((s, img) => s + Math.ceil(img.size / 512) * 512, 0);

    let values: OptionValues = {};
    let given: Record<string, string> = {};
    let driver: FormatDriver | undefined;
    if (!skipCreate) {
      // Unknown formats, formats qemu cannot create, and those qimg cannot yet.
      await createOptionsHelp(outFmt!);
      driver = await loadFormat(outFmt!);
      const descs = mergeOptionTables(
        driver?.createOptions ?? CREATE_OPTION_TABLES[outFmt!] ?? [],
        PROTOCOL_CREATE_OPTIONS,
      );
      const parsed = emptyOptions();
      if (createOptions !== undefined) {
        parseOptionList(createOptions, descs, parsed, warn);
      }
      values = parsed.values;
      given = { ...parsed.given };
      // Set apart: the size is the sources' total, -B and -F override -o.
      delete given.size;
      delete given.backing_file;
      delete given.backing_fmt;
      const hasOption = (name: string) => descs.some((d) => d.name === name);
      if (outBase !== undefined) {
        if (!hasOption("backing_file")) {
          throw new QimgError(`Backing file not supported for file format '${outFmt}'`);
        }
        values.backing_file = outBase;
      }
      if (backingFmt !== undefined) {
        if (!hasOption("backing_fmt")) {
          throw new QimgError(`Backing file format not supported for file format '${outFmt}'`);
        }
        values.backing_fmt = backingFmt;
      }
    }
    const baseParam = values.backing_file;
    if (typeof baseParam === "string") outBase = baseParam;
    const targetHasBacking = outBase !== undefined;
    if (targetIsZero && targetHasBacking) {
      io.stderr(
        "qimg: Cannot use --target-is-zero when the destination image has a backing file\n",
      );
      // qemu-img 7.2 reports this but exits 0, as after a successful copy.
      meter.print(100, 0);
      exitCode = 0;
      return exitCode;
    }
    if (sources.length > 1 && outBase !== undefined) {
      throw new QimgError(
        "Having a backing file for the target makes no sense when concatenating multiple input images",
      );
    }
    if (targetHasBacking && !skipCreate && values.backing_fmt === undefined) {
      throw new QimgError("Use of backing file requires explicit backing format");
    }
    if (compressed) {
      if (driver && !canCompress(driver)) {
        throw new QimgError("Compression not supported for this file format");
      }
      if (values.encryption === true || values["encrypt.format"] !== undefined) {
        throw new QimgError("Compression and encryption not supported at the same time");
      }
      const prealloc = values.preallocation;
      if (prealloc !== undefined && prealloc !== "off") {
        throw new QimgError("Compression and preallocation not supported at the same time");
      }
    }
    let bitmapsOfSource: BitmapContent[] = [];
    if (bitmaps) {
      if (sources.length > 1) {
        throw new QimgError("Copying bitmaps only possible with single source");
      }
      bitmapsOfSource = await sourceBitmaps(opened[0], skipBroken);
    }

    if (!skipCreate) {
      try {
        await createImageWith(
          outName,
          {
            format: outFmt,
            size: total,
            options: given,
            backingFile: values.backing_file as string | undefined,
            backingFormat: values.backing_fmt as string | undefined,
            // qemu's bdrv_create does not open the backing file (opening the target does).
            unsafeBacking: true,
            warn,
          },
          (p, o) => io.openFile(p, o),
          io.remove?.bind(io),
        );
      } catch (e) {
        throw new QimgError(`${outName}: error while converting ${outFmt}: ${strerror(e)}`, {
          hint: e instanceof ImageLockError ? e.hint : undefined,
        });
      }
    }
    if (!isCacheMode(cache)) throw new QimgError(`Invalid cache option: ${cache}`);

    target = await openForCommand(outName, cache === "unsafe" ? unsafeCacheIo(io) : io, {
      format: outFmt,
      imageOpts: targetImageOpts,
      write: true,
    });
    if (
      bitmaps &&
      (target.format !== "qcow2" ||
        (await target.formatInfo()).formatSpecific?.data.compat === "0.10")
    ) {
      throw new QimgError(`Format driver '${target.format}' does not support bitmaps`);
    }
    if (compressed && !target.chain[0].image.writeCompressed) {
      if (canCompress(target.chain[0].driver)) {
        throw notSupportedYet(`compressed ${target.format} writes`);
      }
      throw new QimgError("Compression not supported for this file format");
    }
    if (skipCreate && target.size < total) {
      throw new QimgError("output file is smaller than input file");
    }
    const info = await target.formatInfo();
    const copyTarget = rateLimit > 0
      ? throttledTarget(imageTarget(target), rateLimit)
      : imageTarget(target);
    await convert(sources, copyTarget, {
      minSparse,
      parallel,
      outOfOrder,
      targetIsZero: targetIsZero || (!skipCreate && minSparse > 0 && !targetHasBacking),
      targetHasBacking,
      targetBackingSize: targetHasBacking && !skipCreate && target.chain.length > 1
        ? target.chain[1].image.size
        : undefined,
      compressed,
      copyRange,
      clusterSize: info.clusterSize,
      salvage,
      quiet,
      warn: (m) => io.stderr(`qimg: warning: ${m}\n`),
      progress: (p) => meter.print(p, 0),
    });
    if (bitmaps) {
      await copyBitmaps(bitmapsOfSource, opened[0].size, target, (m) => warn(`warning: ${m}`));
    }
    // cache=unsafe (convert's default) never flushes; the others flush on close.
    if (cache !== "unsafe") await target.flush();
    meter.print(100, 0);
    exitCode = 0;
  } finally {
    meter.end();
    if (target) await target.close();
    for (const s of opened) await s.close();
  }
  return exitCode;
}
