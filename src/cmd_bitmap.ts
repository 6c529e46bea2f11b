/** `qimg bitmap`: add, remove, clear, enable, disable or merge persistent dirty bitmaps. */

import type { Io } from "./command.ts";
import { notSupportedYet, optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { QimgError } from "./errors.ts";
import type { Image } from "./image.ts";
import { bitmapNames, openForCommand, printHelp, processObject } from "./cmd_util.ts";
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
    const target = await bitmapsOf(image);
    const from = source ? await bitmapsOf(source) : target;
    // Only the first action matters: it either fails as in qemu, or would
    // change the image, which qimg's drivers cannot do yet.
    const { op, source: merged } = actions[0];
    const why = whyNot(op, bitmap, granularity, target, merged, from);
    if (why === undefined) throw notSupportedYet("bitmap");
    throw new QimgError(`Operation ${op} on bitmap ${bitmap} failed: ${why}`);
  } finally {
    await source?.close();
    await image.close();
  }
}

/** What an image holds and can hold, as far as qemu's bitmap checks go. */
interface BitmapState {
  /** Names of the persistent bitmaps. */
  names: string[];
  /** Why qemu refuses to store a new one, if it does (before the node name). */
  refusal?: (name: string, node: string) => string;
}

/** The bitmaps of an image, from its format's `info` data (qemu's ImageInfoSpecific). */
async function bitmapsOf(image: Image): Promise<BitmapState> {
  if (!BITMAP_FORMATS.has(image.format)) {
    return {
      names: [],
      refusal: (_, node) => `Can't store persistent bitmaps to ${node}: Operation not supported`,
    };
  }
  const data = (await image.formatInfo()).formatSpecific?.data ?? {};
  const names = await bitmapNames(image);
  const persistent = (why: string) => (name: string, node: string) =>
    `Can't make bitmap '${name}' persistent in '${node}': ${why}`;
  if (data.compat === "0.10") {
    return { names, refusal: persistent("Cannot store dirty bitmaps in qcow2 v2 files") };
  }
  return {
    names,
    refusal: (name, node) =>
      new TextEncoder().encode(name).length > 1023
        ? persistent("Name length exceeds maximum (1023 characters)")(name, node)
        : "",
  };
}

/** qemu's reason the first action fails, or undefined when it would succeed. */
function whyNot(
  op: Op,
  bitmap: string,
  granularity: number,
  target: BitmapState,
  merged: string | undefined,
  from: BitmapState,
): string | undefined {
  if (op !== "add") {
    if (!target.names.includes(bitmap)) return `Dirty bitmap '${bitmap}' not found`;
    if (op === "merge" && !from.names.includes(merged!)) {
      return `Dirty bitmap '${merged}' not found`;
    }
    return undefined;
  }
  if (bitmap === "") return "Bitmap name cannot be empty";
  // QMP carries the granularity as a 32-bit number.
  const g = granularity % 2 ** 32;
  if (granularity && (g < 512 || !Number.isInteger(Math.log2(g)))) {
    return "Granularity must be power of 2 and at least 512";
  }
  // qemu names the node by an automatic name: "#block1" and two random digits.
  const node = `#block1${String(Math.floor(Math.random() * 100)).padStart(2, "0")}`;
  const refused = target.refusal?.(bitmap, node);
  if (refused) return refused;
  if (target.names.includes(bitmap)) return `Bitmap already exists: ${bitmap}`;
  return undefined;
}
