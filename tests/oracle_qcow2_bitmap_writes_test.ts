/**
 * Writes to qcow2 images that carry persistent dirty bitmaps: each command
 * run by Debian's qemu-img 7.2 in q/ and by qimg in m/ on copies of the same
 * files; same output and exit code, clean check, identical guest data,
 * same `info` and the same bits (parsed from the files): every write marks
 * the enabled bitmaps, disabled and inconsistent ones stay as they were.
 */

import { assertEquals, assertTrue } from "./_assert.ts";
import { CLI, qemuImg, qimg, sh, tempDir } from "./_util.ts";
import { bitmapsIn, infoOf } from "./_bitmap_util.ts";

/** Sets the in-use flag of the first bitmap directory entry (an image qemu did not close). */
const IN_USE = `python3 -c "
import struct,sys
f=open(sys.argv[1],'r+b'); d=f.read(); e=struct.unpack('>I',d[100:104])[0]
while struct.unpack('>I',d[e:e+4])[0]!=0x23852875: e+=8+(struct.unpack('>I',d[e+4:e+8])[0]+7)//8*8
q=struct.unpack('>Q',d[e+24:e+32])[0]; f.seek(q+12)
f.write(struct.pack('>I',struct.unpack('>I',d[q+12:q+16])[0]|1))"`;

/** Makes the inputs in q/ by `setup`, copies them to m/. */
async function inputs(setup: string): Promise<{ path: string } & AsyncDisposable> {
  const dir = await tempDir();
  await sh(`mkdir q && (cd q && ${setup}) && cp -r q m`, dir.path);
  return dir;
}

/** Runs `args` in q/ (qemu-img) and m/ (qimg); compares output, then each of `images`. */
async function same(dir: string, args: string[], images: string[]): Promise<void> {
  const theirs = await qemuImg(args, `${dir}/q`);
  const ours = await qimg(args, `${dir}/m`);
  const what = args.join(" ");
  assertEquals(ours, theirs, what);
  for (const img of images) {
    const check = await qemuImg(["check", img], `${dir}/m`);
    assertEquals(check.code, 0, `${what}: ${img}: ${check.stdout}${check.stderr}`);
    assertTrue(!/leaked/.test(check.stdout), `${what}: ${img}: ${check.stdout}`);
    await sh(`qemu-img compare q/${img} m/${img} >/dev/null`, dir);
    assertEquals(await infoOf(img, `${dir}/m`), await infoOf(img, `${dir}/q`), `${what}: ${img}`);
    assertEquals(await bitmapsIn(`${dir}/m/${img}`), await bitmapsIn(`${dir}/q/${img}`), what);
  }
}

/** An image with an enabled bitmap made dirty by qemu-io, a disabled one and a coarse one. */
const IMAGE = "qemu-img create -q -f qcow2 t.qcow2 4M && qemu-img bitmap --add t.qcow2 a && " +
  "qemu-img bitmap --add -g 4k --disable t.qcow2 d && qemu-img bitmap --add -g 512k t.qcow2 c && " +
  "qemu-io -c 'write -P 1 0 64k' -c 'write 3968k 128k' t.qcow2 >/dev/null 2>&1; " +
  "qemu-img bitmap --merge a t.qcow2 d";

Deno.test("convert -n marks the enabled bitmaps of a qcow2 target as qemu-img 7.2", async () => {
  await using dir = await inputs(
    `${IMAGE} && qemu-img create -q -f raw s.raw 4M && ` +
      "qemu-io -f raw -c 'write -P 2 1M 4k' -c 'write -P 3 3M 100k' s.raw >/dev/null",
  );
  const before = await bitmapsIn(`${dir.path}/m/t.qcow2`);
  await same(dir.path, ["convert", "-n", "-O", "qcow2", "s.raw", "t.qcow2"], ["t.qcow2"]);
  const after = await bitmapsIn(`${dir.path}/m/t.qcow2`);
  assertTrue(after[0] !== before[0], after[0]); // the enabled bitmap changed
  assertEquals(after[1], before[1]); // the disabled one did not
  // Data written compressed and with -S marks too.
  await same(dir.path, ["convert", "-n", "-c", "-O", "qcow2", "s.raw", "t.qcow2"], ["t.qcow2"]);
});

