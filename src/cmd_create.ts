/** `qimg create`: a new image of a given format and size, as qemu-img 7.2's img_create. */

import type { Io } from "./command.ts";
import { optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { QimgError, usageError } from "./errors.ts";
import { accumulateOptions, isHelpOption } from "./options.ts";
import { cvtnum } from "./size.ts";
import { createImageWith, createOptionsHelp } from "./create.ts";
import { printHelp, processObject } from "./cmd_util.ts";

const LONG = [
  { name: "help", arg: "none", val: "h" },
  { name: "object", arg: "required", val: "object" },
] as const;

/** Runs `create`. */
export async function run(args: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(args, ":F:b:f:ho:qu", [...LONG], "create");
  let format = "raw";
  let backingFile: string | undefined;
  let backingFormat: string | undefined;
  let optionText: string | undefined;
  let quiet = false;
  let unsafeBacking = false;
  for (const o of options) {
    switch (o.opt) {
      case "F":
        backingFormat = o.arg;
        break;
      case "b":
        backingFile = o.arg;
        break;
      case "f":
        format = o.arg!;
        break;
      case "o":
        optionText = accumulateOptions(optionText, o.arg!);
        break;
      case "q":
        quiet = true;
        break;
      case "u":
        unsafeBacking = true;
        break;
      case "h":
        return printHelp(io);
      case "object":
        if (processObject(o.arg!, io)) return 0;
        break;
      default:
        throw optionError(o);
    }
  }
  const filename = operands[0] as string | undefined;
  // `-o help` wins over everything after the options, even a missing file name.
  if (optionText !== undefined && isHelpOption(optionText)) {
    io.stdout(await createOptionsHelp(format, filename));
    return 0;
  }
  if (filename === undefined) throw usageError("Expecting image file name");
  const warn = (message: string) => io.stderr(`qimg: ${message}\n`);
  const size = operands.length > 1 ? cvtnum("image size", operands[1], { warn }) : undefined;
  if (operands.length > 2) throw usageError(`Unexpected argument: ${operands[2]}`);
  try {
    await createImageWith(
      filename,
      {
        format,
        size,
        options: optionText,
        backingFile,
        backingFormat,
        unsafeBacking,
        warn,
        onFormatting: quiet ? undefined : (line) => io.stdout(line),
      },
      (path, o) => io.openFile(path, o),
      io.remove?.bind(io),
    );
  } catch (e) {
    // qemu-img names the target before every message from the block layer.
    if (e instanceof QimgError) {
      throw new QimgError(`${filename}: ${e.message}`, { exitCode: e.exitCode, hint: e.hint });
    }
    throw e;
  }
  return 0;
}
