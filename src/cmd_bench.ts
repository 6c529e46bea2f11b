/** `qimg bench`. */

import type { Io } from "./command.ts";
import { notSupportedYet } from "./command.ts";

/** Runs `bench`. */
export function run(_args: string[], _io: Io): Promise<number> {
  return Promise.reject(notSupportedYet("bench"));
}
