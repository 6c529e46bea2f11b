/**
 * vpc (VHD) against Debian's qemu-img: images qemu-img makes (dynamic,
 * fixed, force_size, sizes that CHS rounds) read by qimg; images qimg
 * makes (create, convert) read by qemu-img; info, map and check output;
 * created files byte-identical except the footer's timestamp, UUID and
 * checksum (time and random); hostile footers and headers.
 */

import { assertEquals } from "./_assert.ts";
import {
  assertReadsLikeQemu,
  assertSameAsQemu,
  be32,
  be64,
  GUEST_WRITES,
  qimg,
  sh,
  tempDir,
} from "./_util.ts";
import { chsGeometry, openVpc, roundedImageSize, vpcDriver } from "../src/vpc.ts";
import { type BlockFile, DenoFile } from "../src/file.ts";
import { convert } from "../src/convert.ts";
import { Image } from "../src/image.ts";

/** Footer bytes that hold the time, the random UUID and the checksum over both. */
const FOOTER_VARIABLE = [[24, 28], [64, 84]];

/** Zeroes the footer's variable fields at every footer in `b` (start and end of the file). */
function maskFooters(b: Uint8Array): Uint8Array {
  const out = b.slice();
  const footers = [0, out.length - 512].filter((o) =>
    o >= 0 && new TextDecoder().decode(out.subarray(o, o + 8)) === "conectix"
  );
  for (const o of footers) for (const [s, e] of FOOTER_VARIABLE) out.fill(0, o + s, o + e);
  return out;
}

/** Reads or changes bytes of a file; `fixChecksum` recomputes the footer checksum at `footer`. */
async function poke(
  path: string,
  offset: number,
  bytes: number[],
  fixChecksum?: { footer: number },
): Promise<void> {
  const b = await Deno.readFile(path);
  b.set(bytes, offset);
  if (fixChecksum) {
    const f = fixChecksum.footer;
    const v = new DataView(b.buffer, b.byteOffset + f, 512);
    v.setUint32(64, 0);
    let sum = 0;
    for (let i = 0; i < 512; i++) sum += b[f + i];
    v.setUint32(64, (~sum) >>> 0);
  }
  await Deno.writeFile(path, b);
}

Deno.test("chsGeometry() follows the VHD specification's table", () => {
  assertEquals(chsGeometry(20480), { cylinders: 301, heads: 4, sectorsPerTrack: 17 });
  assertEquals(chsGeometry(65535 * 16 * 255 + 1), {
    cylinders: 65535,
    heads: 16,
    sectorsPerTrack: 255,
  });
  assertEquals(roundedImageSize(10 << 20, false).sectors, 20536);
  assertEquals(roundedImageSize(10000384, true).sectors, 19532);
});

