/**
 * The qcow2 write path against Debian's qemu-img and qemu-io: images qimg
 * writes pass `qemu-img check` (no errors, no leaks), compare identical, and
 * come out the size qemu-img makes them; library writes (partial clusters
 * over a backing file, compressed and snapshot-shared clusters, zeroes)
 * match the same writes done by qemu-io on a twin image.
 */

import { assertEquals, assertRejects, assertTrue } from "./_assert.ts";
import { qimg, runProgram, sh, tempDir } from "./_util.ts";
import { openImageChain } from "../src/image.ts";
import type { Qcow2Image } from "../src/qcow2.ts";

/** Raw inputs: text (compresses), random data, holes, an unaligned end. */
const INPUTS = [
  "seq 1 400000 > t.raw && truncate -s 6M t.raw",
  "head -c 1M /dev/urandom > r.raw && truncate -s 3M r.raw",
  "dd if=t.raw of=r.raw bs=64k seek=40 count=5 conv=notrunc status=none",
  "head -c 100000 /dev/urandom > odd.raw",
].join(" && ");

async function qemuCheck(path: string, cwd?: string): Promise<void> {
  const r = await runProgram("qemu-img", ["check", path], cwd);
  assertEquals(r.code, 0, `qemu-img check ${path}: ${r.stdout}${r.stderr}`);
  assertTrue(!/ERROR|[Ll]eaked/.test(r.stdout + r.stderr), r.stdout);
}

async function qemuCompare(a: string, b: string, cwd?: string): Promise<void> {
  const r = await runProgram("qemu-img", ["compare", a, b], cwd);
  assertEquals(r.code, 0, `qemu-img compare ${a} ${b}: ${r.stdout}${r.stderr}`);
}

/** Runs the same convert with qemu-img and qimg; checks, compares, and holds sizes within 2%. */
async function convertBoth(dir: string, args: string[], src: string): Promise<void> {
  const label = `convert ${args.join(" ")} ${src}`;
  const q = await runProgram("qemu-img", ["convert", ...args, src, "q.qcow2"], dir);
  assertEquals(q.code, 0, q.stderr);
  const o = await qimg(["convert", ...args, src, "o.qcow2"], dir);
  assertEquals(o, { stdout: "", stderr: "", code: 0 }, label);
  await qemuCheck(`${dir}/o.qcow2`);
  await qemuCompare(`${dir}/${src}`, `${dir}/o.qcow2`);
  const sq = await Deno.stat(`${dir}/q.qcow2`);
  const so = await Deno.stat(`${dir}/o.qcow2`);
  assertTrue(
    Math.abs(so.size - sq.size) <= sq.size * 0.02,
    `${label}: size ${so.size} vs ${sq.size}`,
  );
  const bq = sq.blocks ?? 0, bo = so.blocks ?? 0;
  assertTrue(Math.abs(bo - bq) <= Math.max(16, bq * 0.02), `${label}: blocks ${bo} vs ${bq}`);
  await Deno.remove(`${dir}/q.qcow2`);
  await Deno.remove(`${dir}/o.qcow2`);
}

Deno.test("convert -O qcow2 across cluster sizes, refcount widths and compat as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  for (
    const o of [
      "cluster_size=512", // refcount blocks and the refcount table grow
      "cluster_size=512,refcount_bits=1",
      "cluster_size=512,refcount_bits=64", // the refcount table moves
      "cluster_size=1k,refcount_bits=64",
      "cluster_size=4k,refcount_bits=8",
      "cluster_size=2M",
      "refcount_bits=2",
      "compat=0.10",
      "compat=0.10,cluster_size=512",
      "extended_l2=on",
      "extended_l2=on,cluster_size=2M",
    ]
  ) {
    await convertBoth(dir.path, ["-O", "qcow2", "-o", o], "r.raw");
  }
  await convertBoth(dir.path, ["-O", "qcow2"], "odd.raw");
  await convertBoth(dir.path, ["-O", "qcow2", "-o", "cluster_size=512"], "t.raw");
});

