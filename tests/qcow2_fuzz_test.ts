/**
 * Hostile qcow2 images: a seeded PRNG pokes headers, L1/L2 tables,
 * refcount structures and snapshot tables of small images made by
 * qemu-img/qemu-io, then runs info, check, map and convert in-process on
 * in-memory files. Each must succeed or fail cleanly (`qimg: ...`, a proper
 * exit code), never with an internal error or a stack trace, within a time
 * bound. QIMG_FUZZ_CASES sets the number of cases per image, QIMG_FUZZ_SEED
 * the first seed.
 */

import { assertTrue } from "./_assert.ts";
import { assertSameAsQemu, qemuImg, sh, tempDir } from "./_util.ts";
import { DenoFile } from "../src/file.ts";
import { main } from "../src/command.ts";
import { reportError } from "../src/report.ts";
import { memIo, type Outcome, prng, problem, runIn, storeOf } from "./_fuzz.ts";

/** Where an image's metadata lives, to aim pokes at it. */
function regions(b: Uint8Array): [number, number][] {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const cs = 2 ** v.getUint32(20);
  const out: [number, number][] = [[0, 112], [0, Math.min(cs, 4096)]];
  const inFile = (off: number, len: number) => off >= 0 && off + len <= b.length;
  const add = (off: number, len: number) => {
    if (inFile(off, 8)) out.push([off, Math.min(len, b.length - off)]);
  };
  const l1 = Number(v.getBigUint64(40) & 0xffffffffffffn);
  const l1Size = v.getUint32(36);
  add(l1, l1Size * 8);
  for (let i = 0; i < Math.min(l1Size, 64) && inFile(l1 + 8 * i, 8); i++) {
    const l2 = Number(v.getBigUint64(l1 + 8 * i) & 0x00fffffffffffe00n);
    if (l2) add(l2, cs);
  }
  const rt = Number(v.getBigUint64(48) & 0xffffffffffffn);
  add(rt, v.getUint32(56) * cs);
  for (let i = 0; i < 8 && inFile(rt + 8 * i, 8); i++) {
    const rb = Number(v.getBigUint64(rt + 8 * i) & 0x00fffffffffffe00n);
    if (rb) add(rb, cs);
  }
  const snap = Number(v.getBigUint64(64) & 0xffffffffffffn);
  if (v.getUint32(60)) add(snap, 512);
  return out;
}

const INTERESTING64 = [
  0n,
  1n,
  0x200n,
  0x10000n,
  0x10200n,
  0x20000n,
  0x30000n,
  0x7fffffffn,
  0x80000000n,
  0xffffffffn,
  1n << 40n,
  (1n << 55n) - 512n,
  1n << 56n,
  1n << 62n,
  1n << 63n,
  (1n << 63n) | 0x10000n,
  (1n << 62n) | 0x30000n,
  0x7fffffffffffffffn,
  0xffffffffffffffffn,
];
const INTERESTING32 = [
  0,
  1,
  2,
  8,
  9,
  16,
  21,
  22,
  64,
  0x7fff,
  0xffff,
  0x10000,
  0x7fffffff,
  0x80000000,
  0xffffffff,
];

/** Applies 1-4 pokes chosen by `rand`; returns a description for the report. */
function mutate(b: Uint8Array, rand: () => number): string {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const rs = regions(b);
  const pick = <T>(a: T[]): T => a[Math.floor(rand() * a.length)];
  const done: string[] = [];
  const n = 1 + Math.floor(rand() * 4);
  for (let i = 0; i < n; i++) {
    const [start, len] = pick(rs);
    const kind = Math.floor(rand() * 5);
    const at = start + Math.floor(rand() * Math.max(1, len - 8)) & (kind >= 3 ? ~7 : ~0);
    if (at + 8 > b.length) continue;
    switch (kind) {
      case 0:
        b[at] ^= 1 << Math.floor(rand() * 8);
        done.push(`flip@${at}`);
        break;
      case 1:
        b[at] = Math.floor(rand() * 256);
        done.push(`byte@${at}`);
        break;
      case 2:
        v.setUint32(at, pick(INTERESTING32));
        done.push(`u32@${at}`);
        break;
      case 3:
        v.setBigUint64(at, pick(INTERESTING64));
        done.push(`u64@${at}`);
        break;
      default: {
        // An offset within (or just past) the file, aligned or not.
        const off = BigInt(
          Math.floor(rand() * (b.length + 0x20000)) & ~(rand() < 0.7 ? 0xffff : 0x1ff),
        );
        v.setBigUint64(at, (v.getBigUint64(at) & 0xff000000000001ffn) | off);
        done.push(`offset@${at}`);
      }
    }
  }
  return done.join(",");
}

