import { assertEquals } from "./_assert.ts";
import { assertSameAsQemu, hashFile, qemuImg, qimg, sh, tempDir } from "./_util.ts";

async function rawDir() {
  const dir = await tempDir();
  await sh(
    "qemu-img create -q -f raw a.raw 1M && qemu-io -f raw -c 'write -P 0x5a 0 64k' a.raw >/dev/null && " +
      "cp a.raw b.raw && mkdir sub && cp a.raw sub/a.raw",
    dir.path,
  );
  return dir;
}

Deno.test("amend parses its options and refuses raw images as qemu-img 7.2", async () => {
  await using dir = await rawDir();
  const before = await hashFile(`${dir.path}/a.raw`);
  for (
    const args of [
      ["amend"],
      ["amend", "a.raw"],
      ["amend", "-p", "a.raw"],
      ["amend", "-x"],
      ["amend", "-o"],
      ["amend", "-U", "-o", "size=1M", "a.raw"],
      ["amend", "-o", "", "a.raw"],
      ["amend", "-o", ",", "a.raw"],
      ["amend", "-o", "a,", "a.raw"],
      ["amend", "-o", "a,,,", "a.raw"],
      ["amend", "-p", "-o", ",", "a.raw"],
      ["amend", "-o", "size=2M"],
      ["amend", "-o", "size=2M", "a.raw", "b.raw"],
      ["amend", "-p", "-o", "size=2M"],
      ["amend", "-o", "help"],
      ["amend", "-o", "size=2M", "a.raw"],
      ["amend", "-f", "raw", "-o", "size=2M", "a.raw"],
      ["amend", "-o", "size=2M", "-o", "foo=1", "a.raw"],
      ["amend", "-o", "a,,", "-f", "raw", "a.raw"],
      ["amend", "-o", "help", "a.raw"],
      ["amend", "-o", "?", "a.raw"],
      ["amend", "-f", "raw", "-o", "help"],
      ["amend", "-f", "nosuch", "-o", "help"],
      ["amend", "-f", "nosuch", "-o", "size=1M", "a.raw"],
      ["amend", "-p", "-o", "help", "-f", "raw"],
      ["amend", "-p", "-o", "size=1M", "-f", "raw", "a.raw"],
      ["amend", "-f", "raw", "-o", "size=1M", "a.raw", "-p"],
      ["amend", "-p", "-q", "-o", "size=1M", "-t", "none", "a.raw"],
      ["amend", "-t", "bogus", "-o", "size=1M", "a.raw"],
      ["amend", "-p", "-t", "bogus", "-o", "size=1M", "a.raw"],
      ["amend", "--force", "-o", "size=1M", "-f", "raw", "a.raw"],
      ["amend", "-o", "size=1M", "nonexist"],
      ["amend", "-o", "size=1M", "sub"],
      ["amend", "--image-opts", "-f", "raw", "-o", "x=1", "a.raw"],
      ["amend", "--image-opts", "-o", "x=1", "driver=raw,file.filename=a.raw"],
      ["amend", "--object", "foo", "-o", "x=1", "a.raw"],
    ]
  ) await assertSameAsQemu(args, dir.path);
  assertEquals(await hashFile(`${dir.path}/a.raw`), before);
});

