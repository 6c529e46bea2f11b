import { assertEquals } from "./_assert.ts";
import { assertSameAsQemu, hashFile, qemuImg, qimg, sh, tempDir } from "./_util.ts";
import { fullyAllocatedSize, measureQcow2, refcountMetadataSize } from "../src/measure.ts";

const SETUP = "truncate -s 10M s.raw && " +
  "qemu-io -f raw -c 'write -P 1 1M 64k' -c 'write -P 2 4M 1M' -c 'write 9M 4k' s.raw >/dev/null && " +
  "truncate -s 5000 odd.raw && printf abc | dd of=odd.raw bs=1 seek=4500 conv=notrunc 2>/dev/null && " +
  "truncate -s 0 empty && mkdir sub";

Deno.test("measure --size matches qemu-img for raw and qcow2 targets and options", async () => {
  await using dir = await tempDir();
  for (
    const args of [
      ["--size", "1G"],
      ["--size", "1000", "-O", "raw"],
      ["--size", "9223372036854775807", "-O", "raw"],
      ["--output=json", "--size", "9223372036854775807", "-O", "raw"],
      ["--size", "1G", "-O", "raw", "-o", "preallocation=full,size=5"],
      ["--size", "1G", "-O", "qcow2"],
      ["--output=json", "--size", "1G", "-O", "qcow2"],
      ["--size", "0", "-O", "qcow2"],
      ["--size", "12345", "-O", "qcow2", "-o", "extended_l2=on,refcount_bits=1"],
      ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=4k"],
      ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=512"],
      ["--size", "1T", "-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on"],
      ["--size", "1G", "-O", "qcow2", "-o", "extended_l2=on"],
      ["--size", "1G", "-O", "qcow2", "-o", "preallocation=full"],
      ["--size", "1G", "-O", "qcow2", "-o", "preallocation=falloc"],
      ["--size", "1G", "-O", "qcow2", "-o", "preallocation=metadata"],
      ["--size", "1G", "-O", "qcow2", "-o", "compat=0.10"],
      ["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=64", "-o", "lazy_refcounts=on"],
      ["--size", "1G", "-O", "qcow2", "-o", "backing_file=x,nocow=on,extent_size_hint=1M"],
      ["--size", "1G", "-O", "qcow2", "-o", "size=5"],
      ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=0x10k"],
      ["--size", "0x10k"],
      ["--size", "64T", "-O", "qcow2", "-o", "cluster_size=2M"],
    ]
  ) await assertSameAsQemu(["measure", ...args], dir.path);
});

Deno.test("measure of an image counts its data clusters as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    SETUP + " && qemu-img create -q -f qcow2 -b s.raw -F raw o.qcow2 && " +
      "qemu-io -c 'write -P 3 0 128k' -c 'write -z 4M 64k' o.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M",
    dir.path,
  );
  for (
    const args of [
      ["s.raw"],
      ["--output=json", "s.raw"],
      ["-O", "qcow2", "s.raw"],
      ["-O", "qcow2", "-o", "cluster_size=4k", "s.raw"],
      ["-O", "qcow2", "-o", "cluster_size=2M,preallocation=full", "--output=json", "s.raw"],
      ["-O", "qcow2", "-o", "backing_file=s.raw", "s.raw"],
      ["-O", "qcow2", "-o", "size=3M", "s.raw"],
      ["-O", "qcow2", "-o", "cluster_size=512", "odd.raw"],
      ["-O", "qcow2", "empty"],
      ["-f", "raw", "-U", "-O", "qcow2", "s.raw"],
      ["--image-opts", "driver=raw,file.filename=s.raw"],
      ["-O", "raw", "o.qcow2"],
      ["-O", "qcow2", "-o", "compat=0.10", "o.qcow2"],
      ["-O", "qcow2", "v2.qcow2"],
    ]
  ) await assertSameAsQemu(["measure", ...args], dir.path);
});

