/**
 * Hostile qcow2 headers: one field poked at a time into images made by
 * qemu-img; qimg must refuse (or accept) each exactly as qemu-img info does,
 * with its message and exit code, quickly and without a stack trace.
 */

import { assertEquals, assertTrue } from "./_assert.ts";
import { assertSameAsQemu, brokenCompressedQcow2, qemuImg, qimg, sh, tempDir } from "./_util.ts";

/** One poke: big-endian `value` of `type` (B, H, I, Q) at `offset`. */
type Poke = [offset: number, type: "B" | "I" | "Q", value: bigint | number];

function poke(b: Uint8Array, [offset, type, value]: Poke): void {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  if (type === "B") v.setUint8(offset, Number(value));
  else if (type === "I") v.setUint32(offset, Number(value));
  else v.setBigUint64(offset, BigInt(value));
}

/** Header pokes on a plain v3 image (feature name table at 0x70). */
const PLAIN: [string, Poke[]][] = [
  ["version 4", [[4, "I", 4]]],
  ["version 0xffffffff", [[4, "I", 0xffffffff]]],
  ["cluster_bits 8", [[20, "I", 8]]],
  ["cluster_bits 22", [[20, "I", 22]]],
  ["cluster_bits 21", [[20, "I", 21]]],
  ["cluster_bits 9", [[20, "I", 9]]],
  ["huge l1_size", [[36, "I", 0x7fffffff]]],
  ["l1_size 0x400001", [[36, "I", 0x400001]]],
  ["l1_size 0", [[36, "I", 0]]],
  ["l1_size larger than needed", [[36, "I", 8]]],
  ["misaligned l1_table_offset", [[40, "Q", 0x30001]]],
  ["l1_table_offset near 2^63", [[40, "Q", 0x7fffffffffff0000n]]],
  ["l1_table_offset past the end of the file", [[40, "Q", 0x100000000n]]],
  ["refcount_order 7", [[96, "I", 7]]],
  ["refcount_order 0", [[96, "I", 0]]],
  ["header_length 50", [[100, "I", 50]]],
  ["header_length 104", [[100, "I", 104]]],
  ["header_length past the cluster", [[100, "I", 0x20000]]],
  ["header_length 200", [[100, "I", 200]]],
  ["unknown incompatible bit 8", [[72, "Q", 0x100]]],
  ["unknown incompatible bit 63", [[72, "Q", 0x8000000000000000n]]],
  ["named and unknown incompatible bits", [[0x79, "B", 8], [72, "Q", 0x301]]],
  ["dirty bit", [[72, "Q", 1]]],
  ["corrupt bit", [[72, "Q", 2]]],
  ["data file bit without a data file", [[72, "Q", 4]]],
  ["compression bit with zlib", [[72, "Q", 8]]],
  ["extended L2 bit with 64k clusters", [[72, "Q", 0x10]]],
  ["extended L2 bit with 8k clusters", [[72, "Q", 0x10], [20, "I", 13]]],
  ["refcount table near 2^63", [[48, "Q", 0x7fffffffffff0000n]]],
  ["refcount table far past the end of the file", [[48, "Q", 0xa80000010000n]]],
  // Exact digits above 2^53 (shortest round-trip digits would end in 5000).
  ["2 MiB clusters, size above 2^53", [
    [20, "I", 21],
    [36, "I", 0x400000],
    [24, "Q", 0x0800000000000600n],
    [48, "Q", 0],
    [40, "Q", 0x200000],
  ]],
  ["zstd without the compression bit", [[104, "B", 1]]],
  ["compression type 2", [[104, "B", 2]]],
  ["compression type 2 in a short header", [[104, "B", 2], [100, "I", 104]]],
  ["lazy refcounts bit", [[80, "Q", 1]]],
  ["unknown compatible and autoclear bits", [[80, "Q", 0xf0], [88, "Q", 0xf0]]],
  ["no refcount table", [[56, "I", 0]]],
  ["huge refcount table", [[56, "I", 0x7fffffff]]],
  ["misaligned refcount table", [[48, "Q", 5]]],
  ["too many snapshots", [[60, "I", 70000]]],
  ["misaligned snapshot table", [[64, "Q", 3]]],
  ["backing file offset past the cluster", [[8, "Q", 0x20000]]],
  ["crypt method 3", [[32, "I", 3]]],
  ["crypt method aes", [[32, "I", 1]]],
  ["size 2^64-1", [[24, "Q", 0xffffffffffffffffn]]],
  ["size 2^63-1", [[24, "Q", 0x7fffffffffffffffn]]],
  ["size not a multiple of 512", [[24, "Q", 1000000]]],
  ["size 0", [[24, "Q", 0]]],
  ["extension too large", [[0x74, "I", 0x10000]]],
  ["extension length just past the end", [[0x74, "I", 0xff88]]],
  ["feature table with a partial entry", [[0x74, "I", 50], [72, "Q", 0x10000]]],
];

