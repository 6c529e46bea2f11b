/**
 * Gaps found by auditing issue 7 (vmdk, vpc, vhdx, vdi, every command)
 * against qemu-img 7.2: each test pins one behaviour the per-format oracle
 * tests did not cover.
 */
import { assertEquals } from "./_assert.ts";
import { qemuImg, qimg, sh, tempDir } from "./_util.ts";

/** Runs `args` with qimg and qemu-img in two copies of `setup`; returns both dirs' results. */
async function assertSameInTwoDirs(
  setup: string,
  args: string[],
  files: string[],
): Promise<void> {
  await using ours = await tempDir();
  await using theirs = await tempDir();
  if (setup) {
    await sh(setup, ours.path);
    await sh(setup, theirs.path);
  }
  const a = await qimg(args, ours.path);
  const b = await qemuImg(args, theirs.path);
  assertEquals(
    { stdout: a.stdout, stderr: a.stderr, code: a.code },
    { stdout: b.stdout, stderr: b.stderr, code: b.code },
    `qimg ${args.join(" ")}`,
  );
  for (const f of files) {
    const sizeOf = async (dir: string) => {
      try {
        return (await Deno.stat(`${dir}/${f}`)).size;
      } catch {
        return -1;
      }
    };
    assertEquals(
      await sizeOf(ours.path),
      await sizeOf(theirs.path),
      `${f} after ${args.join(" ")}`,
    );
  }
}

for (const fmt of ["vmdk", "vpc", "vhdx", "vdi"]) {
  Deno.test(`createImageWith() refuses preallocation=metadata for ${fmt} as file-posix does`, async () => {
    // The host file is created (empty), then the protocol refuses the mode.
    await assertSameInTwoDirs("", [
      "create",
      "-f",
      fmt,
      "-o",
      "preallocation=metadata",
      `x.${fmt}`,
      "1M",
    ], [`x.${fmt}`]);
    await assertSameInTwoDirs("qemu-img create -q -f raw s.raw 1M", [
      "convert",
      "-O",
      fmt,
      "-o",
      "preallocation=metadata",
      "s.raw",
      `o.${fmt}`,
    ], [`o.${fmt}`]);
  });
}

Deno.test("createImageWith() refuses preallocation=metadata before vmdk writes any extent file", async () => {
  await assertSameInTwoDirs("", [
    "create",
    "-f",
    "vmdk",
    "-o",
    "preallocation=metadata,subformat=twoGbMaxExtentFlat",
    "x.vmdk",
    "1M",
  ], ["x.vmdk", "x-f001.vmdk"]);
});