Deno.test("convert -n into a qcow2 image with an inconsistent bitmap keeps it, stores the others", async () => {
  await using dir = await inputs(
    `${IMAGE} && ${IN_USE} t.qcow2 && qemu-img create -q -f raw s.raw 4M && ` +
      "qemu-io -f raw -c 'write -P 2 1M 4k' s.raw >/dev/null",
  );
  await same(dir.path, ["convert", "-n", "-O", "qcow2", "s.raw", "t.qcow2"], ["t.qcow2"]);
  assertTrue((await bitmapsIn(`${dir.path}/m/t.qcow2`))[0].includes("flags=3"));
});

Deno.test("commit marks the base's bitmaps, leaves the emptied overlay's as qemu-img 7.2", async () => {
  const chain = "qemu-img create -q -f qcow2 b.qcow2 4M && qemu-img bitmap --add b.qcow2 a && " +
    "qemu-img bitmap --add -g 4k --disable b.qcow2 d && qemu-io -c 'write -P 1 2M 64k' b.qcow2 >/dev/null && " +
    "qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 t.qcow2 && qemu-img bitmap --add t.qcow2 o && " +
    "qemu-io -c 'write -P 2 0 8k' -c 'write -z 1M 64k' -c 'write -P 3 3M 4k' t.qcow2 >/dev/null";
  for (const args of [["commit", "t.qcow2"], ["commit", "-d", "t.qcow2"]]) {
    await using dir = await inputs(chain);
    await same(dir.path, args, ["b.qcow2", "t.qcow2"]);
  }
  // Into a longer chain's middle (-b), from an overlay of compat=0.10 size.
  await using dir = await inputs(
    `${chain} && qemu-img create -q -f qcow2 -b t.qcow2 -F qcow2 u.qcow2 && ` +
      "qemu-io -c 'write -P 4 512k 128k' u.qcow2 >/dev/null",
  );
  await same(dir.path, ["commit", "-b", "t.qcow2", "u.qcow2"], ["b.qcow2", "t.qcow2", "u.qcow2"]);
});

Deno.test("rebase marks the overlay's enabled bitmaps for what it copies, as qemu-img 7.2", async () => {
  const chain =
    "qemu-img create -q -f qcow2 b1.qcow2 4M && qemu-io -c 'write -P 1 0 1M' b1.qcow2 >/dev/null && " +
    "qemu-img create -q -f qcow2 b2.qcow2 4M && qemu-io -c 'write -P 1 512k 1M' b2.qcow2 >/dev/null && " +
    "qemu-img create -q -f qcow2 -b b1.qcow2 -F qcow2 t.qcow2 && qemu-img bitmap --add -g 128k t.qcow2 x && " +
    "qemu-img bitmap --add --disable t.qcow2 y && qemu-io -c 'write -P 5 3M 4k' t.qcow2 >/dev/null";
  for (
    const args of [
      ["rebase", "-b", "b2.qcow2", "-F", "qcow2", "t.qcow2"],
      ["rebase", "-b", "", "t.qcow2"],
      ["rebase", "-u", "-b", "b2.qcow2", "-F", "qcow2", "t.qcow2"],
    ]
  ) {
    await using dir = await inputs(chain);
    await same(dir.path, args, ["t.qcow2"]);
  }
});

Deno.test("resize of qcow2 images with bitmaps resizes them, refuses inconsistent ones as qemu-img 7.2", async () => {
  for (const inUse of [false, true]) {
    // Inconsistent bitmaps: one size is enough, qemu refuses them all.
    for (const size of inUse ? ["1M"] : ["8M", "1M", "+1k", "4100k"]) {
      await using dir = await inputs(inUse ? `${IMAGE} && ${IN_USE} t.qcow2` : IMAGE);
      await same(dir.path, ["resize", "--shrink", "t.qcow2", size], ["t.qcow2"]);
    }
  }
  await using dir = await inputs(`${IMAGE} && ${IN_USE} t.qcow2`);
  const r = await qimg(["resize", "t.qcow2", "8M"], `${dir.path}/m`);
  assertEquals(
    r.stderr,
    "qimg: Bitmap 'a' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk\n",
  );
});

