import { assertEquals } from "./_assert.ts";
import { assertSameAsQemu, hashFile, qemuImg, qimg, sh, tempDir } from "./_util.ts";

async function rawDir() {
  const dir = await tempDir();
  await sh("qemu-img create -q -f raw a.raw 1M && cp a.raw b.raw && mkdir sub", dir.path);
  return dir;
}

Deno.test("bitmap parses its options as qemu-img 7.2", async () => {
  await using dir = await rawDir();
  for (
    const args of [
      ["bitmap"],
      ["bitmap", "a.raw"],
      ["bitmap", "a.raw", "b1"],
      ["bitmap", "-x"],
      ["bitmap", "--foo", "a", "b"],
      ["bitmap", "--merge"],
      ["bitmap", "-g"],
      ["bitmap", "--add", "-q", "a.raw", "b1"],
      ["bitmap", "--add", "-U", "a.raw", "b1"],
      ["bitmap", "--add=1", "a.raw", "b1"],
      ["bitmap", "--add", "a.raw"],
      ["bitmap", "--add", "a.raw", "b1", "c"],
      ["bitmap", "-g", "64k", "a.raw", "b1"],
      ["bitmap", "-b", "x", "a.raw", "b1"],
      ["bitmap", "--remove", "-g", "64k", "a.raw", "b1"],
      ["bitmap", "--remove", "--granularity=64k", "a.raw", "b1"],
      ["bitmap", "--add", "-b", "x", "a.raw", "b1"],
      ["bitmap", "-F", "raw", "--add", "a.raw", "b1"],
      ["bitmap", "--add", "--source-format", "raw", "a.raw", "b1"],
      ["bitmap", "--add", "-g", "abc", "a.raw", "b1"],
      ["bitmap", "--add", "-g", "-1", "a.raw", "b1"],
      ["bitmap", "--add", "-g", "8E", "a.raw", "b1"],
      ["bitmap", "--add", "-g", "99999E", "a.raw", "b1"],
      ["bitmap", "--add", "--image-opts", "-f", "raw", "a.raw", "b1"],
      ["bitmap", "--object", "foo", "--add", "a.raw", "b1"],
    ]
  ) await assertSameAsQemu(args, dir.path);
});

Deno.test("bitmap on raw images fails as qemu-img 7.2 does", async () => {
  await using dir = await rawDir();
  const before = await hashFile(`${dir.path}/a.raw`);
  for (
    const args of [
      ["bitmap", "--remove", "a.raw", "b1"],
      ["bitmap", "--clear", "a.raw", "b1"],
      ["bitmap", "--enable", "a.raw", "b1"],
      ["bitmap", "--disable", "-f", "raw", "a.raw", "b1"],
      ["bitmap", "--e", "a.raw", "b1"],
      ["bitmap", "--d", "a.raw", "b1"],
      ["bitmap", "--merge", "s", "a.raw", "b1"],
      ["bitmap", "--m", "s", "a.raw", "b1"],
      ["bitmap", "--merge", "s", "-b", "x", "-F", "raw", "a.raw", "b1"],
      ["bitmap", "--merge", "s", "-b", "b.raw", "-f", "raw", "a.raw", "b1"],
      ["bitmap", "--merge", "s", "-b", "b.raw", "-F", "qcow2", "-f", "raw", "a.raw", "b1"],
      ["bitmap", "--enable", "-f", "raw", "-b", "b.raw", "--merge", "s", "a.raw", "b1"],
      ["bitmap", "--add", "-g", "1000", "a.raw", "b1"],
      ["bitmap", "--add", "-g", "256", "-f", "raw", "a.raw", "b1"],
      ["bitmap", "--add", "-g", "4G", "-f", "raw", "a.raw", "b1"],
      ["bitmap", "--add", "nonexist", "b1"],
      ["bitmap", "--add", "-f", "raw", "sub", "b1"],
      ["bitmap", "--add", "-f", "nosuch", "a.raw", "b1"],
    ]
  ) await assertSameAsQemu(args, dir.path);
  assertEquals(await hashFile(`${dir.path}/a.raw`), before);
});

