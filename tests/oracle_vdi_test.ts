/**
 * vdi against Debian's qemu-img: dynamic and static images made by
 * qemu-img and qemu-io read by qimg; images qimg creates and writes
 * (create, convert) read back and checked by qemu-img; info, map and check
 * output; created files byte-identical except the two random header UUIDs;
 * hostile headers and block maps.
 */

import { assertEquals } from "./_assert.ts";
import {
  assertReadsLikeQemu,
  assertSameAsQemu,
  GUEST_WRITES,
  le32,
  le64,
  qimg,
  sh,
  tempDir,
} from "./_util.ts";
import { openVdi, parseVdiHeader } from "../src/vdi.ts";
import { DenoFile } from "../src/file.ts";

/** Header bytes of the image and last-snapshot UUIDs (random at creation). */
const UUIDS: [number, number] = [392, 424];

function maskUuids(b: Uint8Array): Uint8Array {
  const out = b.slice();
  out.fill(0, ...UUIDS);
  return out;
}

async function poke(path: string, offset: number, bytes: number[]): Promise<void> {
  const b = await Deno.readFile(path);
  b.set(bytes, offset);
  await Deno.writeFile(path, b);
}

Deno.test("vdiDriver reads dynamic and static images written by qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    `qemu-img create -q -f vdi dyn.vdi 10M && qemu-io -f vdi ${GUEST_WRITES} dyn.vdi >/dev/null
     qemu-img create -q -f vdi -o static=on static.vdi 10M && qemu-io -f vdi ${GUEST_WRITES} static.vdi >/dev/null
     qemu-img create -q -f vdi empty.vdi 0
     qemu-img create -q -f vdi odd.vdi 1234567 && qemu-io -f vdi -c 'write -P 0x55 1M 1k' odd.vdi >/dev/null`,
    dir.path,
  );
  for (const name of ["dyn.vdi", "static.vdi", "empty.vdi", "odd.vdi"]) {
    await assertReadsLikeQemu(dir.path, name);
  }
});

Deno.test("parseVdiHeader() reads the block map geometry and UUIDs in VirtualBox's byte order", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f vdi a.vdi 3M", dir.path);
  const b = await Deno.readFile(`${dir.path}/a.vdi`);
  const h = parseVdiHeader(b);
  assertEquals(
    [h.offsetBmap, h.offsetData, h.blocksInImage, h.blocksAllocated, h.diskSize],
    [512, 1024, 3, 0, 3 << 20],
  );
  assertEquals(h.uuidLink, "00000000-0000-0000-0000-000000000000");
  // Version 4 UUIDs: the version nibble sits in the (little-endian) third field.
  assertEquals(h.uuidImage[14], "4");
  const image = await openVdi(await DenoFile.open(`${dir.path}/a.vdi`));
  assertEquals(image.size, 3 << 20);
  await image.close();
});

Deno.test("createVdi() writes qemu-img's files (masking the UUIDs) and options", async () => {
  await using dir = await tempDir();
  for (
    const [opts, size] of [
      ["", "10M"],
      ["", "0"],
      ["", "1234567"],
      ["", "5T"],
      ["-o static=on", "10M"],
      ["-o static=on", "1000000"],
      ["-o static=off,preallocation=full", "3M"],
    ] as const
  ) {
    const args = opts ? opts.split(" ") : [];
    const r = await assertSameAsQemu(["create", "-f", "vdi", ...args, "ours.vdi", size], dir.path);
    assertEquals(r.code, 0);
    await sh("mv ours.vdi mine.vdi", dir.path);
    await sh(`qemu-img create -q -f vdi ${opts} ours.vdi ${size}`, dir.path);
    assertEquals(
      maskUuids(await Deno.readFile(`${dir.path}/mine.vdi`)),
      maskUuids(await Deno.readFile(`${dir.path}/ours.vdi`)),
      `create ${opts} ${size}`,
    );
    await assertSameAsQemu(["info", "--output=json", "mine.vdi"], dir.path);
    await assertSameAsQemu(["map", "--output=json", "mine.vdi"], dir.path);
    await sh("rm -f ours.vdi mine.vdi", dir.path);
  }
  for (
    const args of [
      ["create", "-f", "vdi", "-o", "help"],
      ["create", "-f", "vdi", "x.vdi", "600T"],
      ["create", "-f", "vdi", "-o", "static=on", "s.vdi", "20T"],
      ["create", "-f", "vdi", "-o", "static=maybe", "x.vdi", "1M"],
      ["create", "-f", "vdi", "-o", "cluster_size=2M", "x.vdi", "1M"],
      ["create", "-f", "vdi", "-b", "base.vdi", "-F", "vdi", "x.vdi", "1M"],
      ["measure", "-O", "vdi", "--size", "1M"],
      ["resize", "-f", "vdi", "x.vdi", "2M"],
    ]
  ) await assertSameAsQemu(args, dir.path);
});

Deno.test("VdiImage.write() allocates blocks as qemu: convert -O vdi output qemu-img reads and checks", async () => {
  await using dir = await tempDir();
  await sh(
    `qemu-img create -q -f qcow2 src.qcow2 20M && qemu-io -f qcow2 -c 'write -P 0x11 0 64k' \
       -c 'write -P 0x22 3M 1M' -c 'write -P 0x33 9M 4k' -c 'write -P 0x44 19M 1M' src.qcow2 >/dev/null`,
    dir.path,
  );
  for (const opts of ["", "-o static=on"]) {
    const o = opts ? opts.split(" ") : [];
    const r = await qimg(["convert", "-O", "vdi", ...o, "src.qcow2", "mine.vdi"], dir.path);
    assertEquals(r.code, 0, r.stderr);
    await sh(`qemu-img convert -O vdi ${opts} src.qcow2 theirs.vdi`, dir.path);
    // Same layout as qemu's (blocks in write order), apart from the UUIDs.
    assertEquals(
      maskUuids(await Deno.readFile(`${dir.path}/mine.vdi`)),
      maskUuids(await Deno.readFile(`${dir.path}/theirs.vdi`)),
      `convert ${opts}`,
    );
    await sh("qemu-img check mine.vdi && qemu-img compare mine.vdi src.qcow2", dir.path);
    // Writes into allocated and new blocks of an existing image, in several requests.
    await sh(
      "qemu-io -f vdi -c 'write -P 0x55 3M 512' -c 'write -P 0x66 15M 4k' -c 'write -P 0x77 7M 3M' theirs.vdi >/dev/null",
      dir.path,
    );
    const w = await qimg(["convert", "-n", "-O", "vdi", "theirs.vdi", "mine.vdi"], dir.path);
    assertEquals(w.code, 0, w.stderr);
    await sh("qemu-img check mine.vdi && qemu-img compare mine.vdi theirs.vdi", dir.path);
    await assertReadsLikeQemu(dir.path, "mine.vdi");
    await sh("rm -f mine.vdi theirs.vdi", dir.path);
  }
  // convert -n writes zero runs too (no zero-init target): blocks get allocated as qemu's do.
  await sh(
    `qemu-img create -q -f vdi n1.vdi 20M && cp n1.vdi n2.vdi && qemu-img convert -n -O vdi src.qcow2 n1.vdi`,
    dir.path,
  );
  const n = await qimg(["convert", "-n", "-O", "vdi", "src.qcow2", "n2.vdi"], dir.path);
  assertEquals(n.code, 0, n.stderr);
  assertEquals(
    await Deno.readFile(`${dir.path}/n2.vdi`),
    await Deno.readFile(`${dir.path}/n1.vdi`),
    "convert -n",
  );
  // Out-of-order parallel writes (-W) allocate in another order but read the same.
  const r = await qimg(["convert", "-W", "-m", "8", "-O", "vdi", "src.qcow2", "w.vdi"], dir.path);
  assertEquals(r.code, 0, r.stderr);
  await sh("qemu-img compare -F qcow2 w.vdi src.qcow2", dir.path);
});

Deno.test("VdiImage.check() reports qemu's block map errors and exit codes", async () => {
  await using dir = await tempDir();
  await sh(
    `qemu-img create -q -f vdi base.vdi 8M && qemu-io -f vdi -c 'write -P 1 0 1k' -c 'write -P 2 2M 1k' -c 'write -P 3 5M 1k' base.vdi >/dev/null`,
    dir.path,
  );
  // Block map at 512: entries 0, 2, 5 hold data blocks 0, 1, 2.
  const cases: [string, (p: string) => Promise<void>][] = [
    ["clean", () => Promise.resolve()],
    ["duplicate", (p) => poke(p, 512 + 4 * 5, le32(1))],
    ["too-large", (p) => poke(p, 512 + 4 * 6, le32(77))],
    ["count", (p) => poke(p, 388, le32(7))],
    ["discarded", async (p) => {
      await poke(p, 512 + 4 * 2, le32(0xfffffffe));
      await poke(p, 388, le32(2));
    }],
  ];
  for (const [name, mutate] of cases) {
    const file = `${name}.vdi`;
    await sh(`cp base.vdi ${file}`, dir.path);
    await mutate(`${dir.path}/${file}`);
    await assertSameAsQemu(["check", file], dir.path);
    await assertSameAsQemu(["check", "--output=json", file], dir.path);
    await assertSameAsQemu(["check", "-r", "all", file], dir.path);
    await assertSameAsQemu(["check", "-r", "leaks", file], dir.path);
    await assertSameAsQemu(["map", "--output=json", file], dir.path);
  }
});

Deno.test("openVdi() ends hostile headers with qemu-img's message", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f vdi base.vdi 4M", dir.path);
  const cases: [string, (p: string) => Promise<void>][] = [
    ["signature", (p) => poke(p, 64, le32(0xbeda1070))],
    ["version", (p) => poke(p, 68, le32(0x00010002))],
    ["bmap-unaligned", (p) => poke(p, 340, le32(0x201))],
    ["data-unaligned", (p) => poke(p, 344, le32(0x3ff))],
    ["sector-size", (p) => poke(p, 360, le32(4096))],
    ["block-size", (p) => poke(p, 376, le32(2 << 20))],
    ["disk-too-big-for-map", (p) => poke(p, 368, le64(5n << 20n))],
    ["disk-huge", (p) => poke(p, 368, le64(0xffffffffffffffffn))],
    ["disk-max", (p) => poke(p, 368, le64(0x1fffff8000001n))],
    ["disk-odd", (p) => poke(p, 368, le64((3n << 20n) + 1n))],
    ["link-uuid", (p) => poke(p, 424, [1])],
    ["parent-uuid", (p) => poke(p, 440 + 15, [1])],
    ["too-many-blocks", (p) => poke(p, 384, le32(0x1fffff81))],
    ["map-past-eof", async (p) => {
      await poke(p, 384, le32(0x1000));
      await poke(p, 368, le64(64n << 20n));
    }],
    ["entry-past-eof", (p) => poke(p, 512, le32(1000))],
    ["short", (p) => Deno.truncate(p, 300)],
  ];
  for (const [name, mutate] of cases) {
    const file = `${name}.vdi`;
    await sh(`cp base.vdi ${file}`, dir.path);
    await mutate(`${dir.path}/${file}`);
    for (
      const args of [
        ["info", "-f", "vdi", file],
        ["map", "-f", "vdi", "--output=json", file],
        ["check", "-f", "vdi", file],
        ["convert", "-f", "vdi", "-O", "raw", file, `${file}.raw`],
      ]
    ) {
      const r = await assertSameAsQemu(args, dir.path);
      assertEquals(r.stderr.includes("internal error"), false, r.stderr);
    }
    await sh(`rm -f ${file}.raw`, dir.path);
  }
});
