/**
 * `qimg map`: the allocation map of an image through its backing chain,
 * as qemu-img's table (data runs only) or one JSON object per run.
 */

import type { Io } from "./command.ts";
import { optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { IoError, QimgError, SizeQueryError, strerror, usageError } from "./errors.ts";
import type { Image } from "./image.ts";
import { openForCommand, parseOutputFormat, printHelp, processObject } from "./cmd_util.ts";
import { cvtnum } from "./size.ts";

const LONG = [
  { name: "help", arg: "none", val: "h" },
  { name: "format", arg: "required", val: "f" },
  { name: "output", arg: "required", val: "output" },
  { name: "object", arg: "required", val: "object" },
  { name: "image-opts", arg: "none", val: "image-opts" },
  { name: "force-share", arg: "none", val: "U" },
  { name: "start-offset", arg: "required", val: "s" },
  { name: "max-length", arg: "required", val: "l" },
] as const;

/** One line of the map: qemu's MapEntry. */
export interface MapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
  depth: number;
  present: boolean;
  /** Host offset, when the run has one (qemu's has_offset). */
  offset?: number;
  /** Host file of the run; set only together with `offset`. */
  filename?: string;
}

/** Runs `map`. */
export async function run(args: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(args, ":f:s:l:hU", [...LONG], "map");
  let format: string | undefined;
  let output = "human";
  let imageOpts = false;
  let forceShare = false;
  let start = 0n;
  let maxLength: bigint | undefined;
  const warn = (m: string) => io.stderr(`qimg: ${m}\n`);
  for (const o of options) {
    switch (o.opt) {
      case "f":
        format = o.arg;
        break;
      case "output":
        output = o.arg!;
        break;
      case "s":
        start = cvtnum("start offset", o.arg!, { warn });
        break;
      case "l":
        maxLength = cvtnum("max length", o.arg!, { warn });
        break;
      case "h":
        return printHelp(io);
      case "U":
        forceShare = true;
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
  if (operands.length !== 1) throw usageError("Expecting one image file name");
  const human = parseOutputFormat(output) === "human";
  const image = await openForCommand(operands[0], io, { format, imageOpts, forceShare });
  // Lines are gathered and written in blocks: a big image can have millions.
  let pending = "";
  const print = (text: string) => {
    pending += text;
    if (pending.length >= 1 << 16) {
      io.stdout(pending);
      pending = "";
    }
  };
  try {
    print(human ? "Offset          Length          Mapped to       File\n" : "[");
    // qemu computes start + max-length in int64: an overflow wraps negative and maps nothing.
    let end: bigint;
    try {
      end = BigInt(image.size);
    } catch (e) {
      if (e instanceof SizeQueryError) {
        throw new QimgError(`Failed to get size for '${operands[0]}'`);
      }
      throw e;
    }
    if (maxLength !== undefined) {
      let sum = start + maxLength;
      if (sum > 0x7fffffffffffffffn) sum -= 1n << 64n;
      if (sum < end) end = sum;
    }
    const dump: (e: MapEntry, next?: MapEntry, start?: bigint) => string = human
      ? dumpHuman
      : dumpJson;
    if (start >= end) {
      // Nothing to walk: qemu still dumps its empty starting entry.
      const empty = { start: 0, length: 0, data: false, zero: false, depth: 0, present: false };
      print(dump(empty, undefined, start));
    } else {
      let curr: MapEntry | undefined;
      for await (const next of mapEntries(image, Number(start), Number(end))) {
        if (curr && mergeable(curr, next)) {
          curr.length += next.length;
          continue;
        }
        if (curr) print(dump(curr, next));
        curr = next;
      }
      print(dump(curr!, undefined));
    }
    if (!human) print("]\n");
  } finally {
    // What was printed before an error still goes out, as qemu's stdout.
    if (pending) io.stdout(pending);
    await image.close();
  }
  return 0;
}

/**
 * The runs qemu-img's map sees between `start` and `end`, one per block
 * status answer through the chain (Image.blockStatus gives map's view: a
 * run past the end of a shorter backing file is absent, at the layer above).
 */
export async function* mapEntries(
  image: Image,
  start: number,
  end: number,
): AsyncGenerator<MapEntry> {
  for (let offset = start; offset < end;) {
    let e;
    try {
      e = await image.blockStatus(offset, end - offset);
    } catch (err) {
      // qemu-img map's words for a failed block status query.
      if (err instanceof IoError || err instanceof QimgError) {
        throw new QimgError(`Could not read file metadata: ${strerror(err)}`);
      }
      throw err;
    }
    if (e.length <= 0) throw new Error(`blockStatus returned an empty run at ${offset}`);
    const entry: MapEntry = {
      start: offset,
      length: e.length,
      data: e.data,
      zero: e.zero,
      depth: e.depth,
      present: e.present,
    };
    if (e.hostOffset !== undefined) {
      entry.offset = e.hostOffset;
      entry.filename = e.file;
    }
    yield entry;
    offset += e.length;
  }
}

/** qemu's entry_mergeable: same status and file, host offsets continuing. */
function mergeable(curr: MapEntry, next: MapEntry): boolean {
  if (
    curr.zero !== next.zero || curr.data !== next.data || curr.depth !== next.depth ||
    curr.present !== next.present || curr.filename !== next.filename ||
    (curr.offset === undefined) !== (next.offset === undefined)
  ) {
    return false;
  }
  return curr.offset === undefined || curr.offset + curr.length === next.offset;
}

/** C's `%#-16` PRIx64: `0x` before non-zero values, left-aligned in 16 columns. */
function hexColumn(n: number): string {
  return (n === 0 ? "0" : "0x" + n.toString(16)).padEnd(16);
}

/**
 * The table prints data runs only. Like qemu, it then folds every
 * non-data status of the next run into plain zero, so such runs merge.
 */
function dumpHuman(e: MapEntry, next?: MapEntry): string {
  if (e.data && e.offset === undefined) {
    throw new QimgError("File contains external, encrypted or compressed clusters.");
  }
  const line = e.data && !e.zero
    ? `${hexColumn(e.start)}${hexColumn(e.length)}${hexColumn(e.offset ?? 0)}${e.filename ?? ""}\n`
    : "";
  if (next && (!next.data || next.zero)) {
    next.data = false;
    next.zero = true;
  }
  return line;
}

function dumpJson(e: MapEntry, next?: MapEntry, start?: bigint): string {
  let s = `{ "start": ${start ?? e.start}, "length": ${e.length}, "depth": ${e.depth},` +
    ` "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}`;
  if (e.offset !== undefined) s += `, "offset": ${e.offset}`;
  return s + (next ? "},\n" : "}");
}