/** Pokes on an overlay whose backing format extension is at 0x70 and backing name at 0x210. */
const OVERLAY: [string, Poke[]][] = [
  ["backing format length 16", [[0x74, "I", 16]]],
  ["backing format length 0", [[0x74, "I", 0]]],
  ["bitmaps extension of the wrong length", [[0x70, "I", 0x23852875]]],
  ["bitmaps extension with a reserved field", [[0x70, "I", 0x23852875], [0x74, "I", 24], [
    88,
    "Q",
    1,
  ]]],
  ["bitmaps extension with zero bitmaps", [
    [0x70, "I", 0x23852875],
    [0x74, "I", 24],
    [88, "Q", 1],
    [0x78, "Q", 0],
    [0x80, "Q", 0],
    [0x88, "Q", 0],
  ]],
  ["bitmaps extension with too many bitmaps", [
    [0x70, "I", 0x23852875],
    [0x74, "I", 24],
    [88, "Q", 1],
    [0x78, "Q", 0x0001000000000000n],
    [0x80, "Q", 0],
    [0x88, "Q", 0],
  ]],
  ["bitmaps extension with a misaligned directory", [
    [0x70, "I", 0x23852875],
    [0x74, "I", 24],
    [88, "Q", 1],
    [0x78, "Q", 0x0000000100000000n],
    [0x80, "Q", 0x100],
    [0x88, "Q", 0x10001],
  ]],
  ["bitmaps extension with a huge directory", [
    [0x70, "I", 0x23852875],
    [0x74, "I", 24],
    [88, "Q", 1],
    [0x78, "Q", 0x0000000100000000n],
    [0x80, "Q", 0x10000000],
    [0x88, "Q", 0x10000],
  ]],
  ["crypto extension without LUKS", [[0x70, "I", 0x0537be77]]],
  ["unknown extension", [[0x70, "I", 0x12345678]]],
  ["data file name extension", [[0x70, "I", 0x44415441]]],
  ["backing file name too long", [[16, "I", 1024]]],
  ["backing file name of 1023 bytes", [[16, "I", 1023]]],
  ["backing file name empty", [[16, "I", 0]]],
  ["backing file offset 0", [[8, "Q", 0]]],
];

async function runCases(base: string, cases: [string, Poke[]][], dir: string): Promise<void> {
  const clean = await Deno.readFile(`${dir}/${base}`);
  for (const [what, pokes] of cases) {
    const b = clean.slice();
    for (const p of pokes) poke(b, p);
    await Deno.writeFile(`${dir}/x.qcow2`, b);
    const started = performance.now();
    const r = await assertSameAsQemu(["info", "x.qcow2"], dir).catch((e) => {
      throw new Error(`${what}: ${e.message}`);
    });
    assertTrue(performance.now() - started < 10000, `${what}: too slow`);
    assertTrue(!r.stderr.includes("    at "), `${what}: stack trace`);
    await assertSameAsQemu(["info", "--output=json", "x.qcow2"], dir);
  }
}

Deno.test("qcow2Driver refuses poked header fields as qemu-img info does", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f qcow2 base.qcow2 1G", dir.path);
  await runCases("base.qcow2", PLAIN, dir.path);
});

Deno.test("qcow2Driver refuses poked header extensions as qemu-img info does", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 base.qcow2 1G && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 ov.qcow2",
    dir.path,
  );
  await runCases("ov.qcow2", OVERLAY, dir.path);
});

Deno.test("qcow2Driver handles truncated and forced-format files as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 base.qcow2 1G && head -c 100 base.qcow2 > h100.qcow2 && " +
      "head -c 112 base.qcow2 > h112.qcow2 && head -c 600 base.qcow2 > h600.qcow2 && " +
      "head -c 7 base.qcow2 > h7.qcow2 && qemu-img create -q -f raw r.raw 1M && " +
      // seven bytes whose missing eighth makes version 0x300
      "printf 'QFI\\373\\0\\0\\3' > v7.img",
    dir.path,
  );
  for (
    const args of [
      ["info", "h100.qcow2"],
      ["info", "h112.qcow2"],
      ["info", "h600.qcow2"],
      ["info", "h7.qcow2"],
      ["info", "v7.img"],
      ["info", "-f", "qcow2", "r.raw"],
    ]
  ) await assertSameAsQemu(args, dir.path);
});