Deno.test("amend of qcow2 images with bitmaps keeps and resizes them as qemu-img 7.2", async () => {
  for (
    const o of [
      "lazy_refcounts=on",
      "refcount_bits=8",
      "size=8M",
      "size=1M",
      "refcount_bits=1,size=5M",
      "backing_file=x.qcow2",
    ]
  ) {
    await using dir = await inputs(`${IMAGE} && qemu-img create -q -f qcow2 plain.qcow2 4M`);
    // What amend cannot do for any image is not this test's concern.
    const plain = await qimg(["amend", "-o", o, "plain.qcow2"], `${dir.path}/m`);
    if (plain.stderr.includes("not supported yet")) continue;
    await same(dir.path, ["amend", "-o", o, "t.qcow2"], ["t.qcow2"]);
  }
});

Deno.test("snapshot -c and -d keep bitmaps, -a refuses them as qemu-img 7.2", async () => {
  await using dir = await inputs(`${IMAGE} && qemu-img snapshot -c s1 t.qcow2`);
  await same(dir.path, ["snapshot", "-a", "s1", "t.qcow2"], ["t.qcow2"]);
  await same(dir.path, ["snapshot", "-d", "s1", "t.qcow2"], ["t.qcow2"]);
  const args = ["snapshot", "-c", "s2", "t.qcow2"];
  assertEquals(await qimg(args, `${dir.path}/m`), await qemuImg(args, `${dir.path}/q`));
  assertEquals(await bitmapsIn(`${dir.path}/m/t.qcow2`), await bitmapsIn(`${dir.path}/q/t.qcow2`));
  await sh("qemu-img check -q m/t.qcow2", dir.path);
});

Deno.test("bench -w marks the enabled bitmaps as qemu-img 7.2", async () => {
  for (
    const args of [
      ["-c", "20", "-s", "4k", "-S", "192k"],
      ["-c", "10", "-s", "64k", "-o", "100k", "--pattern=5"],
    ]
  ) {
    await using dir = await inputs(IMAGE);
    const all = ["bench", "-w", "-q", ...args, "t.qcow2"];
    const theirs = await qemuImg(all, `${dir.path}/q`);
    const ours = await qimg(all, `${dir.path}/m`);
    const time = /Run completed in [0-9.]+ seconds/;
    assertEquals(ours.stdout.replace(time, ""), theirs.stdout.replace(time, ""));
    assertEquals([ours.stderr, ours.code], [theirs.stderr, theirs.code]);
    await sh("qemu-img check -q m/t.qcow2 && qemu-img compare -q q/t.qcow2 m/t.qcow2", dir.path);
    assertEquals(
      await bitmapsIn(`${dir.path}/m/t.qcow2`),
      await bitmapsIn(`${dir.path}/q/t.qcow2`),
    );
  }
});

Deno.test("convert -n into a qcow2 image with bitmaps killed at any point leaves them in use or stored, never corrupt", async () => {
  await using dir = await inputs(
    "qemu-img create -q -f qcow2 t0.qcow2 8M && qemu-img bitmap --add t0.qcow2 a && " +
      "qemu-img bitmap --add -g 4k --disable t0.qcow2 d && qemu-img create -q -f raw s.raw 8M && " +
      "qemu-io -f raw -c 'write -P 2 1M 1M' -c 'write -P 3 5M 100k' s.raw >/dev/null && " +
      "cp t0.qcow2 t.qcow2 && qemu-img convert -n -O qcow2 s.raw t.qcow2",
  );
  const m = `${dir.path}/m`;
  const expected = await bitmapsIn(`${dir.path}/q/t.qcow2`);
  const original = await bitmapsIn(`${m}/t0.qcow2`);
  let points = 0;
  for (let n = 1;; n++) {
    const out = await new Deno.Command("sh", {
      args: [
        "-c",
        `cp t0.qcow2 t.qcow2 && QIMG_CRASH_AFTER_WRITES=${n} "${Deno.execPath()}" run -A ${CLI} ` +
        "convert -n -O qcow2 s.raw t.qcow2",
      ],
      cwd: m,
      stderr: "null",
    }).output();
    const check = await qemuImg(["check", "t.qcow2"], m);
    assertTrue(check.code === 0 || check.code === 3, `kill ${n}: ${check.stdout}${check.stderr}`);
    const bits = await bitmapsIn(`${m}/t.qcow2`);
    if (out.code === 0) {
      assertEquals(bits, expected);
      break;
    }
    // Killed: the bitmaps as they were, marked in use (qemu's inconsistent), or stored.
    const same = (x: string[]) => x.join() === bits.join();
    assertTrue(
      same(original) || same(expected) || bits[0].includes("flags=3"),
      `kill ${n}: ${bits}`,
    );
    points++;
  }
  assertTrue(points > 5, `${points} kill points`);
});

