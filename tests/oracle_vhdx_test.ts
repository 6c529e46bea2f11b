/**
 * vhdx against Debian's qemu-img: images qemu-img makes (dynamic, fixed,
 * block sizes, ZERO or NOT_PRESENT blocks) read by qimg; images qimg
 * makes (create, convert) read by qemu-img and clean in its check;
 * created and converted files byte-identical except the random fields
 * (header sequence numbers, file, data and log GUIDs, their checksums,
 * the page 83 id); a pending log replayed by `check -r all` as qemu's;
 * hostile headers, region tables, metadata and BAT entries end with
 * qemu's message.
 */

import { assertEquals } from "./_assert.ts";
import {
  assertReadsLikeQemu,
  assertSameAsQemu,
  GUEST_WRITES,
  haveSharedImages,
  le32,
  le64,
  qemuImg,
  qimg,
  sh,
  SHARED_IMAGES,
  tempDir,
} from "./_util.ts";
import { buildLogEntry, crc32c } from "../src/vhdx_log.ts";

const MiB = 1 << 20;
/** A default 10 MiB image: log at 1 MiB, BAT at 2 MiB, metadata at 3 MiB. */
const BAT = 2 * MiB;
const META = 3 * MiB;

/**
 * Zeroes the random fields: headers' checksum, sequence number and GUIDs,
 * the page 83 id, and log entries' GUID and checksum.
 */
function maskRandom(b: Uint8Array): Uint8Array {
  const out = b.slice();
  for (const h of [64 << 10, 128 << 10]) out.fill(0, h + 4, h + 48);
  // Log entries (in the default 1 MiB log at 1 MiB): their checksum and random log GUID.
  for (let e = MiB; e + 8192 <= Math.min(out.length, 2 * MiB); e += 8192) {
    if (new TextDecoder().decode(out.subarray(e, e + 4)) !== "loge") continue;
    out.fill(0, e + 4, e + 8);
    out.fill(0, e + 32, e + 48);
  }
  if (out.length > (192 << 10) + 72) {
    const meta = Number(new DataView(out.buffer).getBigUint64((192 << 10) + 64, true));
    if (meta + (64 << 10) + 32 <= out.length) {
      out.fill(0, meta + (64 << 10) + 16, meta + (64 << 10) + 32);
    }
  }
  return out;
}

/** Changes bytes of a file; `reseal` recomputes the CRC-32C of the structure at [start, start+size). */
async function poke(
  path: string,
  offset: number,
  bytes: number[],
  reseal?: { start: number; size: number },
): Promise<void> {
  const b = await Deno.readFile(path);
  b.set(bytes, offset);
  if (reseal) {
    const s = b.subarray(reseal.start, reseal.start + reseal.size);
    s.set([0, 0, 0, 0], 4);
    s.set(le32(crc32c(s)), 4);
  }
  await Deno.writeFile(path, b);
}

const HEADER1 = { start: 64 << 10, size: 4096 };
const HEADER2 = { start: 128 << 10, size: 4096 };
const REGION = { start: 192 << 10, size: 64 << 10 };