Deno.test("commit parses its options and handles images without a backing file as qemu-img 7.2", async () => {
  await using dir = await rawDir();
  const before = await hashFile(`${dir.path}/a.raw`);
  for (
    const args of [
      ["commit"],
      ["commit", "a.raw", "b.raw"],
      ["commit", "-x"],
      ["commit", "-U", "a.raw"],
      ["commit", "-s", "1", "a.raw"],
      ["commit", "-r"],
      ["commit", "-b"],
      ["commit", "a.raw"],
      ["commit", "-f", "raw", "a.raw"],
      ["commit", "-q", "a.raw"],
      ["commit", "-d", "a.raw"],
      ["commit", "-b", "x", "a.raw"],
      ["commit", "-b", "x", "-d", "a.raw"],
      ["commit", "-d", "-b", "x", "a.raw"],
      ["commit", "-r", "1M", "a.raw"],
      ["commit", "-r", "0", "a.raw"],
      ["commit", "-r", "0x10k", "-f", "raw", "a.raw"],
      ["commit", "-r", "-5", "a.raw"],
      ["commit", "-r", "abc", "a.raw"],
      ["commit", "-r", "99999E", "a.raw"],
      ["commit", "-t", "bogus", "a.raw"],
      ["commit", "-t", "none", "a.raw"],
      ["commit", "-p", "a.raw"],
      ["commit", "-p", "-q", "a.raw"],
      ["commit", "-p", "-t", "bogus", "-f", "raw", "a.raw"],
      ["commit", "-p", "-b", "x", "-f", "raw", "a.raw"],
      ["commit", "-p", "-f", "raw", "nonexist"],
      ["commit", "nonexist"],
      ["commit", "sub"],
      ["commit", "--image-opts", "driver=raw,file.filename=a.raw"],
      ["commit", "--image-opts", "-f", "raw", "a.raw"],
    ]
  ) await assertSameAsQemu(args, dir.path);
  assertEquals(await hashFile(`${dir.path}/a.raw`), before);
});

Deno.test("commit -d writes a qcow2 overlay's data into its raw backing file as qemu-img", async () => {
  await using dir = await tempDir();
  const setup = "qemu-img create -q -f raw base.raw 4M && " +
    "qemu-io -f raw -c 'write -P 0x11 0 4M' base.raw >/dev/null && " +
    "qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 4M && " +
    "qemu-io -c 'write -P 0x22 64k 128k' -c 'write -z 1M 64k' -c 'write -z 2M 1M' " +
    "-c 'write -P 0x33 3M 4k' top.qcow2 >/dev/null";
  await sh(`mkdir q m && (cd q && ${setup}) && (cd m && ${setup})`, dir.path);
  const theirs = await qemuImg(["commit", "-d", "top.qcow2"], `${dir.path}/q`);
  const ours = await qimg(["commit", "-d", "top.qcow2"], `${dir.path}/m`);
  assertEquals(ours, theirs);
  assertEquals(ours.stdout, "Image committed.\n");
  for (const f of ["base.raw", "top.qcow2"]) {
    assertEquals(await hashFile(`${dir.path}/m/${f}`), await hashFile(`${dir.path}/q/${f}`), f);
  }
  // Zeroes in the overlay become holes in the backing file, as with qemu.
  const map = (d: string) => sh(`qemu-img map --output=json -f raw ${d}/base.raw`, dir.path);
  assertEquals(await map("m"), await map("q"));
  const q = await qemuImg(["commit", "-q", "-d", "-b", "base.raw", "top.qcow2"], `${dir.path}/q`);
  const m = await qimg(["commit", "-q", "-d", "-b", "base.raw", "top.qcow2"], `${dir.path}/m`);
  assertEquals(m, q);
  assertEquals(m.stdout, "");
});

Deno.test("commit -r limits the job's speed as qemu-img's (4 MiB at 1 MiB/s takes about 4 s)", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 base.qcow2 8M && " +
      "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 && " +
      "qemu-io -c 'write -P 0x44 0 3M' -c 'write -z 3M 1M' top.qcow2 >/dev/null && " +
      "qemu-img convert -O raw top.qcow2 want.raw",
    dir.path,
  );
  const start = performance.now();
  const ours = await qimg(["commit", "-r", "1M", "top.qcow2"], dir.path);
  const seconds = (performance.now() - start) / 1000;
  assertEquals(ours, { code: 0, stdout: "Image committed.\n", stderr: "" });
  // qemu-img takes 4.06 s here; without the limit qimg takes well under one.
  if (seconds < 3.5) throw new Error(`commit -r 1M of 4 MiB took only ${seconds.toFixed(2)} s`);
  assertEquals(
    await sh("qemu-img compare -F raw base.qcow2 want.raw", dir.path),
    "Images are identical.\n",
  );
});

