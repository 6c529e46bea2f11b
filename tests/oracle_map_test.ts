import { assertEquals } from "./_assert.ts";
import { assertSameAsQemu, hashFile, qemuImg, qimg, sh, tempDir } from "./_util.ts";

/** A 10 MiB sparse raw file with three data runs, and files of odd sizes. */
const RAW_SETUP = "truncate -s 10M s.raw && " +
  "qemu-io -f raw -c 'write -P 1 1M 64k' -c 'write -P 2 4M 1M' -c 'write 9M 4k' s.raw >/dev/null && " +
  "truncate -s 3M h.raw && qemu-io -f raw -c 'write 100 10' -c 'write 1M 1' -c 'write 3145000 5' h.raw >/dev/null && " +
  "truncate -s 4M h.raw && head -c 1000 /dev/urandom > odd.raw && truncate -s 0 empty && mkdir sub";

Deno.test("map matches qemu-img on sparse raw files, human and json", async () => {
  await using dir = await tempDir();
  await sh(RAW_SETUP, dir.path);
  // The holes are real: qemu-img sees several runs (else the test proves little).
  const theirs = await qemuImg(["map", "--output=json", "s.raw"], dir.path);
  assertEquals(theirs.stdout.split("\n").length, 8, theirs.stdout);
  for (const name of ["s.raw", "h.raw", "odd.raw", "empty"]) {
    await assertSameAsQemu(["map", name], dir.path);
    await assertSameAsQemu(["map", "--output=json", name], dir.path);
  }
  await assertSameAsQemu(["map", "-f", "raw", "--output", "json", "-U", "s.raw"], dir.path);
  await assertSameAsQemu(["map", "--image-opts", "driver=raw,file.filename=s.raw"], dir.path);
});

Deno.test("map --start-offset and --max-length cut the walk as qemu-img does", async () => {
  await using dir = await tempDir();
  await sh(RAW_SETUP, dir.path);
  for (
    const args of [
      ["--start-offset", "1M", "--max-length", "4M"],
      ["--start-offset=1M", "--max-length=4M"],
      ["-s", "1M"],
      ["-l", "1M"],
      ["--start-offset=1000"],
      ["--start-offset=4095", "--max-length=3"],
      ["--max-length=0"],
      ["--start-offset=20M"],
      ["--start-offset=0x10k"],
      ["--start-offset=9223372036854775807"],
      ["--start-offset=4E", "--max-length=6E"],
    ]
  ) {
    await assertSameAsQemu(["map", ...args, "s.raw"], dir.path);
    await assertSameAsQemu(["map", "--output=json", ...args, "s.raw"], dir.path);
  }
});

Deno.test("map refuses bad input with qemu-img's messages and exit codes", async () => {
  await using dir = await tempDir();
  await sh(RAW_SETUP, dir.path);
  for (
    const args of [
      ["map"],
      ["map", "s.raw", "h.raw"],
      ["map", "nofile"],
      ["map", "sub"],
      ["map", "--output=xml", "s.raw"],
      ["map", "--output=xml", "nofile"],
      ["map", "--output=xml", "--start-offset=x", "s.raw"],
      ["map", "--start-offset=-1", "s.raw"],
      ["map", "--start-offset=abc", "s.raw"],
      ["map", "--max-length=1x", "s.raw"],
      ["map", "--start-offset=9E", "s.raw"],
      ["map", "--start-offset=99999999999999999999", "s.raw"],
      ["map", "-x", "s.raw"],
      ["map", "--bogus", "s.raw"],
      ["map", "-s"],
      ["map", "-f", "qcow2", "s.raw"],
      ["map", "-f", "nosuch", "s.raw"],
      ["map", "--image-opts", "s.raw"],
      ["map", "--image-opts", "-f", "raw", "s.raw"],
      ["map", "--object", "bogus", "s.raw"],
    ]
  ) await assertSameAsQemu(args, dir.path);
});

Deno.test("map follows qcow2 backing chains: depth, present, short backing files", async () => {
  await using dir = await tempDir();
  await sh(
    RAW_SETUP + " && " +
      "qemu-img create -q -f qcow2 -b s.raw -F raw o.qcow2 && " +
      "qemu-io -c 'write -P 3 0 128k' -c 'write -z 4M 64k' o.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -b s.raw -F raw long.qcow2 20M && " +
      "qemu-img create -q -f qcow2 base.qcow2 4M && " +
      "qemu-io -c 'write -P 1 0 1M' -c 'write -z 2M 512k' base.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 8M && " +
      "qemu-io -c 'write -P 2 512k 1M' -c 'write -z 5M 64k' mid.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 12M && " +
      "qemu-io -c 'write -P 3 3M 2M' -c 'discard 0 64k' -c 'write -P 4 10M 64k' top.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -o cluster_size=16k,extended_l2=on ext.qcow2 1M && " +
      "qemu-io -c 'write 1k 2k' -c 'write -z 8k 4k' -c 'write 20k 8k' ext.qcow2 >/dev/null && " +
      // Past its short backing file, an allocated cluster's empty subclusters keep their offset.
      "qemu-img create -q -f qcow2 -o cluster_size=1M,extended_l2=on -b h.raw -F raw extshort.qcow2 5M && " +
      "qemu-io -c 'write -P 6 4M 32k' extshort.qcow2 >/dev/null",
    dir.path,
  );
  for (
    const name of ["o.qcow2", "long.qcow2", "top.qcow2", "mid.qcow2", "ext.qcow2", "extshort.qcow2"]
  ) {
    await assertSameAsQemu(["map", name], dir.path);
    await assertSameAsQemu(["map", "--output=json", name], dir.path);
  }
  await assertSameAsQemu(
    ["map", "--output=json", "--start-offset=100k", "--max-length=5M", "top.qcow2"],
    dir.path,
  );
  // An absolute path names the backing files absolutely, as qemu-img.
  await assertSameAsQemu(["map", `${dir.path}/o.qcow2`], dir.path);
});

Deno.test("map stops at compressed clusters in the table but lists them in json", async () => {
  await using dir = await tempDir();
  await sh(RAW_SETUP + " && qemu-img convert -c -O qcow2 s.raw c.qcow2", dir.path);
  await assertSameAsQemu(["map", "c.qcow2"], dir.path);
  await assertSameAsQemu(["map", "--output=json", "c.qcow2"], dir.path);
});

Deno.test("map leaves its input unmodified", async () => {
  await using dir = await tempDir();
  await sh(RAW_SETUP + " && qemu-img create -q -f qcow2 -b s.raw -F raw o.qcow2", dir.path);
  const before = [await hashFile(`${dir.path}/s.raw`), await hashFile(`${dir.path}/o.qcow2`)];
  for (const args of [["map", "o.qcow2"], ["map", "--output=json", "s.raw"]]) {
    const r = await qimg(args, dir.path);
    assertEquals(r.code, 0, r.stderr);
  }
  assertEquals(
    [await hashFile(`${dir.path}/s.raw`), await hashFile(`${dir.path}/o.qcow2`)],
    before,
  );
});
