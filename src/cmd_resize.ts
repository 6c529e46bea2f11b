/** `qimg resize`. */

import type { Io } from "./command.ts";
import { notSupportedYet } from "./command.ts";

/** Runs `resize`. */
export function run(_args: string[], _io: Io): Promise<number> {
  return Promise.reject(notSupportedYet("resize"));
}
