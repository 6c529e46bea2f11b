/**
 * The copy engine's file I/O: WriteQueue (one background transfer at a
 * time per file, neighbouring writes queued meanwhile merged into one
 * pwritev, DenoFile.writevConcurrent) and DenoFile.view's window slots.
 */

import { DenoFile } from "../src/file.ts";
import type { BlockFile } from "../src/file.ts";
import { WriteQueue } from "../src/write_queue.ts";
import { dataRuns } from "../src/convert.ts";
import { assertEquals, assertRejects, assertTrue } from "./_assert.ts";
import { tempDir } from "./_util.ts";

const ffi = (await Deno.permissions.query({ name: "ffi" })).state === "granted" &&
  Deno.build.os === "linux";

/** A file that records its calls; transfers finish when the test says so. */
function recordingFile(options: { short?: number; failAt?: number } = {}) {
  const calls: string[] = [];
  const bytes = new Uint8Array(1 << 16);
  let running = 0;
  let most = 0;
  const gates: (() => void)[] = [];
  const transfer = async (label: string, offset: number, parts: Uint8Array[]) => {
    calls.push(label);
    most = Math.max(most, ++running);
    await new Promise<void>((r) => gates.push(r));
    running--;
    let pos = offset;
    for (const p of parts) {
      if (
        options.failAt !== undefined && pos <= options.failAt && options.failAt < pos + p.length
      ) {
        throw new Error("No space left on device");
      }
      bytes.set(p, pos);
      pos += p.length;
    }
    return pos - offset;
  };
  const file = {
    name: "f",
    writable: true,
    write: async (offset: number, data: Uint8Array) => {
      await transfer(`write ${offset}+${data.length}`, offset, [data]);
    },
    writeConcurrent: async (offset: number, data: Uint8Array) => {
      await transfer(`pwrite ${offset}+${data.length}`, offset, [data]);
    },
    writevConcurrent: async (offset: number, parts: Uint8Array[]) => {
      const label = `pwritev ${offset}+${parts.map((p) => p.length).join("+")}`;
      if (options.short !== undefined) {
        // Writes only the first `short` bytes (as a full disk would).
        await transfer(label, offset, [concat(parts).subarray(0, options.short)]);
        return options.short;
      }
      return await transfer(label, offset, parts);
    },
    allocate: (offset: number, length: number) => {
      calls.push(`allocate ${offset}+${length}`);
      return Promise.resolve();
    },
  } as unknown as BlockFile;
  /** Lets the running transfer finish, then lets the queue start the next. */
  const finishOne = async () => {
    for (let i = 0; i < 20 && gates.length === 0; i++) await new Promise((r) => setTimeout(r, 0));
    gates.shift()?.();
    for (let i = 0; i < 5; i++) await new Promise((r) => setTimeout(r, 0));
  };
  return { file, calls, bytes, finishOne, most: () => most, pending: () => gates.length };
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
  let pos = 0;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

const fill = (n: number, v: number) => new Uint8Array(n).fill(v);

Deno.test("WriteQueue.write() runs two transfers at most and merges the neighbours queued meanwhile", async () => {
  const f = recordingFile();
  const q = new WriteQueue(f.file);
  const done = [
    q.write(0, fill(100, 1)), // these two start at once, alone
    q.write(100, fill(50, 2)),
    q.write(150, fill(50, 3)), // these two continue each other: one pwritev
    q.write(200, fill(24, 4)),
    q.write(1000, fill(10, 5)), // a gap: a transfer of its own
  ];
  while (f.pending() || f.calls.length < 4) await f.finishOne();
  await Promise.all(done);
  assertEquals(f.calls, ["pwrite 0+100", "pwrite 100+50", "pwritev 150+50+24", "pwrite 1000+10"]);
  assertEquals(f.most(), 2, "never more than two transfers at once");
  assertTrue(f.bytes.subarray(0, 100).every((b) => b === 1));
  assertTrue(f.bytes.subarray(100, 150).every((b) => b === 2));
  assertTrue(f.bytes.subarray(200, 224).every((b) => b === 4));
  assertTrue(f.bytes.subarray(1000, 1010).every((b) => b === 5));
});

Deno.test("WriteQueue.write() reserves a merged run of fresh clusters with one allocate", async () => {
  const f = recordingFile();
  const q = new WriteQueue(f.file);
  const done = [q.write(1000, fill(10, 1), true), q.write(2000, fill(10, 2), true)];
  done.push(q.write(0, fill(10, 3), true), q.write(10, fill(10, 4), true), q.write(20, fill(5, 5)));
  while (f.pending() || f.calls.length < 7) await f.finishOne();
  await Promise.all(done);
  // Writes that reserve and writes that do not are not merged.
  assertEquals(f.calls.slice(4), ["allocate 0+20", "pwritev 0+10+10", "pwrite 20+5"]);
});

Deno.test("WriteQueue.write() writes the rest of a short merged transfer one by one, each failure its own", async () => {
  // The merged transfer stops after 50 bytes (inside the second write); byte 70 fails.
  const f = recordingFile({ short: 50, failAt: 70 });
  const q = new WriteQueue(f.file);
  const first = [q.write(1000, fill(10, 1)), q.write(2000, fill(10, 1))];
  const merged = [q.write(10, fill(40, 2)), q.write(50, fill(20, 3)), q.write(70, fill(10, 4))];
  const settled = Promise.allSettled([...first, ...merged]);
  for (let i = 0; i < 10; i++) await f.finishOne();
  const results = await settled;
  assertEquals(results.map((r) => r.status), [
    "fulfilled",
    "fulfilled",
    "fulfilled",
    "fulfilled",
    "rejected",
  ]);
  assertEquals(f.calls, [
    "pwrite 1000+10",
    "pwrite 2000+10",
    "pwritev 10+40+20+10",
    "pwrite 50+20",
    "pwrite 70+10",
  ]);
  await assertRejects(() => merged[2], /No space left on device/);
});

Deno.test({
  name: "DenoFile.writevConcurrent() writes its parts one after the other at the offset",
  ignore: !ffi,
  async fn() {
    await using dir = await tempDir();
    const f = await DenoFile.open(`${dir.path}/f`, { create: true });
    try {
      const parts = [fill(4096, 7), fill(10, 8), new Uint8Array(300).fill(9).subarray(100)];
      assertEquals(await f.writevConcurrent!(5000, parts), 4096 + 10 + 200);
      const back = new Uint8Array(4306);
      assertEquals(await f.read(5000, back), 4306);
      assertTrue(back.subarray(0, 4096).every((b) => b === 7));
      assertTrue(back.subarray(4096, 4106).every((b) => b === 8));
      assertTrue(back.subarray(4106).every((b) => b === 9));
      assertEquals(await f.size(), 5000 + 4306);
      // Through the queue: the same bytes land.
      const q = new WriteQueue(f);
      await Promise.all([q.write(0, fill(1000, 1)), q.write(1000, fill(1000, 2))]);
      const head = new Uint8Array(2000);
      await f.read(0, head);
      assertTrue(
        head.subarray(0, 1000).every((b) => b === 1) && head.subarray(1000).every((b) => b === 2),
      );
    } finally {
      await f.close();
    }
  },
});

Deno.test({
  name: "DenoFile.view() serves a view across a window boundary from the shared arena",
  ignore: !ffi,
  async fn() {
    await using dir = await tempDir();
    const MIB = 1 << 20;
    await Deno.writeFile(`${dir.path}/f`, new Uint8Array(20 * MIB).map((_, i) => i % 251));
    const f = await DenoFile.open(`${dir.path}/f`);
    try {
      const a = (await f.view!(0, 4096))!;
      // Starts 4 KiB before the 8 MiB window boundary, ends 2 MiB - 4 KiB after it.
      const b = (await f.view!(8 * MIB - 4096, 2 * MIB))!;
      assertTrue(a.bytes.buffer === b.bytes.buffer, "one ArrayBuffer: no mapping of its own");
      assertTrue(b.bytes.every((v, i) => v === (8 * MIB - 4096 + i) % 251), "the file's bytes");
      a.release();
      b.release();
    } finally {
      await f.close();
    }
  },
});

Deno.test("dataRuns() gives the same writes with its one-in-min shortcut as scanning every sector", () => {
  // xorshift: the same cases every run.
  let x = 2463534242;
  const rand = (n: number) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
  let shortcuts = 0;
  for (let c = 0; c < 3000; c++) {
    const count = 1 + rand(300);
    const buf = new Uint8Array(count * 512);
    // Data sectors (a non-zero byte anywhere in them) with sparse zero runs of any length.
    for (let s = 0; s < count; s++) buf[s * 512 + rand(512)] = 1 + rand(255);
    const gaps = rand(4);
    for (let g = 0; g < gaps; g++) {
      const at = rand(count);
      buf.fill(0, at * 512, Math.min(count, at + 1 + rand(rand(2) ? 4 : 40)) * 512);
    }
    const min = [1, 2, 7, 8, 16, 64][rand(6)];
    // Zero heads and tails shorter than `min` too.
    if (rand(4) === 0) buf.fill(0, (count - 1 - rand(min)) * 512);
    if (rand(4) === 0) buf.fill(0, 0, (1 + rand(min)) * 512);
    const alignment = Math.max(2 ** Math.floor(Math.log2(min)), [1, 8][rand(2)]);
    const sector = rand(5000);
    const fast = dataRuns(buf, sector, count, min, alignment);
    const exact = dataRuns(buf, sector, count, min, alignment, undefined, true);
    assertEquals(fast, exact, `case ${c}: count ${count} min ${min} sector ${sector}`);
    if (exact.length === 1 && exact[0].data) shortcuts++;
  }
  assertTrue(shortcuts > 500, `the shortcut's case came up (${shortcuts} times)`);
});