Deno.test("commit -d writes a qcow2 overlay's data into qcow2, vmdk, vpc and vdi backing files as qemu-img", async () => {
  for (const fmt of ["qcow2", "vmdk", "vpc", "vdi"]) {
    await using dir = await tempDir();
    const setup = `qemu-img create -q -f ${fmt} base.${fmt} 4M && ` +
      `qemu-io -f ${fmt} -c 'write -P 0x11 0 1M' base.${fmt} >/dev/null && ` +
      `qemu-img create -q -f qcow2 -b base.${fmt} -F ${fmt} top.qcow2 && ` +
      "qemu-io -c 'write -P 0x22 64k 128k' -c 'write -z 512k 64k' -c 'write -P 0x33 3M 4k' top.qcow2 >/dev/null";
    await sh(`mkdir q m && (cd q && ${setup}) && (cd m && ${setup})`, dir.path);
    const theirs = await qemuImg(["commit", "-d", "top.qcow2"], `${dir.path}/q`);
    const ours = await qimg(["commit", "-d", "top.qcow2"], `${dir.path}/m`);
    assertEquals(ours, theirs, fmt);
    // Same guest content; qemu's own check (vpc has none) finds nothing wrong.
    await sh(`qemu-img compare -f ${fmt} -F ${fmt} q/base.${fmt} m/base.${fmt}`, dir.path);
    if (fmt !== "vpc") await sh(`qemu-img check -q -f ${fmt} m/base.${fmt}`, dir.path);
    if (fmt === "qcow2") {
      // qcow2 holds no random ids or times: the very same bytes.
      assertEquals(
        await hashFile(`${dir.path}/m/base.qcow2`),
        await hashFile(`${dir.path}/q/base.qcow2`),
      );
    }
    assertEquals(
      await hashFile(`${dir.path}/m/top.qcow2`),
      await hashFile(`${dir.path}/q/top.qcow2`),
    );
  }
});

Deno.test("commit -d grows a smaller raw backing file, and fails for formats that cannot grow, as qemu-img", async () => {
  await using dir = await tempDir();
  const setup = "qemu-img create -q -f raw base.raw 1M && " +
    "qemu-io -f raw -c 'write -P 0x11 0 1M' base.raw >/dev/null && " +
    "qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 3M && " +
    "qemu-io -c 'write -P 0x22 1536k 64k' top.qcow2 >/dev/null && " +
    "qemu-img create -q -f vmdk base.vmdk 1M && " +
    "qemu-img create -q -f qcow2 -b base.vmdk -F vmdk topv.qcow2 3M && " +
    "qemu-io -c 'write -P 0x22 64k 64k' topv.qcow2 >/dev/null";
  // One setup copied: vmdk files carry a random CID.
  await sh(`mkdir q && (cd q && ${setup}) && cp -r q m`, dir.path);
  for (const top of ["top.qcow2", "topv.qcow2"]) {
    const theirs = await qemuImg(["commit", "-d", top], `${dir.path}/q`);
    const ours = await qimg(["commit", "-d", top], `${dir.path}/m`);
    assertEquals(ours, theirs, top);
  }
  for (const f of ["base.raw", "base.vmdk"]) {
    assertEquals(await hashFile(`${dir.path}/m/${f}`), await hashFile(`${dir.path}/q/${f}`), f);
  }
});

Deno.test("commit of a vmdk overlay keeps it as qemu-img does (vmdk cannot be emptied)", async () => {
  await using dir = await tempDir();
  const setup = "qemu-img create -q -f vmdk base.vmdk 4M && " +
    "qemu-io -f vmdk -c 'write -P 0x11 0 1M' base.vmdk >/dev/null && " +
    "qemu-img create -q -f vmdk -b base.vmdk -F vmdk top.vmdk && " +
    "qemu-io -f vmdk -c 'write -P 0x22 64k 128k' -c 'write -P 0x33 2M 64k' top.vmdk >/dev/null";
  await sh(`mkdir q && (cd q && ${setup}) && cp -r q m`, dir.path);
  const theirs = await qemuImg(["commit", "top.vmdk"], `${dir.path}/q`);
  const ours = await qimg(["commit", "top.vmdk"], `${dir.path}/m`);
  assertEquals(ours, theirs);
  assertEquals(ours.stdout, "Image committed.\n");
  await sh("qemu-img compare -f vmdk -F vmdk q/base.vmdk m/base.vmdk", dir.path);
  await sh("qemu-img check -q -f vmdk m/base.vmdk", dir.path);
  assertEquals(await hashFile(`${dir.path}/m/top.vmdk`), await hashFile(`${dir.path}/q/top.vmdk`));
});