const VERBOSE = Deno.env.get("QIMG_FUZZ_VERBOSE") === "1";
/** Debugging one case: QIMG_FUZZ_ONLY=v2:263 runs it, QIMG_FUZZ_DUMP=path saves its image. */
const ONLY = Deno.env.get("QIMG_FUZZ_ONLY");
const DUMP = Deno.env.get("QIMG_FUZZ_DUMP");

const IMAGES: [string, string][] = [
  ["v2", "-o compat=0.10"],
  ["v3", ""],
  ["ext", "-o extended_l2=on"],
  ["c512", "-o cluster_size=512"],
  ["r1", "-o refcount_bits=1,cluster_size=4k"],
];

Deno.test("qcow2 commands fail cleanly on fuzzed images", async () => {
  await using dir = await tempDir();
  const writes = "-c 'write -P 1 0 8k' -c 'write -c -P 2 64k 64k' -c 'write -z 192k 64k' " +
    "-c 'write -P 3 300k 20k' -c 'write -c -P 4 512k 64k'";
  const setup = IMAGES.map(([name, opts]) =>
    `qemu-img create -q -f qcow2 ${opts} ${name}.qcow2 1M && qemu-io -f qcow2 ${writes} ${name}.qcow2 >/dev/null`
  );
  setup.push(
    "qemu-img snapshot -c s1 v3.qcow2 && qemu-io -f qcow2 -c 'write -P 5 0 64k' v3.qcow2 >/dev/null",
  );
  setup.push("qemu-img snapshot -c s2 v3.qcow2 && qemu-img bitmap --add v3.qcow2 bm");
  await sh(setup.join(" && "), dir.path);

  const perImage = Number(Deno.env.get("QIMG_FUZZ_CASES") ?? "500");
  const firstSeed = Number(Deno.env.get("QIMG_FUZZ_SEED") ?? "1");
  const failures: string[] = [];
  let runs = 0;
  const stats = new Map<string, number>();
  for (const [name] of IMAGES) {
    const clean = await Deno.readFile(`${dir.path}/${name}.qcow2`);
    for (let c = 0; c < perImage && failures.length < 20; c++) {
      const seed = firstSeed + c;
      const b = clean.slice();
      const what = mutate(b, prng(seed * 7919 + name.length));
      if (ONLY && ONLY !== `${name}:${seed}`) continue;
      if (DUMP) await Deno.writeFile(DUMP, b);
      const files = new Map([["x.qcow2", storeOf(b)]]);
      const commands: string[][] = [
        ["info", "x.qcow2"],
        ["info", "--output=json", "x.qcow2"],
        ["check", "x.qcow2"],
        ["check", "--output=json", "x.qcow2"],
        ["map", "--output=json", "x.qcow2"],
        ["snapshot", "-l", "x.qcow2"],
      ];
      // Convert only what is small: a poked size may make a legitimately huge guest.
      const size = new DataView(b.buffer).getBigUint64(24);
      if (size <= 64n << 20n) commands.push(["convert", "-O", "raw", "x.qcow2", "out.raw"]);
      for (const argv of commands) {
        runs++;
        if (VERBOSE) console.error(`${name} seed ${seed} [${what}] ${argv.join(" ")}`);
        let r: Outcome;
        try {
          r = await runIn(files, argv, 10000);
        } catch (e) {
          failures.push(`${name} seed ${seed} [${what}] ${argv.join(" ")}: ${e}`);
          continue;
        }
        const key = `${argv[0]} ${r.code}`;
        stats.set(key, (stats.get(key) ?? 0) + 1);
        const why = problem(argv[0], r);
        if (why) {
          failures.push(
            `${name} seed ${seed} [${what}] ${argv.join(" ")}: ${why}\n${r.err.slice(0, 2000)}`,
          );
        }
        files.delete("out.raw");
      }
    }
  }
  if (VERBOSE) console.error([...stats].sort().map(([k, n]) => `${k}: ${n}`).join("\n"));
  // Most pokes must reach past open, or the fuzzer tests nothing but the header.
  assertTrue(
    (stats.get("check 0") ?? 0) + (stats.get("check 2") ?? 0) + (stats.get("check 3") ?? 0) >
      runs / 20,
    "too few cases open",
  );
  assertTrue(runs >= IMAGES.length * Math.min(perImage, 1), "no cases ran");
  assertTrue(failures.length === 0, `${failures.length} failures:\n${failures.join("\n\n")}`);
});

