/**
 * `qimg dd`: copies `count` blocks of `bs` bytes from `if`, after skipping
 * `skip` blocks, into a new image `of`, as qemu-img 7.2's dd. Every byte of
 * the output is written (qemu's dd does not leave holes), but zero and
 * unallocated input is never read: the copy engine writes zeroes for it.
 */

import type { Io } from "./command.ts";
import { optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { QimgError, strerror } from "./errors.ts";
import type { Image } from "./image.ts";
import { findFormat } from "./format_drivers.ts";
import { convert, CopyError, type CopyTarget, imageTarget, sliceSource } from "./convert.ts";
import { createTargetFile } from "./cmd_convert.ts";
import { cvtnum } from "./size.ts";
import { openForCommand, processObject } from "./cmd_util.ts";
import { ImageLockError } from "./image_lock.ts";

const LONG = [
  { name: "help", arg: "none", val: "h" },
  { name: "object", arg: "required", val: "object" },
  { name: "image-opts", arg: "none", val: "image-opts" },
  { name: "force-share", arg: "none", val: "U" },
] as const;

const INT64_MAX = 0x7fffffffffffffffn;

/** The operands of dd, parsed. */
interface DdOperands {
  bs: number;
  count?: number;
  skip?: number;
  input?: string;
  output?: string;
}

/** Parses `key=value` operands in order; the first bad one stops with qemu's message. */
function parseOperands(operands: string[], warn: (m: string) => void): DdOperands {
  const dd: DdOperands = { bs: 512 };
  for (const operand of operands) {
    const eq = operand.indexOf("=");
    const key = eq < 0 ? operand : operand.slice(0, eq);
    const value = operand.slice(eq + 1);
    if (eq < 0) throw new QimgError(`unrecognized operand ${operand}`);
    switch (key) {
      case "bs":
        dd.bs = Number(cvtnum("bs", value, { min: 1n, max: 0x7fffffffn, warn }));
        break;
      case "count":
        dd.count = Number(cvtnum("count", value, { warn }));
        break;
      case "if":
        dd.input = value;
        break;
      case "of":
        dd.output = value;
        break;
      case "skip":
        dd.skip = Number(cvtnum("skip", value, { warn }));
        break;
      default:
        throw new QimgError(`unrecognized operand ${key}`);
    }
  }
  return dd;
}

/** A target that drops bytes past `limit` (the last block may be short). */
function clipped(target: CopyTarget, limit: number): CopyTarget {
  return {
    size: limit,
    write: (offset, data) =>
      offset >= limit
        ? Promise.resolve()
        : target.write(offset, data.subarray(0, Math.min(data.length, limit - offset))),
  };
}

/** Runs `dd`. */
export async function run(args: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(args, ":hf:O:U", [...LONG], "dd");
  let fmt: string | undefined;
  let outFmt = "raw";
  let imageOpts = false;
  let forceShare = false;
  for (const o of options) {
    switch (o.opt) {
      case "O":
        outFmt = o.arg!;
        break;
      case "f":
        fmt = o.arg;
        break;
      case "h":
        return (await import("./cmd_util.ts")).printHelp(io);
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
  const dd = parseOperands(operands, (m) => io.stderr(`qimg: ${m}\n`));
  if (dd.input === undefined || dd.output === undefined) {
    throw new QimgError("Must specify both input and output files");
  }
  const outName = dd.output;
  let input: Image | undefined;
  let output: Image | undefined;
  try {
    if (dd.input === "" && !imageOpts) {
      throw new QimgError(`Could not open '': The 'file' block driver requires a file name`);
    }
    input = await openForCommand(dd.input, io, { format: fmt, imageOpts, forceShare });
    const driver = findFormat(outFmt);
    if (!driver) throw new QimgError("Unknown file format");
    let size = input.size;
    const bs = BigInt(dd.bs);
    if (dd.count !== undefined && BigInt(dd.count) <= INT64_MAX / bs && dd.count * dd.bs < size) {
      size = dd.count * dd.bs;
    }
    const skipTooFar = dd.skip !== undefined &&
      (BigInt(dd.skip) > INT64_MAX / bs || size < dd.skip * dd.bs);
    const start = skipTooFar ? size : (dd.skip ?? 0) * dd.bs;
    const outSize = size - start;
    try {
      await createTargetFile(io, outName, outFmt, outSize);
    } catch (e) {
      throw new QimgError(`${outName}: error while creating output image: ${strerror(e)}`, {
        hint: e instanceof ImageLockError ? e.hint : undefined,
      });
    }
    output = await openForCommand(outName, io, { format: outFmt, write: true });
    if (skipTooFar) io.stderr(`qimg: ${dd.input}: cannot skip to specified offset\n`);
    if (outSize > 0) {
      try {
        await convert([sliceSource(input, start, outSize)], clipped(imageTarget(output), outSize), {
          minSparse: 0,
        });
      } catch (e) {
        if (!(e instanceof CopyError)) throw e;
        const side = e.operation === "reading" ? "reading from input" : "writing to output";
        throw new QimgError(`error while ${side} image file: ${e.reason}`);
      }
    }
    await output.flush();
  } finally {
    if (output) await output.close();
    if (input) await input.close();
  }
  return 0;
}
