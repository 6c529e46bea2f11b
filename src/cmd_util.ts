/** Small pieces several commands share. */

import type { Io } from "./command.ts";
import { QimgError } from "./errors.ts";
import { helpText } from "./help.ts";
import { FORMATS } from "./formats.ts";

/** Parses `--output`: qemu-img accepts `human` and `json` only. */
export function parseOutputFormat(value: string): "human" | "json" {
  if (value === "human" || value === "json") return value;
  throw new QimgError("--output must be used with human or json as argument.");
}

/** `-h` on a command prints the full help and exits 0, as qemu-img does. */
export function printHelp(io: Io): number {
  io.stdout(helpText(FORMATS.map((f) => f.name).sort()));
  return 0;
}
