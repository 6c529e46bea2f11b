/** `qimg amend`: change format-specific options of an existing image. */

import type { Io } from "./command.ts";
import { notSupportedYet, optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { QimgError, usageError } from "./errors.ts";
import { findFormat } from "./formats.ts";
import { accumulateOptions, isHelpOption } from "./options.ts";
import { checkCacheMode, openForCommand, printHelp, processObject } from "./cmd_util.ts";

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
  try {
    return await amend(options, operands, io, { format, cache, imageOpts });
  } finally {
    if (progress && !quiet) io.stdout("\n");
  }
}

async function amend(
  options: string,
  operands: string[],
  io: Io,
  o: { format?: string; cache: string; imageOpts: boolean },
): Promise<number> {
  if (o.format !== undefined && isHelpOption(options)) {
    // With -f, `-o help` lists the format's options without an image.
    if (!findFormat(o.format)) throw new QimgError(`Unknown file format '${o.format}'`);
    refuse(o.format);
  }
  if (operands.length !== 1) throw new QimgError("Expecting one image file name");
  checkCacheMode(o.cache);
  const image = await openForCommand(operands[0], io, {
    format: o.format,
    imageOpts: o.imageOpts,
    write: true,
  });
  try {
    refuse(image.format);
  } finally {
    await image.close();
  }
}

/** No qimg driver amends yet: qemu's refusal, or "not supported yet" where qemu can. */
function refuse(format: string): never {
  if (AMEND_FORMATS.has(format)) throw notSupportedYet("amend");
  throw new QimgError(`Format driver '${format}' does not support option amendment`);
}
