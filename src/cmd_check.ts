/**
 * `qimg check`: runs the format's metadata check and renders its
 * CheckResult as qemu-img does. Formats only fill a CheckResult; all the
 * wording, JSON keys and exit codes live here.
 */

import type { Io } from "./command.ts";
import { optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { EXIT, QimgError, usageError } from "./errors.ts";
import type { CheckResult } from "./driver.ts";
import { type JsonValue, toJsonPretty } from "./output.ts";
import {
  checkCacheMode,
  openForCommand,
  parseOutputFormat,
  printHelp,
  processObject,
} from "./cmd_util.ts";

const LONG = [
  { name: "help", arg: "none", val: "h" },
  { name: "format", arg: "required", val: "f" },
  { name: "repair", arg: "required", val: "r" },
  { name: "output", arg: "required", val: "output" },
  { name: "object", arg: "required", val: "object" },
  { name: "image-opts", arg: "none", val: "image-opts" },
  { name: "force-share", arg: "none", val: "U" },
] as const;

/** Runs `check`. */
export async function run(args: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(args, ":hf:r:T:qU", [...LONG], "check");
  let format: string | undefined;
  let output = "human";
  let repair: "leaks" | "all" | undefined;
  let cache = "writeback";
  let quiet = false;
  let forceShare = false;
  let imageOpts = false;
  for (const o of options) {
    switch (o.opt) {
      case "h":
        return printHelp(io);
      case "f":
        format = o.arg;
        break;
      case "r":
        if (o.arg !== "leaks" && o.arg !== "all") {
          throw usageError(`Unknown option value for -r (expecting 'leaks' or 'all'): ${o.arg}`);
        }
        repair = o.arg;
        break;
      case "output":
        output = o.arg!;
        break;
      case "T":
        cache = o.arg!;
        break;
      case "q":
        quiet = true;
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
      default:
        throw optionError(o);
    }
  }
  if (operands.length !== 1) throw usageError("Expecting one image file name");
  const filename = operands[0];
  const human = parseOutputFormat(output) === "human";
  checkCacheMode(cache, "source cache");
  const image = await openForCommand(filename, io, {
    format,
    imageOpts,
    forceShare,
    write: repair !== undefined,
    check: true,
  });
  try {
    const top = image.chain[0].image;
    if (!top.check) {
      throw new QimgError("This image format does not support checks", {
        exitCode: EXIT.CHECK_UNSUPPORTED,
      });
    }
    const say = (text: string) => {
      if (!quiet) io.stdout(text);
    };
    let result = await runCheck(() => top.check!({ repair }), io);
    if (result.corruptionsFixed || result.leaksFixed) {
      // Repaired: check again and report the second pass with the first one's fixes.
      const fixed = { corruptionsFixed: result.corruptionsFixed, leaksFixed: result.leaksFixed };
      if (human) {
        say(
          "The following inconsistencies were found and repaired:\n\n" +
            `    ${fixed.leaksFixed} leaked clusters\n` +
            `    ${fixed.corruptionsFixed} corruptions\n\n` +
            "Double checking the fixed image now...\n",
        );
      }
      result = { ...(await runCheck(() => top.check!({}), io)), ...fixed };
    }
    say(
      human
        ? renderCheckHuman(result)
        : toJsonPretty(checkToJson(result, filename, image.format)) + "\n",
    );
    if (result.checkErrors) throw new QimgError("Check failed");
    if (result.corruptions) return EXIT.CHECK_CORRUPT;
    if (result.leaks) return EXIT.CHECK_LEAKS;
    return 0;
  } finally {
    await image.close();
  }
}

/** Runs one check pass; its progress lines go to stderr as qemu prints them. */
async function runCheck(pass: () => Promise<CheckResult>, io: Io): Promise<CheckResult> {
  let result: CheckResult;
  try {
    result = await pass();
  } catch (e) {
    // A check that stops early still printed its lines so far (qcow2's CheckFailedError).
    const lines = (e as { messages?: string[] }).messages;
    if (lines?.length) io.stderr(lines.map((m) => m + "\n").join(""));
    // A driver refusing the check (qemu's -ENOTSUP, e.g. vdi's repair) keeps its own message and code.
    if (e instanceof QimgError && e.exitCode === EXIT.CHECK_UNSUPPORTED) throw e;
    if (e instanceof QimgError) throw new QimgError(`Check failed: ${e.message}`);
    throw e;
  }
  if (result.messages.length) io.stderr(result.messages.map((m) => m + "\n").join(""));
  for (const text of result.moreMessages ?? []) io.stderr(text);
  return result;
}

/** qemu-img's human report of a check. */
export function renderCheckHuman(r: CheckResult): string {
  let out = "";
  if (!(r.corruptions || r.leaks || r.checkErrors)) {
    out += "No errors were found on the image.\n";
  } else {
    if (r.corruptions) {
      out += `\n${r.corruptions} errors were found on the image.\n` +
        "Data may be corrupted, or further writes to the image may corrupt it.\n";
    }
    if (r.leaks) {
      out += `\n${r.leaks} leaked clusters were found on the image.\n` +
        "This means waste of disk space, but no harm to data.\n";
    }
    if (r.checkErrors) {
      out += `\n${r.checkErrors} internal errors have occurred during the check.\n`;
    }
  }
  const total = r.totalClusters ?? 0;
  const allocated = r.allocatedClusters ?? 0;
  if (total !== 0 && allocated !== 0) {
    const pct = (n: number, of: number) => fixed2((n * 100) / of);
    out += `${allocated}/${total} = ${pct(allocated, total)}% allocated, ` +
      `${pct(r.fragmentedClusters ?? 0, allocated)}% fragmented, ` +
      `${pct(r.compressedClusters ?? 0, allocated)}% compressed clusters\n`;
  }
  if (r.imageEndOffset) out += `Image end offset: ${r.imageEndOffset}\n`;
  return out;
}

/** qemu's ImageCheck object: optional counters appear only when non-zero. */
export function checkToJson(
  r: CheckResult,
  filename: string,
  format: string,
): { [key: string]: JsonValue | undefined } {
  const nz = (n: number | undefined) => (n ? n : undefined);
  return {
    filename,
    format,
    "check-errors": r.checkErrors,
    "image-end-offset": nz(r.imageEndOffset),
    corruptions: nz(r.corruptions),
    leaks: nz(r.leaks),
    "corruptions-fixed": nz(r.corruptionsFixed),
    "leaks-fixed": nz(r.leaksFixed),
    "total-clusters": nz(r.totalClusters),
    "allocated-clusters": nz(r.allocatedClusters),
    "fragmented-clusters": nz(r.fragmentedClusters),
    "compressed-clusters": nz(r.compressedClusters),
  };
}

/** C's `%0.2f` of a double: the exact binary value, rounded half to even. */
export function fixed2(x: number): string {
  const [mant, exp = "0"] = x.toPrecision(100).split("e");
  const e = Number(exp);
  let [ip, fp = ""] = mant.split(".");
  if (e < 0) {
    // toPrecision goes exponential below 1e-6: write the digits out.
    fp = "0".repeat(-e - 1) + ip + fp;
    ip = "0";
  }
  const keep = BigInt(ip + fp.slice(0, 2).padEnd(2, "0"));
  const rest = fp.slice(2);
  let up = false;
  if (rest[0] > "5") up = true;
  else if (rest[0] === "5") up = /[1-9]/.test(rest.slice(1)) || keep % 2n === 1n;
  const cents = (keep + (up ? 1n : 0n)).toString().padStart(3, "0");
  return `${cents.slice(0, -2)}.${cents.slice(-2)}`;
}
