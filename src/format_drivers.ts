/**
 * Every format's driver, loaded, for the commands that pick a target format
 * by name and read its option tables synchronously (create, convert, dd,
 * measure, amend). Commands that only open images use formats.ts, which
 * loads the driver of the format opened alone.
 */

import type { FormatDriver } from "./driver.ts";
import { FORMATS } from "./formats.ts";

/** The drivers of formats.ts's FORMATS, in its order. */
export const FORMAT_DRIVERS: FormatDriver[] = await Promise.all(FORMATS.map((f) => f.load()));

/** Finds a loaded driver by qemu's name. */
export function findFormat(name: string): FormatDriver | undefined {
  return FORMAT_DRIVERS.find((d) => d.name === name);
}
