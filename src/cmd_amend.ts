/** `qimg amend`: change format-specific options of an existing image. */

import type { Io } from "./command.ts";
import { notSupportedYet, optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { QimgError, usageError } from "./errors.ts";
import { findFormat } from "./format_drivers.ts";
import {
  accumulateOptions,
  CREATE_OPTION_TABLES,
  formatOptionHelp,
  isHelpOption,
  mergeOptionTables,
  type OptionDesc,
  parseOptionList,
  QCOW2_CREATE_OPTIONS,
} from "./options.ts";
import { Progress } from "./progress.ts";
import { checkCacheMode, openForCommand, printHelp, processObject } from "./cmd_util.ts";
import { Image } from "./image.ts";

const LONG = [
  { name: "help", arg: "none", val: "h" },
  { name: "object", arg: "required", val: "object" },
  { name: "image-opts", arg: "none", val: "image-opts" },
  { name: "force", arg: "none", val: "force" },
] as const;

/** Formats whose qemu driver can amend options; qimg's drivers cannot yet. */
const AMEND_FORMATS = new Set(["qcow2", "luks"]);

/** Runs `amend`. */
export async function run(args: string[], io: Io): Promise<number> {
  const { options: parsed, operands } = getopt(args, ":ho:f:t:pq", [...LONG], "amend");
  let options: string | undefined;
  let format: string | undefined;
  let cache = "writeback";
  let progress = false;
  let quiet = false;
  let imageOpts = false;
  for (const o of parsed) {
    switch (o.opt) {
      case "h":
        return printHelp(io);
      case "o":
        options = accumulateOptions(options, o.arg!);
        break;
      case "f":
        format = o.arg;
        break;
      case "t":
        cache = o.arg!;
        break;
      case "p":
        progress = true;
        break;
      case "q":
        quiet = true;
        break;
      case "object":
        if (processObject(o.arg!, io)) return 0;
        break;
      case "image-opts":
        imageOpts = true;
        break;
      case "force":
        break;
      default:
        throw optionError(o);
    }
  }
  if (options === undefined) throw usageError("Must specify options (-o)");
  // From here on qemu-img's progress meter is running: it ends with a newline.
  const meter = new Progress(progress && !quiet, 1, io.stdout);
  meter.listen(io);
  try {
    return await amend(options, operands, io, { format, cache, imageOpts, progress: meter });
  } finally {
    meter.end();
  }
}

async function amend(
  options: string,
  operands: string[],
  io: Io,
  o: { format?: string; cache: string; imageOpts: boolean; progress: Progress },
): Promise<number> {
  if (o.format !== undefined && isHelpOption(options)) {
    // With -f, `-o help` lists the format's options without an image.
    if (!findFormat(o.format)) throw new QimgError(`Unknown file format '${o.format}'`);
    return amendHelp(o.format, io);
  }
  if (operands.length !== 1) throw new QimgError("Expecting one image file name");
  checkCacheMode(o.cache);
  const image = await openForCommand(operands[0], io, {
    format: o.format,
    imageOpts: o.imageOpts,
    write: true,
  });
  try {
    const format = image.format;
    if (isHelpOption(options)) return amendHelp(format, io);
    const table = amendTable(format);
    if (!table) throw refusal(format);
    const warn = (m: string) => io.stderr(`qimg: ${m}\n`);
    let values;
    try {
      values = parseOptionList(options, table, undefined, warn).values;
    } catch (e) {
      if (!(e instanceof QimgError)) throw e;
      // qemu tries the create options too, to tell why the option is refused.
      const create = findFormat(format)?.createOptions ?? CREATE_OPTION_TABLES[format] ?? [];
      try {
        parseOptionList(options, mergeOptionTables(table, create), undefined, warn);
      } catch {
        throw e;
      }
      throw new QimgError(`${e.message}\nThis option is only supported for image creation`);
    }
    o.progress.print(0, 0);
    const top = image.chain[0].image;
    if (!top.amend) throw notSupportedYet("amend");
    try {
      // qemu's amend_status_cb: the percentage in single precision.
      const below = image.chain.length > 1 ? new Image(image.chain.slice(1)) : undefined;
      await top.amend(values, (done, total) => {
        o.progress.print(Math.fround(Math.fround(100 * done) / total), 0);
      }, {
        backingSize: below?.size,
        backingRead: below ? (offset, buf) => below.read(offset, buf) : undefined,
      });
    } finally {
      // qemu completes the meter whether or not the driver succeeded.
      o.progress.print(100, 0);
    }
    return 0;
  } finally {
    await image.close();
  }
}

/**
 * qcow2's amend options in qemu 7.2, for as long as its driver carries
 * none (a driver's own `amendOptions` wins).
 */
const QCOW2_AMEND_OPTIONS: OptionDesc[] = [
  ...QCOW2_CREATE_OPTIONS.filter((d) =>
    [
      "size",
      "compat",
      "backing_file",
      "backing_fmt",
      "data_file",
      "data_file_raw",
      "lazy_refcounts",
      "refcount_bits",
      "encrypt.iter-time",
    ].includes(d.name)
  ),
  {
    name: "encrypt.keyslot",
    type: "number",
    help: "Select a single keyslot to modify explicitly",
  },
  {
    name: "encrypt.new-secret",
    type: "string",
    help: "New secret to set in the matching keyslots. Empty string to erase",
  },
  {
    name: "encrypt.old-secret",
    type: "string",
    help: "Select all keyslots that match this password",
  },
  {
    name: "encrypt.state",
    type: "string",
    help: "Select new state of affected keyslots (active/inactive)",
  },
];

/** The options a format can amend, or undefined when qemu cannot amend it. */
function amendTable(format: string): OptionDesc[] | undefined {
  const own = findFormat(format)?.amendOptions;
  if (own) return own;
  if (format === "qcow2") return QCOW2_AMEND_OPTIONS;
  return undefined;
}

/** `-o help`: the format's amend options, as qemu's print_amend_option_help. */
function amendHelp(format: string, io: Io): number {
  const table = amendTable(format);
  if (!table) {
    if (AMEND_FORMATS.has(format)) throw notSupportedYet("amend");
    throw refusal(format);
  }
  io.stdout(`Amend options for '${format}':\n` + formatOptionHelp(table));
  return 0;
}

/** qemu's answer for a format that cannot amend its options. */
function refusal(format: string): QimgError {
  if (AMEND_FORMATS.has(format)) return notSupportedYet("amend");
  return new QimgError(`Format driver '${format}' does not support option amendment`);
}