Deno.test("convert -c -O qcow2 packs zlib and zstd clusters as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  for (
    const o of [
      "cluster_size=64k",
      "cluster_size=2M",
      "cluster_size=4k,refcount_bits=1", // one compressed cluster per host cluster
      "cluster_size=1k,refcount_bits=64",
      "compat=0.10",
      "compression_type=zstd",
      "compression_type=zstd,cluster_size=4k",
      "extended_l2=on,cluster_size=16k",
    ]
  ) {
    await convertBoth(dir.path, ["-c", "-O", "qcow2", "-o", o], "t.raw");
  }
  await convertBoth(dir.path, ["-c", "-O", "qcow2", "-o", "cluster_size=512"], "r.raw");
  // zlib: node:zlib's deflate (compress_pool.ts) may differ from qemu's zlib
  // by a byte here and there; content matches and the size stays within 2%.
  await sh("qemu-img convert -c -O qcow2 t.raw q.qcow2", dir.path);
  assertEquals(
    (await qimg(["convert", "-c", "-O", "qcow2", "t.raw", "o.qcow2"], dir.path)).code,
    0,
  );
  await qemuCheck(`${dir.path}/o.qcow2`);
  await qemuCompare(`${dir.path}/q.qcow2`, `${dir.path}/o.qcow2`);
  const q = (await Deno.stat(`${dir.path}/q.qcow2`)).size;
  const o = (await Deno.stat(`${dir.path}/o.qcow2`)).size;
  assertTrue(Math.abs(o - q) <= q * 0.02, `size ${o} against qemu-img's ${q}`);
});

/** Opens `path` for writing with its backing chain; `below` reads the backing layers. */
async function openForWrite(path: string) {
  const image = await openImageChain(path, { write: true });
  const top = image.chain[0].image as Qcow2Image;
  const next = image.chain[1]?.image;
  const below = next ? (o: number, b: Uint8Array) => next.read(o, b) : undefined;
  return { image, top, below };
}

function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed) & 0xff || 1;
  return b;
}

/** qemu-io's `write -P` pattern bytes, for the twin. */
function filled(n: number, v: number): Uint8Array {
  return new Uint8Array(n).fill(v);
}

Deno.test("Qcow2Image.write copies partial clusters from the backing file as qemu-io", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 base.qcow2 4M && " +
      "qemu-io -f qcow2 -c 'write -P 0x11 0 2M' -c 'write -P 0x22 3M 1M' base.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 && cp top.qcow2 twin.qcow2 && " +
      "qemu-io -f qcow2 -c 'write -P 0x33 65836 1000' -c 'write -P 0x44 200000 70000' " +
      "-c 'write -P 0x55 4193000 1304' -c 'write -P 0x66 2100000 3000' twin.qcow2 >/dev/null",
    dir.path,
  );
  const { image, top, below } = await openForWrite(`${dir.path}/top.qcow2`);
  await top.write(65836, filled(1000, 0x33), below);
  await top.write(200000, filled(70000, 0x44), below);
  await top.write(4193000, filled(1304, 0x55), below);
  await top.write(2100000, filled(3000, 0x66), below);
  await image.close();
  await qemuCheck(`${dir.path}/top.qcow2`);
  await qemuCompare(`${dir.path}/twin.qcow2`, `${dir.path}/top.qcow2`);
  const map = (f: string) =>
    runProgram("qemu-img", ["map", "--output=json", f], dir.path).then((r) =>
      r.stdout.replace(/"offset": \d+/g, "")
    );
  assertEquals(await map("top.qcow2"), await map("twin.qcow2"));
});

