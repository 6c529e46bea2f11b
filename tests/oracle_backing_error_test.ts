/**
 * A backing file that cannot be opened: qemu opens an image and its chain
 * as one bdrv_open, so commands say "Could not open 'TOP': Could not open
 * backing file: ..." once per level down to the failing one, while
 * `info --backing-chain` opens each layer alone and names only that one.
 */

import { assertSameAsQemu, sh, tempDir } from "./_util.ts";

/** top -> mid -> base (missing), bad -> broken (not qcow2 any more). */
async function makeChains(dir: string): Promise<void> {
  await sh(
    `
    qemu-img create -q -f qcow2 base.qcow2 1M
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
    qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
    rm base.qcow2
    qemu-img create -q -f qcow2 broken.qcow2 1M
    qemu-img create -q -f qcow2 -b broken.qcow2 -F qcow2 bad.qcow2
    printf XXXX | dd of=broken.qcow2 conv=notrunc status=none
    `,
    dir,
  );
}

Deno.test("openForCommand() fails on an unopenable backing file with qemu-img's nested message", async () => {
  await using dir = await tempDir();
  await makeChains(dir.path);
  const cases = [
    ["map", "top.qcow2"],
    ["map", "--output=json", "mid.qcow2"],
    ["map", `${dir.path}/top.qcow2`],
    ["map", "--image-opts", "driver=qcow2,file.filename=top.qcow2"],
    ["map", "bad.qcow2"],
    ["convert", "-O", "raw", "top.qcow2", "out.raw"],
    ["compare", "top.qcow2", "bad.qcow2"],
    ["compare", "mid.qcow2", "mid.qcow2"],
    ["info", "--backing-chain", "top.qcow2"],
    ["info", "--backing-chain", "bad.qcow2"],
    ["info", "top.qcow2"],
  ];
  for (const args of cases) await assertSameAsQemu(args, dir.path);
});
