import { assertEquals } from "./_assert.ts";
import { assertSameAsQemu, hashFile, qimg, sh, tempDir } from "./_util.ts";
import { firstDifference, firstNonZero } from "../src/compare.ts";

/** Raw files: equal, differing in one byte, longer with zeroes, longer with data. */
const SETUP = "truncate -s 10M s.raw && " +
  "qemu-io -f raw -c 'write -P 1 1M 64k' -c 'write -P 2 4M 1M' -c 'write 9M 4k' s.raw >/dev/null && " +
  "cp s.raw t.raw && cp s.raw u.raw && qemu-io -f raw -c 'write -P 9 4100k 1' u.raw >/dev/null && " +
  "cp s.raw v.raw && printf x | dd of=v.raw bs=1 seek=$((9*1048576+777)) conv=notrunc 2>/dev/null && " +
  "truncate -s 12M big.raw && truncate -s 10M z.raw && cp s.raw tail.raw && truncate -s 12M tail.raw && " +
  "qemu-io -f raw -c 'write -P 5 11M 512' tail.raw >/dev/null && " +
  "truncate -s 1M d1.raw d2.raw && qemu-io -f raw -c 'write -P 1 0 1M' d1.raw >/dev/null && " +
  "qemu-io -f raw -c 'write -P 1 0 512k' d2.raw >/dev/null && " +
  "truncate -s 0 empty && mkdir sub";

Deno.test("compare finds identical images and the first differing sector as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(SETUP, dir.path);
  for (
    const args of [
      ["s.raw", "t.raw"],
      ["s.raw", "u.raw"],
      ["u.raw", "s.raw"],
      ["s.raw", "v.raw"],
      ["-q", "s.raw", "u.raw"],
      ["-q", "s.raw", "t.raw"],
      ["-f", "raw", "-F", "raw", "s.raw", "t.raw"],
      ["-U", "-T", "none", "s.raw", "t.raw"],
      ["d1.raw", "d2.raw"],
      ["--image-opts", "driver=raw,file.filename=s.raw", "driver=raw,file.filename=t.raw"],
    ]
  ) await assertSameAsQemu(["compare", ...args], dir.path);
});

Deno.test("compare warns of a size mismatch and checks the longer image's tail", async () => {
  await using dir = await tempDir();
  await sh(SETUP, dir.path);
  for (
    const args of [
      ["s.raw", "big.raw"],
      ["z.raw", "big.raw"],
      ["big.raw", "z.raw"],
      ["s.raw", "tail.raw"],
      ["empty", "s.raw"],
      ["s.raw", "empty"],
    ]
  ) await assertSameAsQemu(["compare", ...args], dir.path);
});

Deno.test("compare -s fails on size or block status differences as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(SETUP + " && qemu-img convert -O qcow2 s.raw sq.qcow2", dir.path);
  for (
    const args of [
      ["s.raw", "t.raw"],
      ["s.raw", "u.raw"],
      ["s.raw", "big.raw"],
      ["z.raw", "big.raw"],
      ["d1.raw", "d2.raw"],
      ["s.raw", "sq.qcow2"],
      ["sq.qcow2", "sq.qcow2"],
    ]
  ) await assertSameAsQemu(["compare", "-s", ...args], dir.path);
});

Deno.test("compare -p prints qemu-img's progress lines", async () => {
  await using dir = await tempDir();
  await sh(SETUP, dir.path);
  for (
    const args of [
      ["s.raw", "t.raw"],
      ["s.raw", "u.raw"],
      ["z.raw", "big.raw"],
      ["-q", "s.raw", "t.raw"],
      ["s.raw", "nofile"],
      ["-T", "bogus", "s.raw", "t.raw"],
    ]
  ) await assertSameAsQemu(["compare", "-p", ...args], dir.path);
});

