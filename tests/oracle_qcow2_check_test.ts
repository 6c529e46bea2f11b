/**
 * qcow2 check against Debian's qemu-img: clean images of every shape, then
 * the same images with metadata poked (refcounts, L1/L2 entries, refcount
 * table, snapshot table, OFLAG_COPIED): stdout, stderr and exit code, human
 * and JSON.
 */

import { assertEquals } from "./_assert.ts";
import { assertSameAsQemu, qemuImg, qimg, sh, tempDir } from "./_util.ts";

/** Where an image's metadata lives, read from its header. */
export interface Layout {
  cs: number;
  l1: number;
  l1Size: number;
  reftable: number;
  snapshots: number;
  refcountOrder: number;
  /** Host offset of L2 table `i` (0: none). */
  l2(i: number): number;
  /** Host offset of refcount block `i` (0: none). */
  refblock(i: number): number;
}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** Reads the layout of a qcow2 image in `b`. */
export function layout(b: Uint8Array): Layout {
  const v = view(b);
  const cs = 2 ** v.getUint32(20);
  const l1 = Number(v.getBigUint64(40));
  const reftable = Number(v.getBigUint64(48));
  const version = v.getUint32(4);
  return {
    cs,
    l1,
    l1Size: v.getUint32(36),
    reftable,
    snapshots: Number(v.getBigUint64(64)),
    refcountOrder: version === 3 ? v.getUint32(96) : 4,
    l2: (i) => Number(v.getBigUint64(l1 + 8 * i) & 0x00fffffffffffe00n),
    refblock: (i) => Number(v.getBigUint64(reftable + 8 * i) & ~0x1ffn),
  };
}

export function set64(b: Uint8Array, offset: number, value: bigint | number): void {
  view(b).setBigUint64(offset, BigInt(value));
}

export function get64(b: Uint8Array, offset: number): bigint {
  return view(b).getBigUint64(offset);
}

export function set32(b: Uint8Array, offset: number, value: number): void {
  view(b).setUint32(offset, value);
}

export function set16(b: Uint8Array, offset: number, value: number): void {
  view(b).setUint16(offset, value);
}

/** Sets the 16-bit refcount of cluster `index` (refcount_bits=16, first refblock). */
function setRefcount16(b: Uint8Array, g: Layout, index: number, value: number): void {
  set16(b, g.refblock(0) + 2 * index, value);
}

type Poke = (b: Uint8Array, g: Layout) => Uint8Array | void;

/** Runs check (human and JSON) on `base` poked by each case, as qemu-img. */
async function assertChecksLikeQemu(
  dir: string,
  base: string,
  cases: [string, Poke][],
): Promise<void> {
  const clean = await Deno.readFile(`${dir}/${base}`);
  for (const [what, pokeFn] of cases) {
    const b = clean.slice();
    const out = pokeFn(b, layout(b)) ?? b;
    await Deno.writeFile(`${dir}/x.qcow2`, out);
    for (const args of [["check", "x.qcow2"], ["check", "--output=json", "x.qcow2"]]) {
      await assertSameAsQemu(args, dir).catch((e) => {
        throw new Error(`${base}: ${what}: ${e.message}`);
      });
    }
  }
}

const WRITES = "-c 'write -P 0x11 0 64k' -c 'write -P 0x22 200k 8k' -c 'write -z 1M 128k' " +
  "-c 'write -P 0x33 3M 1M' -c 'write -c -P 0x44 5M 64k' -c 'discard 3M 64k'";