Deno.test("measure refuses bad input with qemu-img's messages and exit codes", async () => {
  await using dir = await tempDir();
  await sh(SETUP, dir.path);
  for (
    const args of [
      [],
      ["s.raw", "s.raw"],
      ["--size", "1G", "s.raw"],
      ["-f", "raw"],
      ["-l", "snap"],
      ["--image-opts"],
      ["nofile"],
      ["sub"],
      ["-O", "foo", "--size", "1G"],
      ["-O", "foo", "nofile"],
      ["--size", "1x"],
      ["--size", "-1"],
      ["--size", "8E"],
      ["--output=xml"],
      ["--output=xml", "--size", "x"],
      ["--size", "x", "--output=xml"],
      ["--size", "1G", "-O", "qcow2", "-o", "foo=bar"],
      ["--size", "1G", "-O", "qcow2", "-o", "help"],
      ["--size", "1G", "-O", "qcow2", "-o", ""],
      ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=4k,"],
      ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=4k,,"],
      ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=x"],
      ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=1000"],
      ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=4M"],
      ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=8k,extended_l2=on"],
      ["--size", "1G", "-O", "qcow2", "-o", "extended_l2=maybe"],
      ["--size", "1G", "-O", "qcow2", "-o", "compat=v3"],
      ["--size", "1G", "-O", "qcow2", "-o", "compat=0.10,refcount_bits=1"],
      ["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=3"],
      ["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=x"],
      ["--size", "1G", "-O", "qcow2", "-o", "preallocation=bogus"],
      ["--size", "1G", "-O", "qcow2", "-o", "encrypt.format=luks"],
      ["--size", "1E", "-O", "qcow2"],
      ["--size", "9223372036854775807", "-O", "qcow2"],
      ["-O", "qcow2", "-o", "size=1E", "s.raw"],
      ["-l", "snap", "s.raw"],
      ["-l", "snapshot.id=1", "s.raw"],
      ["-l", "snapshot.foo=1", "s.raw"],
      ["--object", "bogus", "--size", "1G"],
    ]
  ) await assertSameAsQemu(["measure", ...args], dir.path);
});

/** qemu-img's help text with the two lines that legitimately differ masked. */
function maskHelp(text: string): string {
  return text
    .replace(/^qimg version 7\.2\.\d+ \([^\n]*\)\n/, "qimg version 7.2.x (...)\n")
    .replace(/^Supported formats:.*$/m, "Supported formats: ...");
}

Deno.test("measure answers bad options with glibc's message and the help text", async () => {
  await using dir = await tempDir();
  for (
    const args of [
      ["-x"],
      ["-qx"],
      ["-f", "raw", "-x"],
      ["-O"],
      ["-l"],
      ["--size"],
      ["--s"],
      ["--output"],
      ["--foo"],
      ["--foo=bar"],
      ["--help=3"],
      ["--ima=3"],
      ["--o", "json", "--size", "1G"],
      ["-h"],
    ]
  ) {
    const ours = await qimg(["measure", ...args], dir.path);
    const theirs = await qemuImg(["measure", ...args], dir.path);
    assertEquals(
      { stdout: maskHelp(ours.stdout), stderr: ours.stderr, code: ours.code },
      { stdout: maskHelp(theirs.stdout), stderr: theirs.stderr, code: theirs.code },
      `measure ${args.join(" ")}`,
    );
  }
});

Deno.test("measure leaves its input unmodified", async () => {
  await using dir = await tempDir();
  await sh(SETUP, dir.path);
  const before = await hashFile(`${dir.path}/s.raw`);
  assertEquals((await qimg(["measure", "-O", "qcow2", "s.raw"], dir.path)).code, 0);
  assertEquals(await hashFile(`${dir.path}/s.raw`), before);
});

