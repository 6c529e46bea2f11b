/**
 * `-T`/`--trace`: qemu-img's trace options, parsed as qemu does. qimg has
 * no trace points, so every event name qemu would look up "does not exist"
 * (patterns match nothing, silently), and the listing asked by `help` is empty.
 */

import type { Io } from "./command.ts";
import { QimgError, strerror } from "./errors.ts";
import { splitOptionString } from "./options.ts";

/** What `-T` asked for. */
export interface TraceSettings {
  /** The trace file to create once a command runs. */
  file?: string;
  /** `help`: qemu lists its trace events and exits 0. */
  list?: boolean;
  /** qemu-img exits with this code (the events file could not be read). */
  exit?: number;
}

const KEYS = ["enable", "events", "file"];

/** Parses one `-T` argument; warnings go to stderr as qemu prints them. */
export async function parseTraceOption(text: string, io: Io): Promise<TraceSettings> {
  const values = new Map<string, string>();
  for (let [key, value, i] of splitOptionString(text).map(([k, v], i) => [k, v, i] as const)) {
    if (value === undefined && i === 0 && key !== "") {
      values.set("enable", key);
      continue;
    }
    if (value === undefined && (key === "help" || key === "?")) {
      // Asking for help among the options lists them, and fails.
      io.stdout("trace options:\n" + KEYS.map((k) => `  ${k}=<str>\n`).join(""));
      return { exit: 1 };
    }
    if (value === undefined) {
      const off = key.startsWith("no");
      const name = off ? key.slice(2) : key;
      io.stderr(
        `qimg: warning: short-form boolean option '${key}' deprecated\n` +
          `Please use ${name}=${off ? "off" : "on"} instead\n`,
      );
      key = name;
      value = off ? "off" : "on";
    }
    if (!KEYS.includes(key)) throw new QimgError(`Invalid parameter '${key}'`);
    values.set(key, value);
  }
  const enable = values.get("enable");
  if (enable !== undefined) {
    if (enable === "help" || enable === "?") return { list: true };
    enableEvents(enable, "", io);
  }
  const events = values.get("events");
  if (events !== undefined && !(await readEventsFile(events, io))) return { exit: 1 };
  return { file: values.get("file") };
}

function enableEvents(name: string, where: string, io: Io): void {
  const bare = name.startsWith("-") ? name.slice(1) : name;
  if (/[*?]/.test(bare)) return; // a pattern matching no event
  io.stderr(`qimg${where}: warning: trace event '${bare}' does not exist\n`);
}

/** Enables the events listed in a file; false when it cannot be opened. */
async function readEventsFile(path: string, io: Io): Promise<boolean> {
  let bytes: Uint8Array;
  try {
    const file = await io.openFile(path, {});
    try {
      bytes = new Uint8Array(await file.size());
      let done = 0;
      while (done < bytes.length) {
        const n = await file.read(done, bytes.subarray(done));
        if (n <= 0) break;
        done += n;
      }
      bytes = bytes.subarray(0, done);
    } finally {
      await file.close();
    }
  } catch (e) {
    if (e instanceof QimgError) return true; // not a regular file: nothing to read
    io.stderr(`qimg:${path}: ${strerror(e)}\n`);
    return false;
  }
  const lines = new TextDecoder().decode(bytes).split("\n");
  if (lines[lines.length - 1] === "") lines.pop();
  lines.forEach((raw, i) => {
    const line = raw.split("\0")[0];
    if (line === "" || line.startsWith("#")) return;
    enableEvents(line, `:${path}:${i + 1}`, io);
  });
  return true;
}

/** Creates the trace file as qemu does once a command is about to run. */
export async function openTraceFile(path: string, io: Io): Promise<void> {
  try {
    const f = await io.openFile(path, { write: true, create: true });
    await f.close();
  } catch (e) {
    throw new QimgError(`Error opening logfile ${path}: ${strerror(e)}`);
  }
}
