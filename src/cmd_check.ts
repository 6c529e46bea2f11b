/** `qimg check`. */

import type { Io } from "./command.ts";
import { notSupportedYet } from "./command.ts";

/** Runs `check`. */
export function run(_args: string[], _io: Io): Promise<number> {
  return Promise.reject(notSupportedYet("check"));
}
