/** `qimg bitmap`: add, remove, clear, enable, disable or merge persistent dirty bitmaps. */

import type { Io } from "./command.ts";
import { optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { QimgError } from "./errors.ts";
import type { Image } from "./image.ts";
import { openForCommand, printHelp, processObject } from "./cmd_util.ts";
import { cvtnum } from "./size.ts";
import type { BlockFile } from "./file.ts";
import type { BitmapDirEntry, Qcow2Header } from "./qcow2_header.ts";
import type { BitmapContent } from "./qcow2_bitmap.ts";

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

/** Formats whose qemu driver stores persistent bitmaps. */
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
    // qemu runs the actions in order and stops at the first that fails;
    // the ones before it stay done.
    let failed: { op: Op; why: string } | undefined;
    let done = 0;
    for (const { op, source: merged } of actions) {
      const why = whyNot(op, bitmap, granularity, target, merged, from);
      if (why !== undefined) {
        failed = { op, why };
        break;
      }
      if (op === "add") target.bitmaps.push({ name: bitmap, inUse: false, size: target.size });
      if (op === "remove") target.bitmaps = target.bitmaps.filter((b) => b.name !== bitmap);
      done++;
    }
    // Even when the first action fails qemu has opened the image for
    // writing, so it stores its bitmaps anew as it closes it.
    if (target.stores) {
      const run = apply(actions.slice(0, done), bitmap, granularity, image, source);
      if (done > 0 || !failed) await run;
      else await run.catch(() => {}); // qemu's message matters more than the rewrite
    }
    if (failed) {
      throw new QimgError(`Operation ${failed.op} on bitmap ${bitmap} failed: ${failed.why}`);
    }
    return 0;
  } finally {
    await source?.close();
    await image.close();
  }
}

/** What a qcow2 image (Qcow2Image) holds for its persistent bitmaps. */
interface BitmapHolder {
  file: BlockFile;
  header: Qcow2Header;
  bitmapDirectory: BitmapDirEntry[];
}

/** qemu's default granularity: the cluster size, within 4 KiB to 64 KiB. */
function defaultGranularity(clusterSize: number | undefined): number {
  return clusterSize ? Math.min(65536, Math.max(4096, clusterSize)) : 65536;
}

/** Runs `actions` (all of which qemu would accept) on the qcow2 `image`. */
async function apply(
  actions: { op: Op; source?: string }[],
  bitmap: string,
  granularity: number,
  image: Image,
  source: Image | undefined,
): Promise<void> {
  const { Qcow2Bitmaps, readBitmaps } = await import("./qcow2_bitmap.ts");
  const top = image.chain[0].image;
  const bitmaps = await Qcow2Bitmaps.open(top.file);
  let others: BitmapContent[] | undefined;
  if (source) {
    const h = source.chain[0].image as unknown as BitmapHolder;
    others = await readBitmaps(h.file, h.header, h.bitmapDirectory);
  }
  for (const { op, source: merged } of actions) {
    const b = bitmaps.get(bitmap);
    switch (op) {
      case "add": {
        const g = granularity || defaultGranularity((await image.formatInfo()).clusterSize);
        bitmaps.add({
          name: bitmap,
          granularity: g,
          enabled: true,
          inUse: false,
          bits: new Uint8Array(Math.ceil(Math.ceil(image.size / g) / 8)),
        });
        break;
      }
      case "remove":
        await bitmaps.remove(bitmap);
        break;
      case "clear":
        b!.bits.fill(0);
        break;
      case "enable":
      case "disable":
        b!.enabled = op === "enable";
        break;
      case "merge": {
        const src = (others ?? bitmaps.bitmaps).find((x) => x.name === merged)!;
        mergeBits(b!, src, image.size);
        break;
      }
    }
  }
  await bitmaps.close();
}

