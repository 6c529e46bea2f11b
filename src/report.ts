/**
 * How the CLI entries (cli.ts for Deno, node_cli.ts for Node) report an
 * error that ends a command. Runtime-neutral, so both print the same text
 * and exit with the same code.
 */

import { IoError, isPermissionError, QimgError } from "./errors.ts";

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
