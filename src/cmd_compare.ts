/**
 * `qimg compare`: whether two images have the same guest contents.
 * Exit 0 identical, 1 different, 2 on errors (usage errors stay 1).
 */

import type { Io } from "./command.ts";
import { optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { EXIT, QimgError, usageError } from "./errors.ts";
import type { Image } from "./image.ts";
import { Progress } from "./progress.ts";
import { compareImages } from "./compare.ts";
import { isCacheMode, openForCommand, printHelp, processObject } from "./cmd_util.ts";

const LONG = [
  { name: "help", arg: "none", val: "h" },
  { name: "object", arg: "required", val: "object" },
  { name: "image-opts", arg: "none", val: "image-opts" },
  { name: "force-share", arg: "none", val: "U" },
] as const;

/** Runs `compare`. */
export async function run(args: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(args, ":hf:F:T:pqsU", [...LONG], "compare");
  let fmt1: string | undefined;
  let fmt2: string | undefined;
  let cache = "writeback";
  let showProgress = false;
  let quiet = false;
  let strict = false;
  let forceShare = false;
  let imageOpts = false;
  for (const o of options) {
    switch (o.opt) {
      case "h":
        return printHelp(io);
      case "f":
        fmt1 = o.arg;
        break;
      case "F":
        fmt2 = o.arg;
        break;
      case "T":
        cache = o.arg!;
        break;
      case "p":
        showProgress = true;
        break;
      case "q":
        quiet = true;
        break;
      case "s":
        strict = true;
        break;
      case "U":
        forceShare = true;
        break;
      case "object":
        try {
          if (processObject(o.arg!, io)) return 0;
        } catch (e) {
          // compare alone exits 2 on a bad --object.
          if (e instanceof QimgError) throw new QimgError(e.message, { exitCode: 2 });
          throw e;
        }
        break;
      case "image-opts":
        imageOpts = true;
        break;
      default:
        throw optionError(o);
    }
  }
  if (operands.length !== 2) throw usageError("Expecting two image file names");
  const [name1, name2] = operands;
  const say = (text: string) => {
    if (!quiet) io.stdout(text);
  };
  const progress = new Progress(showProgress && !quiet, 2.0, (t) => io.stdout(t));
  progress.listen(io); // SIGUSR1 prints the progress, as qemu-img
  let image1: Image | undefined;
  let image2: Image | undefined;
  try {
    if (!isCacheMode(cache)) throw new QimgError(`Invalid source cache option: ${cache}`);
    image1 = await openForCommand(name1, io, { format: fmt1, imageOpts, forceShare });
    image2 = await openForCommand(name2, io, { format: fmt2, imageOpts, forceShare });
    progress.print(0, 100);
    const result = await compareImages(image1, image2, {
      strict,
      onProgress: (bytes, total) => {
        // qemu computes the step in single precision.
        const share = Math.fround(Math.fround(bytes) / Math.fround(total));
        progress.print(Math.fround(share * 100), 100);
      },
      onSizeMismatch: () => say("Warning: Image size mismatch!\n"),
    });
    if (result.kind === "identical") {
      say("Images are identical.\n");
      return 0;
    }
    say(
      result.kind === "content"
        ? `Content mismatch at offset ${result.offset}!\n`
        : result.kind === "size"
        ? "Strict mode: Image size mismatch!\n"
        : `Strict mode: Offset ${result.offset} block status mismatch!\n`,
    );
    return EXIT.COMPARE_DIFFER;
  } catch (e) {
    // Anything past argument parsing is an error exit 2, as qemu-img's.
    if (e instanceof QimgError) {
      throw new QimgError(e.message, { exitCode: EXIT.COMPARE_ERROR, hint: e.hint });
    }
    throw e;
  } finally {
    await image2?.close();
    await image1?.close();
    progress.end();
  }
}