Deno.test("Qcow2Image.write rewrites compressed and snapshot-shared clusters (copy-on-write)", async () => {
  await using dir = await tempDir();
  await sh(
    "seq 1 300000 > s.raw && truncate -s 4M s.raw && qemu-img convert -c -O qcow2 s.raw c.qcow2 && " +
      "qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=2 snap.qcow2 4M && " +
      "qemu-io -f qcow2 -c 'write -P 7 0 1M' snap.qcow2 >/dev/null && " +
      "qemu-img snapshot -c s1 snap.qcow2 && cp c.qcow2 ctwin.qcow2 && cp snap.qcow2 stwin.qcow2 && " +
      "qemu-io -f qcow2 -c 'write -P 0x44 70000 100' -c 'write -P 0x45 131072 65536' ctwin.qcow2 >/dev/null && " +
      "qemu-io -f qcow2 -c 'write -P 0x46 5000 10000' -c 'write -P 0x47 512k 8k' stwin.qcow2 >/dev/null",
    dir.path,
  );
  let w = await openForWrite(`${dir.path}/c.qcow2`);
  await w.top.write(70000, filled(100, 0x44));
  await w.top.write(131072, filled(65536, 0x45));
  // Reads see the new data at once (the decompressed-cluster cache is dropped).
  const back = new Uint8Array(100);
  await w.top.read(70000, back);
  assertEquals(back, filled(100, 0x44));
  await w.image.close();
  await qemuCheck(`${dir.path}/c.qcow2`);
  await qemuCompare(`${dir.path}/ctwin.qcow2`, `${dir.path}/c.qcow2`);

  w = await openForWrite(`${dir.path}/snap.qcow2`);
  await w.top.write(5000, filled(10000, 0x46));
  await w.top.write(512 * 1024, filled(8192, 0x47));
  await w.image.close();
  await qemuCheck(`${dir.path}/snap.qcow2`);
  await qemuCompare(`${dir.path}/stwin.qcow2`, `${dir.path}/snap.qcow2`);
  // The snapshot still holds the old data.
  await sh(
    "qemu-img convert -l s1 -O raw snap.qcow2 s1.raw && qemu-io -f raw -c 'read -P 7 0 1M' s1.raw | grep -q 'read 1048576'",
    dir.path,
  );
});

Deno.test("Qcow2Image.writeZeroes uses zero clusters on v3, explicit zeroes on v2, as qemu-io", async () => {
  await using dir = await tempDir();
  for (const compat of ["1.1", "0.10"]) {
    await sh(
      `rm -f *.qcow2 && qemu-img create -q -f qcow2 -o compat=${compat} base.qcow2 4M && ` +
        "qemu-io -f qcow2 -c 'write -P 1 0 4M' base.qcow2 >/dev/null && " +
        `qemu-img create -q -f qcow2 -o compat=${compat} z.qcow2 4M && ` +
        "qemu-io -f qcow2 -c 'write -P 2 0 2M' z.qcow2 >/dev/null && cp z.qcow2 ztwin.qcow2 && " +
        `qemu-img create -q -f qcow2 -o compat=${compat} -b base.qcow2 -F qcow2 b.qcow2 && cp b.qcow2 btwin.qcow2 && ` +
        "qemu-io -f qcow2 -c 'write -z -u 0 64k' -c 'write -z 128k 128k' -c 'write -z 300000 1000' " +
        "-c 'write -z 3M 64k' ztwin.qcow2 >/dev/null && " +
        "qemu-io -f qcow2 -c 'write -z 64k 128k' -c 'write -z 1000 3000' btwin.qcow2 >/dev/null",
      dir.path,
    );
    let w = await openForWrite(`${dir.path}/z.qcow2`);
    await w.top.writeZeroes(0, 65536, { mayUnmap: true });
    await w.top.writeZeroes(131072, 131072);
    await w.top.writeZeroes(300000, 1000);
    await w.top.writeZeroes(3 * 1024 * 1024, 65536);
    await w.image.close();
    await qemuCheck(`${dir.path}/z.qcow2`);
    await qemuCompare(`${dir.path}/ztwin.qcow2`, `${dir.path}/z.qcow2`);
    if (compat === "1.1") {
      const map = await runProgram("qemu-img", ["map", "--output=json", "z.qcow2"], dir.path);
      assertTrue(
        /"start": 0, "length": 65536, [^}]*"zero": true, "data": false}/.test(map.stdout),
        map.stdout,
      );
    }

    w = await openForWrite(`${dir.path}/b.qcow2`);
    await w.top.writeZeroes(65536, 131072, { backingRead: w.below });
    await w.top.writeZeroes(1000, 3000, { backingRead: w.below });
    await w.image.close();
    await qemuCheck(`${dir.path}/b.qcow2`);
    await qemuCompare(`${dir.path}/btwin.qcow2`, `${dir.path}/b.qcow2`);
  }
});

