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
import { armCrash, DenoFile, fileChanges } from "./src/file.ts";
import { reportError } from "./src/report.ts";

// Shared with node_cli.ts; re-exported for callers of the Deno entry.
export { reportError };

const encoder = new TextEncoder();

/**
 * Writes all of `text`, as C's stdio does for qemu-img: a stream that
 * fails (a closed pipe, a full disk) is dropped silently and the command
 * goes on, so `qimg map x | head` ends as qemu-img does, with its own code.
 */
function writer(fd: { writeSync(p: Uint8Array): number }): (text: string) => void {
  let broken = false;
  // One buffer, reused: encode() per call leaves garbage V8 collects late
  // (gigabytes of RSS when a vdi check streams 19 GB of lines).
  const buf = new Uint8Array(1 << 16);
  return (text) => {
    if (broken) return;
    try {
      for (let at = 0; at < text.length;) {
        const r = encoder.encodeInto(at ? text.slice(at) : text, buf);
        at += r.read;
        let done = 0;
        while (done < r.written) done += fd.writeSync(buf.subarray(done, r.written));
      }
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
  onProgressSignal: (handler) => {
    try {
      Deno.addSignalListener("SIGUSR1", handler);
    } catch {
      return () => {}; // no SIGUSR1 here (Windows)
    }
    return () => Deno.removeSignalListener("SIGUSR1", handler);
  },
};

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
  // qemu-img blocks SIGUSR1 (its main loop's SIG_IPI) except to print progress: never fatal.
  denoIo.onProgressSignal?.(() => {});
  // The crash test's hook (src/file.ts); only with --allow-env for it.
  const hook = { name: "env", variable: "QIMG_CRASH_AFTER_WRITES" } as const;
  const crash = Deno.permissions.querySync(hook).state === "granted" && Deno.env.get(hook.variable);
  if (crash) armCrash(Number(crash));
  const code = await runCli(Deno.args);
  if (crash) denoIo.stderr(`qimg: crash hook: ${fileChanges()} file changes\n`);
  Deno.exit(code);
}
