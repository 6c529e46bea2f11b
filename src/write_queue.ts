/**
 * Background writes to one file, two transfers at most, neighbours merged.
 *
 * Buffered writes to one file serialise in the kernel anyway (ext4 holds
 * the inode lock for each), so many transfers in flight only make the
 * waiting ones spin on that lock, burning the CPU the copy engine needs.
 * Here one transfer runs and one more waits ready (so the file never idles
 * while the main thread is busy or descheduled); writes queued meanwhile
 * that continue each other on the file go out together (pwritev): a
 * convert's requests to a raw target become one system call and one thread
 * hand-off each few requests. (qcow2 targets write their clusters as before,
 * see Qcow2Writer: through this queue they ran slower on the idle machine.)
 */

import type { BlockFile } from "./file.ts";

/** Most bytes one merged transfer carries. */
const MAX_BATCH = 32 << 20;
/** Most pieces one merged transfer carries (well under Linux's IOV_MAX of 1024). */
const MAX_PARTS = 256;
/** Transfers in flight: one writing, one waiting for the file's lock. */
const IN_FLIGHT = 2;

interface Pending {
  offset: number;
  data: Uint8Array;
  /** Reserve the blocks first (fallocate): fresh clusters of an image file. */
  reserve: boolean;
  done: () => void;
  fail: (err: unknown) => void;
}

/** Queues a file's writes for another thread (see the module comment). */
export class WriteQueue {
  readonly #file: BlockFile;
  #queue: Pending[] = [];
  #running = 0;

  constructor(file: BlockFile) {
    this.#file = file;
  }

  /**
   * Writes `data` at `offset` once the writes queued before it are done;
   * `data` must stay unchanged until the promise settles. With `reserve`,
   * the range's blocks are allocated first (file.allocate, where it can).
   */
  write(offset: number, data: Uint8Array, reserve = false): Promise<void> {
    return new Promise<void>((done, fail) => {
      this.#queue.push({ offset, data, reserve, done, fail });
      // A free slot starts at once (no batching delay); later writes gather meanwhile.
      this.#pump();
    });
  }

  #pump(): void {
    while (this.#queue.length && this.#running < IN_FLIGHT) {
      this.#running++;
      this.#run(this.#take()).finally(() => {
        this.#running--;
        this.#pump();
      });
    }
  }

  /** The writes at the head of the queue that continue each other on the file. */
  #take(): Pending[] {
    const q = this.#queue;
    let n = 1;
    let end = q[0].offset + q[0].data.length;
    let bytes = q[0].data.length;
    while (
      n < q.length && n < MAX_PARTS && q[n].offset === end && q[n].reserve === q[0].reserve &&
      bytes + q[n].data.length <= MAX_BATCH
    ) {
      end += q[n].data.length;
      bytes += q[n].data.length;
      n++;
    }
    return q.splice(0, n);
  }

  /** One transfer; settles every write in `batch` (never rejects). */
  async #run(batch: Pending[]): Promise<void> {
    const file = this.#file;
    const first = batch[0];
    const last = batch[batch.length - 1];
    const length = last.offset + last.data.length - first.offset;
    if (first.reserve && file.allocate) await file.allocate(first.offset, length).catch(() => {});
    let i = 0;
    if (batch.length > 1 && file.writevConcurrent) {
      const written = await file.writevConcurrent(first.offset, batch.map((p) => p.data))
        .catch(() => 0);
      for (let pos = 0; i < batch.length && pos + batch[i].data.length <= written; i++) {
        pos += batch[i].data.length;
        batch[i].done();
      }
    }
    // One at a time what is left (a short transfer's rest; errors get their own text).
    for (; i < batch.length; i++) {
      const p = batch[i];
      try {
        if (file.writeConcurrent) await file.writeConcurrent(p.offset, p.data);
        else await file.write(p.offset, p.data);
        p.done();
      } catch (err) {
        p.fail(err);
      }
    }
  }
}