/** ORs the bits of `src` into `dst` (qemu's hbitmap_merge), granularities may differ. */
function mergeBits(dst: BitmapContent, src: BitmapContent, size: number): void {
  if (dst === src) return;
  const bits = Math.ceil(size / src.granularity);
  for (let i = 0; i < bits; i++) {
    if (!(src.bits[i >> 3] & (1 << (i & 7)))) continue;
    // Every granule of dst that the bytes of src's granule i touch.
    const first = Math.floor(i * src.granularity / dst.granularity);
    const end = Math.min(size, (i + 1) * src.granularity);
    const last = Math.floor((end - 1) / dst.granularity);
    for (let j = first; j <= last; j++) dst.bits[j >> 3] |= 1 << (j & 7);
  }
}

/** A persistent bitmap as far as qemu's checks go. */
interface BitmapFact {
  name: string;
  /** Marked in use: qemu's "inconsistent", unusable except for removal. */
  inUse: boolean;
}

/** What an image holds and can hold, as far as qemu's bitmap checks go. */
interface BitmapState {
  /** The persistent bitmaps. */
  bitmaps: (BitmapFact & { size: number })[];
  /** The image's virtual size (a bitmap's size). */
  size: number;
  /** Why qemu refuses to store a new one, if it does (before the node name). */
  refusal?: (name: string, node: string) => string;
  /** Whether the image stores persistent bitmaps (qcow2 v3). */
  stores?: boolean;
}

/** The bitmaps of an image, from its format's `info` data (qemu's ImageInfoSpecific). */
async function bitmapsOf(image: Image): Promise<BitmapState> {
  if (!BITMAP_FORMATS.has(image.format)) {
    return {
      bitmaps: [],
      size: image.size,
      refusal: (_, node) => `Can't store persistent bitmaps to ${node}: Operation not supported`,
    };
  }
  const data = (await image.formatInfo()).formatSpecific?.data ?? {};
  const list = (Array.isArray(data.bitmaps) ? data.bitmaps : []) as {
    name: string;
    flags?: string[];
  }[];
  const bitmaps = list.map((b) => ({
    name: String(b.name),
    inUse: b.flags?.includes("in-use") ?? false,
    size: image.size,
  }));
  const persistent = (why: string) => (name: string, node: string) =>
    `Can't make bitmap '${name}' persistent in '${node}': ${why}`;
  if (data.compat === "0.10") {
    return {
      bitmaps,
      size: image.size,
      refusal: persistent("Cannot store dirty bitmaps in qcow2 v2 files"),
    };
  }
  return {
    bitmaps,
    size: image.size,
    stores: true,
    refusal: (name, node) =>
      new TextEncoder().encode(name).length > 1023
        ? persistent("Name length exceeds maximum (1023 characters)")(name, node)
        : "",
  };
}

/** qemu's refusal to use an inconsistent bitmap. */
function inconsistent(name: string): string {
  return `Bitmap '${name}' is inconsistent and cannot be used\n` +
    "Try block-dirty-bitmap-remove to delete this bitmap from disk";
}

/** qemu's reason an action fails, or undefined when it would succeed. */
function whyNot(
  op: Op,
  bitmap: string,
  granularity: number,
  target: BitmapState,
  merged: string | undefined,
  from: BitmapState,
): string | undefined {
  if (op !== "add") {
    const dst = target.bitmaps.find((b) => b.name === bitmap);
    if (!dst) return `Dirty bitmap '${bitmap}' not found`;
    if (op === "remove") return undefined;
    if (dst.inUse) return inconsistent(bitmap);
    if (op === "merge") {
      const src = from.bitmaps.find((b) => b.name === merged);
      if (!src) return `Dirty bitmap '${merged}' not found`;
      if (src.inUse) return inconsistent(merged!);
      if (src.size !== dst.size) {
        return `Bitmaps are of different sizes (destination size is ${dst.size}, source size is ${src.size}) and can't be merged`;
      }
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
  if (target.bitmaps.some((b) => b.name === bitmap)) return `Bitmap already exists: ${bitmap}`;
  return undefined;
}
