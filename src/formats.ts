/** The format registry: one line per format, in qemu-img's `Supported formats` order. */

import type { FormatDriver } from "./driver.ts";
import { rawDriver } from "./raw.ts";
import { qcow2Driver } from "./qcow2.ts";
import { vdiDriver } from "./vdi.ts";
import { vpcDriver } from "./vpc.ts";
import { vhdxDriver } from "./vhdx.ts";
import { vmdkDriver } from "./vmdk.ts";

/** Every format qimg knows. */
export const FORMATS: FormatDriver[] = [
  rawDriver,
  qcow2Driver,
  vdiDriver,
  vpcDriver,
  vhdxDriver,
  vmdkDriver,
];

/** Finds a driver by qemu's name. */
export function findFormat(name: string): FormatDriver | undefined {
  return FORMATS.find((d) => d.name === name);
}

/** Picks the best-scoring driver for a file's first bytes (raw, scoring 1, is the fallback). */
export function probeFormat(head: Uint8Array, filename: string): FormatDriver {
  let best = rawDriver;
  let bestScore = 0;
  for (const d of FORMATS) {
    const score = d.probe?.(head, filename) ?? 0;
    if (score > bestScore) {
      best = d;
      bestScore = score;
    }
  }
  return best;
}
