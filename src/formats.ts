/**
 * The format registry: one line per format, in qemu-img's `Supported formats`
 * order. An entry holds the format's name and probe (format_probes.ts); its
 * driver module loads on first use, so a command loads the code of the
 * formats it opens only (start-up time: see ARCHITECTURE.md).
 */

import type { FormatDriver } from "./driver.ts";
import { probeQcow2, probeVdi, probeVhdx, probeVmdk, probeVpc } from "./format_probes.ts";

/** A format qimg knows: its name and probe, and its driver on demand. */
export interface FormatEntry {
  /** The name as qemu spells it. */
  readonly name: string;
  /** Scores the first bytes of a file 0-100 (raw answers 1, the fallback). */
  probe?(head: Uint8Array, filename: string): number;
  /** Loads the driver (once; later calls answer from the module cache). */
  load(): Promise<FormatDriver>;
}

/** Every format qimg knows. */
export const FORMATS: FormatEntry[] = [
  { name: "raw", probe: () => 1, load: async () => (await import("./raw.ts")).rawDriver },
  { name: "qcow2", probe: probeQcow2, load: async () => (await import("./qcow2.ts")).qcow2Driver },
  { name: "vdi", probe: probeVdi, load: async () => (await import("./vdi.ts")).vdiDriver },
  { name: "vpc", probe: probeVpc, load: async () => (await import("./vpc.ts")).vpcDriver },
  { name: "vhdx", probe: probeVhdx, load: async () => (await import("./vhdx.ts")).vhdxDriver },
  { name: "vmdk", probe: probeVmdk, load: async () => (await import("./vmdk.ts")).vmdkDriver },
];

/** The registry entry of a format by qemu's name (whether qimg knows it); loads nothing. */
export function findFormat(name: string): FormatEntry | undefined {
  return FORMATS.find((d) => d.name === name);
}

/** The driver of a format by qemu's name, loaded. */
export async function loadFormat(name: string): Promise<FormatDriver | undefined> {
  return await findFormat(name)?.load();
}

/** Loads the best-scoring driver for a file's first bytes (raw, scoring 1, is the fallback). */
export async function probeFormat(head: Uint8Array, filename: string): Promise<FormatDriver> {
  let best = FORMATS[0];
  let bestScore = 0;
  for (const d of FORMATS) {
    const score = d.probe?.(head, filename) ?? 0;
    if (score > bestScore) {
      best = d;
      bestScore = score;
    }
  }
  return await best.load();
}
