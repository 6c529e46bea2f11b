/** Test file wrappers that reorder a driver's concurrent writes. */

import type { BlockFile, DenoFile } from "../src/file.ts";

/**
 * `file` whose concurrent writes run in batches, each batch's last call
 * first: transfers the driver lets overlap come out in the worst order.
 */
export function lastFirst(file: DenoFile): BlockFile {
  let batch: (() => Promise<void>)[] = [];
  const writeConcurrent = (offset: number, data: Uint8Array) =>
    new Promise<void>((resolve, reject) => {
      if (!batch.length) {
        setTimeout(async () => {
          const run = batch.reverse();
          batch = [];
          for (const transfer of run) await transfer();
        }, 0);
      }
      batch.push(() => file.write(offset, data).then(resolve, reject));
    });
  return new Proxy(file, {
    get(target, key) {
      if (key === "writeConcurrent") return writeConcurrent;
      const value = Reflect.get(target, key);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
}