Deno.test("vhdxDriver reads dynamic, fixed and block-size variants written by qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    `qemu-img create -q -f vhdx dyn.vhdx 10M && qemu-io -f vhdx ${GUEST_WRITES} dyn.vhdx >/dev/null
     qemu-img create -q -f vhdx -o subformat=fixed fixed.vhdx 10M && qemu-io -f vhdx ${GUEST_WRITES} fixed.vhdx >/dev/null
     qemu-img create -q -f vhdx -o subformat=fixed,block_state_zero=off fixed0.vhdx 10M && qemu-io -f vhdx ${GUEST_WRITES} fixed0.vhdx >/dev/null
     qemu-img create -q -f vhdx -o block_state_zero=off,block_size=1M np.vhdx 10M && qemu-io -f vhdx ${GUEST_WRITES} np.vhdx >/dev/null
     qemu-img create -q -f vhdx -o block_size=64M,log_size=2M big.vhdx 200M && qemu-io -f vhdx -c 'write -P 0x55 100M 1M' big.vhdx >/dev/null
     qemu-img create -q -f vhdx empty.vhdx 0
     qemu-img create -q -f vhdx odd.vhdx 1234567`,
    dir.path,
  );
  // Independent images: compared in parallel to keep the test short.
  await Promise.all(
    ["dyn", "fixed", "fixed0", "np", "big", "empty", "odd"].map((name) =>
      assertReadsLikeQemu(dir.path, `${name}.vhdx`)
    ),
  );
});

Deno.test("createVhdx() writes qemu-img's files (masking random fields) and options", async () => {
  await using dir = await tempDir();
  for (
    const [opts, size] of [
      ["", "10M"],
      ["", "0"],
      ["", "1234567"],
      ["", "3G"],
      ["", "200G"],
      ["-o subformat=fixed", "10M"],
      ["-o subformat=fixed,block_state_zero=off", "5M"],
      ["-o block_state_zero=off", "100M"],
      ["-o block_size=1M,log_size=3M", "20M"],
      ["-o block_size=300M,log_size=1500k", "1G"],
      ["-o block_size=0", "1M"],
    ] as const
  ) {
    const args = opts ? opts.split(" ") : [];
    const ours = await assertSameAsQemu(
      ["create", "-f", "vhdx", ...args, "ours.vhdx", size],
      dir.path,
    );
    assertEquals(ours.code, 0);
    await sh("mv ours.vhdx mine.vhdx", dir.path);
    await sh(`qemu-img create -q -f vhdx ${opts} ours.vhdx ${size}`, dir.path);
    assertEquals(
      maskRandom(await Deno.readFile(`${dir.path}/mine.vhdx`)),
      maskRandom(await Deno.readFile(`${dir.path}/ours.vhdx`)),
      `create ${opts} ${size}`,
    );
    await sh("qemu-img check -q mine.vhdx", dir.path);
    await sh("rm -f ours.vhdx mine.vhdx", dir.path);
  }
  for (
    const args of [
      ["create", "-f", "vhdx", "-o", "help"],
      ["create", "-f", "vhdx", "-o", "subformat=sparse", "x.vhdx", "1M"],
      ["create", "-f", "vhdx", "-o", "log_size=0", "x.vhdx", "1M"],
      ["create", "-f", "vhdx", "-o", "log_size=5G", "x.vhdx", "1M"],
      ["create", "-f", "vhdx", "-o", "block_size=3M", "x.vhdx", "1M"],
      ["create", "-f", "vhdx", "-o", "block_state_zero=maybe", "x.vhdx", "1M"],
      ["create", "-f", "vhdx", "x.vhdx", "65T"],
      ["create", "-f", "vhdx", "-b", "base.vhdx", "-F", "vhdx", "x.vhdx", "1M"],
    ]
  ) await assertSameAsQemu(args, dir.path);
});

Deno.test("VhdxImage.write() allocates blocks: convert -O vhdx output qemu-img reads and checks clean", async () => {
  await using dir = await tempDir();
  await sh(
    `qemu-img create -q -f qcow2 src.qcow2 40M && qemu-io -f qcow2 -c 'write -P 0x11 0 64k' \
       -c 'write -P 0x22 3M 1M' -c 'write -P 0x33 9M 4k' -c 'write -P 0x44 39M 1M' src.qcow2 >/dev/null`,
    dir.path,
  );
  for (
    const opts of [
      "",
      "-o subformat=fixed",
      "-o subformat=fixed,block_state_zero=off",
      "-o block_state_zero=off,block_size=1M",
    ]
  ) {
    const o = opts ? opts.split(" ") : [];
    const r = await qimg(["convert", "-O", "vhdx", ...o, "src.qcow2", "mine.vhdx"], dir.path);
    assertEquals(r.code, 0, r.stderr);
    await sh("qemu-img compare -F qcow2 mine.vhdx src.qcow2", dir.path);
    // Same file as qemu's, BAT updates logged alike, apart from random fields.
    await sh(`qemu-img convert -O vhdx ${opts} src.qcow2 same.vhdx`, dir.path);
    assertEquals(
      maskRandom(await Deno.readFile(`${dir.path}/mine.vhdx`)),
      maskRandom(await Deno.readFile(`${dir.path}/same.vhdx`)),
      `convert ${opts}`,
    );
    const check = await qemuImg(["check", "mine.vhdx"], dir.path);
    assertEquals(check.stdout, "No errors were found on the image.\n", opts);
    // Writes into allocated and new blocks of a qemu-made image.
    await sh(
      `qemu-img convert -O vhdx ${opts} src.qcow2 theirs.vhdx && qemu-io -f vhdx -c 'write -P 0x55 3M 512' \
         -c 'write -P 0x66 25M 4k' theirs.vhdx >/dev/null`,
      dir.path,
    );
    const w = await qimg(["convert", "-n", "-O", "vhdx", "theirs.vhdx", "mine.vhdx"], dir.path);
    assertEquals(w.code, 0, w.stderr);
    await sh("qemu-img compare mine.vhdx theirs.vhdx && qemu-img check -q mine.vhdx", dir.path);
    await assertReadsLikeQemu(dir.path, "mine.vhdx");
    await sh("rm -f mine.vhdx theirs.vhdx", dir.path);
  }
  // convert -n writes zero runs too (no zero-init target): qemu's zero writes allocate blocks.
  await sh(
    "qemu-img create -q -f vhdx n1.vhdx 40M && cp n1.vhdx n2.vhdx && qemu-img convert -n -O vhdx src.qcow2 n1.vhdx",
    dir.path,
  );
  const n = await qimg(["convert", "-n", "-O", "vhdx", "src.qcow2", "n2.vhdx"], dir.path);
  assertEquals(n.code, 0, n.stderr);
  assertEquals(
    maskRandom(await Deno.readFile(`${dir.path}/n2.vhdx`)),
    maskRandom(await Deno.readFile(`${dir.path}/n1.vhdx`)),
    "convert -n",
  );
  // Out-of-order parallel writes (-W) read the same.
  const r = await qimg(["convert", "-W", "-m", "8", "-O", "vhdx", "src.qcow2", "w.vhdx"], dir.path);
  assertEquals(r.code, 0, r.stderr);
  await sh("qemu-img compare -F qcow2 w.vhdx src.qcow2 && qemu-img check -q w.vhdx", dir.path);
});

/** Writes a one-sector log entry replacing 4 KiB at `target` with `fill`, and points header 2 at it. */
async function addLogEntry(path: string, target: number, fill: number): Promise<void> {
  const b = await Deno.readFile(path);
  const guid = crypto.getRandomValues(new Uint8Array(16));
  const entry = new Uint8Array(8192);
  const dv = new DataView(entry.buffer);
  entry.set(new TextEncoder().encode("loge"), 0);
  dv.setUint32(8, 8192, true);
  dv.setBigUint64(16, 7n, true); // sequence number
  dv.setUint32(24, 1, true);
  entry.set(guid, 32);
  dv.setBigUint64(48, BigInt(b.length), true); // flushed file offset
  dv.setBigUint64(56, BigInt(b.length), true);
  entry.set(new TextEncoder().encode("desc"), 64);
  entry.fill(fill, 64 + 4, 64 + 16); // trailing (4) and leading (8) bytes
  dv.setBigUint64(64 + 16, BigInt(target), true);
  dv.setBigUint64(64 + 24, 7n, true);
  entry.set(new TextEncoder().encode("data"), 4096);
  dv.setUint32(4096 + 4, 0, true);
  entry.fill(fill, 4096 + 8, 4096 + 4092);
  dv.setUint32(4096 + 4092, 7, true);
  dv.setUint32(4, crc32c(entry), true);
  b.set(entry, MiB);
  await Deno.writeFile(path, b);
  // Header 2 (the current one) names the log.
  await poke(path, HEADER2.start + 48, [...guid], HEADER2);
}

Deno.test("openVhdx() refuses a pending log read-only and replays it on check -r all, as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f vhdx -o block_state_zero=off d.vhdx 10M && qemu-io -f vhdx -c 'write -P 0x11 0 1M' d.vhdx >/dev/null",
    dir.path,
  );
  // The log rewrites the first 4 KiB of the first payload block (at 8 MiB... wherever the BAT says).
  const bat = new DataView((await Deno.readFile(`${dir.path}/d.vhdx`)).buffer);
  const block = Number(bat.getBigUint64(BAT, true) & ~0xfffffn);
  await addLogEntry(`${dir.path}/d.vhdx`, block, 0x77);
  await sh("cp d.vhdx q.vhdx", dir.path);
  for (const args of [["info", "d.vhdx"], ["map", "d.vhdx"], ["check", "d.vhdx"]]) {
    await assertSameAsQemu(args, dir.path);
  }
  const ours = await qimg(["check", "-r", "all", "d.vhdx"], dir.path);
  const theirs = await qemuImg(["check", "-r", "all", "q.vhdx"], dir.path);
  assertEquals(ours, theirs);
  await sh("qemu-img check -q d.vhdx && qemu-img compare d.vhdx q.vhdx", dir.path);
  await assertReadsLikeQemu(dir.path, "d.vhdx");
});

/** Writes log entries at their positions in the 1 MiB log and names their GUID in header 2. */
async function writeLog(path: string, guid: Uint8Array, entries: [number, Uint8Array][]) {
  const b = await Deno.readFile(path);
  for (const [at, e] of entries) {
    for (let i = 0; i < e.length; i += 4096) b.set(e.subarray(i, i + 4096), MiB + (at + i) % MiB);
  }
  await Deno.writeFile(path, b);
  await poke(path, HEADER2.start + 48, [...guid], HEADER2);
}

Deno.test("findLogEntries() and replayLog() pick and apply entries as qemu-img: chains, zero descriptors, wrap, refusals", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f vhdx -o block_state_zero=off base.vhdx 10M && qemu-io -f vhdx -c 'write -P 0x11 0 2M' base.vhdx >/dev/null",
    dir.path,
  );
  const b = await Deno.readFile(`${dir.path}/base.vhdx`);
  const block = Number(new DataView(b.buffer).getBigUint64(BAT, true) & ~0xfffffn);
  const size = b.length;
  const sector = (fill: number) => new Uint8Array(4096).fill(fill);
  const entry = (
    guid: Uint8Array,
    sequence: bigint,
    offset: number,
    fill: number,
    fileSize = size,
  ) => buildLogEntry({ guid, sequence, tail: 0, fileSize, offset, sector: sector(fill) });
  /** A zero descriptor entry: `length` zero bytes at `offset`. */
  const zeroEntry = (guid: Uint8Array, sequence: bigint, offset: number, length: number) => {
    const e = new Uint8Array(4096);
    const v = new DataView(e.buffer);
    e.set(new TextEncoder().encode("loge"), 0);
    v.setUint32(8, 4096, true);
    v.setBigUint64(16, sequence, true);
    v.setUint32(24, 1, true);
    e.set(guid, 32);
    v.setBigUint64(48, BigInt(size), true);
    v.setBigUint64(56, BigInt(size), true);
    e.set(new TextEncoder().encode("zero"), 64);
    v.setBigUint64(72, BigInt(length), true);
    v.setBigUint64(80, BigInt(offset), true);
    v.setBigUint64(88, sequence, true);
    v.setUint32(4, crc32c(e), true);
    return e;
  };
  const g = () => crypto.getRandomValues(new Uint8Array(16));
  const cases: [string, (guid: Uint8Array) => [number, Uint8Array][]][] = [
    [
      "chain",
      (guid) => [[0, entry(guid, 7n, block, 0x21)], [8192, entry(guid, 8n, block + 4096, 0x22)]],
    ],
    [
      "two-runs",
      (guid) => [[0, entry(guid, 3n, block, 0x31)], [65536, entry(guid, 9n, block, 0x32)]],
    ],
    ["zero", (guid) => [[0, zeroEntry(guid, 5n, block + 8192, 16384)]]],
    ["wrap", (guid) => [[MiB - 4096, entry(guid, 4n, block, 0x41)]]],
    ["truncated", (guid) => [[0, entry(guid, 4n, block, 0x51, size + MiB)]]],
    ["bad-data-sequence", (guid) => {
      const e = entry(guid, 4n, block, 0x61);
      e.set([9, 9, 9, 9], 4096 + 4092);
      new DataView(e.buffer).setUint32(4, 0, true);
      new DataView(e.buffer).setUint32(4, crc32c(e), true);
      return [[0, e]];
    }],
    ["bad-checksum", (guid) => {
      const e = entry(guid, 4n, block, 0x71);
      e[5000] ^= 1;
      return [[0, e]];
    }],
  ];
  await Promise.all(cases.map(async ([name, make]) => {
    const guid = g();
    await sh(`cp base.vhdx ${name}-a.vhdx`, dir.path);
    await writeLog(`${dir.path}/${name}-a.vhdx`, guid, make(guid));
    await sh(`cp ${name}-a.vhdx ${name}-b.vhdx`, dir.path);
    await assertSameAsQemu(["info", `${name}-a.vhdx`], dir.path);
    const ours = await qimg(["check", "-r", "all", `${name}-a.vhdx`], dir.path);
    const theirs = await qemuImg(["check", "-r", "all", `${name}-b.vhdx`], dir.path);
    assertEquals(
      ours,
      { ...theirs, stderr: theirs.stderr.replaceAll(`${name}-b`, `${name}-a`) },
      name,
    );
    // What each case is for: a replay (one repaired corruption), a refusal, or no log at all.
    const want = ["truncated", "bad-data-sequence"].includes(name)
      ? "refused"
      : name === "bad-checksum"
      ? "clean"
      : "replayed";
    const got = ours.code !== 0
      ? "refused"
      : ours.stdout.includes("1 corruptions")
      ? "replayed"
      : "clean";
    assertEquals(got, want, name);
    if (ours.code === 0) {
      await sh(
        `qemu-img compare ${name}-a.vhdx ${name}-b.vhdx && qemu-img check -q ${name}-a.vhdx`,
        dir.path,
      );
    }
  }));
});

Deno.test({
  name: "openVhdx() replays the shared dirty-log images as qemu-img",
  ignore: !haveSharedImages(),
  async fn() {
    await using dir = await tempDir();
    await sh(
      `bzip2 -dc '${SHARED_IMAGES}vhdx/qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2' > a.vhdx && cp a.vhdx b.vhdx`,
      dir.path,
    );
    await assertSameAsQemu(["info", "a.vhdx"], dir.path);
    const ours = await qimg(["check", "-r", "all", "a.vhdx"], dir.path);
    const theirs = await qemuImg(["check", "-r", "all", "b.vhdx"], dir.path);
    assertEquals(ours, theirs);
    await sh("qemu-img compare a.vhdx b.vhdx && qemu-img check -q a.vhdx", dir.path);
  },
});

Deno.test("openVhdx() ends hostile headers, region tables, metadata and BATs with qemu-img's message", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f vhdx -o block_state_zero=off base.vhdx 10M && qemu-io -f vhdx -c 'write -P 0x11 0 1M' base.vhdx >/dev/null",
    dir.path,
  );
  const md = (i: number) => META + 32 + i * 32; // metadata table entry i
  const item = META + (64 << 10); // file parameters, size, page 83, logical, physical
  const cases: [string, (p: string) => Promise<void>][] = [
    ["empty", (p) => Deno.writeFile(p, new Uint8Array(0))],
    ["signature", (p) => poke(p, 0, [0x56])],
    ["header1-checksum", (p) => poke(p, HEADER1.start + 4, [1, 2, 3, 4])],
    ["headers-checksum", async (p) => {
      await poke(p, HEADER1.start + 4, [1, 2, 3, 4]);
      await poke(p, HEADER2.start + 4, [1, 2, 3, 4]);
    }],
    ["header-version", async (p) => {
      await poke(p, HEADER1.start + 66, [2, 0], HEADER1);
      await poke(p, HEADER2.start + 66, [2, 0], HEADER2);
    }],
    ["same-sequence", async (p) => {
      await poke(p, HEADER1.start + 8, le64(5n), HEADER1);
      await poke(p, HEADER2.start + 8, le64(5n), HEADER2);
    }],
    ["log-overlaps-bat", async (p) => {
      await poke(p, HEADER1.start + 68, le32(2 * MiB), HEADER1);
      await poke(p, HEADER2.start + 68, le32(2 * MiB), HEADER2);
    }],
    ["region-checksum", (p) => poke(p, REGION.start + 4, [0, 0, 0, 0])],
    ["region-signature", (p) => poke(p, REGION.start, [0x52], REGION)],
    ["region-count", (p) => poke(p, REGION.start + 8, le32(2048), REGION)],
    ["region-count-1", (p) => poke(p, REGION.start + 8, le32(1), REGION)],
    ["region-required-unknown", async (p) => {
      await poke(p, REGION.start + 8, le32(3), REGION);
      await poke(p, REGION.start + 80, [1, 2, 3], REGION);
      await poke(p, REGION.start + 96, le64(BigInt(40 * MiB)), REGION);
      await poke(p, REGION.start + 104, [...le32(MiB), 1, 0, 0, 0], REGION);
    }],
    ["region-overlap", (p) => poke(p, REGION.start + 64, le64(BigInt(BAT)), REGION)],
    ["region-huge-length", (p) => poke(p, REGION.start + 40, le32(0xfff00000), REGION)],
    ["bat-too-small", (p) => poke(p, REGION.start + 40, le32(8), REGION)],
    ["metadata-offset-huge", (p) => poke(p, REGION.start + 64, le64(1n << 62n), REGION)],
    ["metadata-signature", (p) => poke(p, META, [0x4d])],
    ["metadata-count", (p) => poke(p, META + 10, [0xff, 0xff])],
    ["metadata-count-2047", (p) => poke(p, META + 10, [0xff, 0x07])],
    ["metadata-missing", (p) => poke(p, META + 10, [4, 0])],
    ["metadata-duplicate", (p) => poke(p, md(1), [0x37, 0x67, 0xa1, 0xca])],
    ["metadata-required-unknown", (p) => poke(p, md(2), [1, 2, 3, 4])],
    ["metadata-item-huge", (p) => poke(p, md(1) + 16, le32(0xffffff00))],
    ["has-parent", (p) => poke(p, item + 4, le32(2))],
    ["has-parent-locator", async (p) => {
      await poke(p, item + 4, le32(2));
      await poke(p, META + 10, [6, 0]);
      await poke(p, md(5), [
        0x2d,
        0x5f,
        0xd3,
        0xa8,
        0x0b,
        0xb3,
        0x4d,
        0x45,
        0xab,
        0xf7,
        0xd3,
        0xd8,
        0x48,
        0x34,
        0xab,
        0x0c,
      ]);
    }],
    ["block-size-0", (p) => poke(p, item, le32(0))],
    ["block-size-3M", (p) => poke(p, item, le32(3 * MiB))],
    ["block-size-512M", (p) => poke(p, item, le32(512 * MiB))],
    ["logical-4096", (p) => poke(p, item + 32, le32(4096))],
    ["logical-1000", (p) => poke(p, item + 32, le32(1000))],
    ["size-huge", (p) => poke(p, item + 8, le64(1n << 62n))],
    ["size-odd", (p) => poke(p, item + 8, le64(10000001n))],
    ["bat-past-eof", (p) => poke(p, BAT, le64((1n << 40n) | 6n))],
    ["bat-end-past-eof", async (p) => {
      const size = (await Deno.stat(p)).size;
      await poke(p, BAT + 8, le64(BigInt(size - MiB) | 6n));
    }],
    ["bat-overflow", (p) => poke(p, BAT, le64(0xfffffffffff00006n))],
    ["bat-in-log", (p) => poke(p, BAT, le64(BigInt(MiB) | 6n))],
    ["bat-partial", (p) => poke(p, BAT, le64(BigInt(8 * MiB) | 7n))],
    ["bat-state-4", (p) => poke(p, BAT, le64(BigInt(8 * MiB) | 4n))],
    ["bat-offset-0", (p) => poke(p, BAT, le64(6n))],
    ["log-version", async (p) => {
      await poke(p, HEADER2.start + 48, [1], HEADER2);
      await poke(p, HEADER2.start + 64, [1], HEADER2);
    }],
    ["log-guid-no-entries", (p) => poke(p, HEADER2.start + 48, [1], HEADER2)],
    ["log-version-only", (p) => poke(p, HEADER2.start + 64, [1], HEADER2)],
    ["log-offset-unaligned", (p) => poke(p, HEADER2.start + 72, le64(BigInt(MiB + 4096)), HEADER2)],
    ["log-offset-0", (p) => poke(p, HEADER2.start + 72, le64(0n), HEADER2)],
    ["log-length-unaligned", async (p) => {
      await poke(p, HEADER2.start + 48, [1], HEADER2);
      await poke(p, HEADER2.start + 68, le32(MiB + 4096), HEADER2);
    }],
    ["log-offset-huge", async (p) => {
      await poke(p, HEADER2.start + 48, [1], HEADER2);
      await poke(p, HEADER2.start + 72, le64(1n << 60n), HEADER2);
    }],
    ["log-length-4G", async (p) => {
      await poke(p, HEADER2.start + 48, [1], HEADER2);
      await poke(p, HEADER2.start + 68, le32(0xfff00000), HEADER2);
    }],
  ];
  // Independent files: a few cases at a time keep the test short.
  const runCase = async ([name, mutate]: (typeof cases)[number]) => {
    const file = `${name}.vhdx`;
    await sh(`cp base.vhdx ${file}`, dir.path);
    await mutate(`${dir.path}/${file}`);
    const info = await assertSameAsQemu(["info", "-f", "vhdx", file], dir.path);
    // check opens without the BAT check (qemu's BDRV_O_CHECK); a convert only adds to an image that opens.
    const more = [["check", "-f", "vhdx", file], ["check", "-r", "all", "-f", "vhdx", file]];
    if (info.code === 0) more.unshift(["convert", "-f", "vhdx", "-O", "raw", file, `${file}.raw`]);
    // One command at a time per file: qemu locks the image.
    for (const args of more) {
      const r = await assertSameAsQemu(args, dir.path);
      assertEquals(r.stderr.includes("internal error"), false, r.stderr);
    }
    assertEquals(info.stderr.includes("internal error"), false, info.stderr);
  };
  for (let i = 0; i < cases.length; i += 6) await Promise.all(cases.slice(i, i + 6).map(runCase));
});
