import { type Extent, type Image, openImage, parseSize, QimgError } from "../mod.ts";
import { findFormat } from "../src/formats.ts";
import { toJsonPretty } from "../src/output.ts";
import { assertEquals, assertRejects, assertTrue } from "./_assert.ts";
import { qemuImg, sh, tempDir } from "./_util.ts";

async function collect(it: AsyncIterable<Extent>): Promise<Extent[]> {
  const out: Extent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

/** What `qemu-img info --output=json` prints, as the library renders `info()`. */
async function assertInfoLikeQemu(image: Image, path: string, cwd: string): Promise<void> {
  const theirs = await qemuImg(["info", "--output=json", path], cwd);
  assertEquals(theirs.code, 0, theirs.stderr);
  const info = await image.info();
  assertEquals(toJsonPretty(info) + "\n", theirs.stdout);
  // The object itself equals what qemu printed (no undefined members left over).
  assertEquals(info, JSON.parse(theirs.stdout));
}

Deno.test("openImage() gives format, size, read, extents, info and close for raw", async () => {
  await using dir = await tempDir();
  await sh(
    "truncate -s 4M a.raw && qemu-io -f raw -c 'write -P 0x11 1M 64k' a.raw >/dev/null",
    dir.path,
  );
  const image = await openImage(`${dir.path}/a.raw`);
  try {
    assertEquals(image.format, "raw");
    assertEquals(image.size, 4 << 20);
    const buf = new Uint8Array(8);
    await image.read((1 << 20) - 4, buf);
    assertEquals([...buf], [0, 0, 0, 0, 0x11, 0x11, 0x11, 0x11]);
    // Past the end reads as zeroes, as through a short backing file.
    const tail = new Uint8Array(16).fill(0xff);
    await image.read((4 << 20) - 8, tail);
    assertEquals([...tail.subarray(0, 8)], [0, 0, 0, 0, 0, 0, 0, 0]);
    assertEquals(tail.subarray(8).every((b) => b === 0), true);

    const extents = await collect(image.extents());
    assertEquals(extents.reduce((n, e) => n + e.length, 0), image.size);
    assertEquals(extents[0].offset, 0);
    for (let i = 1; i < extents.length; i++) {
      assertEquals(extents[i].offset, extents[i - 1].offset + extents[i - 1].length);
    }
    const data = extents.filter((e) => e.data);
    assertTrue(data.some((e) => e.offset <= 1 << 20 && e.offset + e.length >= (1 << 20) + 65536));
    const part = await collect(image.extents({ start: 1 << 20, length: 4096 }));
    assertEquals(part.reduce((n, e) => n + e.length, 0), 4096);
    assertEquals(part[0].offset, 1 << 20);

    await assertInfoLikeQemu(image, `${dir.path}/a.raw`, dir.path);
  } finally {
    await image.close();
  }
  // Closed: the handle is gone.
  await assertRejects(() => image.read(0, new Uint8Array(1)));
});

Deno.test("Image.check() rejects with qemu's message and exit code 63 for raw", async () => {
  await using dir = await tempDir();
  await sh("truncate -s 1M a.raw", dir.path);
  await using image = await openImage(`${dir.path}/a.raw`, { format: "raw" });
  const e = await image.check().then(() => null, (e) => e);
  assertTrue(e instanceof QimgError, String(e));
  assertEquals([e.message, e.exitCode], ["This image format does not support checks", 63]);
  const theirs = await qemuImg(["check", "a.raw"], dir.path);
  assertEquals(theirs.code, 63);
  assertEquals(theirs.stderr, `qimg: ${e.message}\n`);
});

Deno.test("openImage() rejects a missing file with qemu's message", async () => {
  await using dir = await tempDir();
  const e = await openImage(`${dir.path}/nope`).then(() => null, (e) => e);
  assertTrue(e instanceof QimgError, String(e));
  const theirs = await qemuImg(["info", `${dir.path}/nope`]);
  assertEquals(`qimg: ${e.message}\n`, theirs.stderr);
});

Deno.test("openImage() with an unknown format rejects as qemu-img does", async () => {
  await using dir = await tempDir();
  await sh("truncate -s 1M a.raw", dir.path);
  const e = await openImage(`${dir.path}/a.raw`, { format: "nosuchfmt" }).then(
    () => null,
    (e) => e,
  );
  assertTrue(e instanceof QimgError, String(e));
  const theirs = await qemuImg(["info", "-f", "nosuchfmt", `${dir.path}/a.raw`]);
  assertEquals(`qimg: ${e.message}\n`, theirs.stderr);
});

Deno.test({
  name: "openImage() on qcow2 with a backing file: read, info and extents agree with qemu-img",
  // Runs once the qcow2 driver is registered.
  ignore: !findFormat("qcow2"),
  async fn() {
    await using dir = await tempDir();
    await sh(
      "qemu-img create -q -f qcow2 base.qcow2 4M && " +
        "qemu-io -f qcow2 -c 'write -P 0x22 0 128k' base.qcow2 >/dev/null && " +
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 && " +
        "qemu-io -f qcow2 -c 'write -P 0x33 64k 64k' top.qcow2 >/dev/null",
      dir.path,
    );
    await using image = await openImage(`${dir.path}/top.qcow2`);
    assertEquals([image.format, image.size], ["qcow2", 4 << 20]);
    const buf = new Uint8Array(2);
    await image.read(65535, buf);
    assertEquals([...buf], [0x22, 0x33]);
    await assertInfoLikeQemu(image, `${dir.path}/top.qcow2`, dir.path);
    const map = JSON.parse(
      (await qemuImg(["map", "--output=json", "top.qcow2"], dir.path)).stdout,
    ) as { start: number; length: number; depth: number; data: boolean }[];
    const ours = await collect(image.extents());
    assertEquals(
      ours.map((e) => [e.offset, e.length, e.depth, e.data]),
      map.map((m) => [m.start, m.length, m.depth, m.data]),
    );
  },
});

Deno.test({
  name:
    "openImage() opens backing files only inside options.roots (default: the image's directory)",
  ignore: !findFormat("qcow2"),
  async fn() {
    await using dir = await tempDir();
    await sh(
      "mkdir vm && qemu-img create -q -f raw secret.raw 1M && " +
        "qemu-io -f raw -c 'write -P 0x5e 0 4k' secret.raw >/dev/null && " +
        "qemu-img create -q -f qcow2 -b ../secret.raw -F raw vm/rel.qcow2 && " +
        `qemu-img create -q -f qcow2 -b ${dir.path}/secret.raw -F raw vm/abs.qcow2 && ` +
        "qemu-img create -q -f raw vm/base.raw 1M && " +
        "qemu-img create -q -f qcow2 -b base.raw -F raw vm/ok.qcow2",
      dir.path,
    );
    for (const name of ["rel", "abs"]) {
      const e = await openImage(`${dir.path}/vm/${name}.qcow2`).then(() => null, (e) => e);
      assertTrue(e instanceof QimgError, `${name}: ${e}`);
      assertTrue(/outside the directories/.test(e.message), e.message);
      // qemu-img itself follows it: the gate is the library's.
      assertEquals((await qemuImg(["info", `vm/${name}.qcow2`], dir.path)).code, 0);
    }
    {
      await using ok = await openImage(`${dir.path}/vm/ok.qcow2`);
      assertEquals(ok.size, 1 << 20);
    }
    await using allowed = await openImage(`${dir.path}/vm/rel.qcow2`, { roots: [dir.path] });
    const buf = new Uint8Array(1);
    await allowed.read(0, buf);
    assertEquals(buf[0], 0x5e);
    // Without the backing chain nothing else is opened, so nothing is refused.
    await using top = await openImage(`${dir.path}/vm/abs.qcow2`, { backing: false });
    assertEquals(top.format, "qcow2");
  },
});

const haveQcow2Check = await Deno.stat(new URL("../src/qcow2_refcount.ts", import.meta.url)).then(
  () => !!findFormat("qcow2"),
  () => false,
);

Deno.test({
  name: "Image.check() on qcow2 agrees with qemu-img check",
  // Runs once qcow2's check (src/qcow2_refcount.ts) has landed.
  ignore: !haveQcow2Check,
  async fn() {
    await using dir = await tempDir();
    await sh(
      "qemu-img create -q -f qcow2 a.qcow2 4M && " +
        "qemu-io -f qcow2 -c 'write -P 0x22 0 128k' a.qcow2 >/dev/null",
      dir.path,
    );
    const theirs = await qemuImg(["check", "--output=json", "a.qcow2"], dir.path);
    const q = JSON.parse(theirs.stdout);
    await using image = await openImage(`${dir.path}/a.qcow2`);
    const r = await image.check();
    assertEquals([r.corruptions, r.leaks, r.checkErrors], [0, 0, 0]);
    assertEquals(
      [r.imageEndOffset, r.totalClusters, r.allocatedClusters],
      [q["image-end-offset"], q["total-clusters"], q["allocated-clusters"]],
    );
  },
});

Deno.test("parseSize() is exported with qemu's rules", () => {
  assertEquals(parseSize("1G"), 1 << 30);
});