Deno.test("qcow2Driver read errors on corrupt L2 metadata fail without a stack trace", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 a.qcow2 1M && qemu-io -c 'write -P 1 0 64k' a.qcow2 >/dev/null",
    dir.path,
  );
  const b = await Deno.readFile(`${dir.path}/a.qcow2`);
  const view = new DataView(b.buffer);
  const l1 = Number(view.getBigUint64(40));
  // L1 entry 0 -> an unaligned L2 table offset.
  view.setBigUint64(l1, view.getBigUint64(l1) | 0x200n);
  await Deno.writeFile(`${dir.path}/a.qcow2`, b);
  const { openImageChain } = await import("../src/image.ts");
  const image = await openImageChain(`${dir.path}/a.qcow2`);
  try {
    let message = "";
    try {
      await image.read(0, new Uint8Array(512));
    } catch (e) {
      message = (e as Error).message;
    }
    assertEquals(message, "Input/output error");
  } finally {
    await image.close();
  }
});

Deno.test("qcow2Driver checks the bitmap directory at open as qemu-img info does", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 bm.qcow2 10M && qemu-img bitmap --add bm.qcow2 b1 && " +
      "qemu-img bitmap --add -g 128k --disable bm.qcow2 second",
    dir.path,
  );
  const clean = await Deno.readFile(`${dir.path}/bm.qcow2`);
  const v = new DataView(clean.buffer);
  // Find the bitmaps extension after the header; its fields locate the directory.
  let ext = 104;
  while (v.getUint32(ext) !== 0x23852875) ext += 8 + ((v.getUint32(ext + 4) + 7) & ~7);
  const d = Number(v.getBigUint64(ext + 24));
  const cases: [string, Poke[]][] = [
    ["fewer bitmaps in the header", [[ext + 8, "I", 1]]],
    ["more bitmaps in the header", [[ext + 8, "I", 3]]],
    ["empty directory", [[ext + 16, "Q", 0]]],
    ["directory cut short", [[ext + 16, "Q", 20]]],
    ["extra data", [[d + 20, "I", 8]]],
    ["granularity 2^8", [[d + 17, "B", 8]]],
    ["granularity 2^31", [[d + 17, "B", 31]]],
    ["bitmap type 2", [[d + 16, "B", 2]]],
    ["reserved flag", [[d + 12, "I", 8]]],
    ["in-use flag", [[d + 12, "I", 3]]],
    ["empty bitmap table", [[d + 8, "I", 0]]],
    ["misaligned bitmap table", [[d, "Q", 0x10001]]],
    // name_size (u16) 1000 and extra_data_size kept 0
    ["name past the directory", [[d + 18, "I", 1000 << 16]]],
  ];
  await Deno.writeFile(`${dir.path}/base.qcow2`, clean);
  await runCases("base.qcow2", cases, dir.path);
});

Deno.test("qcow2Driver reads clusters mapped far past the end of the file as zeroes, as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 a.qcow2 1M && qemu-io -c 'write -P 1 0 128k' a.qcow2 >/dev/null",
    dir.path,
  );
  const b = await Deno.readFile(`${dir.path}/a.qcow2`);
  const view = new DataView(b.buffer);
  const l2 = Number(view.getBigUint64(Number(view.getBigUint64(40))) & 0x00fffffffffffe00n);
  // Second cluster: keep the COPIED flag, move it far past the end (but below 2^53).
  view.setBigUint64(l2 + 8, (1n << 63n) | 0xa80000010000n);
  await Deno.writeFile(`${dir.path}/a.qcow2`, b);
  await assertSameAsQemu(["map", "--output=json", "a.qcow2"], dir.path);
  await assertSameAsQemu(["convert", "-O", "raw", "a.qcow2", "out.raw"], dir.path);
  await sh("qemu-img convert -O raw a.qcow2 ref.raw && cmp ref.raw out.raw", dir.path);
});

Deno.test("qcow2Driver refuses to open a corrupt-flagged image for writing, as qemu-img", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f qcow2 c.qcow2 1G", dir.path);
  const b = await Deno.readFile(`${dir.path}/c.qcow2`);
  poke(b, [72, "Q", 2]);
  await Deno.writeFile(`${dir.path}/c.qcow2`, b);
  for (
    const args of [
      ["resize", "c.qcow2", "+1M"],
      ["commit", "c.qcow2"],
      ["amend", "-o", "lazy_refcounts=on", "c.qcow2"],
      ["info", "c.qcow2"],
    ]
  ) await assertSameAsQemu(args, dir.path);
});

Deno.test("qcow2Driver fails undecodable compressed clusters with EIO, as qemu-img convert", async () => {
  await using dir = await tempDir();
  await brokenCompressedQcow2(dir.path);
  await assertSameAsQemu(["convert", "-O", "raw", "c.qcow2", "out.raw"], dir.path);
});

