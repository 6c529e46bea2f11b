import { convert, type CopyTarget, sliceSource, type SourceImage } from "../src/convert.ts";
import { formatPercent, Progress } from "../src/progress.ts";
import { assertEquals, assertRejects, assertTrue } from "./_assert.ts";

const MiB = 1 << 20;

/** A run of a fake source: data with a fill byte, or a hole. */
interface Run {
  length: number;
  fill?: number;
}

/** A fake source made of runs; counts the bytes read and records the reads. */
class FakeSource implements SourceImage {
  readonly size: number;
  readonly chain = [0];
  bytesRead = 0;
  reads: [number, number][] = [];
  statusCalls = 0;
  failAt?: number;
  #runs: { start: number; end: number; fill?: number }[] = [];

  constructor(runs: Run[]) {
    let pos = 0;
    for (const r of runs) {
      this.#runs.push({ start: pos, end: pos + r.length, fill: r.fill });
      pos += r.length;
    }
    this.size = pos;
  }

  #at(offset: number) {
    return this.#runs.find((r) => offset >= r.start && offset < r.end)!;
  }

  read(offset: number, buf: Uint8Array): Promise<void> {
    if (this.failAt !== undefined && offset <= this.failAt && this.failAt < offset + buf.length) {
      return Promise.reject(Object.assign(new Error("io"), { code: "EIO" }));
    }
    this.bytesRead += buf.length;
    this.reads.push([offset, buf.length]);
    for (let i = 0; i < buf.length;) {
      if (offset + i >= this.size) {
        buf.fill(0, i);
        break;
      }
      const r = this.#at(offset + i);
      const n = Math.min(buf.length - i, r.end - (offset + i));
      buf.fill(r.fill ?? 0, i, i + n);
      i += n;
    }
    return Promise.resolve();
  }

  blockStatus(offset: number, length: number) {
    this.statusCalls++;
    // Neighbouring runs of the same kind answer as one, as a file's extents do.
    const i = this.#runs.indexOf(this.#at(offset));
    const data = this.#runs[i].fill !== undefined;
    let end = this.#runs[i].end;
    for (let j = i + 1; j < this.#runs.length && (this.#runs[j].fill !== undefined) === data; j++) {
      end = this.#runs[j].end;
    }
    return Promise.resolve({
      length: Math.min(length, end - offset),
      data,
      zero: !data,
      present: true,
    });
  }

  formatInfo() {
    return Promise.resolve({});
  }
}

/** A target that records writes and zero writes in memory (sparse). */
class FakeTarget implements CopyTarget {
  readonly size: number;
  writes: [number, number][] = [];
  zeroes: [number, number][] = [];
  /** The bytes written (tracked for targets up to 64 MiB). */
  data: Uint8Array;
  delay = false;
  failAt?: number;
  constructor(size: number) {
    this.size = size;
    this.data = new Uint8Array(size <= 64 * MiB ? size : 0);
  }
  async write(offset: number, data: Uint8Array): Promise<void> {
    if (this.delay) await new Promise((r) => setTimeout(r, (offset / 512) % 3));
    if (this.failAt !== undefined && offset <= this.failAt && this.failAt < offset + data.length) {
      throw Object.assign(new Error("nospc"), { code: "ENOSPC" });
    }
    this.writes.push([offset, data.length]);
    if (this.data.length) this.data.set(data, offset);
  }
  writeZeroes(offset: number, length: number): Promise<void> {
    this.zeroes.push([offset, length]);
    return Promise.resolve();
  }
}

Deno.test("formatPercent() prints like C's %3.2f, ties to even", () => {
  assertEquals(formatPercent(0), "0.00");
  assertEquals(formatPercent(100), "100.00");
  assertEquals(formatPercent(Math.fround(66.7100830078125)), "66.71");
  assertEquals(formatPercent(0.125), "0.12");
  assertEquals(formatPercent(0.375), "0.38");
  assertEquals(formatPercent(37.125), "37.12");
  assertEquals(formatPercent(5.5), "5.50");
});

Deno.test("Progress.print() prints 0, steps over 1 point, 100, and a newline at the end", () => {
  const out: string[] = [];
  const p = new Progress(true, 1, (t) => out.push(t));
  p.print(0, 100);
  p.print(0.5, 0);
  p.print(1.5, 0);
  p.print(2, 0);
  p.print(100, 0);
  p.print(100, 0);
  p.end();
  assertEquals(out, [
    "    (0.00/100%)\r",
    "    (1.50/100%)\r",
    "    (100.00/100%)\r",
    "    (100.00/100%)\r",
    "\n",
  ]);
  const silent: string[] = [];
  const q = new Progress(false, 1, (t) => silent.push(t));
  q.print(0, 100);
  q.print(100, 0);
  q.end();
  assertEquals(silent, []);
});