Deno.test("Qcow2Image.write grows refcount blocks and the refcount table (scattered 512-byte clusters)", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 g.qcow2 64M && cp g.qcow2 twin.qcow2",
    dir.path,
  );
  const w = await openForWrite(`${dir.path}/g.qcow2`);
  const mirror = new Uint8Array(64 * 1024 * 1024);
  for (let i = 0; i < 1500; i++) {
    const off = (i * 104729) % (64 * 1024 * 1024 - 2048);
    const data = pattern(700, i);
    await w.top.write(off, data);
    mirror.set(data, off);
  }
  await w.image.close();
  await qemuCheck(`${dir.path}/g.qcow2`);
  await Deno.writeFile(`${dir.path}/mirror.raw`, mirror);
  await qemuCompare(`${dir.path}/mirror.raw`, `${dir.path}/g.qcow2`);
  // The refcount table had to move: its one cluster covered 64 blocks of 64 clusters.
  const header = new DataView((await Deno.readFile(`${dir.path}/g.qcow2`)).buffer);
  assertTrue(header.getBigUint64(48) !== 512n, `reftable at ${header.getBigUint64(48)}`);
  assertTrue(header.getUint32(56) > 1, `reftable clusters ${header.getUint32(56)}`);
});

Deno.test("Qcow2Image.write refuses images whose writes are not supported yet", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f qcow2 s.qcow2 1M && qemu-img snapshot -c s1 s.qcow2", dir.path);
  const sn = await openForWrite(`${dir.path}/s.qcow2`);
  // Past the end: EIO, as qemu's block layer.
  await assertRejects(
    () => sn.top.write(1048576 - 256, new Uint8Array(512)),
    /Input\/output error/,
  );
  const view = await sn.top.atSnapshot((await sn.top.snapshots())[0]);
  await assertRejects(() => view.write(0, new Uint8Array(512)), /snapshot view/);
  await sn.image.close();
  await qemuCheck(`${dir.path}/s.qcow2`);
});

Deno.test("resize grows qcow2 images byte for byte as qemu-img (L1 table moved, exact size)", async () => {
  await using dir = await tempDir();
  for (const size of ["100G", "+1536", "1T", "+1000"]) {
    await sh(
      "rm -f q.qcow2 o.qcow2 && qemu-img create -q -f qcow2 -o cluster_size=4k q.qcow2 1G && " +
        "qemu-io -c 'write -P 3 1M 3M' q.qcow2 >/dev/null && cp q.qcow2 o.qcow2",
      dir.path,
    );
    const theirs = await runProgram("qemu-img", ["resize", "q.qcow2", size], dir.path);
    const ours = await qimg(["resize", "o.qcow2", size], dir.path);
    assertEquals(
      { ...ours, stderr: ours.stderr.replace(/^qimg:/gm, "qemu-img:") },
      theirs,
      `resize ${size}`,
    );
    await sh("cmp q.qcow2 o.qcow2", dir.path);
    await qemuCheck(`${dir.path}/o.qcow2`);
  }
  await sh(
    "qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M && qemu-img snapshot -c s v2.qcow2",
    dir.path,
  );
  const theirs = await runProgram("qemu-img", ["resize", "v2.qcow2", "2M"], dir.path);
  const ours = await qimg(["resize", "v2.qcow2", "2M"], dir.path);
  assertEquals(ours.stderr, theirs.stderr.replace("qemu-img:", "qimg:"));
  assertEquals(ours.code, theirs.code);
});

