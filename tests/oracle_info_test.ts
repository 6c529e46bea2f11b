import { assertSameAsQemu, sh, tempDir } from "./_util.ts";

Deno.test("info matches qemu-img on raw images, human and json", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f raw a.raw 1G && qemu-io -f raw -c 'write -P 0xab 1M 64k' a.raw >/dev/null && " +
      "truncate -s 0 empty && mkdir sub && printf 'x' > one.raw",
    dir.path,
  );
  for (
    const args of [
      ["info", "a.raw"],
      ["info", "--output=json", "a.raw"],
      ["info", "--output", "json", "a.raw"],
      ["info", "-f", "raw", "--backing-chain", "--output=json", "a.raw"],
      ["info", "--backing-chain", "a.raw"],
      ["info", "-U", "empty"],
      ["info", "one.raw"],
    ]
  ) await assertSameAsQemu(args, dir.path);
});

Deno.test("info refuses bad input as qemu-img does", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f raw a.raw 1M && mkdir sub && truncate -s 0 empty", dir.path);
  for (
    const args of [
      ["info"],
      ["info", "nofile"],
      ["info", "sub"],
      ["info", "a.raw", "a.raw"],
      ["info", "--output=xml", "a.raw"],
      ["info", "-f", "nosuchfmt", "a.raw"],
      ["info", "-x", "a.raw"],
      ["info", "-qx", "a.raw"],
      ["info", "a.raw", "-f"],
      ["info", "--foo", "a.raw"],
      ["info", "--output"],
      ["info", "--force-share=1", "a.raw"],
      ["nosuchcommand"],
      [],
    ]
  ) await assertSameAsQemu(args, dir.path);
});