Deno.test("commit without -d on a qcow2 overlay with bitmaps empties it as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f raw base.raw 1M && qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 && " +
      "qemu-img bitmap --add top.qcow2 b0",
    dir.path,
  );
  const before = await hashFile(`${dir.path}/base.raw`);
  const r = await qimg(["commit", "top.qcow2"], dir.path);
  assertEquals(r, { stdout: "Image committed.\n", stderr: "", code: 0 });
  await sh("qemu-img check -q top.qcow2", dir.path);
  assertEquals(await hashFile(`${dir.path}/base.raw`), before);
});

Deno.test("rebase parses its options and handles raw images as qemu-img 7.2", async () => {
  await using dir = await rawDir();
  const before = await hashFile(`${dir.path}/a.raw`);
  for (
    const args of [
      ["rebase"],
      ["rebase", "a.raw"],
      ["rebase", "-F", "raw", "a.raw"],
      ["rebase", "-b", "x"],
      ["rebase", "-b", "x", "a.raw", "b.raw"],
      ["rebase", "-x"],
      ["rebase", "-c", "-b", "x", "a.raw"],
      ["rebase", "-b"],
      ["rebase", "-t", "bogus", "-b", "x", "a.raw"],
      ["rebase", "-T", "bogus", "-b", "x", "a.raw"],
      ["rebase", "-p", "-t", "bogus", "-b", "x", "-f", "raw", "a.raw"],
      ["rebase", "-u", "-b", "x", "a.raw"],
      ["rebase", "-f", "raw", "-u", "-b", "x", "a.raw"],
      ["rebase", "-u", "-b", "x", "-F", "raw", "a.raw"],
      ["rebase", "-u", "-b", "", "a.raw"],
      ["rebase", "-u", "-b", "", "-F", "raw", "a.raw"],
      ["rebase", "-u", "a.raw"],
      ["rebase", "-u", "-f", "raw", "a.raw"],
      ["rebase", "-U", "-u", "-b", "x", "a.raw"],
      ["rebase", "-q", "-u", "-b", "x", "a.raw"],
      ["rebase", "-b", "x", "a.raw"],
      ["rebase", "-U", "-b", "x", "a.raw"],
      ["rebase", "-b", "", "a.raw"],
      ["rebase", "-b", "x", "-F", "raw", "a.raw"],
      ["rebase", "-b", "x", "sub/a.raw"],
      ["rebase", "-b", "a.raw", "sub/a.raw"],
      ["rebase", "-b", "a.raw", "a.raw"],
      ["rebase", "-b", "b.raw", "a.raw"],
      ["rebase", "-b", "b.raw", "-F", "raw", "a.raw"],
      ["rebase", "-b", "b.raw", "-F", "qcow2", "a.raw"],
      ["rebase", "-b", "x", "-F", "nosuch", "a.raw"],
      ["rebase", "-u", "-b", "x", "-F", "nosuch", "a.raw"],
      ["rebase", "-u", "-b", "x", "-f", "nosuch", "a.raw"],
      ["rebase", "-u", "-b", "x", "nonexist"],
      ["rebase", "-p", "-u", "-f", "raw", "-b", "x", "a.raw"],
      ["rebase", "-p", "-f", "raw", "-b", "b.raw", "a.raw"],
      ["rebase", "-p", "-b", "x", "-f", "raw", "a.raw"],
      ["rebase", "-p", "-b", "x", "-f", "nosuch", "a.raw"],
      ["rebase", "-p", "-q", "-b", "x", "-f", "raw", "a.raw"],
      ["rebase", "--image-opts", "-u", "-b", "x", "driver=raw,file.filename=a.raw"],
    ]
  ) await assertSameAsQemu(args, dir.path);
  assertEquals(await hashFile(`${dir.path}/a.raw`), before);
});