Deno.test("qcow2 check agrees with qemu-img check on fuzzed images", async () => {
  await using dir = await tempDir();
  const writes = "-c 'write -P 1 0 8k' -c 'write -c -P 2 64k 64k' -c 'write -z 192k 64k' " +
    "-c 'write -P 3 300k 20k'";
  const setup = IMAGES.map(([name, opts]) =>
    `qemu-img create -q -f qcow2 ${opts} ${name}.qcow2 1M && qemu-io -f qcow2 ${writes} ${name}.qcow2 >/dev/null`
  );
  setup.push(
    "qemu-img snapshot -c s1 v3.qcow2 && qemu-io -f qcow2 -c 'write -P 5 0 64k' v3.qcow2 >/dev/null",
  );
  await sh(setup.join(" && "), dir.path);
  const perImage = Number(Deno.env.get("QIMG_FUZZ_ORACLE_CASES") ?? "30");
  const firstSeed = Number(Deno.env.get("QIMG_FUZZ_SEED") ?? "1");
  const path = `${dir.path}/x.qcow2`;
  const failures: string[] = [];
  for (const [name] of IMAGES) {
    const clean = await Deno.readFile(`${dir.path}/${name}.qcow2`);
    for (let c = 0; c < perImage && failures.length < 10; c++) {
      const seed = firstSeed + c;
      const b = clean.slice();
      const what = mutate(b, prng(seed * 104729 + name.length));
      if (ONLY && ONLY !== `${name}:${seed}`) continue;
      // Version 1 makes qemu probe QEMU's old qcow format, which qimg lacks.
      if (new DataView(b.buffer).getUint32(4) === 1) continue;
      await Deno.writeFile(path, b);
      const commands = [["check", path], ["check", "--output=json", path]];
      // More commands on demand: QIMG_FUZZ_ORACLE_ALL=1 adds info, map and snapshot -l.
      if (Deno.env.get("QIMG_FUZZ_ORACLE_ALL") === "1") {
        commands.push(["info", "--output=json", path], ["map", "--output=json", path], [
          "snapshot",
          "-l",
          path,
        ]);
      }
      for (const argv of commands) {
        const io = memIo(new Map());
        io.openFile = (p, o) => DenoFile.open(p, o);
        const code = await main(argv, io).catch((e) => reportError(e, (t) => io.stderr(t)));
        const theirs = await qemuImg(argv);
        const ours = { stdout: io.out, stderr: io.err, code };
        if (JSON.stringify(ours) !== JSON.stringify(theirs)) {
          failures.push(
            `${name} seed ${seed} [${what}] ${argv[0]}: qimg ${
              JSON.stringify(ours).slice(0, 1500)
            }\n` +
              `qemu-img ${JSON.stringify(theirs).slice(0, 1500)}`,
          );
        }
      }
    }
  }
  assertTrue(failures.length === 0, `${failures.length} differences:\n${failures.join("\n\n")}`);
});

Deno.test("qcow2 commands handle what the fuzzer found as qemu-img does", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M && qemu-io -f qcow2 -c 'write -P 1 0 8k' v2.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -o extended_l2=on ext.qcow2 1M",
    dir.path,
  );
  const cases: [string, string, (v: DataView) => void][] = [
    ["v2", "zero flag in a v2 image", (v) => {
      const l2 = Number(v.getBigUint64(Number(v.getBigUint64(40))) & 0xfffffffffe00n);
      v.setBigUint64(l2, v.getBigUint64(l2) | 1n);
    }],
    ["v2", "unaligned L2 table", (v) => v.setBigUint64(Number(v.getBigUint64(40)), 0x24000n)],
    ["v2", "size near 2^64", (v) => v.setBigUint64(24, 0xffffffffffffffffn)],
    ["ext", "size near 2^64 with extended L2", (v) => v.setBigUint64(24, 0xffffffffffffffffn)],
    ["v2", "size 2^63", (v) => v.setBigUint64(24, 1n << 63n)],
    ["v2", "encryption method above 2^31", (v) => v.setUint32(32, 0x80000000)],
  ];
  for (const [base, what, poke] of cases) {
    const b = await Deno.readFile(`${dir.path}/${base}.qcow2`);
    poke(new DataView(b.buffer));
    await Deno.writeFile(`${dir.path}/x.qcow2`, b);
    for (
      const args of [["info", "x.qcow2"], ["map", "--output=json", "x.qcow2"], ["check", "x.qcow2"]]
    ) {
      await assertSameAsQemu(args, dir.path).catch((e) => {
        throw new Error(`${what}: ${e.message}`);
      });
    }
  }
});
