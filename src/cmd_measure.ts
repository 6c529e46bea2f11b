/**
 * `qimg measure`: how large a new image of a format would be, for a given
 * size or for converting an existing image.
 */

import { getopt, type LongOption, type ParsedOption } from "./getopt.ts";
import { QimgError } from "./errors.ts";
import { type Io, notSupportedYet } from "./command.ts";
import type { FormatDriver, MeasureResult, MeasureSource, PersistentBitmap } from "./driver.ts";
import { Image } from "./image.ts";
import { findFormat } from "./format_drivers.ts";
import { openForCommand, parseOutputFormat, printHelp, processObject } from "./cmd_util.ts";
import { cvtnum } from "./size.ts";
import {
  accumulateOptions,
  CREATE_OPTION_TABLES,
  isQemuCreatable,
  isQemuFormat,
  mergeOptionTables,
  type OptionDesc,
  parseOptionList,
  setNumberOption,
  splitOptionString,
} from "./options.ts";
import { PROTOCOL_CREATE_OPTIONS } from "./protocol.ts";
import { measureQcow2 } from "./measure.ts";
import { type JsonValue, toJsonPretty } from "./output.ts";

const LONG: LongOption[] = [
  { name: "help", arg: "none", val: "h" },
  { name: "image-opts", arg: "none", val: "image-opts" },
  { name: "object", arg: "required", val: "object" },
  { name: "output", arg: "required", val: "output" },
  { name: "size", arg: "required", val: "size" },
  { name: "force-share", arg: "none", val: "U" },
];

/** Runs `measure`. */
export async function run(args: string[], io: Io): Promise<number> {
  // qemu-img's measure, alone, gives getopt no leading ':': glibc prints its
  // own message for a bad option and qemu-img then prints its help (exit 0).
  const { options, operands } = getopt(args, ":hf:O:o:l:U", LONG, "measure");
  let format: string | undefined;
  let outFormat = "raw";
  let optionText: string | undefined;
  let snapshot: SnapshotSpec | undefined;
  let forceShare = false;
  let imageOpts = false;
  let human = true;
  let size: bigint | undefined;
  const warn = (m: string) => io.stderr(`qimg: ${m}\n`);
  for (const o of options) {
    switch (o.opt) {
      case "h":
        return printHelp(io);
      case "f":
        format = o.arg;
        break;
      case "O":
        outFormat = o.arg!;
        break;
      case "o":
        optionText = accumulateOptions(optionText, o.arg!);
        break;
      case "l":
        snapshot = o.arg!.startsWith("snapshot.") ? snapshotParam(o.arg!) : o.arg;
        break;
      case "U":
        forceShare = true;
        break;
      case "object":
        if (processObject(o.arg!, io)) return 0;
        break;
      case "image-opts":
        imageOpts = true;
        break;
      case "output":
        // measure, unlike the other commands, checks the value right away.
        human = parseOutputFormat(o.arg!) === "human";
        break;
      case "size":
        size = cvtnum("image size", o.arg!, { warn });
        break;
      default:
        io.stderr(glibcMessage(o, LONG));
        return printHelp(io);
    }
  }
  if (operands.length > 1) throw new QimgError("At most one filename argument is allowed.");
  const filename = operands[0];
  if (filename === undefined && (imageOpts || format !== undefined || snapshot !== undefined)) {
    throw new QimgError("--image-opts, -f, and -l require a filename argument.");
  }
  if (filename !== undefined && size !== undefined) {
    throw new QimgError("--size N cannot be used together with a filename.");
  }
  if (filename === undefined && size === undefined) {
    throw new QimgError("Either --size N or one filename must be specified.");
  }

  let image: Image | undefined;
  let source: Image | undefined;
  try {
    if (filename !== undefined) {
      image = await openForCommand(filename, io, { format, imageOpts, forceShare });
      source = snapshot === undefined ? image : await loadSnapshot(image, snapshot);
    }
    const target = targetDriver(outFormat);
    const descs = mergeOptionTables(target.createOptions, PROTOCOL_CREATE_OPTIONS);
    const parsed = parseTargetOptions(optionText, descs, outFormat, warn);
    if (size !== undefined) setNumberOption(parsed, "size", size);
    const values = parsed.values;
    const result = await target.measure(
      source ? source.size : Number(values.size ?? 0),
      values,
      source ? await measureSource(source) : undefined,
    );
    io.stdout(human ? renderHuman(result) : toJsonPretty(measureJson(result)) + "\n");
  } finally {
    await image?.close();
  }
  return 0;
}

/** A target format as measure needs it: its options and its estimate. */
interface MeasureTarget {
  createOptions: OptionDesc[];
  measure: NonNullable<FormatDriver["measure"]>;
}

/**
 * Finds the `-O` format. qcow2's estimate lives in measure.ts, so it is
 * available before (and whether or not) the qcow2 driver brings its own.
 */
function targetDriver(name: string): MeasureTarget {
  const driver = findFormat(name);
  const options = driver?.createOptions ?? CREATE_OPTION_TABLES[name];
  if (name === "qcow2" && options) {
    return { createOptions: options, measure: driver?.measure ?? measureQcow2 };
  }
  if (!driver) return otherQemuFormat(name);
  if (!driver.create || !options) {
    throw new QimgError(`Format driver '${name}' does not support image creation`);
  }
  if (!driver.measure) {
    throw new QimgError(`Block driver '${name}' does not support size measurement`);
  }
  return { createOptions: options, measure: driver.measure };
}

