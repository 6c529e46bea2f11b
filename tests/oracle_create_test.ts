import { assertEquals, assertRejects } from "./_assert.ts";
import { createImage } from "../src/create.ts";
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

/**
 * Runs `args` with qimg and with qemu-img, each in its own fresh directory
 * prepared by `setup`, and asserts the same output, exit code and files
 * (size, allocated blocks, content).
 */
async function assertCreateSameAsQemu(args: string[], setup = "true"): Promise<void> {
  await using ours = await tempDir();
  await using theirs = await tempDir();
  await sh(setup, ours.path);
  await sh(setup, theirs.path);
  const a = await qimg(args, ours.path);
  const b = await qemuImg(args, theirs.path);
  const label = `qimg ${args.join(" ")}`;
  assertEquals(printed(a), printed(b), label);
  assertEquals(await snapshotDir(ours.path), await snapshotDir(theirs.path), label);
}

Deno.test("create makes raw images identical to qemu-img's", async () => {
  for (
    const args of [
      ["create", "a.raw", "1M"],
      ["create", "-f", "raw", "a.raw", "0"],
      ["create", "-f", "raw", "a.raw", "1"],
      ["create", "a.raw", "513"],
      ["create", "a.raw", "4097"],
      ["create", "a.raw", "1.5k"],
      ["create", "a.raw", "0x10k"],
      ["create", "-q", "a.raw", "64M"],
      ["create", "a.raw", "-q", "1G"],
      ["create", "--", "a.raw", "1M"],
      ["create", "file:a.raw", "1M"],
      ["create", "-fraw", "a.raw", "1M"],
    ]
  ) await assertCreateSameAsQemu(args);
});

Deno.test("create -o preallocation, size and protocol options as qemu-img", async () => {
  for (
    const args of [
      ["create", "-o", "preallocation=off", "a.raw", "1M"],
      ["create", "-o", "preallocation=full", "a.raw", "1M"],
      ["create", "-o", "preallocation=falloc", "a.raw", "1M"],
      ["create", "-o", "preallocation=full", "a.raw", "100"],
      ["create", "-o", "preallocation=falloc", "a.raw", "0"],
      ["create", "-o", "size=2M", "a.raw"],
      ["create", "-o", "size=1M", "-o", "nocow=on", "a.raw"],
      ["create", "-o", "nocow=on", "-o", "size=2M", "-o", "extent_size_hint=1M", "b.raw"],
      ["create", "-o", "size=1M,size=2M", "a.raw"],
      ["create", "-o", "nocow=true,nocow=n", "a.raw", "1M"],
      ["create", "-o", "extent_size_hint=1.5k,id=x", "a.raw", "1M"],
      ["create", "-o", "size=0x10k", "a.raw"],
      ["create", "-o", "size=0x10k,extent_size_hint=0x20k", "a.raw"],
      ["create", "-o", "extent_size_hint=0x20k,size=0x10k", "a.raw"],
      ["create", "-q", "a.raw", "0x10k"],
      ["create", "-f", "file", "a.raw", "1M"],
    ]
  ) await assertCreateSameAsQemu(args);
});

Deno.test("create replaces an existing file's contents as qemu-img does", async () => {
  await assertCreateSameAsQemu(
    ["create", "c.raw", "50000"],
    "head -c 100000 /dev/zero | tr '\\0' 'x' > c.raw",
  );
});

Deno.test("create refuses bad sizes with qemu-img's messages", async () => {
  for (
    const size of [
      "1x",
      "-1",
      "1.5",
      "0.5",
      "16E",
      "8E",
      "9223372036854775808",
      "99999999999999999999",
      "1e3",
      "",
      " ",
      "1M ",
      ".5k",
      "0x",
      "0x1.5k",
      "1kB",
      "1.5b",
    ]
  ) await assertCreateSameAsQemu(["create", "a.raw", size]);
  await assertCreateSameAsQemu(["create", "a.raw", "--", "-1M"]);
});

Deno.test("create fails as qemu-img does when the file system refuses", async () => {
  for (
    const args of [
      ["create", "a.raw", "7E"],
      ["create", "a.raw", "1P"],
      ["create", "a.raw", "9223372036854775807"],
      ["create", "-o", "size=9223372036854775808", "a.raw"],
      ["create", "d", "1M"],
      ["create", "nodir/a.raw", "1M"],
      ["create", "-o", "preallocation=metadata", "a.raw", "1M"],
    ]
  ) await assertCreateSameAsQemu(args, "mkdir d");
});

