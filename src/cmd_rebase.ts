/** `qimg rebase`: change an image's backing file, safely (copying differences) or not (`-u`). */

import type { Io } from "./command.ts";
import { notSupportedYet, optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { QimgError, usageError } from "./errors.ts";
import { resolveRelative } from "./file.ts";
import { findFormat } from "./formats.ts";
import { Image, openImageChain } from "./image.ts";
import type { FormatImage } from "./driver.ts";
import { Progress } from "./progress.ts";
import { backingChangeError } from "./qcow2_header_write.ts";
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
  { name: "force-share", arg: "none", val: "U" },
] as const;

/** Formats whose qemu driver can change the backing file; qimg's drivers cannot yet. */
const BACKING_FORMATS = new Set(["qcow2", "qed"]);

/** Runs `rebase`. */
export async function run(args: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(args, ":hf:F:b:upt:T:qU", [...LONG], "rebase");
  let format: string | undefined;
  let backingFormat: string | undefined;
  let backing: string | undefined;
  let unsafe = false;
  let progress = false;
  let cache = "writeback";
  let srcCache = "writeback";
  let quiet = false;
  let imageOpts = false;
  for (const o of options) {
    switch (o.opt) {
      case "h":
        return printHelp(io);
      case "f":
        format = o.arg;
        break;
      case "F":
        backingFormat = o.arg;
        break;
      case "b":
        backing = o.arg;
        break;
      case "u":
        unsafe = true;
        break;
      case "p":
        progress = true;
        break;
      case "t":
        cache = o.arg!;
        break;
      case "T":
        srcCache = o.arg!;
        break;
      case "q":
        quiet = true;
        break;
      case "U":
        break; // only shared with the new backing file, and qimg takes no locks
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
  if (!unsafe && backing === undefined) {
    throw usageError("Must specify backing file (-b) or use unsafe mode (-u)");
  }
  const filename = operands[0];
  const meter = new Progress(progress, 2, io.stdout);
  meter.listen(io);
  meter.print(0, 100);
  let refusal: QimgError;
  try {
    checkCacheMode(cache);
    checkCacheMode(srcCache, "source cache");
    const image = await openForCommand(filename, io, {
      format,
      imageOpts,
      write: true,
      backing: !unsafe,
    });
    try {
      if (backingFormat !== undefined && !findFormat(backingFormat)) {
        throw new QimgError(`Invalid format name: '${backingFormat}'`);
      }
      // Safe mode reads the new backing file: it must open, unless it is
      // already in the chain.
      let newBacking: Image | undefined;
      let opened: Image | undefined;
      if (!unsafe && backing) {
        const path = resolveRelative(image.chain[0].image.file.name, backing);
        const at = image.chain.findIndex((l, i) => i > 0 && l.filename === path);
        if (at > 0) {
          newBacking = new Image(image.chain.slice(at));
        } else if (path === image.chain[0].filename && image.format !== "raw") {
          // qemu holds the image's write lock (raw shares it): opening it again fails.
          throw new QimgError(
            `Could not open new backing file '${backing}': Failed to get shared "write" lock\n` +
              `Is another process using the image [${path}]?`,
          );
        } else {
          try {
            opened = newBacking = await openImageChain(path, {
              format: backingFormat,
              openFile: (p, w) => io.openFile(p, { write: w }),
            });
          } catch (e) {
            if (!(e instanceof QimgError)) throw e;
            throw new QimgError(
              `Could not open new backing file '${backing}': ${innerOpenMessage(e, path)}`,
            );
          }
        }
      }
      try {
        // qemu copies what differs between the old and the new backing file
        // into the image, then changes the reference. No qimg driver can
        // change the reference yet: where the change would succeed, qimg
        // stops before writing; where it is refused (no backing format, a
        // driver without backing files), qimg copies and fails as qemu.
        const refused = !!backing && backingFormat === undefined;
        const top = image.chain[0].image;
        if (top.setBacking && !refused) {
          // Removing the backing file safely copies all of it (qemu compares with zeroes).
          if (newBacking || (!unsafe && backing === "")) {
            await copyDifferences(image, newBacking, meter, top);
          }
          await opened?.close();
          opened = undefined;
          try {
            await top.setBacking(backing, backingFormat);
          } catch (e) {
            throw backingChangeError(backing, e);
          }
          meter.print(100, 0);
          return 0;
        }
        if (BACKING_FORMATS.has(image.format) && !refused) throw notSupportedYet("rebase");
        if (newBacking) {
          if (top.write) await copyDifferences(image, newBacking, meter, top);
          else if (await copyDifferences(image, newBacking, meter)) {
            throw notSupportedYet("rebase");
          }
        }
      } finally {
        await opened?.close();
      }
      // Nothing to copy: what remains is changing the reference, refused.
      meter.print(100, 0);
      refusal = new QimgError(
        `Could not change the backing file to '${backing ?? "(null)"}': ${
          changeBackingError(backing, backingFormat)
        }`,
      );
    } finally {
      await image.close();
    }
  } finally {
    meter.end();
  }
  throw refusal;
}

/** Why qemu's bdrv_change_backing_file fails for a driver that cannot change it. */
function changeBackingError(backing: string | undefined, format: string | undefined): string {
  // An empty name removes the backing file (qemu then passes no format either).
  if (backing && format === undefined) return "backing format must be specified";
  return "Operation not supported";
}

/** qemu-img rebase's IO_BUF_SIZE: the most it compares at a time. */
const IO_BUF_SIZE = 2 * 1024 * 1024;

/** A run of the image: whether the image itself holds it, and whether layers above the new backing file do. */
interface Run {
  end: number;
  own: boolean;
  above: boolean;
}

/**
 * qemu's safe rebase: where `image` does not hold its own data, compares
 * the old backing chain with `newBacking` and, given `top` (the image's
 * writable layer), writes the old content where they differ, so the guest
 * does not change. Walks the ranges as qemu does (at most IO_BUF_SIZE,
 * split where allocation changes, at L2 slice boundaries and at the end of
 * either backing file), printing its progress for each range it compares;
 * writes runs of differing 512-byte sectors. Without `top`, stops at the
 * first difference. Returns whether anything differed.
 */
async function copyDifferences(
  image: Image,
  newBacking: Image | undefined,
  meter: Progress,
  top?: FormatImage,
): Promise<boolean> {
  const size = image.size;
  if (size === 0) return false;
  // The new backing file may be a layer of the old chain (qemu's prefix_chain_bs).
  const prefix = newBacking ? image.chain.indexOf(newBacking.chain[0]) : -1;
  const newSize = newBacking?.size ?? 0;
  const runs: (Run & { start: number })[] = [];
  for await (const e of image.extents()) {
    const own = e.present && e.depth === 0;
    const above = e.present && e.depth > 0 && (prefix < 0 || e.depth < prefix);
    const last = runs.at(-1);
    if (last && last.own === own && last.above === above) last.end = e.offset + e.length;
    else runs.push({ start: e.offset, end: e.offset + e.length, own, above });
  }
  const info = await image.formatInfo();
  const cluster = info.clusterSize ?? 65536;
  const extendedL2 = (info.formatSpecific?.data as { "extended-l2"?: boolean } | undefined)?.[
    "extended-l2"
  ];
  const slice = cluster * (cluster / (extendedL2 ? 16 : 8));
  const step = Math.fround(100 / Math.trunc(size / Math.min(size, IO_BUF_SIZE)));
  const oldBacking = new Image(image.chain.slice(1));
  const oldSize = oldBacking.chain.length > 0 ? oldBacking.size : 0;
  // A write to part of a cluster fills the rest from the old backing chain.
  const below = oldBacking.chain.length > 0
    ? (o: number, b: Uint8Array) => oldBacking.read(o, b)
    : undefined;
  let differed = false;
  let r = 0;
  // compare.ts brings node:buffer's memcmp, which start-up need not load.
  const { firstDifference } = await import("./compare.ts");
  const oldBuf = new Uint8Array(Math.min(IO_BUF_SIZE, size));
  const newBuf = new Uint8Array(Math.min(IO_BUF_SIZE, size));
  for (let offset = 0; offset < size;) {
    while (runs[r].end <= offset) r++;
    const run = runs[r];
    const sliceEnd = (Math.floor(offset / slice) + 1) * slice;
    // qemu asks whether the image holds the range, then (with a prefix of
    // the chain as new backing file) whether the layers above it do: each
    // answer covers a stretch of the same status.
    const stretch = (same: (x: Run) => boolean) => {
      let k = r;
      while (k + 1 < runs.length && same(runs[k + 1])) k++;
      return runs[k].end;
    };
    let n = Math.min(IO_BUF_SIZE, size - offset, sliceEnd - offset);
    n = Math.min(n, stretch((x) => x.own === run.own) - offset);
    if (!run.own && prefix > 0) {
      n = Math.min(n, stretch((x) => !x.own && x.above === run.above) - offset);
    }
    if (!run.own && (prefix < 0 || run.above)) {
      // Reads stop at the end of the shorter backing file.
      for (const end of [oldSize, newSize]) {
        if (offset < end && offset + n > end) n = end - offset;
      }
    }
    const start = offset;
    offset += n;
    if (run.own || (prefix > 0 && !run.above)) continue;
    // Buffers are reused: fresh ones cost page faults on every range.
    const x = oldBuf.subarray(0, n);
    const y = newBuf.subarray(0, n);
    const oldIsZero = start >= oldSize;
    if (!oldIsZero) await oldBacking.read(start, x);
    else x.fill(0);
    if (start < newSize) await newBacking!.read(start, y);
    else y.fill(0);
    for (let done = 0; done < n;) {
      const [differ, len] = compareSectors(x.subarray(done), y.subarray(done), firstDifference);
      if (differ) {
        if (!top?.write) return true;
        differed = true;
        if (oldIsZero && top.writeZeroes) await top.writeZeroes(start + done, len);
        else await top.write(start + done, x.subarray(done, done + len), below);
      }
      done += len;
    }
    meter.print(step, 100);
  }
  return differed;
}

/**
 * qemu's compare_buffers: whether the first 512-byte sector differs, and
 * how many bytes from the start share that answer, sector by sector.
 */
function compareSectors(
  a: Uint8Array,
  b: Uint8Array,
  firstDifference: (x: Uint8Array, y: Uint8Array) => number,
): [boolean, number] {
  const sector = (at: number) => {
    const end = Math.min(at + 512, a.length);
    return firstDifference(a.subarray(at, end), b.subarray(at, end)) >= 0;
  };
  const first = sector(0);
  let i = Math.min(512, a.length);
  if (!first) {
    // Equal so far: the sector holding the first difference ends the run.
    const d = firstDifference(a.subarray(i), b.subarray(i));
    i = d < 0 ? a.length : i + d - (d % 512);
  }
  while (i < a.length && sector(i) === first) i += 512;
  return [first, Math.min(i, a.length)];
}