Deno.test("convert -n --target-is-zero marks only the granules it writes, with 512 B, 2 MiB clusters and extended L2", async () => {
  for (const o of ["cluster_size=512", "cluster_size=2M", "extended_l2=on"]) {
    await using dir = await inputs(
      `qemu-img create -q -f qcow2 -o ${o} t.qcow2 64M && qemu-img bitmap --add -g 512 t.qcow2 fine && ` +
        "qemu-img bitmap --add t.qcow2 dflt && qemu-img bitmap --add -g 1M --disable t.qcow2 off && " +
        "qemu-io -c 'write -P 1 0 3M' -c 'write 40M 7k' t.qcow2 >/dev/null && " +
        "qemu-img create -q -f raw s.raw 64M && qemu-io -f raw -c 'write -P 2 1M 4k' " +
        "-c 'write -P 3 33M 100k' -c 'write -P 4 63M 1536' s.raw >/dev/null",
    );
    const args = ["convert", "-n", "--target-is-zero", "-O", "qcow2", "s.raw", "t.qcow2"];
    await same(dir.path, args, ["t.qcow2"]);
  }
});

Deno.test("convert -n --bitmaps adds to a target's bitmaps, stops at a name it has, as qemu-img 7.2", async () => {
  const setup = "qemu-img create -q -f qcow2 s.qcow2 4M && qemu-img bitmap --add s.qcow2 sa && " +
    "qemu-img bitmap --add -g 4k --disable s.qcow2 both && qemu-io -c 'write 1M 64k' s.qcow2 >/dev/null && " +
    "qemu-img bitmap --enable s.qcow2 both && qemu-img create -q -f qcow2 t.qcow2 4M && " +
    "qemu-img bitmap --add t.qcow2 ta && qemu-io -c 'write 2M 64k' t.qcow2 >/dev/null";
  for (const more of ["", " && qemu-img bitmap --add t.qcow2 sa"]) {
    await using dir = await inputs(setup + more);
    await same(dir.path, ["convert", "-n", "--bitmaps", "-O", "qcow2", "s.qcow2", "t.qcow2"], [
      "t.qcow2",
    ]);
  }
});

Deno.test("convert -n into a qcow2 image with bitmaps and an external data file marks them as qemu-img 7.2", async () => {
  await using dir = await inputs(
    "qemu-img create -q -f qcow2 -o data_file=t.data t.qcow2 4M && qemu-img bitmap --add t.qcow2 a && " +
      "qemu-io -c 'write -P 1 0 64k' t.qcow2 >/dev/null && qemu-img create -q -f raw s.raw 4M && " +
      "qemu-io -f raw -c 'write -P 2 1M 300k' s.raw >/dev/null",
  );
  const args = ["convert", "-n", "--target-is-zero", "-O", "qcow2", "s.raw", "t.qcow2"];
  assertEquals(await qimg(args, `${dir.path}/m`), await qemuImg(args, `${dir.path}/q`));
  // qemu opens the data file by its name relative to the working directory.
  await sh(
    "qemu-img check -q t.qcow2 && qemu-io -c 'read -P 1 0 64k' -c 'read -P 2 1M 300k' " +
      "-c 'read -P 0 1324k 2772k' t.qcow2 | grep -c '^read' | grep -qx 3",
    `${dir.path}/m`,
  );
  assertEquals(await bitmapsIn(`${dir.path}/m/t.qcow2`), await bitmapsIn(`${dir.path}/q/t.qcow2`));
});