Deno.test("compare reads qcow2 images through their backing chains", async () => {
  await using dir = await tempDir();
  await sh(
    SETUP + " && qemu-img create -q -f qcow2 -b s.raw -F raw o.qcow2 && " +
      "qemu-io -c 'write -P 3 0 128k' -c 'write -z 4M 64k' o.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -b s.raw -F raw long.qcow2 12M && " +
      "qemu-img create -q -f qcow2 -b s.raw -F raw long0.qcow2 12M && " +
      "qemu-io -c 'write -z 10M 2M' long0.qcow2 >/dev/null && " +
      "qemu-img convert -O qcow2 o.qcow2 flat.qcow2 && qemu-img convert -c -O qcow2 s.raw c.qcow2",
    dir.path,
  );
  for (
    const args of [
      ["s.raw", "o.qcow2"],
      ["-s", "s.raw", "o.qcow2"],
      ["o.qcow2", "flat.qcow2"],
      ["-s", "o.qcow2", "flat.qcow2"],
      ["-p", "flat.qcow2", "o.qcow2"],
      ["long.qcow2", "big.raw"],
      ["long.qcow2", "s.raw"],
      ["-s", "long.qcow2", "long.qcow2"],
      // Past a short backing file qemu's status is "zero, allocated", as a zero cluster's.
      ["-s", "long.qcow2", "long0.qcow2"],
      ["-s", "long0.qcow2", "s.raw"],
      ["c.qcow2", "s.raw"],
      ["-f", "qcow2", "-F", "raw", "c.qcow2", "t.raw"],
    ]
  ) await assertSameAsQemu(["compare", ...args], dir.path);
});

Deno.test("compare refuses bad input with qemu-img's messages and exit codes", async () => {
  await using dir = await tempDir();
  await sh(SETUP, dir.path);
  for (
    const args of [
      [],
      ["s.raw"],
      ["s.raw", "t.raw", "u.raw"],
      ["s.raw", "nofile"],
      ["nofile", "s.raw"],
      ["s.raw", "sub"],
      ["-f", "qcow2", "s.raw", "t.raw"],
      ["-F", "qcow2", "s.raw", "t.raw"],
      ["-F", "nosuch", "s.raw", "t.raw"],
      ["-x", "s.raw", "t.raw"],
      ["--bogus", "s.raw", "t.raw"],
      ["-f"],
      ["-T", "bogus", "s.raw", "t.raw"],
      ["-T", "bogus", "nofile", "s.raw"],
      ["--object", "bogus", "s.raw", "t.raw"],
      ["--image-opts", "-f", "raw", "s.raw", "t.raw"],
    ]
  ) await assertSameAsQemu(["compare", ...args], dir.path);
});

Deno.test("compare leaves both images unmodified", async () => {
  await using dir = await tempDir();
  await sh(SETUP, dir.path);
  const before = [await hashFile(`${dir.path}/s.raw`), await hashFile(`${dir.path}/u.raw`)];
  const r = await qimg(["compare", "-s", "s.raw", "u.raw"], dir.path);
  assertEquals(r.code, 1, r.stderr);
  assertEquals([await hashFile(`${dir.path}/s.raw`), await hashFile(`${dir.path}/u.raw`)], before);
});

Deno.test("firstDifference() and firstNonZero() find the first byte at any alignment", () => {
  const a = new Uint8Array(4099);
  const b = new Uint8Array(4099);
  assertEquals(firstDifference(a, b), -1);
  assertEquals(firstNonZero(a), -1);
  for (const at of [0, 3, 4, 511, 4096, 4098]) {
    b.fill(0);
    b[at] = 7;
    assertEquals(firstDifference(a, b), at);
    assertEquals(firstNonZero(b), at);
    assertEquals(firstDifference(a.subarray(1), b.subarray(1)), at - 1);
  }
  // Past the 64 KiB memcmp steps, at and around their boundaries.
  const x = new Uint8Array(300_001);
  const y = new Uint8Array(300_001);
  for (const at of [65535, 65536, 65537, 131072, 299_999, 300_000]) {
    y.fill(0);
    y[at] = 1;
    assertEquals(firstDifference(x, y), at);
    assertEquals(firstDifference(x.subarray(3), y.subarray(3)), at - 3);
  }
});
