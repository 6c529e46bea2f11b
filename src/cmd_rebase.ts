/** `qimg rebase`: change an image's backing file, safely (copying differences) or not (`-u`). */

import type { Io } from "./command.ts";
import { notSupportedYet, optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { QimgError, usageError } from "./errors.ts";
import { resolveRelative } from "./file.ts";
import { findFormat } from "./formats.ts";
import { openImageChain } from "./image.ts";
import { Progress } from "./progress.ts";
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
      if (!unsafe && backing) {
        // The new backing file must open (unless it is already in the chain).
        const path = resolveRelative(image.chain[0].image.file.name, backing);
        const inChain = image.chain.slice(1).some((l) => l.filename === path);
        if (!inChain) {
          try {
            const b = await openImageChain(path, {
              format: backingFormat,
              openFile: (p, w) => io.openFile(p, { write: w }),
            });
            await b.close();
          } catch (e) {
            if (!(e instanceof QimgError)) throw e;
            throw new QimgError(
              `Could not open new backing file '${backing}': ${innerOpenMessage(e, path)}`,
            );
          }
        }
      }
      if (BACKING_FORMATS.has(image.format)) throw notSupportedYet("rebase");
      // The image cannot have a backing file, so there is nothing to copy:
      // what remains is changing the reference, which its driver refuses.
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
