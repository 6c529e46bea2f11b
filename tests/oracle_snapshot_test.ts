import { assertEquals } from "./_assert.ts";
import { assertSameAsQemu, hashFile, qimg, sh, tempDir } from "./_util.ts";

Deno.test("snapshot parses its options as qemu-img 7.2", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f raw a.raw 1M", dir.path);
  for (
    const args of [
      ["snapshot"],
      ["snapshot", "-l"],
      ["snapshot", "-l", "a.raw", "b"],
      ["snapshot", "-c"],
      ["snapshot", "-a"],
      ["snapshot", "-d"],
      ["snapshot", "-x", "a.raw"],
      ["snapshot", "-f", "raw", "-l", "a.raw"],
      ["snapshot", "-l", "-c", "x", "a.raw"],
      ["snapshot", "-c", "x", "-l", "a.raw"],
      ["snapshot", "-c", "x", "-c", "y", "a.raw"],
      ["snapshot", "-l", "-l", "a.raw"],
      ["snapshot", "-l", "-l", "-x", "a.raw"],
      ["snapshot", "-lc", "x", "a.raw"],
      ["snapshot", "-a", "x", "-d", "y", "a.raw"],
      ["snapshot", "--force-share=1", "-l", "a.raw"],
      ["snapshot", "--image-opts", "a.raw"],
      ["snapshot", "--object", "foo", "a.raw"],
      ["snapshot", "--object", "help", "a.raw"],
      ["snapshot", "--object", "secret,id=s,data=x", "-l", "a.raw"],
    ]
  ) await assertSameAsQemu(args, dir.path);
});

Deno.test("snapshot on raw images does what qemu-img 7.2 does", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f raw a.raw 1M && qemu-io -f raw -c 'write -P 0x5a 0 64k' a.raw >/dev/null && mkdir sub",
    dir.path,
  );
  const before = await hashFile(`${dir.path}/a.raw`);
  for (
    const args of [
      ["snapshot", "a.raw"],
      ["snapshot", "-q", "a.raw"],
      ["snapshot", "-l", "a.raw"],
      ["snapshot", "-U", "-l", "a.raw"],
      ["snapshot", "-q", "-l", "a.raw"],
      ["snapshot", "--force-share", "-l", "a.raw"],
      ["snapshot", "-c", "s1", "a.raw"],
      ["snapshot", "-q", "-c", "s1", "a.raw"],
      ["snapshot", "-a", "s1", "a.raw"],
      ["snapshot", "-q", "-a", "s1", "a.raw"],
      ["snapshot", "-d", "s1", "a.raw"],
      ["snapshot", "-d", "s1", "-q", "a.raw"],
      ["snapshot", "-U", "-c", "x", "a.raw"],
      ["snapshot", "-U", "a.raw"],
      ["snapshot", "-U", "-c", "x", "nonexist"],
      ["snapshot", "-l", "nonexist"],
      ["snapshot", "-c", "x", "nonexist"],
      ["snapshot", "-l", "sub"],
      ["snapshot", "-d", "x", "sub"],
      ["snapshot", "--image-opts", "-l", "driver=raw,file.filename=a.raw"],
      ["snapshot", "--image-opts", "-c", "x", "driver=raw,file.filename=a.raw"],
      ["snapshot", "--image-opts", "-a", "x", "driver=raw,file.filename=a.raw"],
    ]
  ) await assertSameAsQemu(args, dir.path);
  assertEquals(await hashFile(`${dir.path}/a.raw`), before);
});

Deno.test("snapshot --image-opts opens what qemu-img opens, named as given", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f raw a.raw 1M && mkdir sub", dir.path);
  for (
    const spec of [
      "a.raw",
      "a.raw,driver=raw",
      "json:{}",
      "file.filename=a.raw",
      "file.driver=file,file.filename=a.raw",
      "driver=raw,file.driver=file,file.filename=a.raw",
      "driver=raw,file.filename=a.raw,read-only=on",
      "driver=raw,file.filename=a.raw,force-share=on",
      "filename=a.raw",
      "driver=raw",
      "driver=qcow2,file.filename=a.raw",
      "driver=nosuch,file.filename=a.raw",
      "driver=raw,file.filename=nonexist",
      "driver=raw,file.filename=sub",
      "driver=raw,file.filename=",
    ]
  ) await assertSameAsQemu(["snapshot", "-l", "--image-opts", spec], dir.path);
});

Deno.test("snapshot on qcow2 lists, and fails for missing snapshots, as qemu-img 7.2", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 q.qcow2 1M && qemu-img snapshot -c first q.qcow2 && " +
      "qemu-img snapshot -c second q.qcow2 && qemu-img create -q -f qcow2 empty.qcow2 1M && " +
      "cp q.qcow2 bm.qcow2 && qemu-img bitmap --add bm.qcow2 b0",
    dir.path,
  );
  const before = await hashFile(`${dir.path}/q.qcow2`);
  for (
    const args of [
      ["snapshot", "-l", "q.qcow2"],
      ["snapshot", "-l", "-U", "q.qcow2"],
      ["snapshot", "-l", "empty.qcow2"],
      ["snapshot", "-a", "nosuch", "q.qcow2"],
      ["snapshot", "-d", "nosuch", "q.qcow2"],
      // qemu-img deletes by name only; "1" is only an id here.
      ["snapshot", "-d", "1", "q.qcow2"],
      ["snapshot", "-q", "-d", "3", "q.qcow2"],
      ["snapshot", "-a", "3", "empty.qcow2"],
      ["snapshot", "q.qcow2"],
      // With dirty bitmaps, qemu refuses to apply any snapshot.
      ["snapshot", "-a", "first", "bm.qcow2"],
      ["snapshot", "-a", "nosuch", "bm.qcow2"],
    ]
  ) await assertSameAsQemu(args, dir.path);
  assertEquals(await hashFile(`${dir.path}/q.qcow2`), before);
});

Deno.test("snapshot changes to qcow2 succeed silently, as qemu-img 7.2", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 q.qcow2 1M && qemu-img snapshot -c first q.qcow2",
    dir.path,
  );
  for (const action of [["-c", "s"], ["-a", "first"], ["-a", "1"], ["-d", "first"]]) {
    const r = await qimg(["snapshot", ...action, "q.qcow2"], dir.path);
    assertEquals(r, { stdout: "", stderr: "", code: 0 });
  }
});

Deno.test("snapshot, amend, commit and rebase on vpc, vdi and vmdk answer as qemu-img 7.2", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f vpc v.vpc 1M && qemu-img create -q -f vdi v.vdi 1M && " +
      "qemu-img create -q -f vmdk v.vmdk 1M",
    dir.path,
  );
  for (const f of ["v.vpc", "v.vdi", "v.vmdk"]) {
    const before = await hashFile(`${dir.path}/${f}`);
    for (
      const args of [
        ["snapshot", "-l"],
        ["snapshot", "-c", "s"],
        ["snapshot", "-a", "s"],
        ["snapshot", "-d", "s"],
        ["amend", "-o", "size=2M"],
        ["amend", "-o", "help"],
        ["commit"],
        ["commit", "-d"],
        ["rebase", "-u", "-b", "x", "-F", "raw"],
      ]
    ) await assertSameAsQemu([...args, f], dir.path);
    assertEquals(await hashFile(`${dir.path}/${f}`), before, f);
  }
});