Deno.test("create refuses bad arguments and options as qemu-img does", async () => {
  for (
    const args of [
      ["create"],
      ["create", "-f", "raw"],
      ["create", "a.raw"],
      ["create", "a.raw", "1M", "2M"],
      ["create", "-f", "foo", "a.raw", "1M"],
      ["create", "-f", "dmg", "a.raw", "1M"],
      ["create", "-x", "a.raw"],
      ["create", "--bogus", "a.raw"],
      ["create", "-f"],
      ["create", "a.raw", "-o"],
      ["create", "-o", "", "a.raw", "1M"],
      ["create", "-o", ",a", "a.raw", "1M"],
      ["create", "-o", "size=1M,", "a.raw"],
      ["create", "-o", "size=1M,,", "a.raw"],
      ["create", "-o", "bogus=1", "a.raw", "1M"],
      ["create", "-o", "preallocation=foo", "a.raw", "1M"],
      ["create", "-o", "preallocation", "a.raw", "1M"],
      ["create", "-o", "nocow", "a.raw", "1M"],
      ["create", "-o", "nocow=OFF", "a.raw", "1M"],
      ["create", "-o", "extent_size_hint=foo", "a.raw", "1M"],
      ["create", "-o", "size=1x", "a.raw"],
      ["create", "-o", "size=16E", "a.raw"],
      ["create", "-o", "size=-1", "a.raw"],
      ["create", "-o", "size", "a.raw"],
      ["create", "-o", "size=1M", "a.raw", "1M"],
      ["create", "-o", "size=18446744073709551615", "a.raw"],
      ["create", "-o", "size=0xFFFFFFFFFFFFFFFF", "a.raw"],
      ["create", "-o", "size=15.99999999999999999E", "a.raw"],
      ["create", "-o", "size=1.99999999999999999999k", "a.raw"],
      ["create", "-o", "help=1", "a.raw", "1M"],
      ["create", "-o", "backing_file=x", "a.raw", "1M"],
      ["create", "-b", "x.raw", "a.raw", "1M"],
      ["create", "-b", "x.raw", "-F", "raw", "a.raw", "1M"],
      ["create", "-F", "raw", "a.raw", "1M"],
      ["create", "-u", "-b", "x.raw", "a.raw", "1M"],
      ["create", "foo:bar", "1M"],
      ["create", "http://example.com/a", "1M"],
      ["create", "--object", "foo", "a.raw", "1M"],
    ]
  ) await assertCreateSameAsQemu(args);
});

Deno.test("create -o help lists options as qemu-img does", async () => {
  for (
    const args of [
      ["create", "-o", "help"],
      ["create", "-o", "?"],
      ["create", "-f", "raw", "-o", "help", "x.raw"],
      ["create", "-f", "raw", "-o", "help,size=1M", "x.raw"],
      ["create", "-o", "size=1M,help", "x.raw", "1M"],
      ["create", "-o", "size=1M", "-o", "?", "x.raw"],
      ["create", "-o", "bogus,help", "x.raw"],
      ["create", "-o", "help", "nodir/x.raw"],
      ["create", "-o", "help", "file:x.raw"],
      ["create", "-f", "qcow2", "-o", "help"],
      ["create", "-f", "qcow2", "-o", "help", "x.qcow2"],
      ["create", "-f", "file", "-o", "help"],
      ["create", "-f", "foo", "-o", "help"],
      ["create", "-f", "dmg", "-o", "help"],
      ["create", "-o", "help", "foo:bar"],
      ["create", "-o", "help", "http://example.com/a"],
      ["create", "-o", "help", "nbd:localhost"],
    ]
  ) await assertCreateSameAsQemu(args);
});

Deno.test("create's images read back the same through qemu-img info and compare", async () => {
  await using dir = await tempDir();
  await qimg(["create", "-q", "-o", "preallocation=full", "ours.raw", "3M"], dir.path);
  await qemuImg(["create", "-q", "-o", "preallocation=full", "theirs.raw", "3M"], dir.path);
  const info = async (name: string) => {
    const r = await qemuImg(["info", "-f", "raw", "--output=json", name], dir.path);
    const parsed = JSON.parse(r.stdout);
    delete parsed.filename;
    return parsed;
  };
  assertEquals(await info("ours.raw"), await info("theirs.raw"));
  const cmp = await qemuImg(
    ["compare", "-s", "-f", "raw", "-F", "raw", "ours.raw", "theirs.raw"],
    dir.path,
  );
  assertEquals(cmp.code, 0, cmp.stdout + cmp.stderr);
});

