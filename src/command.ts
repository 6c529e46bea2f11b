/**
 * The command table and what every command shares: the Io a command
 * writes through, and the global option parsing of `qimg [options] command`.
 * Runtime-neutral: cli.ts supplies an Io over Deno.
 */

import type { BlockFile, OpenFileOptions } from "./file.ts";
import { getopt, type ParsedOption } from "./getopt.ts";
import { QimgError, usageError } from "./errors.ts";
import { FORMATS } from "./formats.ts";

/** Where a command writes and how it reaches files. */
export interface Io {
  /** Writes to standard output. */
  stdout(text: string): void;
  /** Writes to standard error. */
  stderr(text: string): void;
  /** Opens a host file. */
  openFile(path: string, options: OpenFileOptions): Promise<BlockFile>;
  /** Whether a file exists (dd, create). */
  exists?(path: string): Promise<boolean>;
  /** Removes a file (cleanup of a failed create). */
  remove?(path: string): Promise<void>;
  /** Current time in ms (snapshots, bench). */
  now?(): number;
  /**
   * Calls `handler` on each SIGUSR1 (qemu-img prints progress then) until
   * the returned function is called; must not keep the process alive.
   */
  onProgressSignal?(handler: () => void): () => void;
}

/** A command: parses its own arguments (after the command name) and returns an exit code. */
export type Command = (args: string[], io: Io) => Promise<number>;

/** Every qemu-img 7.2 command, loaded on first use so start-up stays small. */
export const COMMANDS: Record<string, () => Promise<Command>> = {
  amend: async () => (await import("./cmd_amend.ts")).run,
  bench: async () => (await import("./cmd_bench.ts")).run,
  bitmap: async () => (await import("./cmd_bitmap.ts")).run,
  check: async () => (await import("./cmd_check.ts")).run,
  commit: async () => (await import("./cmd_commit.ts")).run,
  compare: async () => (await import("./cmd_compare.ts")).run,
  convert: async () => (await import("./cmd_convert.ts")).run,
  create: async () => (await import("./cmd_create.ts")).run,
  dd: async () => (await import("./cmd_dd.ts")).run,
  info: async () => (await import("./cmd_info.ts")).run,
  map: async () => (await import("./cmd_map.ts")).run,
  measure: async () => (await import("./cmd_measure.ts")).run,
  snapshot: async () => (await import("./cmd_snapshot.ts")).run,
  rebase: async () => (await import("./cmd_rebase.ts")).run,
  resize: async () => (await import("./cmd_resize.ts")).run,
};

/** qemu-img's top-level options (before the command). */
const GLOBAL_LONG = [
  { name: "help", arg: "none", val: "h" },
  { name: "version", arg: "none", val: "V" },
  { name: "trace", arg: "required", val: "T" },
] as const;

/** Runs `qimg <argv>`: global options, then the command. Returns the exit code. */
export async function main(argv: string[], io: Io): Promise<number> {
  if (argv.length === 0) throw usageError("Not enough arguments");
  const { options, operands } = getopt(argv, "+:hVT:", [...GLOBAL_LONG], "qimg");
  let traceFile: string | undefined;
  for (const o of options) {
    switch (o.opt) {
      case "h":
        // help.ts and trace.ts load only when asked for: start-up stays small.
        io.stdout((await import("./help.ts")).helpText(FORMATS.map((f) => f.name).sort()));
        return 0;
      case "V":
        io.stdout((await import("./help.ts")).VERSION_TEXT);
        return 0;
      case "T": {
        const t = await (await import("./trace.ts")).parseTraceOption(o.arg!, io);
        if (t.list) return 0; // qimg has no trace events to list
        if (t.exit !== undefined) return t.exit;
        if (t.file !== undefined) traceFile = t.file;
        break;
      }
      default:
        throw optionError(o);
    }
  }
  // Options without a command: qemu-img does nothing and succeeds.
  if (operands.length === 0) return 0;
  if (traceFile !== undefined) await (await import("./trace.ts")).openTraceFile(traceFile, io);
  const [name, ...rest] = operands;
  const load = Object.hasOwn(COMMANDS, name) ? COMMANDS[name] : undefined;
  if (!load) throw usageError(`Command not found: ${name}`);
  const command = await load();
  return await command(rest, io);
}

/** qemu-img's message for an unknown option or a missing argument. */
export function optionError(o: ParsedOption): QimgError {
  if (o.opt === ":") return usageError(`missing argument for option '${o.raw}'`);
  return usageError(`unrecognized option '${o.raw}'`);
}

/** The error for a command or format qimg recognises but does not implement yet. */
export function notSupportedYet(what: string): QimgError {
  return new QimgError(`${what}: not supported yet`);
}
