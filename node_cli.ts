#!/usr/bin/env node
/**
 * The qimg command line on Node (>= 20): the entry point that
 * `deno task build` bundles into dist/qimg.mjs. Same commands, output and
 * exit codes as cli.ts; only the Io differs (node:fs instead of Deno).
 * Callers that run qemu-img under `prlimit --as=1GiB` (OpenStack, libguestfs)
 * need it: Deno cannot start with so little address space, Node can.
 *
 * @example Usage
 * ```sh
 * node dist/qimg.mjs info --output=json --force-share disk.qcow2
 * ```
 * @module
 */

import * as fs from "node:fs";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { main } from "./src/command.ts";
import type { Io } from "./src/command.ts";
import { NodeFile } from "./src/node_file.ts";
import { reportError } from "./src/report.ts";

const encoder = new TextEncoder();

/**
 * Writes all of `text` to descriptor `fd` synchronously, so nothing is lost
 * when the process exits right after. As C's stdio for qemu-img, a stream
 * that fails (a closed pipe, a full disk) is dropped and the command goes on.
 */
function writer(fd: number): (text: string) => void {
  let broken = false;
  return (text) => {
    if (broken) return;
    const bytes = encoder.encode(text);
    let done = 0;
    while (done < bytes.length) {
      try {
        done += fs.writeSync(fd, bytes, done, bytes.length - done);
      } catch (e) {
        // A non-blocking pipe from the parent: wait for room, as a blocking write would.
        if ((e as { code?: string }).code === "EAGAIN") continue;
        broken = true;
        return;
      }
    }
  };
}

/**
 * An Io over Node: node:fs files and descriptors 1 and 2. Every call is
 * synchronous, as NodeFile's are: nothing here needs libuv's thread pool,
 * whose threads each can take a 64 MiB glibc malloc arena out of the 1 GiB
 * that `prlimit --as` callers allow (Node's ESM loader starts the pool anyway;
 * the README's wrapper sets MALLOC_ARENA_MAX for that).
 */
export const nodeIo: Io = {
  stdout: writer(1),
  stderr: writer(2),
  openFile: (path, options) => NodeFile.open(path, options),
  // deno-lint-ignore require-await
  exists: async (path) => {
    try {
      fs.lstatSync(path);
      return true;
    } catch {
      return false;
    }
  },
  // deno-lint-ignore require-await
  remove: async (path) => fs.unlinkSync(path),
  now: () => Date.now(),
  // Node's signal handles do not keep the process alive.
  onProgressSignal: (handler) => {
    try {
      process.on("SIGUSR1", handler);
    } catch {
      return () => {}; // no SIGUSR1 here (Windows)
    }
    return () => process.off("SIGUSR1", handler);
  },
};

/** Whether QIMG_DEBUG=1 is set (stack traces for internal errors). */
function debugEnabled(): boolean {
  return process.env.QIMG_DEBUG === "1";
}

/** Runs the CLI with `args` on Node and returns the exit code (never exits). */
export async function runNodeCli(args: string[]): Promise<number> {
  try {
    return await main(args, nodeIo);
  } catch (err) {
    return reportError(err, nodeIo.stderr, debugEnabled());
  }
}

/**
 * Whether this module is the program being run. Node 20 has no
 * import.meta.main, so the script path is compared, through symlinks:
 * npm's bin entry (node_modules/.bin/qimg) is a symlink to the bundle.
 */
function isMain(): boolean {
  const flag = (import.meta as { main?: boolean }).main;
  if (flag !== undefined) return flag;
  const script = process.argv[1];
  if (!script) return false;
  try {
    return fs.realpathSync(script) === fs.realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

if (isMain()) {
  // A promise nobody awaited that fails is a bug too: one line, not Node's report.
  process.on("unhandledRejection", (reason) => {
    process.exit(reportError(reason, nodeIo.stderr, debugEnabled()));
  });
  // qemu-img blocks SIGUSR1 (its main loop's SIG_IPI) except to print progress: never fatal.
  nodeIo.onProgressSignal?.(() => {});
  process.exit(await runNodeCli(process.argv.slice(2)));
}
