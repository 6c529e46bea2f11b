/** `qimg commit`: write an overlay's data down into its backing file. */

import type { Io } from "./command.ts";
import { notSupportedYet, optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { QimgError } from "./errors.ts";
import type { Image } from "./image.ts";
import { Progress } from "./progress.ts";
import { cvtnum } from "./size.ts";
import { JobRateLimit } from "./throttle.ts";
import { ImageLockError, isImageLockError, unlockFile } from "./image_lock.ts";
import {
  checkCacheMode,
  expectOneImage,
  innerOpenMessage,
  openForCommand,
  printHelp,
  processObject,
} from "./cmd_util.ts";

const LONG = [
  { name: "help", arg: "none", val: "h" },
  { name: "object", arg: "required", val: "object" },
  { name: "image-opts", arg: "none", val: "image-opts" },
] as const;

/** Bytes copied per read/write. */
const CHUNK = 2 * 1024 * 1024;

/** Targets whose write keeps no reference to the caller's buffer once it settles. */
const REUSE_BUFFER_FORMATS = new Set(["qcow2", "raw"]);

/** Runs `commit`. */
export async function run(args: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(args, ":f:ht:b:dpqr:", [...LONG], "commit");
  let format: string | undefined;
  let cache = "writeback";
  let base: string | undefined;
  let drop = false;
  let progress = false;
  let quiet = false;
  let rate = 0;
  let imageOpts = false;
  for (const o of options) {
    switch (o.opt) {
      case "h":
        return printHelp(io);
      case "f":
        format = o.arg;
        break;
      case "t":
        cache = o.arg!;
        break;
      case "b":
        base = o.arg;
        drop = true; // as qemu-img: -b implies -d
        break;
      case "d":
        drop = true;
        break;
      case "p":
        progress = true;
        break;
      case "q":
        quiet = true;
        break;
      case "r":
        rate = Number(cvtnum("rate limit", o.arg!, { warn: (m) => io.stderr(`qimg: ${m}\n`) }));
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
  if (quiet) progress = false;
  if (operands.length !== 1) throw expectOneImage();
  const filename = operands[0];
  checkCacheMode(cache);
  const image = await openForCommand(filename, io, { format, imageOpts, write: true });
  const meter = new Progress(progress, 1, io.stdout);
  meter.listen(io);
  try {
    meter.print(0, 100);
    let depth = 1;
    if (base !== undefined) {
      depth = findInChain(image, base);
      if (depth < 0) {
        throw new QimgError(`Did not find '${base}' in the backing chain of '${filename}'`);
      }
    } else if (image.chain.length < 2) {
      throw new QimgError("Image does not have a backing file");
    }
    await commitInto(image, depth, drop, io, rate > 0 ? new JobRateLimit(rate) : undefined);
    meter.print(100, 0);
  } finally {
    meter.end();
    await image.close();
  }
  if (!quiet) io.stdout("Image committed.\n");
  return 0;
}

/** The depth of the layer `name` names below the top, or -1. */
function findInChain(image: Image, name: string): number {
  for (let depth = 1; depth < image.chain.length; depth++) {
    const stored = image.chain[depth - 1].image.backing?.name;
    if (name === stored || name === image.chain[depth].filename) return depth;
  }
  return -1;
}

/**
 * Formats whose qemu driver empties an image after commit (make_empty);
 * for the others qemu keeps the overlay as it is, as with `-d`.
 */
const MAKE_EMPTY_FORMATS = new Set(["qcow2", "qed"]);

/**
 * Copies what the layers above `depth` hold into that layer, then empties
 * the overlay unless it is kept (-d, -b, formats qemu cannot empty).
 */
async function commitInto(
  image: Image,
  depth: number,
  drop: boolean,
  io: Io,
  limit?: JobRateLimit,
): Promise<void> {
  const keep = drop || !MAKE_EMPTY_FORMATS.has(image.format);
  const top = image.chain[0].image;
  if ((depth !== 1 && !keep) || (!keep && !top.makeEmpty)) throw notSupportedYet("commit");
  // Refuse before writing anything when the overlay cannot be emptied.
  if (!keep) await top.makeEmpty!({ dryRun: true });
  const layer = image.chain[depth];
  // qemu reopens the base read-write: the chain's read-only open must not refuse it.
  if (layer.hostFile) await unlockFile(layer.hostFile);
  let target: Image;
  try {
    target = await openForCommand(layer.filename, io, {
      format: layer.driver.name,
      write: true,
      backing: false,
    });
  } catch (e) {
    // A reopen names no file.
    if (!isImageLockError(e)) throw e;
    throw new ImageLockError(innerOpenMessage(e, layer.filename), { hint: e.hint });
  }

  try {
    const out = target.chain[0].image;
    if (!out.write) throw notSupportedYet("commit");
    if (image.size > out.size) {
      // qemu grows the backing file to the image's size first.
      if (!out.resize) throw new QimgError("Block job failed: Operation not supported");
      await out.resize(image.size, {});
    }
    // One buffer for every chunk where the target's write is done with it
    // when it settles: fresh ones cost page faults on every chunk.
    const reused = REUSE_BUFFER_FORMATS.has(layer.driver.name)
      ? new Uint8Array(Math.min(CHUNK, image.size))
      : undefined;
    // Only the layers above the base are asked (qemu's is_allocated_above).
    for await (const e of image.extents({ base: depth })) {
      // Everything the layers above the base hold goes down into it.
      if (e.depth >= depth || !e.present) continue;
      if (e.zero && out.writeZeroes) {
        // As qemu's commit job: zeroes may become holes.
        await out.writeZeroes(e.offset, e.length, { mayUnmap: true });
        await limit?.processed(e.length);
        continue;
      }
      for (let off = e.offset; off < e.offset + e.length; off += CHUNK) {
        const n = Math.min(CHUNK, e.offset + e.length - off);
        const buf = reused ? reused.subarray(0, n) : new Uint8Array(n);
        if (!e.zero) await image.read(off, buf);
        else if (reused) buf.fill(0);
        await out.write(off, buf);
        await limit?.processed(n);
      }
    }
    await target.flush();
  } finally {
    await target.close();
  }
  // As qemu: the overlay's data now lives below it; drop it.
  if (!keep) await top.makeEmpty!();
}
