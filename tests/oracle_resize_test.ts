import { assertEquals } from "./_assert.ts";
import { hashFile, qemuImg, qimg, type RunResult, sh, tempDir } from "./_util.ts";

/** Size, allocated blocks and content of every file under `dir`, by name. */
async function snapshotDir(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for await (const e of Deno.readDir(dir)) {
    const st = await Deno.stat(`${dir}/${e.name}`);
    out[e.name] = st.isFile
      ? `size=${st.size} blocks=${st.blocks} sha256=${await hashFile(`${dir}/${e.name}`)}`
      : "dir";
  }
  return out;
}

function printed(r: RunResult) {
  return { stdout: r.stdout, stderr: r.stderr, code: r.code };
}

/** A 1 MiB raw image with data at its start and end, made by qemu-img and qemu-io. */
const IMAGE = "qemu-img create -q -f raw a.raw 1M && " +
  "qemu-io -f raw -c 'write -P 0x11 0 64k' -c 'write -P 0x22 960k 64k' a.raw >/dev/null";

/**
 * Runs `args` with qimg and with qemu-img, each in its own directory
 * prepared by `setup`, and asserts the same output, exit code and files.
 * When qemu-img fails, also asserts qimg left every file as it was.
 */
async function assertResizeSameAsQemu(args: string[], setup = IMAGE): Promise<void> {
  await using ours = await tempDir();
  await using theirs = await tempDir();
  await sh(setup, ours.path);
  await sh(setup, theirs.path);
  const before = await snapshotDir(ours.path);
  const a = await qimg(args, ours.path);
  const b = await qemuImg(args, theirs.path);
  const label = `qimg ${args.join(" ")}`;
  assertEquals(printed(a), printed(b), label);
  const after = await snapshotDir(ours.path);
  assertEquals(after, await snapshotDir(theirs.path), label);
  if (b.code !== 0) assertEquals(after, before, `${label} changed the image`);
}

Deno.test("resize grows and shrinks raw images as qemu-img", async () => {
  for (
    const args of [
      ["resize", "-f", "raw", "a.raw", "2M"],
      ["resize", "a.raw", "2M"],
      ["resize", "-f", "raw", "a.raw", "+1M"],
      ["resize", "-f", "raw", "a.raw", "+1"],
      ["resize", "-f", "raw", "a.raw", "1M"],
      ["resize", "-f", "raw", "--shrink", "a.raw", "-512k"],
      ["resize", "--shrink", "a.raw", "1025"],
      ["resize", "-f", "raw", "--shrink", "a.raw", "--", "-1023k"],
      ["resize", "-f", "raw", "a.raw", "--", "+1M"],
      ["resize", "-q", "-f", "raw", "a.raw", "2M"],
      ["resize", "a.raw", "-q", "2M"],
      ["resize", "-f", "raw", "a.raw", "0x200000"],
      ["resize", "-f", "raw", "a.raw", "+0x10k"],
      ["resize", "--image-opts", "driver=raw,file.filename=a.raw", "2M"],
      ["resize", "--pre=off", "--shr", "-f", "raw", "a.raw", "100"],
    ]
  ) await assertResizeSameAsQemu(args);
});

Deno.test("resize --preallocation allocates as qemu-img", async () => {
  for (
    const args of [
      ["resize", "-f", "raw", "--preallocation=full", "a.raw", "3M"],
      ["resize", "-f", "raw", "--preallocation=falloc", "a.raw", "3M"],
      ["resize", "-f", "raw", "--preallocation", "off", "a.raw", "3M"],
      ["resize", "-f", "raw", "--preallocation=full", "a.raw", "+1"],
    ]
  ) await assertResizeSameAsQemu(args);
});

