/** `qimg resize`: grow or shrink an image, as qemu-img 7.2's img_resize. */

import type { Io } from "./command.ts";
import { notSupportedYet, optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { QimgError, usageError } from "./errors.ts";
import { parseSizeOption } from "./size.ts";
import { PREALLOC_MODES, type PreallocMode } from "./protocol.ts";
import { openForCommand, printHelp, processObject } from "./cmd_util.ts";
import { Image } from "./image.ts";

const LONG = [
  { name: "help", arg: "none", val: "h" },
  { name: "object", arg: "required", val: "object" },
  { name: "image-opts", arg: "none", val: "image-opts" },
  { name: "preallocation", arg: "required", val: "preallocation" },
  { name: "shrink", arg: "none", val: "shrink" },
] as const;

/** The largest image length qemu's block layer accepts (BDRV_MAX_LENGTH). */
const BDRV_MAX_LENGTH = (1n << 63n) - (1n << 30n);

/** Formats whose qemu driver can resize, for drivers qimg has not taught to yet. */
const QEMU_RESIZABLE = new Set(["raw", "file", "qcow2", "qed", "luks"]);

/** Runs `resize`. */
export async function run(args: string[], io: Io): Promise<number> {
  // qemu-img takes the size off the end before getopt, so `-1M` is a size.
  if (args.length < 2) throw usageError("Not enough arguments");
  let sizeText = args[args.length - 1];
  const { options, operands } = getopt(args.slice(0, -1), ":f:hq", [...LONG], "resize");
  let format: string | undefined;
  let quiet = false;
  let imageOpts = false;
  let prealloc: PreallocMode = "off";
  let shrink = false;
  for (const o of options) {
    switch (o.opt) {
      case "f":
        format = o.arg;
        break;
      case "q":
        quiet = true;
        break;
      case "h":
        return printHelp(io);
      case "object":
        if (processObject(o.arg!, io)) return 0;
        break;
      case "image-opts":
        imageOpts = true;
        break;
      case "preallocation":
        if (!(PREALLOC_MODES as readonly string[]).includes(o.arg!)) {
          throw new QimgError(`Invalid preallocation mode '${o.arg}'`);
        }
        prealloc = o.arg as PreallocMode;
        break;
      case "shrink":
        shrink = true;
        break;
      default:
        throw optionError(o);
    }
  }
  if (operands.length !== 1) throw usageError("Expecting image file name and size");
  const filename = operands[0];

  let relative = 0n;
  if (sizeText[0] === "+" || sizeText[0] === "-") {
    relative = sizeText[0] === "+" ? 1n : -1n;
    sizeText = sizeText.slice(1);
  }
  const warn = (message: string) => io.stderr(`qimg: ${message}\n`);
  // The size lands in a signed 64-bit variable: 8E and above turn negative.
  const n = BigInt.asIntN(64, parseSizeOption("size", sizeText, warn));

  const image = await openForCommand(filename, io, { format, imageOpts, write: true });
  try {
    const current = BigInt(image.size);
    const total = relative === 0n ? n : BigInt.asIntN(64, current + n * relative);
    if (total <= 0n) throw new QimgError("New image size must be positive");
    if (total <= current && prealloc !== "off") {
      throw new QimgError("Preallocation can only be used for growing images");
    }
    if (total < current && !shrink) {
      throw new QimgError(
        "Use the --shrink option to perform a shrink operation.\n" +
          "qimg: warning: Shrinking an image will delete all data beyond the shrunken image's end. " +
          "Before performing such an operation, make sure there is no important data there.",
      );
    }
    if (total > BDRV_MAX_LENGTH) {
      throw new QimgError(`offset(${total}) exceeds maximum(${BDRV_MAX_LENGTH})`);
    }
    const top = image.chain[0].image;
    if (!top.resize) {
      if (QEMU_RESIZABLE.has(image.format)) throw notSupportedYet(`resize -f ${image.format}`);
      throw new QimgError("Image format driver does not support resize");
    }
    // The layers below: a longer backing file must not show through the grown range.
    const below = image.chain.length > 1 ? new Image(image.chain.slice(1)) : undefined;
    await top.resize(Number(total), {
      preallocation: prealloc,
      shrink,
      backingSize: below?.size,
      backingRead: below ? (o, b) => below.read(o, b) : undefined,
    });
    await image.flush();
  } finally {
    await image.close();
  }
  if (!quiet) io.stdout("Image resized.\n");
  return 0;
}