Deno.test("qcow2Driver reports corrupt L2 metadata as qemu's corruption event, then EIO", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 -o extended_l2=on e.qcow2 1M && " +
      "qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 128k 64k' e.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 p.qcow2 1M && qemu-io -c 'write -P 1 0 64k' p.qcow2 >/dev/null",
    dir.path,
  );
  const variants: [string, string, (v: DataView, l1: number, l2: number) => void][] = [
    ["p.qcow2", "unaligned L2 table", (v, l1) => v.setBigUint64(l1, v.getBigUint64(l1) | 0x200n)],
    ["e.qcow2", "subcluster both allocated and zero", (v, _l1, l2) => {
      v.setBigUint64(l2 + 8, v.getBigUint64(l2 + 8) | (1n << 32n));
    }],
    ["e.qcow2", "unaligned data cluster", (v, _l1, l2) => {
      v.setBigUint64(l2 + 32, v.getBigUint64(l2 + 32) + 0x200n);
    }],
    ["e.qcow2", "allocation bit in an unallocated cluster", (v, _l1, l2) => {
      v.setBigUint64(l2 + 24, 1n);
    }],
  ];
  for (const [base, what, mutate] of variants) {
    const b = await Deno.readFile(`${dir.path}/${base}`);
    const v = new DataView(b.buffer);
    const l1 = Number(v.getBigUint64(40));
    const l2 = Number(v.getBigUint64(l1) & 0x00fffffffffffe00n);
    mutate(v, l1, l2);
    await Deno.writeFile(`${dir.path}/x.qcow2`, b);
    await assertSameAsQemu(["convert", "-O", "raw", "x.qcow2", "out.raw"], dir.path).catch((e) => {
      throw new Error(`${what}: ${e.message}`);
    });
  }
});

Deno.test("qcow2Driver warns about bitmaps left stale by a program without bitmap support", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 a.qcow2 1M && qemu-img bitmap --add a.qcow2 b1",
    dir.path,
  );
  const b = await Deno.readFile(`${dir.path}/a.qcow2`);
  poke(b, [88, "Q", 0]); // autoclear bitmaps bit cleared
  await Deno.writeFile(`${dir.path}/a.qcow2`, b);
  for (const args of [["info", "a.qcow2"], ["convert", "-O", "raw", "a.qcow2", "o.raw"]]) {
    const ours = await qimg(args, dir.path);
    const theirs = await qemuImg(args, dir.path);
    // qemu ends the warning without a newline; qimg's warnings are whole lines.
    assertEquals(
      { ...ours, stderr: ours.stderr.trimEnd() },
      { ...theirs, stderr: theirs.stderr.trimEnd() },
    );
  }
});

Deno.test("qcow2Driver checks the LUKS header at open as qemu-img info does", async () => {
  await using dir = await tempDir();
  // qemu's PBKDF benchmark sometimes fails on a busy machine: try a few times.
  await sh(
    "for i in 1 2 3 4 5 6; do qemu-img create -q -f qcow2 --object secret,id=s0,data=x " +
      "-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=50 base.qcow2 1M 2>/dev/null && exit 0; done; exit 1",
    dir.path,
  );
  const clean = await Deno.readFile(`${dir.path}/base.qcow2`);
  const v = new DataView(clean.buffer);
  let ext = 104;
  while (v.getUint32(ext) !== 0x0537be77) ext += 8 + ((v.getUint32(ext + 4) + 7) & ~7);
  const h = Number(v.getBigUint64(ext + 8));
  const text = (at: number, s: string, width: number): Poke[] =>
    [...new TextEncoder().encode(s.padEnd(width, "\0"))].map((c, i) => [at + i, "B", c]);
  const cases: [string, Poke[]][] = [
    ["extension length 8", [[ext + 4, "I", 8]]],
    ["header offset not cluster aligned", [[ext + 8, "Q", h + 512]]],
    ["header length below a LUKS header", [[ext + 16, "Q", 100]]],
    ["bad magic", [[h, "B", 0]]],
    ["LUKS version 2", [[h + 6, "B", 2]]],
    ["unknown cipher", text(h + 8, "foo", 4)],
    ["odd key size", [[h + 108, "I", 7]]],
    ["unknown hash", text(h + 72, "md9", 8)],
    ["sha1 hash", text(h + 72, "sha1", 8)],
    ["twofish", text(h + 8, "twofish", 8)],
    ["cbc-essiv mode", text(h + 40, "cbc-essiv:sha256", 32)],
    ["keyslot 3 stripes", [[h + 208 + 3 * 48 + 44, "I", 7]]],
  ];
  await runCases("base.qcow2", cases, dir.path);
});