Deno.test("vpcDriver reads dynamic, fixed and force_size images written by qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    `qemu-img create -q -f vpc dyn.vhd 10M && qemu-io -f vpc ${GUEST_WRITES} dyn.vhd >/dev/null
     qemu-img create -q -f vpc -o subformat=fixed fixed.vhd 10M && qemu-io -f vpc ${GUEST_WRITES} fixed.vhd >/dev/null
     qemu-img create -q -f vpc -o force_size=on forced.vhd 10000001 && qemu-io -f vpc ${GUEST_WRITES} forced.vhd >/dev/null
     qemu-img create -q -f vpc empty.vhd 0
     qemu-img create -q -f vpc odd.vhd 1234567`,
    dir.path,
  );
  await assertReadsLikeQemu(dir.path, "dyn.vhd");
  await assertReadsLikeQemu(dir.path, "fixed.vhd", ["-f", "vpc"]);
  await assertReadsLikeQemu(dir.path, "forced.vhd");
  await assertReadsLikeQemu(dir.path, "empty.vhd");
  await assertReadsLikeQemu(dir.path, "odd.vhd");
  // A fixed disk has no footer at the start: probing says raw, as qemu.
  await assertSameAsQemu(["info", "fixed.vhd"], dir.path);
});

Deno.test("vpcDriver sizes by creator: CHS for 'vpc '/'qemu', current_size for Hyper-V, Disk2vhd, Xen and the maximum geometry", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f vpc base.vhd 100M", dir.path);
  // current_size 50 MiB, geometry for 100M: which one counts depends on the creator.
  for (const app of ["vpc ", "qemu", "qem2", "win ", "d2v ", "CTXS", "tap\0", "vbox", "tap "]) {
    const name = `c-${app.replaceAll("\0", "0").trim()}-${app.charCodeAt(3)}.vhd`;
    await sh(`cp base.vhd '${name}'`, dir.path);
    for (const f of [0, 2048]) {
      await poke(`${dir.path}/${name}`, f + 28, [...new TextEncoder().encode(app)]);
      await poke(`${dir.path}/${name}`, f + 48, be64(50n << 20n), { footer: f });
    }
    await assertSameAsQemu(["info", "--output=json", name], dir.path);
    await assertSameAsQemu(["map", "--output=json", name], dir.path);
  }
  // The maximum geometry: current_size, whatever the creator.
  await sh("cp base.vhd max.vhd", dir.path);
  await poke(`${dir.path}/max.vhd`, 56, [0xff, 0xff, 16, 255]);
  await poke(`${dir.path}/max.vhd`, 48, be64(100n << 20n), { footer: 0 });
  await assertSameAsQemu(["info", "max.vhd"], dir.path);
});

Deno.test("createVpc() writes qemu-img's files (masking time and UUID) and options", async () => {
  await using dir = await tempDir();
  for (
    const [opts, size] of [
      ["", "10M"],
      ["", "0"],
      ["", "1234567"],
      ["", "129G"],
      ["-o subformat=fixed", "10M"],
      ["-o subformat=fixed", "1000000"],
      ["-o force_size=on", "10000001"],
      ["-o subformat=fixed,force_size=on", "3M"],
      ["-o subformat=dynamic,force_size=off", "2040G"],
      ["-o preallocation=falloc", "5M"],
    ] as const
  ) {
    const args = opts ? opts.split(" ") : [];
    const ours = await assertSameAsQemu(
      ["create", "-f", "vpc", ...args, "ours.vhd", size],
      dir.path,
    );
    assertEquals(ours.code, 0);
    await sh(`mv ours.vhd mine.vhd`, dir.path);
    await sh(`qemu-img create -q -f vpc ${opts} ours.vhd ${size}`, dir.path);
    assertEquals(
      maskFooters(await Deno.readFile(`${dir.path}/mine.vhd`)),
      maskFooters(await Deno.readFile(`${dir.path}/ours.vhd`)),
      `create ${opts} ${size}`,
    );
    const fmt = opts.includes("fixed") ? ["-f", "vpc"] : [];
    await assertSameAsQemu(["info", ...fmt, "--output=json", "mine.vhd"], dir.path);
    await sh("rm -f ours.vhd mine.vhd", dir.path);
  }
  for (
    const args of [
      ["create", "-f", "vpc", "-o", "help"],
      ["create", "-f", "vpc", "-o", "subformat=sparse", "x.vhd", "1M"],
      ["create", "-f", "vpc", "x.vhd", "3T"],
      ["create", "-f", "vpc", "-o", "force_size=on", "x.vhd", "2041G"],
      ["create", "-f", "vpc", "-o", "force_size=maybe", "x.vhd", "1M"],
      ["create", "-f", "vpc", "-b", "base.vhd", "-F", "vpc", "x.vhd", "1M"],
      ["measure", "-O", "vpc", "--size", "1M"],
    ]
  ) await assertSameAsQemu(args, dir.path);
});

Deno.test("VpcImage.write() allocates blocks as qemu: convert -O vpc output qemu-img reads back", async () => {
  await using dir = await tempDir();
  await sh(
    `qemu-img create -q -f qcow2 src.qcow2 20M && qemu-io -f qcow2 -c 'write -P 0x11 0 64k' \
       -c 'write -P 0x22 3M 1M' -c 'write -P 0x33 9M 4k' -c 'write -P 0x44 19M 1M' src.qcow2 >/dev/null`,
    dir.path,
  );
  for (const opts of ["", "-o subformat=fixed", "-o force_size=on"]) {
    const o = opts ? opts.split(" ") : [];
    const r = await qimg(["convert", "-O", "vpc", ...o, "src.qcow2", "mine.vhd"], dir.path);
    assertEquals(r.code, 0, r.stderr);
    await sh(`qemu-img convert -O vpc ${opts} src.qcow2 theirs.vhd`, dir.path);
    // Same layout as qemu's (blocks in write order), apart from time and UUID.
    assertEquals(
      maskFooters(await Deno.readFile(`${dir.path}/mine.vhd`)),
      maskFooters(await Deno.readFile(`${dir.path}/theirs.vhd`)),
      `convert ${opts}`,
    );
    const fmt = opts.includes("fixed") ? "-f vpc" : "";
    await sh(`qemu-img compare ${fmt} -F qcow2 mine.vhd src.qcow2`, dir.path);
    // Writes into allocated and new blocks of an existing image (qemu-io reads it back).
    await sh(
      `qemu-io ${
        fmt || "-f vpc"
      } -c 'write -P 0x55 3M 512' -c 'write -P 0x66 15M 4k' theirs.vhd >/dev/null`,
      dir.path,
    );
    const w = await qimg(
      ["convert", "-n", "-O", "vpc", ...(fmt ? ["-f", "vpc"] : []), "theirs.vhd", "mine.vhd"],
      dir.path,
    );
    assertEquals(w.code, 0, w.stderr);
    await sh(`qemu-img compare ${fmt} ${fmt.replace("-f", "-F")} mine.vhd theirs.vhd`, dir.path);
    await assertReadsLikeQemu(dir.path, "mine.vhd", fmt ? ["-f", "vpc"] : []);
    await sh("rm -f mine.vhd theirs.vhd", dir.path);
  }
  // convert -n writes zero runs too (no zero-init target): blocks get allocated as qemu's do.
  await sh(
    `qemu-img create -q -f vpc n1.vhd 20M && cp n1.vhd n2.vhd && qemu-img convert -n -O vpc src.qcow2 n1.vhd`,
    dir.path,
  );
  const n = await qimg(["convert", "-n", "-O", "vpc", "src.qcow2", "n2.vhd"], dir.path);
  assertEquals(n.code, 0, n.stderr);
  assertEquals(
    await Deno.readFile(`${dir.path}/n2.vhd`),
    await Deno.readFile(`${dir.path}/n1.vhd`),
    "convert -n",
  );
  // Out-of-order parallel writes (-W) allocate in another order but read the same.
  const r = await qimg(["convert", "-W", "-m", "8", "-O", "vpc", "src.qcow2", "w.vhd"], dir.path);
  assertEquals(r.code, 0, r.stderr);
  await sh("qemu-img compare -F qcow2 w.vhd src.qcow2", dir.path);
});

Deno.test("VpcImage.copyMap() calls holes in allocated blocks zero at their host offsets, unallocated blocks zero", async () => {
  await using dir = await tempDir();
  const M = 1 << 20;
  const K = 1024;
  // qemu-img convert leaves the zero run inside block 0 unwritten: a hole of the vpc file.
  await sh(
    `qemu-img create -q -f raw src.raw 6M
     qemu-io -f raw -c 'write -P 0x11 0 64k' -c 'write -P 0x22 1M 64k' -c 'write -P 0x33 5M 4k' src.raw >/dev/null
     qemu-img convert -f raw -O vpc src.raw a.vhd`,
    dir.path,
  );
  const image = await openVpc(await DenoFile.open(`${dir.path}/a.vhd`));
  const map = JSON.parse(await sh("qemu-img map --output=json a.vhd", dir.path));
  const runs = await image.copyMap(0, 4 * M);
  // Block 0 lies in place, holes (file system blocks) included; block 1 is not allocated.
  let pos = 0;
  const zero = new Set<number>(); // guest 64 KiB units wholly zero
  for (const r of runs) {
    if (pos < 2 * M) assertEquals(r.hostOffset, map[0].offset + pos, `run at ${pos}`);
    else assertEquals(r, { length: 2 * M, zero: true });
    for (let u = Math.ceil(pos / (64 * K)); (u + 1) * 64 * K <= pos + r.length; u++) {
      if (r.zero) zero.add(u);
    }
    pos += r.length;
  }
  assertEquals(pos, 4 * M);
  // The data (0 and 1 MiB) is not zero; what qemu-img left unwritten between is.
  assertEquals([zero.has(0), zero.has(2), zero.has(14), zero.has(16), zero.has(18)], [
    false,
    true,
    true,
    false,
    true,
  ]);
  await image.close();
  // convert reads it as qemu-img does.
  await assertReadsLikeQemu(dir.path, "a.vhd");
});

Deno.test("convert takes the holes inside vpc blocks from copyMap: what the host calls a hole is not read or scanned", async () => {
  await using dir = await tempDir();
  const M = 1 << 20;
  await sh(
    `qemu-img create -q -f raw src.raw 4M
     qemu-io -f raw -c 'write -P 0x11 0 64k' -c 'write -P 0x22 1M 64k' src.raw >/dev/null
     qemu-img convert -f raw -O vpc src.raw a.vhd`,
    dir.path,
  );
  const host = await DenoFile.open(`${dir.path}/a.vhd`);
  // The host says block 0 is a hole from 512 KiB on (its data at 1 MiB included): convert
  // must believe it (zeroes there) rather than look at the mapped bytes.
  const cut = 2560 + M / 2;
  const lying: BlockFile = new Proxy(host, {
    get(target, key) {
      if (key === "extent") {
        return async (offset: number, length: number) =>
          offset >= cut
            ? { length, data: false }
            : await host.extent(offset, Math.min(length, cut - offset));
      }
      const value = Reflect.get(target, key);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  const image = await openVpc(lying);
  const source = new Image([{ image, driver: vpcDriver, filename: "a.vhd" }]);
  const out = new Uint8Array(image.size);
  try {
    await convert([source], {
      size: out.length,
      write: (offset, data) => Promise.resolve(void out.set(data, offset)),
    }, { targetIsZero: true });
  } finally {
    await source.close();
  }
  const want = new Uint8Array(image.size);
  want.fill(0x11, 0, 64 * 1024);
  assertEquals(out.findIndex((b, i) => b !== want[i]), -1);
});

Deno.test("DenoFile.extent() answers read-only as writable: data, holes, past the end (copyMap's queries)", async () => {
  await using dir = await tempDir();
  await sh(
    "truncate -s 1M f && qemu-io -f raw -c 'write -P 1 64k 4k' f >/dev/null",
    dir.path,
  );
  const ro = await DenoFile.open(`${dir.path}/f`);
  const rw = await DenoFile.open(`${dir.path}/f`, { write: true });
  try {
    for (
      const [at, n] of [[0, 1 << 20], [64 << 10, 8192], [68 << 10, 4096], [1 << 20, 512], [
        5 << 20,
        512,
      ]]
    ) {
      assertEquals(await ro.extent(at, n), await rw.extent(at, n), `${at} ${n}`);
    }
    // The read-only handle sees the file grow (no size kept).
    await rw.write(2 << 20, new Uint8Array(4096).fill(2));
    assertEquals(await ro.extent(2 << 20, 4096), { length: 4096, data: true });
  } finally {
    await ro.close();
    await rw.close();
  }
});

Deno.test("openVpc() ends hostile footers and headers with qemu-img's message", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f vpc base.vhd 10M", dir.path);
  // Dynamic header at 512, BAT at 1536 (6 entries), footer copy at 2048.
  const cases: [string, (p: string) => Promise<void>][] = [
    ["short", (p) => Deno.writeFile(p, new Uint8Array(100))],
    ["empty", (p) => Deno.writeFile(p, new Uint8Array(0))],
    ["nofooter", (p) => Deno.writeFile(p, new Uint8Array(4096))],
    ["checksum", (p) => poke(p, 64, [1, 2, 3, 4])],
    ["magic", (p) => poke(p, 512, [...new TextEncoder().encode("cxspars!")])],
    ["blocksize", (p) => poke(p, 512 + 32, be32(3 << 20))],
    ["blocksize0", (p) => poke(p, 512 + 32, be32(256))],
    ["entries0", (p) => poke(p, 512 + 28, be32(0))],
    ["entries-big", (p) => poke(p, 512 + 28, be32(0x40000001))],
    ["entries-neg", (p) => poke(p, 512 + 28, be32(0x80000000))],
    ["entries-past-eof", (p) => poke(p, 512 + 28, be32(0x1000000))],
    ["bat-past-eof", (p) => poke(p, 512 + 16, be64(1n << 40n))],
    ["bat-entry-past-eof", (p) => poke(p, 1536, be32(0x100000))],
    ["dataoffset-huge", (p) => poke(p, 16, be64(0xffffffffffffff00n), { footer: 0 })],
    ["dataoffset-past-eof", (p) => poke(p, 16, be64(1n << 40n), { footer: 0 })],
    ["too-large", async (p) => {
      await poke(p, 28, [...new TextEncoder().encode("win ")]);
      await poke(p, 48, be64(3n << 40n), { footer: 0 });
    }],
    ["type-fixed-at-start", (p) => poke(p, 60, be32(2), { footer: 0 })],
    ["type-differencing", (p) => poke(p, 60, be32(4), { footer: 0 })],
  ];
  await sh("qemu-img create -q -f vpc -o subformat=fixed fixed.vhd 1M", dir.path);
  const end = (await Deno.stat(`${dir.path}/fixed.vhd`)).size - 512;
  const fixedCases: [string, (p: string) => Promise<void>][] = [
    ["fixed-type-dynamic", (p) => poke(p, end + 60, be32(3), { footer: end })],
    ["fixed-type-differencing", (p) => poke(p, end + 60, be32(4), { footer: end })],
    ["fixed-checksum", (p) => poke(p, end + 64, [0, 0, 0, 0])],
    ["fixed-too-large", async (p) => {
      await poke(p, end + 28, [...new TextEncoder().encode("tap\0")]);
      await poke(p, end + 48, be64(0x1fe0000001n * 512n), { footer: end });
    }],
    ["fixed-past-eof", async (p) => {
      await poke(p, end + 28, [...new TextEncoder().encode("d2v ")]);
      await poke(p, end + 48, be64(64n << 20n), { footer: end });
    }],
  ];
  for (const [name, mutate] of [...cases, ...fixedCases]) {
    const file = `${name}.vhd`;
    await sh(`cp ${name.startsWith("fixed-") ? "fixed" : "base"}.vhd ${file}`, dir.path);
    await mutate(`${dir.path}/${file}`);
    for (
      const args of [
        ["info", "-f", "vpc", file],
        ["map", "-f", "vpc", "--output=json", file],
        ["convert", "-f", "vpc", "-O", "raw", file, `${file}.raw`],
      ]
    ) {
      const r = await assertSameAsQemu(args, dir.path);
      assertEquals(r.stderr.includes("internal error"), false, r.stderr);
    }
  }
});