Deno.test("Qcow2Image.check() reports clean images as qemu-img check", async () => {
  await using dir = await tempDir();
  await sh(
    [
      "qemu-img create -q -f qcow2 plain.qcow2 16M",
      "qemu-img create -q -f qcow2 empty.qcow2 0",
      `qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 16M && qemu-io -f qcow2 ${WRITES} v2.qcow2`,
      `qemu-img create -q -f qcow2 -o cluster_size=512 c512.qcow2 16M && qemu-io -f qcow2 ${WRITES} c512.qcow2`,
      `qemu-img create -q -f qcow2 -o extended_l2=on ext.qcow2 16M && qemu-io -f qcow2 ${WRITES} -c 'write -P 7 8M 4k' ext.qcow2`,
      `qemu-img create -q -f qcow2 -o refcount_bits=1 r1.qcow2 16M && qemu-io -f qcow2 ${WRITES} r1.qcow2`,
      `qemu-img create -q -f qcow2 -o refcount_bits=64 r64.qcow2 16M && qemu-io -f qcow2 ${WRITES} r64.qcow2`,
      `qemu-img create -q -f qcow2 -o compression_type=zstd zstd.qcow2 16M && qemu-io -f qcow2 ${WRITES} zstd.qcow2`,
      `qemu-img create -q -f qcow2 snap.qcow2 16M && qemu-io -f qcow2 ${WRITES} snap.qcow2`,
      "qemu-img snapshot -c one snap.qcow2",
      "qemu-io -f qcow2 -c 'write -P 0x55 0 128k' snap.qcow2",
      "qemu-img snapshot -c two snap.qcow2",
      `qemu-img create -q -f qcow2 bm.qcow2 16M && qemu-io -f qcow2 ${WRITES} bm.qcow2`,
      "qemu-img bitmap --add bm.qcow2 b0 && qemu-img bitmap --add -g 128k bm.qcow2 b1",
      "qemu-img create -q -f qcow2 -b v2.qcow2 -F qcow2 over.qcow2",
      "qemu-io -f qcow2 -c 'write -P 9 64k 64k' over.qcow2",
      "qemu-img create -q -f qcow2 -o data_file=df.raw df.qcow2 4M",
      "qemu-io -f qcow2 -c 'write -P 3 0 128k' -c 'write -z 1M 64k' df.qcow2",
    ].join(" >/dev/null && ") + " >/dev/null",
    dir.path,
  );
  for (
    const name of [
      "plain",
      "empty",
      "v2",
      "c512",
      "ext",
      "r1",
      "r64",
      "zstd",
      "snap",
      "bm",
      "over",
      "df",
    ]
  ) {
    await assertSameAsQemu(["check", `${name}.qcow2`], dir.path);
    await assertSameAsQemu(["check", "--output=json", `${name}.qcow2`], dir.path);
    await assertSameAsQemu(["check", "-q", `${name}.qcow2`], dir.path);
  }
});

Deno.test("Qcow2Image.check() reports poked refcounts, tables and flags as qemu-img check", async () => {
  await using dir = await tempDir();
  await sh(
    `qemu-img create -q -f qcow2 a.qcow2 16M && qemu-io -f qcow2 ${WRITES} a.qcow2 >/dev/null && ` +
      "qemu-img snapshot -c one a.qcow2 && qemu-io -f qcow2 -c 'write -P 0x66 0 64k' a.qcow2 >/dev/null",
    dir.path,
  );
  await assertChecksLikeQemu(dir.path, "a.qcow2", [
    ["leaked cluster past the data", (b, g) => {
      const grown = new Uint8Array(b.length + g.cs);
      grown.set(b);
      setRefcount16(grown, g, b.length / g.cs, 1);
      return grown;
    }],
    ["refcount too high", (b, g) => setRefcount16(b, g, g.l2(0) / g.cs, 5)],
    ["refcount zero on the L2 table", (b, g) => setRefcount16(b, g, g.l2(0) / g.cs, 0)],
    ["refcount zero on a data cluster", (b, g) => {
      const data = Number(get64(b, g.l2(0)) & 0x00fffffffffffe00n);
      setRefcount16(b, g, data / g.cs, 0);
    }],
    ["refcount zero on the header", (b, g) => setRefcount16(b, g, 0, 0)],
    ["L1 entry unaligned", (b, g) => set64(b, g.l1, get64(b, g.l1) + 512n)],
    ["L1 entry with reserved bits", (b, g) => set64(b, g.l1, get64(b, g.l1) | 1n)],
    ["L1 entry past the end of the file", (b, g) => set64(b, g.l1, (1n << 63n) | 0x40000000n)],
    ["L1 entry without COPIED", (b, g) => set64(b, g.l1, get64(b, g.l1) & ~(1n << 63n))],
    ["L2 entry with reserved bits", (b, g) => set64(b, g.l2(0), get64(b, g.l2(0)) | 2n)],
    ["L2 entry unaligned", (b, g) => set64(b, g.l2(0), get64(b, g.l2(0)) + 512n)],
    ["L2 entry unaligned zero cluster", (b, g) => set64(b, g.l2(0), get64(b, g.l2(0)) + 513n)],
    ["L2 entry past the end of the file", (b, g) => set64(b, g.l2(0) + 8, 0x40000000n)],
    ["L2 entry with COPIED set on a shared cluster", (b, g) => {
      set64(b, g.l2(0) + 16, get64(b, g.l2(0)));
    }],
    ["L2 entry compressed with COPIED", (b, g) => {
      const i = (5 << 20) / g.cs;
      set64(b, g.l2(0) + 8 * i, get64(b, g.l2(0) + 8 * i) | (1n << 63n));
    }],
    ["L2 entry compressed past the end", (b, g) => {
      const i = (5 << 20) / g.cs;
      set64(b, g.l2(0) + 8 * i, (1n << 62n) | 0x7000000n);
    }],
    ["refcount table entry unaligned", (b, g) => set64(b, g.reftable, g.refblock(0) + 512)],
    ["refcount table entry with reserved bits", (b, g) => set64(b, g.reftable, g.refblock(0) + 1)],
    ["refcount table entry outside the image", (b, g) => set64(b, g.reftable + 8, 0x10000000)],
    ["refcount table entry far outside", (b, g) => set64(b, g.reftable + 8, 1n << 62n)],
    ["refcount table entry pointing at the L1 table", (b, g) => set64(b, g.reftable + 8, g.l1)],
    ["refcount block shared with the refcount table", (b, g) => set64(b, g.reftable, g.reftable)],
    ["refcount table empty", (b, g) => set64(b, g.reftable, 0)],
    ["snapshot L1 unaligned", (b, g) => set64(b, g.snapshots, get64(b, g.snapshots) + 8n)],
    ["snapshot L1 too large", (b, g) => set32(b, g.snapshots + 8, 0x1000000)],
    ["snapshot L1 past the end", (b, g) => set64(b, g.snapshots, 0x100000000n)],
    ["snapshot extra data incomplete", (b, g) => set32(b, g.snapshots + 36, 8)],
    ["snapshot table past the end", (b) => set64(b, 64, 0x100000000n)],
    ["snapshot count raised", (b) => set32(b, 60, 2)],
  ]);
});

