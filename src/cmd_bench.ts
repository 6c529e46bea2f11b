/**
 * `qimg bench`: issues `count` reads (or writes with `-w`) of `buffer_size`
 * bytes, `depth` at a time, from `offset` on in steps of `step_size`
 * (wrapping at the end of the image), and reports the time taken, as
 * qemu-img 7.2's bench. Memory is `depth` buffers, whatever the image size.
 */

import type { Io } from "./command.ts";
import { optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { QimgError, usageError } from "./errors.ts";
import type { Image } from "./image.ts";
import { imageTarget } from "./convert.ts";
import { parseCInteger } from "./cmd_convert.ts";
import { cvtnum } from "./size.ts";
import { isCacheMode, openForCommand } from "./cmd_util.ts";

const LONG = [
  { name: "help", arg: "none", val: "h" },
  { name: "flush-interval", arg: "required", val: "flush-interval" },
  { name: "image-opts", arg: "none", val: "image-opts" },
  { name: "pattern", arg: "required", val: "pattern" },
  { name: "no-drain", arg: "none", val: "no-drain" },
  { name: "force-share", arg: "none", val: "U" },
] as const;

const INT_MAX = 0x7fffffff;

/** qemu_strtoul within [0, max], or the given message. */
function unsignedOption(text: string, max: number, message: string): number {
  const v = parseCInteger(text);
  // strtoul takes "-N" as 2^64 - N: above any limit here, except "-0".
  if (v === undefined || v > BigInt(max) || (v < 0n)) throw new QimgError(message);
  return Number(v);
}

/** What a bench run does. */
export interface BenchOptions {
  /** Requests to send. */
  count: number;
  /** Requests in flight at once. */
  depth: number;
  /** Bytes per request. */
  bufferSize: number;
  /** Bytes between the starts of consecutive requests. */
  step: number;
  /** Where the first request starts. */
  offset: number;
  /** Write instead of read. */
  write: boolean;
  /** The byte written (and initially in the read buffers). */
  pattern: number;
  /** Flush after this many requests (writes only); 0 never. */
  flushInterval: number;
  /** Wait for requests in flight before each flush. */
  drainOnFlush: boolean;
}

/**
 * Runs the requests of a bench against an open image. Requests go out in
 * qemu's order: offset, then offset + step modulo the image size, and so on.
 * A request past the end of the image fails as qemu's do (EIO).
 */
export async function runBench(image: Image, o: BenchOptions): Promise<void> {
  const size = image.size;
  const target = o.write ? imageTarget(image) : undefined;
  const buffers: Uint8Array[] = [];
  let next = o.offset;
  let issued = 0;
  let completed = 0;
  let failed: unknown;
  const flushes: Promise<void>[] = [];
  const request = async (buf: Uint8Array, offset: number): Promise<void> => {
    if (offset > size || offset + buf.length > size) {
      throw new QimgError("Failed request: Input/output error");
    }
    if (target) await target.write(offset, buf);
    else await image.read(offset, buf);
  };
  // Runs requests until `limit` have been issued, `depth` at a time.
  const runUntil = async (limit: number): Promise<void> => {
    const worker = async (slot: number): Promise<void> => {
      while (failed === undefined && issued < limit) {
        const offset = next;
        next = (next + o.step) % size;
        issued++;
        buffers[slot] ??= new Uint8Array(o.bufferSize).fill(o.pattern);
        try {
          await request(buffers[slot], offset);
        } catch (e) {
          failed ??= e;
          return;
        }
        completed++;
        if (o.flushInterval && !o.drainOnFlush && completed % o.flushInterval === 0) {
          flushes.push(image.flush());
        }
      }
    };
    const workers = [];
    for (let i = 0; i < Math.min(o.depth, limit - issued); i++) workers.push(worker(i));
    await Promise.all(workers);
  };
  if (o.flushInterval && o.drainOnFlush) {
    // Drain: every flushInterval requests, wait for those in flight, then flush.
    while (issued < o.count && failed === undefined) {
      await runUntil(Math.min(o.count, issued + o.flushInterval));
      if (failed === undefined && issued % o.flushInterval === 0) await image.flush();
    }
  } else {
    await runUntil(o.count);
  }
  await Promise.all(flushes);
  if (failed !== undefined) {
    if (failed instanceof QimgError) throw failed;
    const msg = failed instanceof Error ? failed.message : String(failed);
    throw new QimgError(`Failed request: ${msg}`);
  }
}

/** Runs `bench`. */
export async function run(args: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(args, ":hc:d:f:ni:o:qs:S:t:wU", [...LONG], "bench");
  let fmt: string | undefined;
  let count = 75000;
  let depth = 64;
  let offset = 0;
  let bufferSize = 4096;
  let pattern = 0;
  let step = 0;
  let flushInterval = 0;
  let drainOnFlush = true;
  let write = false;
  let forceShare = false;
  let nativeAio = false;
  let direct = false;
  let imageOpts = false;
  const warn = (m: string) => io.stderr(`qimg: ${m}\n`);
  for (const o of options) {
    const arg = o.arg ?? "";
    switch (o.opt) {
      case "h":
        return (await import("./cmd_util.ts")).printHelp(io);
      case "c":
        count = unsignedOption(arg, INT_MAX, "Invalid request count specified");
        break;
      case "d":
        depth = unsignedOption(arg, INT_MAX, "Invalid queue depth specified");
        break;
      case "f":
        fmt = arg;
        break;
      case "n":
        nativeAio = true;
        break;
      case "i":
        if (arg === "native") nativeAio = true;
        else if (arg === "threads" || arg === "io_uring") nativeAio = false;
        else throw new QimgError(`Invalid aio option: ${arg}`);
        break;
      case "o":
        offset = Number(cvtnum("offset", arg, { warn }));
        break;
      case "q":
        break; // qemu-img's bench prints its lines even with -q
      case "s":
        bufferSize = Number(cvtnum("buffer size", arg, { max: BigInt(INT_MAX), warn }));
        break;
      case "S":
        step = Number(cvtnum("step_size", arg, { max: BigInt(INT_MAX), warn }));
        break;
      case "t":
        if (!isCacheMode(arg)) throw new QimgError("Invalid cache mode");
        direct = arg === "none" || arg === "off" || arg === "directsync";
        break;
      case "w":
        write = true;
        break;
      case "U":
        forceShare = true;
        break;
      case "pattern":
        pattern = unsignedOption(arg, 0xff, "Invalid pattern byte specified");
        break;
      case "flush-interval":
        flushInterval = unsignedOption(arg, INT_MAX, "Invalid flush interval specified");
        break;
      case "no-drain":
        drainOnFlush = false;
        break;
      case "image-opts":
        imageOpts = true;
        break;
      default:
        throw optionError(o);
    }
  }
  if (operands.length !== 1) throw usageError("Expecting one image file name");
  const filename = operands[0];
  if (!write && flushInterval) {
    throw new QimgError("--flush-interval is only available in write tests");
  }
  if (flushInterval && flushInterval < depth) {
    throw new QimgError("Flush interval can't be smaller than depth");
  }
  if (nativeAio && !direct) {
    throw new QimgError(
      `Could not open '${filename}': aio=native was specified, but it requires cache.direct=on, which was not specified.`,
    );
  }
  const image = await openForCommand(filename, io, { format: fmt, imageOpts, write, forceShare });
  try {
    const stepSize = step || bufferSize;
    io.stdout(
      `Sending ${count} ${write ? "write" : "read"} requests, ${bufferSize} bytes each, ` +
        `${depth} in parallel (starting at offset ${offset}, step size ${stepSize})\n`,
    );
    if (flushInterval) io.stdout(`Sending flush every ${flushInterval} requests\n`);
    const now = io.now ?? (() => performance.now());
    const t1 = now();
    await runBench(image, {
      count,
      depth,
      bufferSize,
      step: stepSize,
      offset,
      write,
      pattern,
      flushInterval,
      drainOnFlush,
    });
    const seconds = (now() - t1) / 1000;
    io.stdout(`Run completed in ${seconds.toFixed(3)} seconds.\n`);
    if (write) await image.flush(); // qemu flushes a writable image when it closes it
  } finally {
    await image.close();
  }
  return 0;
}
