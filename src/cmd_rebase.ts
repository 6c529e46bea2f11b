/** `qimg rebase`: change an image's backing file, safely (copying differences) or not (`-u`). */

import type { Io } from "./command.ts";
import { notSupportedYet, optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { QimgError, usageError } from "./errors.ts";
import { resolveRelative } from "./file.ts";
import { findFormat } from "./formats.ts";
import { Image, type Layer, openImageChain } from "./image.ts";
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
  // Only the layers above the new backing file (with one in the chain) or
  // the image itself matter here: below, every layer reads the same.
  for await (const e of image.extents({ base: prefix > 0 ? prefix : 1 })) {
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
  const same = sharedBase(oldBacking.chain, newBacking?.chain ?? []);
  // A write to part of a cluster fills the rest from the old backing chain.
  const below = oldBacking.chain.length > 0
    ? (o: number, b: Uint8Array) => oldBacking.read(o, b)
    : undefined;
  let differed = false;
  let r = 0;
  // compare.ts brings node:buffer's memcmp (~5 ms to load): only a range
  // that starts out equal needs it.
  let firstDifference: ((x: Uint8Array, y: Uint8Array) => number) | undefined;
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
    // Only the stretches where the two chains may differ are read and
    // compared; the rest is equal without reading (no write either).
    for (const [a, b] of await stretchesToCompare(same, start, n)) {
      const xa = x.subarray(a, b);
      const ya = y.subarray(a, b);
      if (!oldIsZero && start + a < oldSize) await oldBacking.read(start + a, xa);
      else xa.fill(0);
      if (start + a < newSize) await newBacking!.read(start + a, ya);
      else ya.fill(0);
      for (let done = a; done < b;) {
        const xs = x.subarray(done, b);
        const ys = y.subarray(done, b);
        let sectors = compareSectors(xs, ys, firstDifference);
        if (!sectors) {
          ({ firstDifference } = await import("./compare.ts"));
          sectors = compareSectors(xs, ys, firstDifference)!;
        }
        const [differ, len] = sectors;
        if (differ) {
          if (!top?.write) return true;
          differed = true;
          if (oldIsZero && top.writeZeroes) await top.writeZeroes(start + done, len);
          else await top.write(start + done, x.subarray(done, done + len), below);
        }
        done += len;
      }
    }
    meter.print(step, 100);
  }
  return differed;
}

/**
 * The layers of the old and the new backing chain above a layer both share
 * (the same file opened the same way), if any. Where neither chain's layers
 * above it hold data, both read that layer at the same offset; where both
 * read as zeroes, they are equal too.
 */
interface SharedBase {
  old: Layer[];
  new: Layer[];
  /** Whether the chains continue into one shared layer below `old` and `new`. */
  shared: boolean;
}

function sharedBase(oldChain: Layer[], newChain: Layer[]): SharedBase {
  for (let i = 0; i < oldChain.length; i++) {
    const o = oldChain[i];
    const j = newChain.findIndex((n) =>
      n === o ||
      (n.filename === o.filename && n.driver.name === o.driver.name &&
        n.image.size === o.image.size)
    );
    if (j >= 0) return { old: oldChain.slice(0, i), new: newChain.slice(0, j), shared: true };
  }
  return { old: oldChain, new: newChain, shared: false };
}

/**
 * What reading `layers` (then the shared layer, if any) gives at `offset`
 * for the returned length: "zero", "shared" (the shared layer's bytes at
 * the same offset) or "own" (data of one of these layers).
 */
async function sourceOf(
  layers: Layer[],
  shared: boolean,
  offset: number,
  length: number,
): Promise<{ kind: "zero" | "shared" | "own"; length: number }> {
  for (const { image } of layers) {
    // Reads stop at the end of a shorter layer: zeroes after it.
    if (offset >= image.size) return { kind: "zero", length };
    length = Math.min(length, image.size - offset);
    const s = await image.blockStatus(offset, length);
    length = Math.min(length, s.length);
    if (s.data) return { kind: "own", length };
    if (s.zero) return { kind: "zero", length };
  }
  return { kind: shared ? "shared" : "zero", length };
}

/**
 * The stretches [a, b) of the range of `n` bytes at `start` (relative to
 * it) where the old and the new backing chain may read differently: all
 * of it but what both read from the same place, trimmed to the range's
 * 512-byte sectors so that comparing the stretches finds the same
 * differing runs as comparing the whole range.
 */
async function stretchesToCompare(
  same: SharedBase,
  start: number,
  n: number,
): Promise<[number, number][]> {
  const out: [number, number][] = [];
  let from = 0;
  for (let at = 0; at < n;) {
    const o = await sourceOf(same.old, same.shared, start + at, n - at);
    const w = await sourceOf(same.new, same.shared, start + at, o.length);
    const len = Math.min(o.length, w.length);
    if (len <= 0) throw new Error(`blockStatus returned an empty run at ${start + at}`);
    if (o.kind === w.kind && o.kind !== "own") {
      const a = Math.ceil(at / 512) * 512;
      const b = at + len === n ? n : Math.floor((at + len) / 512) * 512;
      if (b > a) {
        if (a > from) out.push([from, a]);
        from = b;
      }
    }
    at += len;
  }
  if (from < n) out.push([from, n]);
  return out;
}

/**
 * qemu's compare_buffers: whether the first 512-byte sector differs, and
 * how many bytes from the start share that answer, sector by sector.
 * Undefined when the first sector is equal and `firstDifference` (for the
 * search through equal bytes) is not given.
 */
function compareSectors(
  a: Uint8Array,
  b: Uint8Array,
  firstDifference?: (x: Uint8Array, y: Uint8Array) => number,
): [boolean, number] | undefined {
  // Word by word where both are 4-byte aligned: a differing sector most
  // often shows so in its first word, and no view is made per sector.
  const aligned = ((a.byteOffset | b.byteOffset) & 3) === 0;
  const words = aligned ? a.length >>> 2 : 0;
  const wa = aligned ? new Int32Array(a.buffer, a.byteOffset, words) : new Int32Array(0);
  const wb = aligned ? new Int32Array(b.buffer, b.byteOffset, words) : new Int32Array(0);
  const sector = (at: number) => {
    const end = Math.min(at + 512, a.length);
    let j = at;
    for (const w = Math.min(end, words * 4) >>> 2; j >>> 2 < w; j += 4) {
      if (wa[j >>> 2] !== wb[j >>> 2]) return true;
    }
    for (; j < end; j++) if (a[j] !== b[j]) return true;
    return false;
  };
  const first = sector(0);
  if (!first && !firstDifference) return undefined;
  let i = Math.min(512, a.length);
  if (!first) {
    // Equal so far: the sector holding the first difference ends the run.
    const d = firstDifference!(a.subarray(i), b.subarray(i));
    i = d < 0 ? a.length : i + d - (d % 512);
  }
  while (i < a.length && sector(i) === first) i += 512;
  return [first, Math.min(i, a.length)];
}
