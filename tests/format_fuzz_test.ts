/**
 * Hostile vmdk, vpc, vhdx and vdi images: a seeded PRNG pokes headers,
 * tables, descriptor text, stream markers, parent locators and log entries
 * of small images made by qemu-img/qemu-io (vhdx and vpc checksums fixed
 * up half of the time, so pokes get past them to deeper validation), then
 * runs info, check, map, convert and compare in-process on in-memory
 * files. Each must succeed or fail cleanly (`qimg: ...`, qemu-img's exit
 * codes), never with an internal error or a stack trace, within a time
 * bound and without a huge allocation. A sample also runs through the CLI
 * under a V8 heap limit, and a sample is compared with qemu-img itself.
 *
 * QIMG_FUZZ_CASES: cases per image (default 60); QIMG_FUZZ_SEED: first
 * seed; QIMG_FUZZ_ONLY=name:seed runs one case (QIMG_FUZZ_DUMP=dir saves
 * its files); QIMG_FUZZ_VERBOSE=1 prints each run. QIMG_FUZZ_ORACLE=1 runs
 * the qemu-img comparison on QIMG_FUZZ_ORACLE_CASES cases per image
 * (default 40; 2 without QIMG_FUZZ_ORACLE) with info, check and map.
 */

import { assertEquals, assertTrue } from "./_assert.ts";
import { assertSameAsQemu, CLI, runProgram, type RunResult, sh, tempDir } from "./_util.ts";
import { type MemStore, type Outcome, prng, problem, runIn, storeOf } from "./_fuzz.ts";
import { main } from "../src/command.ts";
import { DenoFile } from "../src/file.ts";
import { reportError } from "../src/report.ts";
import { crc32c } from "../src/vhdx_log.ts";

const env = (name: string) => Deno.env.get(name);
const CASES = Number(env("QIMG_FUZZ_CASES") ?? "60");
const FIRST_SEED = Number(env("QIMG_FUZZ_SEED") ?? "1");
const ONLY = env("QIMG_FUZZ_ONLY");
const DUMP = env("QIMG_FUZZ_DUMP");
const VERBOSE = env("QIMG_FUZZ_VERBOSE") === "1";
const ORACLE = env("QIMG_FUZZ_ORACLE") === "1";
const ORACLE_CASES = Number(env("QIMG_FUZZ_ORACLE_CASES") ?? (ORACLE ? "40" : "2"));
const CLI_CASES = Number(env("QIMG_FUZZ_CLI_CASES") ?? "1");
const MiB = 1 << 20;
/** No fuzz case may allocate one buffer above this (the images are a few MiB). */
const ALLOC_LIMIT = 256 * MiB;
/** Guest sizes convert and compare still copy. */
const COPY_LIMIT = 64 * MiB;

/** A byte range to poke; `seal` recomputes the checksum covering it. */
interface Region {
  start: number;
  length: number;
  seal?: (b: Uint8Array) => void;
}

/** One file of a sample that pokes aim at. */
interface Target {
  file: string;
  regions: Region[];
  /** Descriptor text to mutate as text: embedded at [start, start+length), or the whole file. */
  text?: { start: number; length: number } | "file";
}

/** A fuzzed image: its files (the first is the one commands open) and where to poke. */
interface Sample {
  name: string;
  format: string;
  files: Map<string, Uint8Array>;
  targets: Target[];
  littleEndian: boolean;
  /** Commands run after the usual ones (they may write). */
  extra?: string[][];
}

// ---------------------------------------------------------------- regions

