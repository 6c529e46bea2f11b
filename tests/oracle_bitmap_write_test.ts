/**
 * `bitmap` changing qcow2 images: each step run by qimg on one copy and by
 * Debian's qemu-img 7.2 on another; same output, same file byte for byte
 * (qemu rewrites every bitmap on close: same clusters, same frees), clean
 * check, and the bits as parsed from the file.
 */

import { assertEquals, assertTrue } from "./_assert.ts";
import { hashFile, qemuImg, qimg, sh, tempDir } from "./_util.ts";
import { bitmapsIn, infoOf } from "./_bitmap_util.ts";

/** Runs `bitmap <args> <file> <name>` on ours.qcow2 (qimg) and theirs.qcow2 (qemu-img) and compares. */
async function step(dir: string, args: string[], name: string): Promise<string> {
  const ours = await qimg(["bitmap", ...args, "ours.qcow2", name], dir);
  const theirs = await qemuImg(["bitmap", ...args, "theirs.qcow2", name], dir);
  const what = `bitmap ${args.join(" ")} ${name}`;
  assertEquals(ours, theirs, what);
  const check = await qemuImg(["check", "ours.qcow2"], dir);
  assertEquals(check.code, 0, `${what}: ${check.stdout}${check.stderr}`);
  assertEquals(await infoOf("ours.qcow2", dir), await infoOf("theirs.qcow2", dir), what);
  assertEquals(await bitmapsIn(`${dir}/ours.qcow2`), await bitmapsIn(`${dir}/theirs.qcow2`), what);
  assertEquals(await hashFile(`${dir}/ours.qcow2`), await hashFile(`${dir}/theirs.qcow2`), what);
  return ours.stderr;
}

/** Runs a qemu-io command on both copies (qemu records the writes in the enabled bitmaps). */
function write(dir: string, command: string): Promise<string> {
  return sh(
    `for f in ours.qcow2 theirs.qcow2; do qemu-io -c '${command}' $f >/dev/null; done`,
    dir,
  );
}

Deno.test("bitmap --add, --remove, --clear, --enable, --disable, --merge change qcow2 images as qemu-img 7.2", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 ours.qcow2 64M && cp ours.qcow2 theirs.qcow2 && " +
      "qemu-img create -q -f qcow2 other.qcow2 64M && qemu-img bitmap --add -g 512 other.qcow2 fine && " +
      "qemu-io -c 'write 32M 100k' other.qcow2 >/dev/null",
    dir.path,
  );
  await step(dir.path, ["--add"], "b0");
  await step(dir.path, ["--add", "-g", "512"], "b1");
  await write(dir.path, "write 0 1M");
  const bits = await bitmapsIn(`${dir.path}/ours.qcow2`);
  assertTrue(bits[0].endsWith("bits=0:255,1:255"), bits[0]); // qemu-io's write was recorded
  await step(dir.path, ["--clear"], "b0");
  await step(dir.path, ["--disable"], "b1");
  await write(dir.path, "write 8M 64k");
  await step(dir.path, ["--merge", "b1"], "b0");
  await step(dir.path, ["--remove"], "b1");
  await step(dir.path, ["--add", "--disable", "-g", "1M"], "b2");
  await step(dir.path, ["--merge", "fine", "-b", "other.qcow2", "-F", "qcow2"], "b2");
  await step(dir.path, ["--enable", "--merge", "b2"], "b0");
  await step(dir.path, ["--remove"], "b0");
  await step(dir.path, ["--remove"], "b2");
  assertEquals(await bitmapsIn(`${dir.path}/ours.qcow2`), []);
  await step(dir.path, ["--add", "-g", "4k", "--clear"], "again");
});

Deno.test("bitmap keeps the actions before a failing one, as qemu-img 7.2", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f qcow2 ours.qcow2 4M && cp ours.qcow2 theirs.qcow2", dir.path);
  const err = await step(dir.path, ["--add", "-g", "4k", "--merge", "nos"], "b4");
  assertEquals(err, "qimg: Operation merge on bitmap b4 failed: Dirty bitmap 'nos' not found\n");
  assertEquals((await bitmapsIn(`${dir.path}/ours.qcow2`)).length, 1);
  await step(dir.path, ["--disable", "--add"], "b4");
});

Deno.test("bitmap refuses in-use bitmaps except for removal, as qemu-img 7.2", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 ours.qcow2 64M && qemu-img bitmap --add ours.qcow2 b0 && " +
      "qemu-img bitmap --add -g 512 ours.qcow2 b1 && " +
      // qemu-io aborting with the image open leaves its bitmaps marked in use.
      "{ qemu-io -c 'write 0 64k' -c abort ours.qcow2 >/dev/null 2>&1 || true; } && " +
      "qemu-img bitmap --add ours.qcow2 ok && qemu-io -c 'write 1M 64k' ours.qcow2 >/dev/null && " +
      "cp ours.qcow2 theirs.qcow2",
    dir.path,
  );
  for (const args of [["--clear"], ["--enable"], ["--disable"], ["--merge", "ok"], ["--add"]]) {
    const err = await step(dir.path, args, "b0");
    assertTrue(err.startsWith("qimg: Operation "), err);
  }
  const err = await step(dir.path, ["--merge", "b1"], "ok");
  assertTrue(err.includes("Bitmap 'b1' is inconsistent and cannot be used\nTry "), err);
  await step(dir.path, ["--remove"], "b1");
  await step(dir.path, ["--clear"], "ok");
  await step(dir.path, ["--remove"], "b0");
});
