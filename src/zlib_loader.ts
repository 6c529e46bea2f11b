/**
 * node:zlib and pako, loaded on first use. Importing them costs about 25 ms
 * of start-up (measured: node:zlib ~16 ms, pako ~7 ms), which metadata-only
 * commands such as info, map and check never need. Async entry points call
 * `loadZlib()`/`loadPako()`; the synchronous codecs then use the loaded module.
 */

import type * as Zlib from "node:zlib";

type Pako = typeof import("pako")["default"];

let zlibModule: typeof Zlib | undefined;
let pakoModule: Pako | undefined;

/**
 * Loads node:zlib once. Where there is none (a browser), resolves to an empty
 * stand-in: the codecs then see no inflateRawSync and inflate with pako, and
 * zstd fails with their "This runtime cannot ..." error.
 */
export async function loadZlib(): Promise<typeof Zlib> {
  if (!zlibModule) {
    try {
      zlibModule = await import("node:zlib");
    } catch {
      zlibModule = {} as typeof Zlib;
    }
  }
  return zlibModule;
}

/** node:zlib, after `loadZlib()` has run. */
export function zlibSync(): typeof Zlib {
  if (!zlibModule) throw new Error("node:zlib used before loadZlib()");
  return zlibModule;
}

/** Loads pako once. */
export async function loadPako(): Promise<Pako> {
  pakoModule ??= (await import("pako")).default;
  return pakoModule;
}

/** pako, after `loadPako()` has run. */
export function pakoSync(): Pako {
  if (!pakoModule) throw new Error("pako used before loadPako()");
  return pakoModule;
}