function dv(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

function clip(b: Uint8Array, start: number, length: number, seal?: Region["seal"]): Region[] {
  if (!(start >= 0 && start < b.length) || length <= 0) return [];
  return [{ start, length: Math.min(length, b.length - start), seal }];
}

/** A VMDK4 sparse header at `at` (0, or a stream footer's copy). */
function vmdkHeaderRegions(b: Uint8Array, at: number): Region[] {
  return [...clip(b, at, 80), ...clip(b, at, 512)];
}

/** Regions of a hosted sparse extent: header, descriptor, grain directories and tables. */
function vmdkSparseRegions(b: Uint8Array): Target["regions"] {
  const v = dv(b);
  const out = vmdkHeaderRegions(b, 0);
  const sec = (off: number) => Number(v.getBigUint64(off, true)) * 512;
  const capacity = Number(v.getBigUint64(12, true));
  const grain = Number(v.getBigUint64(20, true));
  const gtes = v.getUint32(44, true);
  const gdEntries = Math.ceil(capacity / grain / gtes);
  for (const gdAt of [48, 56]) {
    const gd = sec(gdAt);
    if (gd <= 0 || gd >= b.length) continue;
    out.push(...clip(b, gd, gdEntries * 4));
    for (let i = 0; i < Math.min(gdEntries, 16); i++) {
      const gt = v.getUint32(gd + 4 * i, true) * 512;
      if (gt) out.push(...clip(b, gt, gtes * 4));
    }
  }
  return out;
}

/** Regions of a streamOptimized file: header, footer, and each marker found walking from the overhead. */
function vmdkStreamRegions(b: Uint8Array): Region[] {
  const v = dv(b);
  const out = vmdkHeaderRegions(b, 0);
  out.push(...clip(b, b.length - 1536, 512), ...vmdkHeaderRegions(b, b.length - 1024));
  out.push(...clip(b, b.length - 512, 512));
  let off = Number(v.getBigUint64(64, true)) * 512;
  for (let n = 0; n < 1000 && off + 16 <= b.length; n++) {
    const count = Number(v.getBigUint64(off, true));
    const size = v.getUint32(off + 8, true);
    if (size) {
      out.push(...clip(b, off, 12), ...clip(b, off + 12, Math.min(size, 64)));
      off = Math.ceil((off + 12 + size) / 512) * 512;
    } else {
      const type = v.getUint32(off + 12, true);
      out.push(...clip(b, off, 16));
      if (type === 0) break;
      out.push(...clip(b, off + 512, count * 512));
      off += 512 + count * 512;
    }
  }
  return out;
}

function embeddedDescriptor(b: Uint8Array): { start: number; length: number } | undefined {
  const v = dv(b);
  const start = Number(v.getBigUint64(28, true)) * 512;
  const length = Number(v.getBigUint64(36, true)) * 512;
  return start && length ? { start, length } : undefined;
}

/** Sets the one's complement byte sum (big-endian) at `at` over [start, start+length). */
function vpcSeal(start: number, length: number, at: number): Region["seal"] {
  return (b) => {
    dv(b).setUint32(start + at, 0);
    let sum = 0;
    for (let i = start; i < start + length; i++) sum += b[i];
    dv(b).setUint32(start + at, ~sum >>> 0);
  };
}

function vpcRegions(b: Uint8Array): Region[] {
  const v = dv(b);
  const end = b.length - 512;
  const out = [
    ...clip(b, end, 88, vpcSeal(end, 512, 64)),
    ...clip(b, end, 512, vpcSeal(end, 512, 64)),
  ];
  if (v.getUint32(end + 60) !== 3) return out;
  out.push(...clip(b, 0, 88, vpcSeal(0, 512, 64)), ...clip(b, 0, 512, vpcSeal(0, 512, 64)));
  const dyn = Number(v.getBigUint64(16));
  const seal = vpcSeal(dyn, 1024, 36);
  out.push(
    ...clip(b, dyn, 64, seal),
    ...clip(b, dyn + 576, 192, seal),
    ...clip(b, dyn, 1024, seal),
  );
  const bat = Number(v.getBigUint64(dyn + 16));
  const entries = v.getUint32(dyn + 28);
  out.push(...clip(b, bat, entries * 4));
  for (let i = 0; i < Math.min(entries, 8); i++) {
    const s = v.getUint32(bat + 4 * i);
    if (s !== 0xffffffff) out.push(...clip(b, s * 512, 512));
  }
  return out;
}

/** Sets the CRC-32C at `start + at` over `length` bytes (or the length stored at `start + lengthAt`). */
function vhdxSeal(start: number, length: number, at = 4, lengthAt = -1): Region["seal"] {
  return (b) => {
    let n = length;
    if (lengthAt >= 0) n = dv(b).getUint32(start + lengthAt, true);
    if (!(n >= 8 && start + n <= b.length && n <= 64 * MiB)) return;
    const part = b.subarray(start, start + n);
    dv(b).setUint32(start + at, 0, true);
    dv(b).setUint32(start + at, crc32c(part), true);
  };
}

function vhdxRegions(b: Uint8Array): Region[] {
  const v = dv(b);
  const K = 1024;
  const out = [...clip(b, 0, 16), ...clip(b, 0, 520)];
  for (const h of [64 * K, 128 * K]) {
    const seal = vhdxSeal(h, 4 * K);
    out.push(...clip(b, h, 80, seal), ...clip(b, h, 4 * K, seal));
  }
  let meta = 0;
  for (const r of [192 * K, 256 * K]) {
    const seal = vhdxSeal(r, 64 * K);
    const count = v.getUint32(r + 8, true);
    out.push(...clip(b, r, 16 + count * 32, seal), ...clip(b, r, 64 * K, seal));
    for (let i = 0; i < count; i++) {
      const e = r + 16 + 32 * i;
      const off = Number(v.getBigUint64(e + 16, true));
      const len = v.getUint32(e + 24, true);
      if (v.getUint32(e, true) === 0x8b7ca206) meta = off; // the metadata region's GUID
      else out.push(...clip(b, off, Math.min(len, 4096)));
    }
  }
  if (meta) {
    const items = v.getUint16(meta + 10, true);
    out.push(...clip(b, meta, 32 + items * 32), ...clip(b, meta, 64 * K));
    for (let i = 0; i < items; i++) {
      const e = meta + 32 + 32 * i;
      out.push(...clip(b, meta + v.getUint32(e + 16, true), v.getUint32(e + 20, true)));
    }
  }
  // The log: entries where the current header says (a clean image's log is empty).
  const log = Number(v.getBigUint64(128 * K + 72, true));
  if (v.getUint32(log, true) === 0x65676f6c) {
    const seal = vhdxSeal(log, 0, 4, 8);
    out.push(
      ...clip(b, log, 64, seal),
      ...clip(b, log + 64, 32, seal),
      ...clip(b, log, 8192, seal),
    );
  }
  return out;
}

function vdiRegions(b: Uint8Array): Region[] {
  const v = dv(b);
  const bmap = v.getUint32(340, true);
  const blocks = v.getUint32(384, true);
  return [...clip(b, 64, 336), ...clip(b, 0, 512), ...clip(b, bmap, blocks * 4)];
}

// ---------------------------------------------------------------- mutation

const INTERESTING64 = [
  0n,
  1n,
  0x200n,
  0x10000n,
  0x100000n,
  0x7fffffffn,
  0x80000000n,
  0xffffffffn,
  1n << 32n,
  1n << 40n,
  (1n << 53n) + 1n,
  1n << 62n,
  1n << 63n,
  0x7fffffffffffffffn,
  0xfffffffffffffe00n,
  0xffffffffffffffffn,
];
const INTERESTING32 = [
  0,
  1,
  2,
  3,
  4,
  8,
  9,
  16,
  64,
  128,
  511,
  512,
  513,
  4096,
  0x7fff,
  0xffff,
  0x10000,
  0x100000,
  0x200000,
  0x7fffffff,
  0x80000000,
  0xfffffffe,
  0xffffffff,
];
const TOKENS = [
  "0",
  "1",
  "-1",
  "512",
  "4294967295",
  "4294967296",
  "9007199254740993",
  "18446744073709551615",
  "99999999999999999999999",
  "0x10",
  "RW",
  "RDONLY",
  "NOACCESS",
  "SPARSE",
  "FLAT",
  "ZERO",
  "VMFS",
  "VMFSSPARSE",
  "SESPARSE",
  '""',
  '"',
  '"missing.vmdk"',
  '"/nonexistent/x"',
  '"../x.vmdk"',
  "monolithicSparse",
  '"streamOptimized"',
  '"vmfs"',
  '"monolithicFlat"',
  '"twoGbMaxExtentFlat"',
  "ffffffff",
  "fffffffe",
  "=",
  "#",
];
const LINES = [
  'RW 2048 FLAT "flat-flat.vmdk" 0',
  'RW 4294967296 SPARSE "sparse.vmdk"',
  "RW 18446744073709551615 ZERO",
  'RW 8 SPARSE "x.vmdk"',
  'RW 2048 FLAT "flat-flat.vmdk" 18446744073709551615',
  'createType="monolithicFlat"',
  'createType="vmfsSparse"',
  'createType="seSparse"',
  'parentFileNameHint="sparse.vmdk"',
  'parentFileNameHint=""',
  "parentCID=fffffffe",
  "parentCID=12345678",
  "CID=fffffffe",
  'ddb.geometry.cylinders = "99999999999"',
  'ddb.virtualHWVersion = "99999999999"',
  "version=3",
  "version=99",
  "",
];

/** Mutates descriptor text: tokens, lines, bytes. */
function mutateText(s: string, rand: () => number, what: string[]): string {
  const pick = <T>(a: T[]): T => a[Math.floor(rand() * a.length)];
  const lines = s.split("\n");
  const n = 1 + Math.floor(rand() * 3);
  for (let k = 0; k < n; k++) {
    if (lines.length === 0) lines.push("");
    const i = Math.floor(rand() * lines.length);
    switch (Math.floor(rand() * 7)) {
      case 0: {
        const eq = lines[i].indexOf("=");
        if (eq >= 0) lines[i] = lines[i].slice(0, eq + 1) + pick(TOKENS);
        what.push(`value@${i}`);
        break;
      }
      case 1: {
        const words = lines[i].split(" ");
        words[Math.floor(rand() * words.length)] = pick(TOKENS);
        lines[i] = words.join(" ");
        what.push(`word@${i}`);
        break;
      }
      case 2:
        lines.splice(i, 1);
        what.push(`delete@${i}`);
        break;
      case 3:
        lines.splice(i, 0, lines[i]);
        what.push(`dup@${i}`);
        break;
      case 4: {
        const at = Math.floor(rand() * (lines[i].length + 1));
        const ch = String.fromCharCode(Math.floor(rand() * 256));
        lines[i] = lines[i].slice(0, at) + ch + lines[i].slice(at + (rand() < 0.5 ? 1 : 0));
        what.push(`char@${i}`);
        break;
      }
      case 5:
        lines.splice(i, 0, pick(LINES));
        what.push(`line@${i}`);
        break;
      default:
        lines.length = Math.max(1, i);
        what.push(`cut@${i}`);
    }
  }
  return lines.join("\n");
}

function latin1(b: Uint8Array): string {
  let s = "";
  for (const x of b) s += String.fromCharCode(x);
  return s;
}

function fromLatin1(s: string): Uint8Array<ArrayBuffer> {
  return Uint8Array.from(s, (c) => c.charCodeAt(0) & 0xff);
}

/** Pokes 1-4 places of one target chosen by `rand`; returns the target's new bytes. */
function mutate(
  b: Uint8Array<ArrayBuffer>,
  t: Target,
  le: boolean,
  rand: () => number,
  what: string[],
): Uint8Array<ArrayBuffer> {
  const pick = <T>(a: T[]): T => a[Math.floor(rand() * a.length)];
  if (t.text && rand() < 0.5) {
    if (t.text === "file") return fromLatin1(mutateText(latin1(b), rand, what));
    const { start, length } = t.text;
    const region = b.subarray(start, start + length);
    const nul = region.indexOf(0);
    const text = mutateText(latin1(region.subarray(0, nul < 0 ? length : nul)), rand, what);
    region.fill(0);
    region.set(fromLatin1(text).subarray(0, length));
    return b;
  }
  if (t.regions.length === 0) return b;
  const v = dv(b);
  const n = 1 + Math.floor(rand() * 4);
  const seals = new Set<Region["seal"]>();
  for (let i = 0; i < n; i++) {
    const r = pick(t.regions);
    const kind = Math.floor(rand() * 5);
    const at = (r.start + Math.floor(rand() * Math.max(1, r.length - 8))) & (kind >= 2 ? ~3 : ~0);
    if (at + 8 > b.length) continue;
    switch (kind) {
      case 0:
        b[at] ^= 1 << Math.floor(rand() * 8);
        what.push(`flip@${at}`);
        break;
      case 1:
        b[at] = Math.floor(rand() * 256);
        what.push(`byte@${at}`);
        break;
      case 2:
        v.setUint32(at, pick(INTERESTING32), le);
        what.push(`u32@${at}`);
        break;
      case 3:
        v.setBigUint64(at, pick(INTERESTING64), le);
        what.push(`u64@${at}`);
        break;
      default: {
        // An offset within or just past the file, in bytes or sectors, aligned or not.
        const unit = rand() < 0.5 ? 512 : 1;
        const align = pick([1, 512, 4096, MiB]);
        const off = Math.floor(Math.floor(rand() * (b.length + 0x20000)) / align) * align;
        const value = Math.floor(off / unit);
        if (rand() < 0.5) v.setUint32(at, value, le);
        else v.setBigUint64(at, BigInt(value), le);
        what.push(`offset@${at}`);
      }
    }
    if (r.seal && rand() < 0.5) seals.add(r.seal);
  }
  for (const seal of seals) seal!(b);
  if (seals.size) what.push("sealed");
  return b;
}

// ---------------------------------------------------------------- samples

/** A pending log entry in the vhdx log (as the log writer leaves it before replay). */
function addVhdxLog(b: Uint8Array): Uint8Array {
  const v = dv(b);
  const K = 1024;
  const log = Number(v.getBigUint64(128 * K + 72, true));
  const guid = new Uint8Array(16).map((_, i) => i * 17 + 3);
  const entry = new Uint8Array(8192);
  const e = dv(entry);
  entry.set(new TextEncoder().encode("loge"), 0);
  e.setUint32(8, 8192, true);
  e.setBigUint64(16, 7n, true);
  e.setUint32(24, 1, true);
  entry.set(guid, 32);
  e.setBigUint64(48, BigInt(b.length), true);
  e.setBigUint64(56, BigInt(b.length), true);
  entry.set(new TextEncoder().encode("desc"), 64);
  // The entry rewrites the first BAT sector (qemu's log writes carry metadata).
  let bat = 0;
  for (let i = 0; i < v.getUint32(192 * K + 8, true); i++) {
    const r = 192 * K + 16 + 32 * i;
    if (v.getUint32(r, true) === 0x2dc27766) bat = Number(v.getBigUint64(r + 16, true));
  }
  e.setBigUint64(80, BigInt(bat), true);
  e.setBigUint64(88, 7n, true);
  entry.set(new TextEncoder().encode("data"), 4096);
  entry.set(b.subarray(bat + 8, bat + 4092), 4096 + 8);
  e.setUint32(4096 + 4092, 7, true);
  entry.set(b.subarray(bat + 4092, bat + 4096), 68);
  entry.set(b.subarray(bat, bat + 8), 72);
  e.setUint32(4, crc32c(entry), true);
  b.set(entry, log);
  const h = 128 * K;
  b.set(guid, h + 48);
  vhdxSeal(h, 4 * K)!(b);
  return b;
}

async function makeSamples(dir: string): Promise<Sample[]> {
  await sh(
    [
      "qemu-img create -q -f raw src.raw 4M",
      "qemu-io -f raw -c 'write -P 1 0 64k' -c 'write -P 2 1M 100k' -c 'write -P 3 3M 4k' src.raw >/dev/null",
      "qemu-img convert -O vmdk src.raw sparse.vmdk",
      "qemu-img create -q -f vmdk -o zeroed_grain=on zg.vmdk 4M",
      "qemu-io -f vmdk -c 'write -P 1 0 64k' -c 'write -z 1M 128k' zg.vmdk >/dev/null",
      "qemu-img convert -O vmdk -o subformat=streamOptimized src.raw stream.vmdk",
      "qemu-img create -q -f vmdk -o subformat=monolithicFlat flat.vmdk 1M",
      "qemu-io -f vmdk -c 'write -P 5 0 4k' flat.vmdk >/dev/null",
      "qemu-img convert -O vmdk -o subformat=twoGbMaxExtentSparse src.raw split.vmdk",
      "qemu-img create -q -f vmdk -b sparse.vmdk -F vmdk child.vmdk",
      "qemu-io -f vmdk -c 'write -P 9 0 4k' child.vmdk >/dev/null",
      "qemu-img convert -O vpc src.raw dyn.vhd",
      "qemu-img convert -O vpc -o subformat=fixed src.raw fixed.vhd",
      "qemu-img convert -O vhdx -o block_size=1M src.raw d.vhdx",
      "qemu-img convert -O vhdx -o subformat=fixed,block_size=1M src.raw f.vhdx",
      "qemu-img convert -O vdi src.raw d.vdi",
      "qemu-img convert -O vdi -o static=on src.raw s.vdi",
    ].join(" && "),
    dir,
  );
  const read = (name: string) => Deno.readFile(`${dir}/${name}`);
  const one = async (
    name: string,
    format: string,
    file: string,
    regions: (b: Uint8Array) => Region[],
    extra: Partial<Sample> = {},
    text?: (b: Uint8Array) => Target["text"],
  ): Promise<Sample> => {
    const b = await read(file);
    return {
      name,
      format,
      files: new Map([[file, b]]),
      targets: [{ file, regions: regions(b), text: text?.(b) }],
      littleEndian: format !== "vpc",
      ...extra,
    };
  };
  const samples = [
    await one("sparse", "vmdk", "sparse.vmdk", vmdkSparseRegions, {}, embeddedDescriptor),
    await one("zg", "vmdk", "zg.vmdk", vmdkSparseRegions, {}, embeddedDescriptor),
    await one("stream", "vmdk", "stream.vmdk", vmdkStreamRegions, {}, embeddedDescriptor),
    await one("dyn", "vpc", "dyn.vhd", vpcRegions),
    await one("fixed", "vpc", "fixed.vhd", vpcRegions),
    await one("vhdx", "vhdx", "d.vhdx", vhdxRegions),
    await one("vhdx-fixed", "vhdx", "f.vhdx", vhdxRegions),
    await one("vdi", "vdi", "d.vdi", vdiRegions),
    await one("vdi-static", "vdi", "s.vdi", vdiRegions),
  ];
  const log = addVhdxLog(await read("d.vhdx"));
  samples.push({
    name: "vhdx-log",
    format: "vhdx",
    files: new Map([["l.vhdx", log]]),
    targets: [{ file: "l.vhdx", regions: vhdxRegions(log) }],
    littleEndian: true,
    extra: [["check", "-r", "all", "l.vhdx"]],
  });
  samples.push({
    name: "flat",
    format: "vmdk",
    files: new Map([["flat.vmdk", await read("flat.vmdk")], [
      "flat-flat.vmdk",
      await read("flat-flat.vmdk"),
    ]]),
    targets: [{ file: "flat.vmdk", regions: [], text: "file" }],
    littleEndian: true,
  });
  const s001 = await read("split-s001.vmdk");
  samples.push({
    name: "split",
    format: "vmdk",
    files: new Map([["split.vmdk", await read("split.vmdk")], ["split-s001.vmdk", s001]]),
    targets: [
      { file: "split.vmdk", regions: [], text: "file" },
      { file: "split-s001.vmdk", regions: vmdkSparseRegions(s001) },
    ],
    littleEndian: true,
  });
  const child = await read("child.vmdk");
  samples.push({
    name: "child",
    format: "vmdk",
    files: new Map([["child.vmdk", child], ["sparse.vmdk", await read("sparse.vmdk")]]),
    targets: [{
      file: "child.vmdk",
      regions: vmdkSparseRegions(child),
      text: embeddedDescriptor(child),
    }],
    littleEndian: true,
  });
  return samples;
}

/** The files of case `seed` of `s`: one target mutated. */
function mutateCase(s: Sample, seed: number): { files: Map<string, Uint8Array>; what: string } {
  const rand = prng(seed * 7919 + s.name.length * 31 + s.name.charCodeAt(0));
  const files = new Map([...s.files].map(([k, v]) => [k, v.slice()]));
  const t = s.targets[Math.floor(rand() * s.targets.length)];
  const what: string[] = [t.file];
  files.set(t.file, mutate(files.get(t.file)!, t, s.littleEndian, rand, what));
  return { files, what: what.join(",") };
}

function commandsFor(s: Sample, seed: number): string[][] {
  const top = [...s.files.keys()][0];
  // Half the cases name the format, so a poked magic still reaches the driver.
  const f = seed % 2 ? ["-f", s.format] : [];
  return [
    ["info", ...f, top],
    ["info", "--output=json", ...f, top],
    ["check", ...f, top],
    ["map", "--output=json", ...f, top],
  ];
}

// ---------------------------------------------------------------- allocation guard

type Ctor = new (...args: unknown[]) => unknown;
let bigAllocation: string | undefined;

/** Replaces typed array and Array constructors with ones that note allocations above ALLOC_LIMIT. */
function guardAllocations(): () => void {
  const g = globalThis as unknown as Record<string, Ctor>;
  const names = ["ArrayBuffer", "Uint8Array", "Uint32Array", "BigUint64Array", "Array"];
  const saved = names.map((n) => g[n]);
  for (const [i, name] of names.entries()) {
    const C = saved[i] as Ctor & { BYTES_PER_ELEMENT?: number };
    g[name] = new Proxy(C, {
      construct(target, args, newTarget) {
        const n = args[0];
        const bytes = typeof n === "number" ? n * (C.BYTES_PER_ELEMENT ?? 8) : 0;
        if (bytes > ALLOC_LIMIT) bigAllocation ??= `new ${name}(${n})`;
        return Reflect.construct(target, args, newTarget);
      },
    });
  }
  return () => names.forEach((n, i) => g[n] = saved[i]);
}

// ---------------------------------------------------------------- tests

/** Runs qemu-img for at most `seconds` (exit code 124 after that), named `qimg` in its output. */
async function qemuImgWithin(seconds: number, argv: string[], cwd?: string): Promise<RunResult> {
  const r = await runProgram("timeout", [String(seconds), "qemu-img", ...argv], cwd);
  return {
    stdout: r.stdout.replaceAll("qemu-img", "qimg"),
    stderr: r.stderr.replaceAll("qemu-img", "qimg"),
    code: r.code,
  };
}

Deno.test("vmdk, vpc, vhdx and vdi commands fail cleanly on fuzzed images", async () => {
  await using dir = await tempDir();
  const samples = await makeSamples(dir.path);
  const clean = storeOf(await Deno.readFile(`${dir.path}/src.raw`));
  const failures: string[] = [];
  const stats = new Map<string, number>();
  let runs = 0;
  const restore = guardAllocations();
  try {
    for (const s of samples) {
      const started = performance.now();
      let prep = 0;
      for (let c = 0; c < CASES && failures.length < 30; c++) {
        const seed = FIRST_SEED + c;
        if (ONLY && ONLY !== `${s.name}:${seed}`) continue;
        const tm = performance.now();
        const { files: bytes, what } = mutateCase(s, seed);
        if (DUMP) {
          for (const [name, b] of bytes) await Deno.writeFile(`${DUMP}/${name}`, b);
        }
        const files = new Map<string, MemStore>([...bytes].map(([k, v]) => [k, storeOf(v)]));
        files.set("clean.raw", clean);
        prep += performance.now() - tm;
        const commands = commandsFor(s, seed);
        const top = commands[0].at(-1)!;
        const f = seed % 2 ? ["-f", s.format] : [];
        let size = -1;
        const queue = [...commands];
        for (let argv = queue.shift(); argv; argv = queue.shift()) {
          runs++;
          const id = `${s.name}:${seed} [${what}] ${argv.join(" ")}`;
          bigAllocation = undefined;
          let r: Outcome;
          const t0 = performance.now();
          try {
            r = await runIn(files, argv, 10000);
            if (VERBOSE) console.error(`${id} ${Math.round(performance.now() - t0)} ms`);
          } catch (e) {
            failures.push(`${id}: ${e}`);
            break;
          }
          const key = `${s.name} ${argv[0]} ${r.code}`;
          stats.set(key, (stats.get(key) ?? 0) + 1);
          const why = problem(argv[0], r) ??
            (bigAllocation ? `allocates ${bigAllocation}` : undefined);
          if (why) failures.push(`${id}: ${why}\n${r.err.slice(0, 1500)}`);
          if (argv[1] === "--output=json" && argv[0] === "info" && r.code === 0) {
            size = JSON.parse(r.out)["virtual-size"];
            // What copies the guest runs only where the guest is small.
            if (size <= COPY_LIMIT) {
              queue.push(
                ["convert", ...f, "-O", "raw", top, "out.raw"],
                ["compare", ...f, "-F", "raw", top, "clean.raw"],
              );
            }
            queue.push(...(s.extra ?? []));
          }
          files.delete("out.raw");
        }
      }
      if (VERBOSE) {
        console.error(
          `${s.name}: ${Math.round(performance.now() - started)} ms, ${Math.round(prep)} ms prep`,
        );
      }
    }
  } finally {
    restore();
  }
  if (VERBOSE) console.error([...stats].sort().map(([k, n]) => `${k}: ${n}`).join("\n"));
  assertTrue(runs > 0, "no cases ran");
  assertTrue(failures.length === 0, `${failures.length} failures:\n${failures.join("\n\n")}`);
  // Most pokes must get past open, or the fuzzer tests nothing but the headers.
  for (const s of samples) {
    if (ONLY) break;
    const ok = [...stats].filter(([k]) => k.startsWith(`${s.name} map 0`)).reduce(
      (a, [, n]) => a + n,
      0,
    );
    assertTrue(ok > CASES / 10, `${s.name}: only ${ok} of ${CASES} cases open`);
  }
});

Deno.test("qimg CLI fails cleanly on fuzzed images under a 256 MiB V8 heap", async () => {
  await using dir = await tempDir();
  const samples = await makeSamples(dir.path);
  const failures: string[] = [];
  for (const s of samples) {
    for (let c = 0; c < CLI_CASES; c++) {
      const seed = FIRST_SEED + 1000 + c;
      const { files, what } = mutateCase(s, seed);
      const work = `${dir.path}/${s.name}`;
      await Deno.mkdir(work, { recursive: true });
      for (const [name, b] of files) await Deno.writeFile(`${work}/${name}`, b);
      const top = [...files.keys()][0];
      for (const argv of [["info", "-f", s.format, top], ["convert", "-O", "raw", top, "o.raw"]]) {
        const started = performance.now();
        const r = await runProgram("timeout", [
          "20",
          Deno.execPath(),
          "run",
          "--no-prompt",
          "--allow-read",
          "--allow-write",
          "--v8-flags=--max-old-space-size=256",
          CLI,
          ...argv,
        ], work);
        const id = `${s.name}:${seed} [${what}] ${argv.join(" ")}`;
        const why = r.code === 124
          ? `timed out after ${Math.round(performance.now() - started)} ms`
          : problem(argv[0], { code: r.code, out: r.stdout, err: r.stderr });
        if (why) failures.push(`${id}: ${why}\n${r.stderr.slice(0, 1500)}`);
      }
    }
  }
  assertTrue(failures.length === 0, `${failures.length} failures:\n${failures.join("\n\n")}`);
});

Deno.test("vmdk, vpc, vhdx and vdi fuzzed images answer as qemu-img does", async () => {
  await using dir = await tempDir();
  const samples = await makeSamples(dir.path);
  const failures: string[] = [];
  for (const s of samples) {
    const work = `${dir.path}/${s.name}`;
    await Deno.mkdir(work);
    for (let c = 0; c < ORACLE_CASES && failures.length < 20; c++) {
      const seed = FIRST_SEED + 2000 + c;
      if (ONLY && ONLY !== `${s.name}:${seed}`) continue;
      const { files, what } = mutateCase(s, seed);
      for (const [name, b] of files) await Deno.writeFile(`${work}/${name}`, b);
      const top = `${work}/${[...files.keys()][0]}`;
      const f = seed % 2 ? ["-f", s.format] : [];
      const commands = [["info", ...f, top]];
      if (ORACLE) {
        commands.push(
          ["info", "--output=json", ...f, top],
          ["check", ...f, top],
          ["map", "--output=json", ...f, top],
        );
      }
      const out = `${work}/out.raw`;
      for (let i = 0; i < commands.length; i++) {
        const argv = commands[i];
        const io = { out: "", err: "" };
        const code = await main(argv, {
          stdout: (t) => void (io.out += t),
          stderr: (t) => void (io.err += t),
          openFile: (p, o) => DenoFile.open(p, o),
          exists: (p) => Deno.stat(p).then(() => true, () => false),
          remove: (p) => Deno.remove(p),
        }).catch((e) => reportError(e, (t) => void (io.err += t)));
        const ours = { stdout: io.out, stderr: io.err, code };
        const converting = argv[0] === "convert";
        if (converting) await Deno.rename(out, `${out}.qimg`).catch(() => {});
        // qemu-img walks a poked huge vmdk grain by grain for minutes: skip those.
        const theirs = await qemuImgWithin(10, argv);
        // 124: timed out; 134: qemu-img aborts (vmdk_get_info asserts an extent exists).
        if (theirs.code === 124 || theirs.code === 134) continue;
        if (ORACLE && argv[0] === "info" && argv[1] === "--output=json" && theirs.code === 0) {
          // What both read from a small guest must be the same bytes.
          if (JSON.parse(theirs.stdout)["virtual-size"] <= COPY_LIMIT) {
            commands.push(["convert", ...f, "-O", "raw", top, out]);
          }
        }
        if (converting && code === 0 && theirs.code === 0) {
          const [a, b] = await Promise.all([Deno.readFile(`${out}.qimg`), Deno.readFile(out)]);
          if (a.length !== b.length || a.some((x, k) => x !== b[k])) {
            failures.push(`${s.name}:${seed} [${what}] convert: the guest reads differently`);
          }
        }
        // Known, deliberate differences: qimg lists at most 65536 vdi map entries
        // past the end of the file (qemu all of them, up to 2^29 lines), and
        // prints descriptor bytes that are not UTF-8 as U+FFFD (qemu as they are).
        if (theirs.stderr.length > 65536 * 30 && ours.stdout === theirs.stdout) continue;
        if (theirs.stderr.includes("\ufffd")) continue;
        if (JSON.stringify(ours) !== JSON.stringify(theirs)) {
          failures.push(
            `${s.name}:${seed} [${what}] ${argv.join(" ")}\nqimg     ${
              JSON.stringify(ours).slice(0, 1200)
            }\nqemu-img ${JSON.stringify(theirs).slice(0, 1200)}`,
          );
        }
      }
    }
  }
  assertTrue(failures.length === 0, `${failures.length} differences:\n${failures.join("\n\n")}`);
});

Deno.test("vmdk and vhdx handle what the fuzzer found as qemu-img does", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f raw src.raw 4M && qemu-io -f raw -c 'write -P 1 0 64k' src.raw >/dev/null && " +
      "qemu-img convert -O vmdk -o subformat=twoGbMaxExtentSparse src.raw split.vmdk && " +
      "qemu-img convert -O vhdx -o block_size=1M src.raw d.vhdx && qemu-img convert -O vdi src.raw d.vdi",
    dir.path,
  );
  const path = (name: string) => `${dir.path}/${name}`;
  // vpc dynamic header and BAT offsets above 2^53, below qemu's limit: read as zeroes past the end.
  await sh("qemu-img create -q -f vpc d.vhd 4M", dir.path);
  const vhd = await Deno.readFile(path("d.vhd"));
  for (const at of [16, 512 + 16]) {
    const b = vhd.slice();
    dv(b).setBigUint64(at, 1n << 56n);
    vpcSeal(0, 512, 64)!(b);
    await Deno.writeFile(path("x.vhd"), b);
    await assertSameAsQemu(["info", "x.vhd"], dir.path);
  }
  // A vdi block map at offset 0 (the header read as the map): blocks far past the end read as zeroes.
  const vdi = await Deno.readFile(path("d.vdi"));
  dv(vdi).setUint32(340, 0, true);
  await Deno.writeFile(path("x.vdi"), vdi);
  await sh("qemu-img convert -f vdi -O raw x.vdi q.raw", dir.path);
  for (const args of [["convert", "-f", "vdi", "-O", "raw", "x.vdi", "o.raw"], ["map", "x.vdi"]]) {
    await assertSameAsQemu(args, dir.path);
  }
  await sh("cmp o.raw q.raw", dir.path);
  // An extent that is missing comes before a line sscanf runs into the next one (offset 0 on SPARSE).
  const desc = await Deno.readTextFile(path("split.vmdk"));
  await Deno.writeTextFile(
    path("split.vmdk"),
    desc.replace("# Extent description\n", '# Extent description\nRW 8 SPARSE "missing.vmdk"\n')
      .replace("# The Disk Data Base", "0 The Disk Data Base"),
  );
  await assertSameAsQemu(["info", "split.vmdk"], dir.path);
  // Flat extent offsets whose byte offsets wrap in qemu's int64 arithmetic (INT64_MAX sectors: -512).
  await sh("qemu-img create -q -f vmdk -o subformat=monolithicFlat f.vmdk 1M", dir.path);
  const flat = await Deno.readTextFile(path("f.vmdk"));
  await Deno.writeTextFile(
    path("f.vmdk"),
    flat.replace(
      /^RW 2048 FLAT "f-flat.vmdk" 0$/m,
      'RW 2048 FLAT "f-flat.vmdk" 0\nRW 2048 FLAT "f-flat.vmdk" 18446744073709551615\n' +
        'RW 2048 FLAT "f-flat.vmdk" 36028797018963968',
    ),
  );
  await assertSameAsQemu(["map", "--output=json", "f.vmdk"], dir.path);
  // Capacities past qemu's block layer limit: opened, then refused for their size.
  await sh("qemu-img create -q -f vmdk s.vmdk 1M", dir.path);
  const sparse = await Deno.readFile(path("s.vmdk"));
  for (const capacity of [1n << 54n, (1n << 64n) - 1n]) {
    dv(sparse).setBigUint64(12, capacity, true);
    await Deno.writeFile(path("x.vmdk"), sparse);
    await assertSameAsQemu(["info", "x.vmdk"], dir.path);
  }
  // Descriptor text is UTF-8 to qemu: extent and parent names with other letters open.
  await sh(
    "qemu-img create -q -f vmdk -o subformat=monolithicFlat 'диск.vmdk' 1M && " +
      "qemu-img create -q -f vmdk -b 'диск.vmdk' -F vmdk 'ребёнок.vmdk'",
    dir.path,
  );
  await assertSameAsQemu(["info", "--backing-chain", "ребёнок.vmdk"], dir.path);

  // Metadata and BAT regions ending just within and just past qemu's block layer limit (EINVAL / EIO).
  const plain = await Deno.readFile(path("d.vhdx"));
  for (const [guid, length] of [[0x8b7ca206, 65536], [0x2dc27766, MiB]]) {
    for (const over of [0n, 1n]) {
      const b = plain.slice();
      const r = 192 * 1024;
      for (let i = 0; i < dv(b).getUint32(r + 8, true); i++) {
        const e = r + 16 + 32 * i;
        if (dv(b).getUint32(e, true) !== guid) continue;
        dv(b).setBigUint64(e + 16, (1n << 63n) - (1n << 30n) - BigInt(length) + over, true);
      }
      vhdxSeal(r, 65536)!(b);
      await Deno.writeFile(path("x.vhdx"), b);
      await assertSameAsQemu(["info", "x.vhdx"], dir.path);
    }
  }

  const clean = addVhdxLog(await Deno.readFile(path("d.vhdx")));
  const log = Number(dv(clean).getBigUint64(128 * 1024 + 72, true));
  const cases: [string, (b: Uint8Array) => Uint8Array][] = [
    // A descriptor whose file offset is not sector-aligned: an invalid log, even read-only.
    ["unaligned descriptor offset", (b) => {
      dv(b).setBigUint64(log + 80, 0xffffffffn, true);
      vhdxSeal(log, 0, 4, 8)!(b);
      return b;
    }],
    // A 32 MiB entry in a 64 MiB log, most of it past the end of the file: read sector by sector.
    ["entry running past the end of the file", (b) => {
      const size = 32 * MiB;
      dv(b).setUint32(128 * 1024 + 68, 2 * size, true);
      vhdxSeal(128 * 1024, 4096)!(b);
      dv(b).setUint32(log + 8, size, true);
      const whole = new Uint8Array(log + size);
      whole.set(b);
      vhdxSeal(log, size)!(whole);
      return whole.slice(0, b.length);
    }],
  ];
  for (const [what, poke] of cases) {
    await Deno.writeFile(path("x.vhdx"), poke(clean.slice()));
    await Deno.copyFile(path("x.vhdx"), path("y.vhdx"));
    if (DUMP) await Deno.copyFile(path("x.vhdx"), `${DUMP}/${what.replaceAll(" ", "-")}.vhdx`);
    for (const args of [["info", "x.vhdx"], ["map", "--output=json", "x.vhdx"]]) {
      await assertSameAsQemu(args, dir.path).catch((e) => {
        throw new Error(`${what}: ${e.message}`);
      });
    }
    const ours = await runProgram(Deno.execPath(), [
      "run",
      "-A",
      CLI,
      "check",
      "-r",
      "all",
      "x.vhdx",
    ], dir.path);
    const theirs = await qemuImgWithin(60, ["check", "-r", "all", "y.vhdx"], dir.path);
    assertEquals(
      { ...ours, stderr: ours.stderr.replaceAll("x.vhdx", "y.vhdx") },
      theirs,
      what,
    );
  }
  // An entry as long as the whole log with a bad checksum: qemu reads it again and again
  // forever (the next read is where it started); qimg ends its scan there.
  const b = clean.slice();
  dv(b).setUint32(log + 8, dv(b).getUint32(128 * 1024 + 68, true), true);
  await Deno.writeFile(path("x.vhdx"), b);
  const r = await runIn(new Map([["x.vhdx", storeOf(b)]]), ["info", "x.vhdx"], 10000);
  assertEquals(r.code, 0, r.err);
  assertTrue(problem("info", r) === undefined, r.err);
});
