/**
 * vdi check against Debian's qemu-img on block maps longer than the file:
 * qemu reads the missing entries as zeroes and lists each one, however
 * many; qimg prints the same bytes, streamed, in bounded memory.
 */

import { assertEquals, assertTrue } from "./_assert.ts";
import { assertSameAsQemu, CLI, le32, le64, runProgram, sh, tempDir } from "./_util.ts";

/** A 4 MiB vdi made by qemu-img whose header claims `blocks` blocks of 1 MiB. */
async function longMap(dir: string, name: string, blocks: number, io = ""): Promise<void> {
  await sh(
    `qemu-img create -q -f vdi ${name} 4M${
      io ? ` && qemu-io -f vdi ${io} ${name} >/dev/null` : ""
    }`,
    dir,
  );
  const f = await Deno.open(`${dir}/${name}`, { write: true });
  try {
    // blocks_in_image at 384, disk_size at 368 (VirtualBox's header after the pre-header).
    await f.seek(384, Deno.SeekMode.Start);
    await f.write(new Uint8Array(le32(blocks)));
    await f.seek(368, Deno.SeekMode.Start);
    await f.write(new Uint8Array(le64(BigInt(blocks) << 20n)));
  } finally {
    f.close();
  }
}

Deno.test("VdiImage.check() lists every map entry past the end of the file as qemu-img does", async () => {
  await using d = await tempDir();
  // More than the 65,536 lines qimg used to stop at; block 0 in use or not
  // (then the first missing entry takes it silently).
  await longMap(d.path, "used.vdi", 0x20003, "-c 'write -P 1 0 4k' -c 'write -P 2 3M 4k'");
  await longMap(d.path, "free.vdi", 0x20003);
  for (const name of ["used.vdi", "free.vdi"]) {
    const r = await assertSameAsQemu(["check", name], d.path);
    assertTrue(r.stderr.split("\n").length > 0x10002, name);
    await assertSameAsQemu(["check", "--output=json", name], d.path);
  }
});

Deno.test("VdiImage.check() streams a map of 2^29 entries in bounded memory and time", async () => {
  await using d = await tempDir();
  await longMap(d.path, "max.vdi", 0x1fffff80);
  // 19 GB of lines: qemu-img writes them in about 10 minutes; qimg's may not pile up in memory.
  const qimg = [
    Deno.execPath(),
    "run --no-prompt --allow-read --allow-write --allow-ffi --allow-env=QIMG_DEBUG",
    CLI,
  ].join(" ");
  const r = await runProgram("bash", [
    "-c",
    `/usr/bin/time -o rss -f %M ${qimg} check max.vdi 2>/dev/null; echo "rc=$?"`,
  ], d.path);
  assertEquals(
    r.stdout,
    "\n536870780 errors were found on the image.\n" +
      "Data may be corrupted, or further writes to the image may corrupt it.\nrc=2\n",
  );
  const rss = Number((await Deno.readTextFile(`${d.path}/rss`)).trim().split("\n").pop());
  assertTrue(rss > 0 && rss < 300_000, `max RSS ${rss} KiB`);
});
