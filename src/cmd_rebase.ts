/** `qimg rebase`. */

import type { Io } from "./command.ts";
import { notSupportedYet } from "./command.ts";

/** Runs `rebase`. */
export function run(_args: string[], _io: Io): Promise<number> {
  return Promise.reject(notSupportedYet("rebase"));
}
