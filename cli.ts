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
import { isPermissionError, QimgError } from "./src/errors.ts";

const encoder = new TextEncoder();

function writeAll(fd: { writeSync(p: Uint8Array): number }, text: string): void {
  const bytes = encoder.encode(text);
  let done = 0;
  while (done < bytes.length) done += fd.writeSync(bytes.subarray(done));
}

/** An Io over the Deno runtime. */
export const denoIo: Io = {
  stdout: (text) => writeAll(Deno.stdout, text),
  stderr: (text) => writeAll(Deno.stderr, text),
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

/** Prints an error as qemu-img does and returns its exit code. */
function report(err: unknown): number {
  if (err instanceof QimgError) {
    denoIo.stderr(`qimg: ${err.message}\n${err.hint ? err.hint + "\n" : ""}`);
    return err.exitCode;
  }
  if (isPermissionError(err)) {
    denoIo.stderr(`qimg: ${(err as Error).message.split("\n")[0]}\n`);
    return 1;
  }
  const debug = (() => {
    try {
      return Deno.env.get("QIMG_DEBUG") === "1";
    } catch {
      return false;
    }
  })();
  const msg = err instanceof Error ? err.message : String(err);
  denoIo.stderr(`qimg: internal error: ${msg.split("\n")[0]}\n`);
  if (debug && err instanceof Error && err.stack) denoIo.stderr(err.stack + "\n");
  return 1;
}

/** Runs the CLI with `args` and returns the exit code (never exits). */
export async function runCli(args: string[]): Promise<number> {
  try {
    return await main(args, denoIo);
  } catch (err) {
    return report(err);
  }
}

if (import.meta.main) {
  Deno.exit(await runCli(Deno.args));
}
