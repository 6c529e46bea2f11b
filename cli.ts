/**
 * The qimg command line: `qimg <command> [options]`, as qemu-img 7.2.
 *
 * @example Usage
 * ```sh
 * deno run --allow-read jsr:@qimg/qimg/cli info disk.qcow2
 * ```
 * @module
 */

import { main } from "./src/command.ts";
import type { Io } from "./src/command.ts";
import { DenoFile } from "./src/file.ts";
import { IoError, isPermissionError, QimgError } from "./src/errors.ts";

const encoder = new TextEncoder();

/**
 * Writes all of `text`, as C's stdio does for qemu-img: a stream that
 * fails (a closed pipe, a full disk) is dropped silently and the command
 * goes on, so `qimg map x | head` ends as qemu-img does, with its own code.
 */
function writer(fd: { writeSync(p: Uint8Array): number }): (text: string) => void {
  let broken = false;
  return (text) => {
    if (broken) return;
    const bytes = encoder.encode(text);
    try {
      let done = 0;
      while (done < bytes.length) done += fd.writeSync(bytes.subarray(done));
    } catch {
      broken = true;
    }
  };
}

/** An Io over the Deno runtime. */
export const denoIo: Io = {
  stdout: writer(Deno.stdout),
  stderr: writer(Deno.stderr),
  openFile: (path, options) => DenoFile.open(path, options),
  exists: async (path) => {
    try {
      await Deno.lstat(path);
      return true;
    } catch {
      return false;
    }
  },
  remove: (path) => Deno.remove(path),
  now: () => Date.now(),
};

/**
 * Prints an error as qemu-img does and returns its exit code: a QimgError
 * is qemu's message (and hint), a missing Deno permission is the first
 * line of Deno's message, anything else is a bug: one line
 * `qimg: internal error: ...`, with the stack only when `debug` is set.
 */
export function reportError(
  err: unknown,
  stderr: (text: string) => void,
  debug = false,
): number {
  if (err instanceof QimgError) {
    stderr(`qimg: ${err.message}\n${err.hint ? err.hint + "\n" : ""}`);
    return err.exitCode;
  }
  if (isPermissionError(err)) {
    stderr(`qimg: ${(err as Error).message.split("\n")[0]}\n`);
    return 1;
  }
  if (err instanceof IoError) {
    // An unreadable image (EIO) is the input's fault, not a bug in qimg.
    stderr(`qimg: ${err.message}\n`);
    return 1;
  }
  let msg: string;
  try {
    msg = err instanceof Error ? err.message : String(err);
  } catch {
    msg = "unprintable error";
  }
  stderr(`qimg: internal error: ${msg.split("\n")[0]}\n`);
  if (debug && err instanceof Error && err.stack) stderr(err.stack + "\n");
  return 1;
}

/** Whether QIMG_DEBUG=1 is set; never prompts for the env permission. */
function debugEnabled(): boolean {
  try {
    const state = Deno.permissions.querySync({ name: "env", variable: "QIMG_DEBUG" }).state;
    return state === "granted" && Deno.env.get("QIMG_DEBUG") === "1";
  } catch {
    return false;
  }
}

/** Runs the CLI with `args` and returns the exit code (never exits). */
export async function runCli(args: string[]): Promise<number> {
  try {
    return await main(args, denoIo);
  } catch (err) {
    return reportError(err, denoIo.stderr, debugEnabled());
  }
}

if (import.meta.main) {
  // A promise nobody awaited that fails is a bug too: one line, not Deno's report.
  globalThis.addEventListener("unhandledrejection", (e) => {
    e.preventDefault();
    Deno.exit(reportError(e.reason, denoIo.stderr, debugEnabled()));
  });
  Deno.exit(await runCli(Deno.args));
}