Deno.test("bitmap --add on raw fails as qemu-img 7.2, up to qemu's random node name", async () => {
  await using dir = await rawDir();
  // qemu names the node "#block1" plus two random digits.
  const mask = (s: string) => s.replace(/#block1\d\d:/g, "#block1NN:");
  for (
    const args of [
      ["bitmap", "--add", "a.raw", "b1"],
      ["bitmap", "--add", "-f", "raw", "a.raw", "b1"],
      ["bitmap", "--ad", "-g", "64k", "a.raw", "b1"],
      ["bitmap", "--add", "-g", "0", "a.raw", "b1"],
      ["bitmap", "--add", "-g", "512", "--remove", "-f", "raw", "a.raw", "b1"],
      ["bitmap", "--image-opts", "--add", "driver=raw,file.filename=a.raw", "b1"],
      ["bitmap", "--add", "-g", "0x1k", "-f", "raw", "a.raw", "b1"],
    ]
  ) {
    const ours = await qimg(args, dir.path);
    const theirs = await qemuImg(args, dir.path);
    assertEquals(
      { ...ours, stderr: mask(ours.stderr) },
      { ...theirs, stderr: mask(theirs.stderr) },
      args.join(" "),
    );
  }
});

Deno.test("bitmap on qcow2 fails as qemu-img 7.2 where qemu fails", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 q.qcow2 1M && qemu-img bitmap --add q.qcow2 b0 && " +
      "qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M && qemu-img create -q -f raw a.raw 1M",
    dir.path,
  );
  // qemu rewrites q.qcow2's bitmap directory on a writable open; v2.qcow2 stays.
  const before = await hashFile(`${dir.path}/v2.qcow2`);
  const mask = (s: string) => s.replace(/#block1\d\d/g, "#block1NN");
  const long = "x".repeat(1024);
  for (
    const args of [
      ["bitmap", "--remove", "q.qcow2", "nob"],
      ["bitmap", "--clear", "q.qcow2", "nob"],
      ["bitmap", "--enable", "q.qcow2", "nob"],
      ["bitmap", "--disable", "q.qcow2", "nob"],
      ["bitmap", "--merge", "s", "q.qcow2", "nob"],
      ["bitmap", "--merge", "nos", "q.qcow2", "b0"],
      ["bitmap", "--merge", "nos", "-b", "v2.qcow2", "q.qcow2", "b0"],
      ["bitmap", "--merge", "b0", "-b", "a.raw", "-F", "raw", "q.qcow2", "b0"],
      ["bitmap", "--add", "q.qcow2", "b0"],
      ["bitmap", "--add", "q.qcow2", ""],
      ["bitmap", "--add", "-f", "raw", "a.raw", ""],
      ["bitmap", "--add", "-g", "1000", "q.qcow2", "b9"],
      ["bitmap", "--add", "q.qcow2", long],
      ["bitmap", "--add", "v2.qcow2", "b1"],
      ["bitmap", "--add", "-g", "1000", "v2.qcow2", "b1"],
      ["bitmap", "--remove", "v2.qcow2", "b1"],
    ]
  ) {
    const ours = await qimg(args, dir.path);
    const theirs = await qemuImg(args, dir.path);
    assertEquals(
      { ...ours, stderr: mask(ours.stderr) },
      { ...theirs, stderr: mask(theirs.stderr) },
      args.join(" ").slice(0, 80),
    );
  }
  assertEquals(await hashFile(`${dir.path}/v2.qcow2`), before);
});

Deno.test("bitmap changes to qcow2 write the image qemu-img 7.2 writes", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f qcow2 q.qcow2 1M && qemu-img bitmap --add q.qcow2 b0", dir.path);
  for (
    const action of [["--add"], ["--add", "-g", "1k"], ["--remove"], ["--enable"], [
      "--merge",
      "b0",
    ]]
  ) {
    const name = action[0] === "--add" ? "b1" : "b0";
    await sh("cp q.qcow2 ours.qcow2 && cp q.qcow2 theirs.qcow2", dir.path);
    const ours = await qimg(["bitmap", ...action, "ours.qcow2", name], dir.path);
    const theirs = await qemuImg(["bitmap", ...action, "theirs.qcow2", name], dir.path);
    assertEquals(ours, theirs);
    assertEquals(ours.code, 0);
    assertEquals(
      await hashFile(`${dir.path}/ours.qcow2`),
      await hashFile(`${dir.path}/theirs.qcow2`),
      action.join(" "),
    );
  }
});

Deno.test("stale bitmaps warn as qemu-img 7.2, whose warning ends without a newline", async () => {
  await using dir = await tempDir();
  // A v3 image with a bitmap whose autoclear bit a program without bitmap support cleared.
  await sh(
    "qemu-img create -q -f qcow2 v3.qcow2 64M && qemu-img bitmap --add v3.qcow2 b0 && " +
      "printf '\\000' | dd of=v3.qcow2 bs=1 seek=95 conv=notrunc status=none",
    dir.path,
  );
  for (
    const args of [
      ["check", "v3.qcow2"],
      ["info", "v3.qcow2"],
      ["map", "--output=json", "v3.qcow2"],
      ["compare", "v3.qcow2", "v3.qcow2"],
    ]
  ) {
    const r = await assertSameAsQemu(args, dir.path);
    assertEquals(r.stderr.includes("fix.\n"), false, "qemu-img prints no newline after it");
  }
});