Deno.test("convert -B zeroes part of a cluster the backing file holds (copy-on-write from the base)", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 b.qcow2 4M && qemu-io -c 'write -P 1 0 1M' b.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 t.qcow2 && " +
      "qemu-io -c 'write -P 0 0 4k' -c 'write -P 0 200k 4k' t.qcow2 >/dev/null",
    dir.path,
  );
  const args = ["convert", "-O", "qcow2", "-B", "b.qcow2", "-F", "qcow2", "t.qcow2"];
  assertEquals((await runProgram("qemu-img", [...args, "q.qcow2"], dir.path)).code, 0);
  assertEquals(await qimg([...args, "o.qcow2"], dir.path), { stdout: "", stderr: "", code: 0 });
  await qemuCheck(`${dir.path}/o.qcow2`);
  await qemuCompare(`${dir.path}/q.qcow2`, `${dir.path}/o.qcow2`);
  await qemuCompare(`${dir.path}/t.qcow2`, `${dir.path}/o.qcow2`);
  assertEquals(
    (await Deno.stat(`${dir.path}/o.qcow2`)).size,
    (await Deno.stat(`${dir.path}/q.qcow2`)).size,
  );
});

Deno.test("Qcow2Image.write and writeZeroes on extended L2 images keep subclusters' contents as qemu-io", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 1 0 4M' base.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k -b base.qcow2 -F qcow2 e.qcow2 && " +
      "qemu-io -c 'write -P 2 4k 4k' -c 'write -z 64k 8k' -c 'write -P 3 1M 64k' e.qcow2 >/dev/null && " +
      "cp e.qcow2 twin.qcow2 && " +
      "qemu-io -c 'write -P 4 6000 3000' -c 'write -P 5 66000 100' -c 'write -P 6 300000 70000' " +
      "-c 'write -z 1M 64k' -c 'write -z 2M 2k' twin.qcow2 >/dev/null",
    dir.path,
  );
  const w = await openForWrite(`${dir.path}/e.qcow2`);
  await w.top.write(6000, filled(3000, 4), w.below);
  await w.top.write(66000, filled(100, 5), w.below);
  await w.top.write(300000, filled(70000, 6), w.below);
  await w.top.writeZeroes(1024 * 1024, 65536, { backingRead: w.below });
  await w.top.writeZeroes(2 * 1024 * 1024, 2048, { backingRead: w.below });
  await w.image.close();
  await qemuCheck(`${dir.path}/e.qcow2`);
  await qemuCompare(`${dir.path}/twin.qcow2`, `${dir.path}/e.qcow2`);
  // The same subclusters allocated and zeroed, and the file ends where qemu's does.
  const map = (f: string) =>
    runProgram("qemu-img", ["map", "--output=json", f], dir.path).then((r) =>
      r.stdout.replace(/"offset": \d+/g, "")
    );
  assertEquals(await map("e.qcow2"), await map("twin.qcow2"));
  assertEquals(
    (await Deno.stat(`${dir.path}/e.qcow2`)).size,
    (await Deno.stat(`${dir.path}/twin.qcow2`)).size,
  );
});