/** Formats qemu knows and qimg does not drive: qemu's refusals, after `-o` is parsed as qemu does. */
function otherQemuFormat(name: string): MeasureTarget {
  if (!isQemuFormat(name)) throw new QimgError(`Unknown file format '${name}'`);
  if (!isQemuCreatable(name)) {
    throw new QimgError(`Format driver '${name}' does not support image creation`);
  }
  return {
    createOptions: CREATE_OPTION_TABLES[name] ?? [],
    measure: () => {
      // luks measures (its header); qimg does not create luks images yet.
      if (name === "luks") throw notSupportedYet("measure -O luks");
      throw new QimgError(`Block driver '${name}' does not support size measurement`);
    },
  };
}

/** Parses `-o` for the target; a bad option gets qemu's second line naming the format. */
function parseTargetOptions(
  text: string | undefined,
  descs: OptionDesc[],
  format: string,
  warn: (m: string) => void,
) {
  try {
    return parseOptionList(text ?? "", descs, undefined, warn);
  } catch (e) {
    if (!(e instanceof QimgError)) throw e;
    throw new QimgError(
      `${e.message}${
        e.hint ? "\n" + e.hint : ""
      }\nqimg: Invalid options for file format '${format}'`,
    );
  }
}

/** What the estimate reads from a source image: its data runs and bitmaps. */
async function measureSource(image: Image): Promise<MeasureSource> {
  const top = image.chain[0].image;
  const bitmaps = top.persistentBitmaps
    ? await top.persistentBitmaps()
    : bitmapsFromInfo((await top.info()).formatSpecific);
  return { extents: () => image.extents(), ...(bitmaps ? { bitmaps } : {}) };
}

/**
 * For drivers without `persistentBitmaps`: qcow2's `info` data says the
 * same (compat 1.1 images can hold bitmaps; `bitmaps` lists them).
 */
function bitmapsFromInfo(
  spec: { type: string; data: Record<string, JsonValue> } | undefined,
): PersistentBitmap[] | undefined {
  if (spec?.type !== "qcow2" || spec.data.compat !== "1.1") return undefined;
  const list = (spec.data.bitmaps ?? []) as { name: string; granularity: number }[];
  return list.map((b) => ({ name: b.name, granularity: Number(b.granularity) }));
}

/** `-l`: a snapshot ID or name, or `snapshot.id=...,snapshot.name=...`. */
type SnapshotSpec = string | { id?: string; name?: string };

/** Parses `-l snapshot.id=...,snapshot.name=...`: only those two keys are allowed. */
function snapshotParam(text: string): SnapshotSpec {
  const spec: { id?: string; name?: string } = {};
  for (const [key, value] of splitOptionString(text)) {
    if (key !== "snapshot.id" && key !== "snapshot.name") {
      throw new QimgError(
        `Invalid parameter '${key}'\nqimg: Failed in parsing snapshot param '${text}'`,
      );
    }
    spec[key === "snapshot.id" ? "id" : "name"] = value ?? "on";
  }
  return spec;
}

/**
 * The image as it was at an internal snapshot, read-only, as qemu's
 * bdrv_snapshot_load_tmp: a bare `-l` value is tried as an ID, then as a name.
 */
async function loadSnapshot(image: Image, spec: SnapshotSpec): Promise<Image> {
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

// Sizes print as exact integers, even the 2^63 a raw estimate can reach.
function renderHuman(r: MeasureResult): string {
  let out = `required size: ${BigInt(r.required)}\n` +
    `fully allocated size: ${BigInt(r.fullyAllocated)}\n`;
  if (r.bitmaps !== undefined) out += `bitmaps size: ${BigInt(r.bitmaps)}\n`;
  return out;
}

/** qemu's BlockMeasureInfo, members in its insertion order; JSON numbers are int64. */
function measureJson(r: MeasureResult): { [key: string]: bigint | undefined } {
  const int64 = (n: number) => BigInt.asIntN(64, BigInt(n));
  return {
    required: int64(r.required),
    "fully-allocated": int64(r.fullyAllocated),
    bitmaps: r.bitmaps === undefined ? undefined : int64(r.bitmaps),
  };
}

/**
 * glibc's own getopt message for a bad option (qemu-img prints it for
 * commands whose option string lacks the leading ':'), named after the command.
 */
export function glibcMessage(o: ParsedOption, longOpts: LongOption[], command = "measure"): string {
  if (o.char !== undefined) {
    return o.opt === ":"
      ? `${command}: option requires an argument -- '${o.char}'\n`
      : `${command}: invalid option -- '${o.char}'\n`;
  }
  const eq = o.raw.indexOf("=");
  const name = o.raw.slice(2, eq < 0 ? undefined : eq);
  const exact = longOpts.find((l) => l.name === name);
  const matches = exact ? [exact] : longOpts.filter((l) => l.name.startsWith(name));
  if (matches.length === 0) return `${command}: unrecognized option '${o.raw}'\n`;
  if (matches.length > 1) {
    const names = matches.map((l) => ` '--${l.name}'`).join("");
    return `${command}: option '--${name}' is ambiguous; possibilities:${names}\n`;
  }
  if (o.opt === ":") return `${command}: option '--${matches[0].name}' requires an argument\n`;
  return `${command}: option '--${matches[0].name}' doesn't allow an argument\n`;
}