Deno.test("refcountMetadataSize() and fullyAllocatedSize() follow the qcow2 layout", () => {
  // 1 GiB, 64 KiB clusters: header + 2 L2 clusters + 1 L1 cluster, then one
  // refcount block and one table cluster covering 16388 clusters.
  assertEquals(refcountMetadataSize(16388, 65536, 4), 131072);
  assertEquals(
    fullyAllocatedSize(1 << 30, { clusterSize: 65536, refcountOrder: 4, extendedL2: false }),
    1074135040,
  );
  // 1-bit refcounts on 512-byte clusters need many blocks: the fixed point counts them too.
  assertEquals(refcountMetadataSize(100000, 512, 0), 25 * 512 + 512);
});

Deno.test("measureQcow2() sizes bitmaps as qemu-img", async () => {
  // qemu-img's own figures for a 100 MiB qcow2 with bitmaps of 64k and 4k granularity.
  const source = {
    extents: async function* () {},
    bitmaps: [{ name: "bm1", granularity: 65536 }, {
      name: "bitmap-number-two",
      granularity: 4096,
    }],
  };
  const r = await measureQcow2(100 << 20, {}, source);
  assertEquals(r, { required: 327680, fullyAllocated: 105185280, bitmaps: 327680 });
  const small = await measureQcow2(100 << 20, { cluster_size: 4096 }, source);
  assertEquals(small.bitmaps, 20480);
  assertEquals((await measureQcow2(100 << 20, { compat: "0.10" }, source)).bitmaps, undefined);
});

Deno.test("measure prints the bitmaps size of qcow2 sources as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 b.qcow2 1G && qemu-img bitmap --add -g 512 b.qcow2 a && " +
      "qemu-img bitmap --add -g 2M b.qcow2 ünïcode && qemu-img bitmap --add b.qcow2 x && " +
      "qemu-img create -q -f qcow2 plain.qcow2 1M",
    dir.path,
  );
  for (
    const args of [
      ["-O", "qcow2", "b.qcow2"],
      ["--output=json", "-O", "qcow2", "-o", "cluster_size=2M", "b.qcow2"],
      ["-O", "qcow2", "-o", "compat=0.10", "b.qcow2"],
      ["-O", "qcow2", "plain.qcow2"],
      ["-O", "raw", "b.qcow2"],
    ]
  ) await assertSameAsQemu(["measure", ...args], dir.path);
});

Deno.test("measure -l measures a qcow2 internal snapshot as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 sn.qcow2 4M && qemu-io -c 'write -P 1 0 1M' sn.qcow2 >/dev/null && " +
      "qemu-img snapshot -c first sn.qcow2 && qemu-img resize -q sn.qcow2 8M && " +
      "qemu-io -c 'write -P 2 5M 2M' sn.qcow2 >/dev/null && qemu-img snapshot -c 2 sn.qcow2 && " +
      "qemu-io -c 'discard 0 1M' sn.qcow2 >/dev/null",
    dir.path,
  );
  for (
    const args of [
      ["-l", "first"],
      ["-l", "1"],
      ["-l", "2"],
      ["-l", "snapshot.name=2"],
      ["-l", "snapshot.id=2"],
      ["-l", "snapshot.id=1,snapshot.name=first"],
      ["-l", "snapshot.id=1,snapshot.name=2"],
      ["-l", "nope"],
      ["--output=json", "-l", "first"],
    ]
  ) {
    await assertSameAsQemu(["measure", "-O", "qcow2", ...args, "sn.qcow2"], dir.path);
  }
  await assertSameAsQemu(["measure", "-O", "raw", "-l", "first", "sn.qcow2"], dir.path);
  // The snapshot changes the answer (else this proves little).
  const now = await qemuImg(["measure", "-O", "qcow2", "sn.qcow2"], dir.path);
  const then = await qemuImg(["measure", "-O", "qcow2", "-l", "first", "sn.qcow2"], dir.path);
  assertEquals(now.stdout === then.stdout, false);
});