Deno.test("convert -n onto a full qcow2 unmaps zero runs as qemu-img (zero clusters on v3, deallocation on v2, holes punched)", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  for (const compat of ["1.1", "0.10"]) {
    for (const side of ["q", "o"]) {
      await sh(
        `rm -f ${side}.qcow2 && qemu-img create -q -f qcow2 -o compat=${compat} ${side}.qcow2 3M && ` +
          `qemu-io -c 'write -P 9 0 3M' ${side}.qcow2 >/dev/null`,
        dir.path,
      );
    }
    await sh("qemu-img convert -n -O qcow2 r.raw q.qcow2", dir.path);
    const o = await qimg(["convert", "-n", "-O", "qcow2", "r.raw", "o.qcow2"], dir.path);
    assertEquals(o, { stdout: "", stderr: "", code: 0 });
    await qemuCheck(`${dir.path}/o.qcow2`);
    await qemuCompare(`${dir.path}/r.raw`, `${dir.path}/o.qcow2`);
    const map = (f: string) =>
      runProgram("qemu-img", ["map", "--output=json", f], dir.path).then((r) => r.stdout);
    assertEquals(await map("o.qcow2"), await map("q.qcow2"), `compat=${compat}`);
    const sq = await Deno.stat(`${dir.path}/q.qcow2`);
    const so = await Deno.stat(`${dir.path}/o.qcow2`);
    assertEquals(so.size, sq.size);
    assertTrue(
      Math.abs((so.blocks ?? 0) - (sq.blocks ?? 0)) <= 16,
      `blocks ${so.blocks} vs ${sq.blocks}`,
    );
  }
});

Deno.test("qcow2 with an external data file: convert and partial writes land at guest offsets as qemu's", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  for (const o of ["data_file=d.raw", "data_file=d.raw,data_file_raw=on"]) {
    await sh("rm -f q.qcow2 o.qcow2 d.raw qd.raw", dir.path);
    const q = await runProgram(
      "qemu-img",
      ["convert", "-O", "qcow2", "-o", o.replace("d.raw", "qd.raw"), "r.raw", "q.qcow2"],
      dir.path,
    );
    assertEquals(q.code, 0, q.stderr);
    const out = await qimg(["convert", "-O", "qcow2", "-o", o, "r.raw", "o.qcow2"], dir.path);
    assertEquals(out, { stdout: "", stderr: "", code: 0 }, o);
    await qemuCheck("o.qcow2", dir.path);
    await qemuCompare("r.raw", "o.qcow2", dir.path);
    const map = (f: string) =>
      runProgram("qemu-img", ["map", "--output=json", f], dir.path).then((r) =>
        r.stdout.replace(/"q?d\.raw"/g, "")
      );
    assertEquals(await map("o.qcow2"), await map("q.qcow2"), o);
    assertEquals(
      (await Deno.stat(`${dir.path}/d.raw`)).size,
      (await Deno.stat(`${dir.path}/qd.raw`)).size,
    );
  }
  // Compression cannot go to a data file: qemu's ENOTSUP.
  const c = await qimg([
    "convert",
    "-c",
    "-O",
    "qcow2",
    "-o",
    "data_file=c.raw",
    "r.raw",
    "c.qcow2",
  ], dir.path);
  assertEquals(c.stderr, "qimg: error while writing at byte 0: Operation not supported\n");
  // Partial writes, guest cluster 0 (host offset 0) included.
  await sh(
    "qemu-img create -q -f qcow2 -o data_file=$PWD/w.raw w.qcow2 2M && " +
      "qemu-img create -q -f qcow2 -o data_file=$PWD/t.raw t.qcow2 2M && " +
      "qemu-io -c 'write -P 1 100 1000' -c 'write -P 2 70000 200000' -c 'write -z 0 512' t.qcow2 >/dev/null",
    dir.path,
  );
  const w = await openForWrite(`${dir.path}/w.qcow2`);
  await w.top.write(100, filled(1000, 1));
  await w.top.write(70000, filled(200000, 2));
  await w.top.writeZeroes(0, 512);
  await w.image.close();
  await qemuCheck("w.qcow2", dir.path);
  await qemuCompare("t.qcow2", "w.qcow2", dir.path);
});