Deno.test("create -o preallocation=falloc reserves space that maps as zero, as qemu-img", async () => {
  await using dir = await tempDir();
  for (const [size, name] of [["1M", "a"], ["100", "b"], ["4097", "c"]]) {
    await qimg(["create", "-q", "-o", "preallocation=falloc", `ours-${name}.raw`, size], dir.path);
    await qemuImg(
      ["create", "-q", "-o", "preallocation=falloc", `theirs-${name}.raw`, size],
      dir.path,
    );
    const map = async (file: string) =>
      (await qemuImg(["map", "-f", "raw", "--output=json", file], dir.path)).stdout;
    assertEquals(await map(`ours-${name}.raw`), await map(`theirs-${name}.raw`), size);
  }
});

Deno.test("create checks a backing file before creating, as qemu-img", async () => {
  const setup =
    "qemu-img create -q a.raw 1M && qemu-img create -q -f qcow2 b.qcow2 2M && mkdir sub";
  for (
    const args of [
      ["create", "-f", "qcow2", "-b", "nofile", "-F", "raw", "q.qcow2"],
      ["create", "-f", "qcow2", "-b", "nofile", "-F", "raw", "q.qcow2", "1M"],
      ["create", "-f", "qcow2", "-u", "-b", "nofile", "-F", "raw", "q.qcow2"],
      ["create", "-f", "qcow2", "-u", "-b", "nofile", "q.qcow2", "1M"],
      ["create", "-f", "qcow2", "-b", "b.qcow2", "-F", "foo", "q.qcow2"],
      ["create", "-f", "qcow2", "-b", "a.raw", "-F", "qcow2", "q.qcow2"],
      ["create", "-f", "qcow2", "-b", "a.raw", "-F", "raw", "sub/q.qcow2"],
      ["create", "-f", "qcow2", "-b", "", "-F", "raw", "q.qcow2", "1M"],
      ["create", "-f", "qcow2", "-b", "q.qcow2", "-F", "raw", "q.qcow2", "1M"],
      ["create", "-f", "qcow2", "-o", "backing_file=nofile,backing_fmt=raw", "q.qcow2"],
    ]
  ) await assertCreateSameAsQemu(args, setup);
});

Deno.test("create names the probed format of a backing file given without -F", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q a.raw 1M", dir.path);
  const args = ["create", "-f", "qcow2", "-b", "a.raw", "q.qcow2"];
  const ours = await qimg(args, dir.path);
  const theirs = await qemuImg(args, dir.path);
  assertEquals(ours.code, theirs.code);
  // qemu's hint lacks its final newline; qimg ends every error line.
  assertEquals(ours.stderr, theirs.stderr + "\n");
});

Deno.test("createImage() makes the image qemu-img create makes, options as an object", async () => {
  await using dir = await tempDir();
  const lines: string[] = [];
  await createImage(`${dir.path}/ours.raw`, {
    size: 4097,
    options: { preallocation: "full", nocow: false },
    onFormatting: (line) => lines.push(line),
  });
  const theirs = await qemuImg(
    ["create", "-o", "preallocation=full,nocow=off", "theirs.raw", "4097"],
    dir.path,
  );
  assertEquals(lines, [theirs.stdout.replace("theirs.raw", `${dir.path}/ours.raw`)]);
  const snap = await snapshotDir(dir.path);
  assertEquals(snap["ours.raw"], snap["theirs.raw"]);
});

Deno.test("createImage() rejects with qemu's message and no file name", async () => {
  await using dir = await tempDir();
  await assertRejects(
    () => createImage(`${dir.path}/a.raw`, { options: "bogus=1", size: 1024 }),
    /^QimgError: Invalid parameter 'bogus'$/,
  );
  await assertRejects(
    () => createImage(`${dir.path}/a.raw`, { format: "raw" }),
    /^QimgError: Image creation needs a size parameter$/,
  );
});