Deno.test("rebase copies what differs and fails as qemu-img 7.2 where the change is refused", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f raw base.raw 1M && qemu-io -f raw -c 'write -P 7 0 64k' base.raw >/dev/null && " +
      "cp base.raw same.raw && qemu-img create -q -f raw zero.raw 1M && " +
      "qemu-img create -q -f qcow2 -b base.raw -F raw ov.qcow2 && " +
      "qemu-io -c 'write -P 9 0 64k' ov.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -b base.raw -F raw empty.qcow2 && " +
      "qemu-img create -q -f qcow2 alone.qcow2 1M && " +
      // Larger images, for the progress of the comparison (2 MiB at a time).
      "qemu-img create -q -f raw z8.raw 8M && qemu-img create -q -f raw z3.raw 3M && " +
      "qemu-img create -q -f qcow2 -b z8.raw -F raw e8.qcow2 && " +
      "qemu-img create -q -f qcow2 -b z8.raw -F raw p8.qcow2 && " +
      "qemu-io -c 'write -z 0 2M' -c 'write 5M 64k' p8.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -b z3.raw -F raw e3.qcow2 && " +
      "qemu-img create -q -f qcow2 -o cluster_size=512 -b z8.raw -F raw s512.qcow2 && " +
      "qemu-io -c 'write 100k 4k' s512.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -b z8.raw -F raw mid.qcow2 && " +
      "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 && " +
      "qemu-io -c 'write 4M 64k' top.qcow2 >/dev/null && qemu-img create -q -f vmdk v.vmdk 1M",
    dir.path,
  );
  for (
    const [args, image] of [
      [["-u", "-b", "x"], "ov.qcow2"],
      [["-u", "-b", "base.raw"], "ov.qcow2"],
      [["-b", "base.raw"], "ov.qcow2"],
      // Where ov.qcow2 has its own data, the backing files may differ.
      [["-b", "zero.raw"], "ov.qcow2"],
      [["-b", "same.raw"], "empty.qcow2"],
      [["-b", "zero.raw"], "alone.qcow2"],
      [["-b", "x"], "ov.qcow2"],
      [["-b", "zero.raw", "-F", "qcow2"], "ov.qcow2"],
      [["-b", "zero.raw", "-F", "nosuch"], "ov.qcow2"],
      [["-p", "-b", "same.raw"], "empty.qcow2"],
      [["-p", "-b", "zero.raw"], "ov.qcow2"],
      [["-p", "-b", "zero.raw"], "alone.qcow2"],
      // Differences: the old content is copied into the image first.
      [["-b", "zero.raw"], "empty.qcow2"],
      [["-p", "-b", "z3.raw"], "empty.qcow2"],
      [["-b", "base.raw"], "alone.qcow2"],
      [["-b", "base.raw", "-F", "raw"], "v.vmdk"],
      [["-p", "-b", "z8.raw"], "p8.qcow2"],
      [["-p", "-b", "z3.raw"], "e8.qcow2"],
      [["-p", "-b", "z3.raw"], "p8.qcow2"],
      [["-p", "-b", "z8.raw"], "e3.qcow2"],
      [["-p", "-b", "z8.raw"], "s512.qcow2"],
      [["-p", "-b", "z8.raw"], "top.qcow2"],
      [["-p", "-b", "mid.qcow2"], "top.qcow2"],
      // vmdk cannot change its backing file in qemu either.
      [["-b", "zero.raw", "-F", "raw"], "v.vmdk"],
      [["-p", "-u", "-b", "zero.raw", "-F", "raw"], "v.vmdk"],
    ] as [string[], string][]
  ) {
    // Each tool works on its own copy: qemu may write before it fails.
    await sh(`cp ${image} q_${image} && cp ${image} m_${image}`, dir.path);
    const theirs = await qemuImg(["rebase", ...args, `q_${image}`], dir.path);
    const ours = await qimg(["rebase", ...args, `m_${image}`], dir.path);
    assertEquals(
      { ...ours, stderr: ours.stderr.replaceAll("m_", "q_") },
      theirs,
      `rebase ${args.join(" ")} ${image}`,
    );
    if (image.endsWith(".qcow2") && image !== "alone.qcow2") {
      // The very same bytes: what qemu copied, qimg copied.
      assertEquals(
        await hashFile(`${dir.path}/m_${image}`),
        await hashFile(`${dir.path}/q_${image}`),
      );
    } else {
      // The same guest content (vmdk ids are random; zeroes may be stored otherwise).
      await sh(`qemu-img compare -q q_${image} m_${image}`, dir.path);
    }
  }
});