Deno.test("resize of an empty or unaligned file matches qemu-img", async () => {
  for (
    const [setup, args] of [
      ["truncate -s 0 z", ["resize", "-f", "raw", "z", "1M"]],
      ["truncate -s 0 z", ["resize", "-f", "raw", "z", "100"]],
      ["truncate -s 0 z", ["resize", "-f", "raw", "--preallocation=full", "z", "100"]],
      ["truncate -s 0 z", ["resize", "-f", "raw", "--preallocation=falloc", "z", "100"]],
      ["truncate -s 1025 y", ["resize", "-f", "raw", "y", "1536"]],
      ["truncate -s 1025 y", ["resize", "-f", "raw", "y", "+1"]],
      ["truncate -s 1025 y", ["resize", "-f", "raw", "y", "1300"]],
    ] as [string, string[]][]
  ) await assertResizeSameAsQemu(args, setup);
});

Deno.test("resize refuses shrinking without --shrink and leaves the image unchanged", async () => {
  for (
    const args of [
      ["resize", "-f", "raw", "a.raw", "-512k"],
      ["resize", "a.raw", "-512k"],
      ["resize", "-f", "raw", "a.raw", "512k"],
      ["resize", "-f", "raw", "a.raw", "-1M"],
      ["resize", "-f", "raw", "a.raw", "-2M"],
      ["resize", "-f", "raw", "a.raw", "0"],
      ["resize", "-f", "raw", "--preallocation=full", "a.raw", "1M"],
      ["resize", "-f", "raw", "--preallocation=full", "--shrink", "a.raw", "512k"],
      ["resize", "-f", "raw", "--preallocation=metadata", "a.raw", "2M"],
      ["resize", "-f", "raw", "--preallocation=foo", "a.raw", "2M"],
    ]
  ) await assertResizeSameAsQemu(args);
});

Deno.test("resize refuses bad sizes and arguments as qemu-img", async () => {
  for (
    const args of [
      ["resize"],
      ["resize", "a.raw"],
      ["resize", "-h"],
      ["resize", "a.raw", "1x"],
      ["resize", "a.raw", "16E"],
      ["resize", "a.raw", "+16E"],
      ["resize", "a.raw", "8E"],
      ["resize", "a.raw", "+8E"],
      ["resize", "-f", "raw", "a.raw", "7E"],
      ["resize", "-f", "raw", "a.raw", "9223372036854775807"],
      ["resize", "-f", "raw", "a.raw", "9223372035781033984"],
      ["resize", "-f", "raw", "a.raw", "9223372035781033985"],
      ["resize", "-f", "raw", "a.raw", "+9223372036854775807"],
      ["resize", "-f", "raw", "a.raw", "+0x10kz"],
      ["resize", "-f", "raw", "a.raw", "--shrink"],
      ["resize", "-f", "raw", "--", "a.raw", "-1M"],
      ["resize", "a.raw", "1.5"],
      ["resize", "a.raw", "1e3"],
      ["resize", "a.raw", ""],
      ["resize", "a.raw", "-"],
      ["resize", "nofile", "1M"],
      ["resize", "d", "1M"],
      ["resize", "-f", "foo", "a.raw", "1M"],
      ["resize", "-x", "a.raw", "1M"],
      ["resize", "a.raw", "1M", "2M"],
      ["resize", "a.raw", "2M", "-q"],
      ["resize", "--shrink=1", "a.raw", "1M"],
      ["resize", "--preallocation", "-f", "raw", "a.raw", "4M"],
      ["resize", "-f", "raw", "a.raw", "--preallocation"],
      ["resize", "-f", "a.raw", "1M"],
      ["resize", "--object", "foo", "a.raw", "1M"],
    ]
  ) await assertResizeSameAsQemu(args, IMAGE + " && mkdir d");
});

Deno.test("resize --preallocation=falloc reserves space that maps as zero, as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(`${IMAGE} && cp a.raw b.raw && truncate -s 0 c.raw d.raw`, dir.path);
  const map = async (file: string) =>
    (await qemuImg(["map", "-f", "raw", "--output=json", file], dir.path)).stdout;
  for (const [ours, theirs, size] of [["a.raw", "b.raw", "3M"], ["c.raw", "d.raw", "1M"]]) {
    const args = ["resize", "-q", "-f", "raw", "--preallocation=falloc"];
    assertEquals((await qimg([...args, ours, size], dir.path)).code, 0);
    assertEquals((await qemuImg([...args, theirs, size], dir.path)).code, 0);
    assertEquals(await map(ours), await map(theirs), size);
  }
});