Deno.test("convert() never reads holes and skips zero runs on a zeroed target", async () => {
  const src = new FakeSource([
    { length: 1000 * MiB },
    { length: 3 * MiB, fill: 7 },
    { length: 1000 * MiB },
  ]);
  const target = new FakeTarget(src.size);
  await convert([src], target, { targetIsZero: true });
  assertEquals(src.bytesRead, 3 * MiB);
  assertEquals(target.zeroes, []);
  assertEquals(target.writes.map((w) => w[0]), [1000 * MiB, 1000 * MiB + 2 * MiB]);
  assertEquals(target.writes.reduce((s, w) => s + w[1], 0), 3 * MiB);
  assertTrue(target.writes.every(([, n]) => n <= 2 * MiB), "requests of at most 2 MiB");
});

Deno.test("convert() zero-detects data at -S granularity", async () => {
  // 64k data, 8k zeroes (kept as a hole), 4k data, 2k zeroes (too short: written), 4k data.
  const src = new FakeSource([
    { length: 65536, fill: 1 },
    { length: 8192, fill: 0 },
    { length: 4096, fill: 2 },
    { length: 2048, fill: 0 },
    { length: 4096, fill: 3 },
  ]);
  const target = new FakeTarget(src.size);
  await convert([src], target, { targetIsZero: true });
  assertEquals(target.writes, [[0, 65536], [73728, 10240]]);
  const full = new FakeTarget(src.size);
  await convert([src], full, { minSparse: 0 });
  assertEquals(full.writes.reduce((s, w) => s + w[1], 0), src.size);
  const notZero = new FakeTarget(src.size);
  await convert([src], notZero, {});
  assertEquals(notZero.zeroes, [[65536, 8192]]);
});

Deno.test("convert() writes in offset order unless outOfOrder", async () => {
  const src = new FakeSource([{ length: 40 * MiB, fill: 5 }]);
  const ordered = new FakeTarget(src.size);
  ordered.delay = true;
  await convert([src], ordered, { parallel: 16 });
  const offsets = ordered.writes.map((w) => w[0]);
  assertEquals(offsets, [...offsets].sort((a, b) => a - b));
  assertEquals(offsets.length, 20);
  const free = new FakeTarget(src.size);
  free.delay = true;
  await convert([src], free, { parallel: 16, outOfOrder: true });
  const freeOffsets = free.writes.map((w) => w[0]);
  assertEquals([...freeOffsets].sort((a, b) => a - b), offsets);
  assertTrue(
    freeOffsets.some((o, i) => i > 0 && o < freeOffsets[i - 1]),
    "-W lets writes overtake",
  );
});

Deno.test("convert() concatenates sources and reports progress up to 100", async () => {
  const a = new FakeSource([{ length: 3 * MiB, fill: 1 }, { length: MiB }]);
  const b = new FakeSource([{ length: 1000, fill: 2 }]);
  const target = new FakeTarget(4 * MiB + 1024);
  const seen: number[] = [];
  await convert([a, b], target, { targetIsZero: true, progress: (p) => seen.push(p) });
  assertEquals([target.data[3 * MiB - 1], target.data[3 * MiB]], [1, 0]);
  assertEquals([target.data[4 * MiB], target.data[4 * MiB + 999]], [2, 2]);
  assertEquals(target.data[4 * MiB + 1000], 0);
  assertEquals(seen[seen.length - 1], 100);
  assertTrue(seen.every((p, i) => i === 0 || p >= seen[i - 1]), "progress never goes back");
});

Deno.test("convert() fails with qemu-img's read and write messages", async () => {
  const src = new FakeSource([{ length: 4 * MiB, fill: 1 }]);
  src.failAt = 3 * MiB;
  await assertRejects(
    () => convert([src], new FakeTarget(src.size), {}),
    /^CopyError: error while reading at byte 2097152: Input\/output error$/,
  );
  const ok = new FakeSource([{ length: 4 * MiB, fill: 1 }]);
  const target = new FakeTarget(ok.size);
  target.failAt = 100;
  await assertRejects(
    () => convert([ok], target, {}),
    /^CopyError: error while writing at byte 0: No space left on device$/,
  );
  const salvaged = new FakeSource([{ length: 4 * MiB, fill: 1 }]);
  salvaged.failAt = 3 * MiB;
  const warnings: string[] = [];
  const t = new FakeTarget(salvaged.size);
  await convert([salvaged], t, { salvage: true, warn: (m) => warnings.push(m) });
  assertEquals(warnings, ["error while reading offset 3145728: Input/output error"]);
  assertEquals([t.data[3 * MiB - 1], t.data[3 * MiB], t.data[3 * MiB + 512]], [1, 0, 1]);
});