Deno.test("rebase onto the image itself meets qemu's own lock, except for raw", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 self.qcow2 1M && mkdir sub && cp self.qcow2 sub/ && " +
      "qemu-img create -q -f vmdk self.vmdk 1M",
    dir.path,
  );
  for (
    const args of [
      ["rebase", "-b", "self.qcow2", "self.qcow2"],
      ["rebase", "-b", "self.qcow2", "sub/self.qcow2"],
      ["rebase", "-b", "self.vmdk", "-F", "vmdk", "self.vmdk"],
    ]
  ) await assertSameAsQemu(args, dir.path);
});

Deno.test("rebase of a qcow2 image changes the reference as qemu-img where the change succeeds", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f raw base.raw 1M && qemu-io -f raw -c 'write -P 7 0 64k' base.raw >/dev/null && " +
      "qemu-img create -q -f raw zero.raw 1M && qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2",
    dir.path,
  );
  for (
    const args of [
      ["-u", "-b", "x", "-F", "raw"],
      ["-b", "base.raw", "-F", "raw"],
      ["-u"],
      ["-b", ""],
    ]
  ) {
    await sh("cp top.qcow2 m.qcow2 && cp top.qcow2 q.qcow2", dir.path);
    const r = await qimg(["rebase", ...args, "m.qcow2"], dir.path);
    const q = await qemuImg(["rebase", ...args, "q.qcow2"], dir.path);
    assertEquals(r, q);
    assertEquals(await hashFile(`${dir.path}/m.qcow2`), await hashFile(`${dir.path}/q.qcow2`));
  }
});

Deno.test("amend of a qcow2 image lists and checks its options as qemu-img 7.2", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f qcow2 q.qcow2 1M", dir.path);
  const before = await hashFile(`${dir.path}/q.qcow2`);
  for (
    const args of [
      ["amend", "-f", "qcow2", "-o", "help"],
      ["amend", "-p", "-f", "qcow2", "-o", "help"],
      ["amend", "-o", "help", "q.qcow2"],
      ["amend", "-o", "compat=1.1,help", "q.qcow2"],
      ["amend", "-o", "?", "-f", "qcow2", "q.qcow2"],
      ["amend", "-o", "foo=1", "q.qcow2"],
      ["amend", "-p", "-o", "foo=1", "q.qcow2"],
      ["amend", "-o", "cluster_size=4k", "q.qcow2"],
      ["amend", "-o", "encrypt.format=luks", "q.qcow2"],
      ["amend", "-o", "cluster_size=4k,foo=1", "q.qcow2"],
      ["amend", "-o", "foo=1,cluster_size=4k", "q.qcow2"],
      ["amend", "-o", "compat=1.1", "-o", "foo=1", "q.qcow2"],
      ["amend", "-o", "lazy_refcounts=maybe", "q.qcow2"],
      ["amend", "-o", "refcount_bits=abc", "q.qcow2"],
      ["amend", "-o", "size=abc", "q.qcow2"],
      ["amend", "-o", "size=1M,,x", "q.qcow2"],
      ["amend", "-o", "size=0x1k,foo=1", "q.qcow2"],
    ]
  ) await assertSameAsQemu(args, dir.path);
  assertEquals(await hashFile(`${dir.path}/q.qcow2`), before);
});

Deno.test("amend -o refcount_bits of a qcow2 image writes what qemu-img writes", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f qcow2 q.qcow2 1M && cp q.qcow2 m.qcow2", dir.path);
  for (const o of ["refcount_bits=8"]) {
    assertEquals(await qimg(["amend", "-o", o, "m.qcow2"], dir.path), {
      stdout: "",
      stderr: "",
      code: 0,
    });
    await sh(`qemu-img amend -o ${o} q.qcow2`, dir.path);
  }
  assertEquals(await hashFile(`${dir.path}/m.qcow2`), await hashFile(`${dir.path}/q.qcow2`));
});
