/** `qimg bitmap`: add, remove, clear, enable, disable or merge persistent dirty bitmaps. */

import type { Io } from "./command.ts";
import { notSupportedYet, optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { QimgError } from "./errors.ts";
import type { Image } from "./image.ts";
import { openForCommand, printHelp, processObject } from "./cmd_util.ts";
import { cvtnum } from "./size.ts";

const LONG = [
  { name: "help", arg: "none", val: "h" },
  { name: "object", arg: "required", val: "object" },
  { name: "image-opts", arg: "none", val: "image-opts" },
  { name: "add", arg: "none", val: "add" },
  { name: "remove", arg: "none", val: "remove" },
  { name: "clear", arg: "none", val: "clear" },
  { name: "enable", arg: "none", val: "enable" },
  { name: "disable", arg: "none", val: "disable" },
  { name: "merge", arg: "required", val: "merge" },
  { name: "granularity", arg: "required", val: "g" },
  { name: "source-file", arg: "required", val: "b" },
  { name: "source-format", arg: "required", val: "F" },
] as const;

type Op = "add" | "remove" | "clear" | "enable" | "disable" | "merge";

/** Formats whose qemu driver stores persistent bitmaps; qimg's drivers do not yet. */
const BITMAP_FORMATS = new Set(["qcow2"]);

/** Runs `bitmap`. */
export async function run(args: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(args, ":b:f:F:g:h", [...LONG], "bitmap");
  const actions: { op: Op; source?: string }[] = [];
  let format: string | undefined;
  let sourceFile: string | undefined;
  let sourceFormat: string | undefined;
  let granularity = 0;
  let imageOpts = false;
  for (const o of options) {
    switch (o.opt) {
      case "h":
        return printHelp(io);
      case "b":
        sourceFile = o.arg;
        break;
      case "f":
        format = o.arg;
        break;
      case "F":
        sourceFormat = o.arg;
        break;
      case "g":
        granularity = Number(
          cvtnum("granularity", o.arg!, { warn: (m) => io.stderr(`qimg: ${m}\n`) }),
        );
        break;
      case "add":
      case "remove":
      case "clear":
      case "enable":
      case "disable":
        actions.push({ op: o.opt });
        break;
      case "merge":
        actions.push({ op: "merge", source: o.arg });
        break;
      case "object":
        if (processObject(o.arg!, io)) return 0;
        break;
      case "image-opts":
        imageOpts = true;
        break;
      default:
        throw optionError(o);
    }
  }
  const has = (op: Op) => actions.some((a) => a.op === op);
  if (actions.length === 0) {
    throw new QimgError(
      "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
    );
  }
  if (granularity && !has("add")) throw new QimgError("granularity only supported with --add");
  if (sourceFormat !== undefined && sourceFile === undefined) {
    throw new QimgError("-F only supported with -b");
  }
  if (sourceFile !== undefined && !has("merge")) {
    throw new QimgError("Merge bitmap source file only supported with --merge");
  }
  if (operands.length !== 2) throw new QimgError("Expecting filename and bitmap name");
  const [filename, bitmap] = operands;
  const image = await openForCommand(filename, io, {
    format,
    imageOpts,
    write: true,
    backing: false,
  });
  let source: Image | undefined;
  try {
    if (sourceFile !== undefined) {
      source = await openForCommand(sourceFile, io, { format: sourceFormat, backing: false });
    }
    if (BITMAP_FORMATS.has(image.format)) throw notSupportedYet("bitmap");
    // The image's driver has no bitmaps: the first action fails as in qemu.
    const { op } = actions[0];
    throw new QimgError(
      `Operation ${op} on bitmap ${bitmap} failed: ${whyNot(op, bitmap, granularity)}`,
    );
  } finally {
    await source?.close();
    await image.close();
  }
}

/** qemu's reason an action fails on an image without bitmap support. */
function whyNot(op: Op, bitmap: string, granularity: number): string {
  if (op !== "add") return `Dirty bitmap '${bitmap}' not found`;
  // QMP carries the granularity as a 32-bit number.
  const g = granularity % 2 ** 32;
  if (granularity && (g < 512 || !Number.isInteger(Math.log2(g)))) {
    return "Granularity must be power of 2 and at least 512";
  }
  // qemu names the node by an automatic name: "#block1" and two random digits.
  const node = `#block1${String(Math.floor(Math.random() * 100)).padStart(2, "0")}`;
  return `Can't store persistent bitmaps to ${node}: Operation not supported`;
}
