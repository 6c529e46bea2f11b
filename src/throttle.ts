/**
 * convert's `-r` rate limit: a leaky bucket on the bytes written to the
 * target, as qemu's throttling with only `bps-write` set. The bucket leaks
 * `rate` bytes a second; a write may start once the level is at most a
 * tenth of a second's worth (qemu's burst allowance without a max), and
 * then adds all its bytes. So a 4 MiB copy in 2 MiB requests at 1 MiB/s
 * takes about 1.9 s, as with qemu-img.
 */

import { Lock } from "./lock.ts";
import type { CopyTarget } from "./convert.ts";

/** Admits writes at `rate` bytes per second on average, first come first served. */
export class WriteThrottle {
  #rate: number;
  #level = 0;
  #last = performance.now();
  #queue = new Lock();

  /** @param rate bytes per second (> 0) */
  constructor(rate: number) {
    this.#rate = rate;
  }

  #leak(): void {
    const now = performance.now();
    this.#level = Math.max(0, this.#level - this.#rate * (now - this.#last) / 1000);
    this.#last = now;
  }

  /** Resolves when a write of `bytes` may start (requests of 0 bytes wait too, as qemu's). */
  admit(bytes: number): Promise<void> {
    return this.#queue.run(async () => {
      for (;;) {
        this.#leak();
        const extra = this.#level - this.#rate / 10;
        if (extra <= 0) break;
        await new Promise((resolve) => setTimeout(resolve, Math.ceil(extra / this.#rate * 1000)));
      }
      this.#level += bytes;
    });
  }
}

/**
 * A block job's speed limit (commit's `-r`), as qemu's job rate limiting:
 * after each chunk the job waits until its bytes so far, at `rate` bytes a
 * second, would have taken as long; so 4 MiB at 1 MiB/s takes 4 s.
 */
export class JobRateLimit {
  #rate: number;
  #start = performance.now();
  #done = 0;

  /** @param rate bytes per second (> 0) */
  constructor(rate: number) {
    this.#rate = rate;
  }

  /** Counts `bytes` as processed; resolves when the job may go on. */
  async processed(bytes: number): Promise<void> {
    this.#done += bytes;
    const due = this.#start + this.#done / this.#rate * 1000 - performance.now();
    if (due > 0) await new Promise((resolve) => setTimeout(resolve, due));
  }
}

/** `target` with every write, zero write and compressed write admitted by a throttle of `rate` bytes/s. */
export function throttledTarget(target: CopyTarget, rate: number): CopyTarget {
  const t = new WriteThrottle(rate);
  const { writeZeroes, writeCompressed, prepareCompressed } = target;
  return {
    get size() {
      return target.size;
    },
    write: async (offset, data) => {
      await t.admit(data.length);
      await target.write(offset, data);
    },
    writeZeroes: writeZeroes
      ? async (offset, length, options) => {
        await t.admit(length);
        await writeZeroes.call(target, offset, length, options);
      }
      : undefined,
    // Counted by their guest bytes, as qemu does.
    writeCompressed: writeCompressed
      ? async (offset, data) => {
        await t.admit(data.length);
        await writeCompressed.call(target, offset, data);
      }
      : undefined,
    prepareCompressed: prepareCompressed ? prepareCompressed.bind(target) : undefined,
  };
}