Deno.test("Qcow2Image.check() finds refcount overflow and misplaced tables as qemu-img check", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 -o refcount_bits=1 r1.qcow2 4M && " +
      "qemu-io -f qcow2 -c 'write -P 1 0 128k' r1.qcow2 >/dev/null && " +
      `qemu-img create -q -f qcow2 -o extended_l2=on ext.qcow2 4M && qemu-io -f qcow2 -c 'write -P 1 0 68k' ext.qcow2 >/dev/null`,
    dir.path,
  );
  await assertChecksLikeQemu(dir.path, "r1.qcow2", [
    ["two L2 entries to one cluster", (b, g) => set64(b, g.l2(0) + 8, get64(b, g.l2(0)))],
    ["L1 pointing at the header", (b, g) => set64(b, g.l1 + 8, 1n << 63n)],
  ]);
  await assertChecksLikeQemu(dir.path, "ext.qcow2", [
    ["allocated and zero bits both set", (b, g) => set32(b, g.l2(0) + 8, 1)],
    ["unallocated cluster with allocation bits", (b, g) => set32(b, g.l2(0) + 16 * 5 + 12, 1)],
    ["compressed cluster with a bitmap", (b, g) => {
      set64(b, g.l2(0) + 16 * 6, (1n << 62n) | BigInt(g.l2(0)));
      set32(b, g.l2(0) + 16 * 6 + 12, 1);
    }],
  ]);
});

Deno.test("Qcow2Image.check() on images with an external data file matches qemu-img check", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 -o data_file=d.raw df.qcow2 4M && " +
      "qemu-io -f qcow2 -c 'write -P 3 0 128k' df.qcow2 >/dev/null",
    dir.path,
  );
  await assertChecksLikeQemu(dir.path, "df.qcow2", [
    ["compressed entry", (b, g) => set64(b, g.l2(0) + 8, (1n << 62n) | 0x10000n)],
    ["offset 0 with COPIED", (b, g) => set64(b, g.l2(0) + 16, 1n << 63n)],
    ["data entry without COPIED", (b, g) => set64(b, g.l2(0), get64(b, g.l2(0)) & ~(1n << 63n))],
    ["a snapshot", (b, g) => {
      set32(b, 60, 1);
      set64(b, 64, g.cs * 2);
    }],
  ]);
});

Deno.test("check -r on qcow2 matches qemu-img with nothing to repair and with a leak", async () => {
  await using dir = await tempDir();
  await sh(
    `qemu-img create -q -f qcow2 a.qcow2 4M && qemu-io -f qcow2 -c 'write -P 1 0 128k' a.qcow2 >/dev/null`,
    dir.path,
  );
  for (const mode of ["leaks", "all"]) {
    await assertSameAsQemu(["check", "-r", mode, "a.qcow2"], dir.path);
    await assertSameAsQemu(["check", "-r", mode, "--output=json", "a.qcow2"], dir.path);
  }
  const b = await Deno.readFile(`${dir.path}/a.qcow2`);
  const grown = new Uint8Array(b.length + 65536);
  grown.set(b);
  setRefcount16(grown, layout(grown), b.length / 65536, 1);
  await Deno.writeFile(`${dir.path}/a.qcow2`, grown);
  // Now a leak to repair: qimg and qemu-img each repair an identical copy.
  await sh("cp a.qcow2 b.qcow2", dir.path);
  const r = await qimg(["check", "-r", "leaks", "a.qcow2"], dir.path);
  const q = await qemuImg(["check", "-r", "leaks", "b.qcow2"], dir.path);
  assertEquals([r.stdout, r.stderr, r.code], [q.stdout, q.stderr, q.code]);
});