Deno.test("sliceSource() windows a source for dd's skip and count", async () => {
  const src = new FakeSource([{ length: MiB, fill: 1 }, { length: MiB }, { length: MiB, fill: 3 }]);
  const win = sliceSource(src, MiB - 512, MiB + 1024);
  assertEquals(win.size, MiB + 1024);
  const s = await win.blockStatus(0, win.size);
  assertEquals([s.length, s.data], [512, true]);
  const buf = new Uint8Array(MiB + 2048);
  await win.read(0, buf);
  assertEquals([buf[0], buf[512], buf[MiB + 512], buf[MiB + 1024]], [1, 0, 3, 0]);
});

Deno.test("convert() rejects a compressed copy without a cluster size", async () => {
  const src = new FakeSource([{ length: MiB, fill: 1 }]);
  await assertRejects(
    () => convert([src], new FakeTarget(src.size), { compressed: true }),
    /^QimgError: invalid cluster size$/,
  );
});

/** A two-layer source: runs the top holds (data or zero) and runs left to its backing file. */
class LayeredSource implements SourceImage {
  readonly size: number;
  readonly chain = [0, 1];
  bytesRead = 0;
  #runs: { start: number; end: number; kind: "data" | "zero" | "backing" }[] = [];
  constructor(runs: { length: number; kind: "data" | "zero" | "backing" }[]) {
    let pos = 0;
    for (const r of runs) {
      this.#runs.push({ start: pos, end: pos + r.length, kind: r.kind });
      pos += r.length;
    }
    this.size = pos;
  }
  read(_offset: number, buf: Uint8Array): Promise<void> {
    this.bytesRead += buf.length;
    buf.fill(0x33);
    return Promise.resolve();
  }
  blockStatus(offset: number, length: number, base = 2) {
    const r = this.#runs.find((x) => offset >= x.start && offset < x.end)!;
    const len = Math.min(length, r.end - offset);
    if (r.kind === "backing" && base < 2) {
      return Promise.resolve({ length: len, data: false, zero: true, present: false });
    }
    const data = r.kind !== "zero";
    return Promise.resolve({ length: len, data, zero: !data, present: true });
  }
  formatInfo() {
    return Promise.resolve({ clusterSize: 65536 });
  }
}

Deno.test("convert() with a backed target leaves runs unallocated above the base alone", async () => {
  const src = new LayeredSource([
    { length: MiB, kind: "data" },
    { length: MiB, kind: "backing" },
    { length: MiB, kind: "zero" },
    { length: MiB, kind: "backing" },
  ]);
  const target = new FakeTarget(src.size);
  await convert([src], target, { targetHasBacking: true });
  assertEquals(target.writes, [[0, MiB]]);
  assertEquals(target.zeroes, [[2 * MiB, MiB]]);
  assertEquals(src.bytesRead, MiB);
  // Without a backed target the whole chain is copied.
  const flat = new FakeTarget(src.size);
  await convert([src], flat, { targetIsZero: true });
  assertEquals(flat.writes.reduce((s, w) => s + w[1], 0), 3 * MiB);
});

Deno.test("convert() skips zero runs past the end of the target's backing file", async () => {
  const src = new LayeredSource([
    { length: MiB, kind: "zero" },
    { length: MiB, kind: "zero" },
  ]);
  const target = new FakeTarget(src.size);
  await convert([src], target, { targetHasBacking: true, targetBackingSize: MiB });
  assertEquals(target.zeroes, [[0, MiB]]);
});

/** A target taking compressed clusters. */
class CompressingTarget extends FakeTarget {
  compressed: [number, number][] = [];
  writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    this.compressed.push([offset, data.length]);
    return Promise.resolve();
  }
}

Deno.test("convert() writes whole clusters compressed, skips zero clusters, ends the stream", async () => {
  const src = new FakeSource([
    { length: 65536, fill: 1 },
    { length: 65536 },
    { length: 4096, fill: 2 },
    { length: 61440 },
    { length: 65536, fill: 0 },
  ]);
  const target = new CompressingTarget(src.size);
  await convert([src], target, { compressed: true, clusterSize: 65536, targetIsZero: true });
  assertEquals(target.compressed, [[0, 65536], [131072, 65536], [0, 0]]);
  assertEquals(target.writes, []);
  const dirty = new CompressingTarget(src.size);
  await convert([src], dirty, { compressed: true, clusterSize: 65536 });
  assertEquals(dirty.zeroes, [[65536, 65536], [196608, 65536]]);
});
