import { assertEquals } from "./_assert.ts";
import { hashFile, qemuImg, qimg, sh, tempDir } from "./_util.ts";
import { infoOf } from "./_bitmap_util.ts";

/** A qcow2 overlay over base.qcow2, plus a second base, in q/ (for qemu-img) and m/ (for qimg). */
async function chainDir(clusterSize = 65536) {
  const dir = await tempDir();
  await sh(
    "mkdir q && cd q && " +
      `qemu-img create -q -f qcow2 -o cluster_size=${clusterSize} base.qcow2 4M && ` +
      "qemu-io -c 'write -P 1 0 2M' base.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 base2.qcow2 4M && " +
      "qemu-io -c 'write -P 2 1M 2M' base2.qcow2 >/dev/null && " +
      `qemu-img create -q -f qcow2 -o cluster_size=${clusterSize} -b base.qcow2 -F qcow2 top.qcow2 4M && ` +
      "qemu-io -c 'write -P 3 512k 64k' -c 'write -z 3M 64k' top.qcow2 >/dev/null && " +
      "cd .. && cp -r q m",
    dir.path,
  );
  return dir;
}

/** Runs the command with both tools in their own copy and compares results. */
async function compareRun(dir: string, args: string[], files: string[]): Promise<void> {
  const theirs = await qemuImg(args, `${dir}/q`);
  const ours = await qimg(args, `${dir}/m`);
  assertEquals(
    { stdout: ours.stdout, stderr: ours.stderr, code: ours.code },
    { stdout: theirs.stdout, stderr: theirs.stderr, code: theirs.code },
    args.join(" "),
  );
  for (const f of files) {
    assertEquals(await hashFile(`${dir}/m/${f}`), await hashFile(`${dir}/q/${f}`), f);
  }
  const check = await qemuImg(["check", `${dir}/m/${files[0]}`]);
  assertEquals(check.code, 0, check.stdout + check.stderr);
}

Deno.test("rebase -u on qcow2 rewrites the backing reference byte for byte as qemu-img", async () => {
  for (const cs of [512, 4096, 65536]) {
    await using dir = await chainDir(cs);
    await compareRun(dir.path, ["rebase", "-u", "-b", "base2.qcow2", "-F", "qcow2", "top.qcow2"], [
      "top.qcow2",
    ]);
    await compareRun(dir.path, ["rebase", "-u", "-b", "", "top.qcow2"], ["top.qcow2"]);
    await compareRun(dir.path, ["rebase", "-u", "-b", "base.qcow2", "-F", "raw", "top.qcow2"], [
      "top.qcow2",
    ]);
  }
});

Deno.test("rebase on qcow2 copies differences then changes the reference as qemu-img", async () => {
  for (
    const args of [
      ["rebase", "-b", "base2.qcow2", "-F", "qcow2", "top.qcow2"],
      ["rebase", "-p", "-b", "base2.qcow2", "-F", "qcow2", "top.qcow2"],
      ["rebase", "-b", "", "top.qcow2"],
      ["rebase", "-b", "base2.qcow2", "top.qcow2"],
    ]
  ) {
    await using dir = await chainDir();
    await compareRun(dir.path, args, ["top.qcow2", "base.qcow2", "base2.qcow2"]);
  }
});

Deno.test("rebase -u on a qcow2 v2 image rewrites its header as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "mkdir q && cd q && qemu-img create -q -f qcow2 -o compat=0.10 top.qcow2 1M && qemu-img create -q -f qcow2 x.qcow2 1M && cd .. && cp -r q m",
    dir.path,
  );
  await compareRun(dir.path, ["rebase", "-u", "-b", "x.qcow2", "-F", "qcow2", "top.qcow2"], [
    "top.qcow2",
  ]);
  await compareRun(dir.path, ["rebase", "-u", "-b", "", "top.qcow2"], ["top.qcow2"]);
});

/** base.qcow2 under top.qcow2 (`topOpts` for its create) with data written by `io`, in q/ and m/. */
async function commitDir(topOpts: string, io: string) {
  const dir = await tempDir();
  await sh(
    "mkdir q && cd q && qemu-img create -q -f qcow2 base.qcow2 4M && " +
      "qemu-io -c 'write -P 1 0 1M' base.qcow2 >/dev/null && " +
      `qemu-img create -q -f qcow2 ${topOpts} -b base.qcow2 -F qcow2 top.qcow2 4M && ` +
      `qemu-io ${io} top.qcow2 >/dev/null && cd .. && cp -r q m`,
    dir.path,
  );
  return dir;
}

Deno.test("commit empties a qcow2 v3 overlay byte for byte as qemu-img", async () => {
  for (const opts of ["", "-o cluster_size=512", "-o lazy_refcounts=on,cluster_size=4k"]) {
    await using dir = await commitDir(opts, "-c 'write -P 3 512k 64k' -c 'write -P 4 2M 1M'");
    // The base's layout after the copy (not this feature) differs with small overlay clusters.
    await compareRun(dir.path, ["commit", "top.qcow2"], ["top.qcow2"]);
    const same = await qemuImg(["compare", "q/base.qcow2", "m/base.qcow2"], dir.path);
    assertEquals(same.stdout, "Images are identical.\n");
  }
  await using dir = await commitDir("", "-c 'write -P 3 0 64k'");
  await compareRun(dir.path, ["commit", "-q", "top.qcow2"], ["top.qcow2", "base.qcow2"]);
});

Deno.test("commit empties qcow2 v2 overlays and overlays with snapshots by discarding as qemu-img", async () => {
  for (
    const [opts, io] of [
      ["-o compat=0.10", "-c 'write -P 3 0 64k' -c 'write -c -P 4 512k 64k'"],
      ["-o compat=0.10", "-c 'write -P 3 0 64k' -c 'write -P 4 2M 128k'"],
    ]
  ) {
    await using dir = await commitDir(opts, io);
    await compareRun(dir.path, ["commit", "top.qcow2"], ["top.qcow2", "base.qcow2"]);
  }
  // Snapshots share L2 tables (copied first) and data clusters.
  for (const opts of ["", "-o compat=0.10"]) {
    await using dir = await commitDir(opts, "-c 'write -P 3 0 64k' -c 'write -c -P 4 512k 64k'");
    await sh("qemu-img snapshot -c s q/top.qcow2 && cp q/top.qcow2 m/top.qcow2", dir.path);
    await compareRun(dir.path, ["commit", "top.qcow2"], ["top.qcow2", "base.qcow2"]);
  }
});

Deno.test("commit of a qcow2 overlay with bitmaps empties it as qemu-img (its bitmaps stay)", async () => {
  await using dir = await commitDir("", "-c 'write -P 3 512k 64k'");
  await sh(
    "qemu-img bitmap --add q/top.qcow2 b0 && qemu-img bitmap --add m/top.qcow2 b0",
    dir.path,
  );
  const theirs = await qemuImg(["commit", "top.qcow2"], `${dir.path}/q`);
  assertEquals(await qimg(["commit", "top.qcow2"], `${dir.path}/m`), theirs);
  await sh(
    "qemu-img check -q m/top.qcow2 && qemu-img compare -q q/top.qcow2 m/top.qcow2 && " +
      "qemu-img compare -q q/base.qcow2 m/base.qcow2",
    dir.path,
  );
  assertEquals(
    await infoOf("top.qcow2", `${dir.path}/m`),
    await infoOf("top.qcow2", `${dir.path}/q`),
  );
});

Deno.test("rebase -u on qcow2 refuses a name that does not fit the header as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "mkdir q && cd q && qemu-img create -q -f qcow2 -o cluster_size=512 top.qcow2 1M && cd .. && cp -r q m",
    dir.path,
  );
  await compareRun(dir.path, ["rebase", "-u", "-b", "y".repeat(400), "-F", "qcow2", "top.qcow2"], [
    "top.qcow2",
  ]);
});

Deno.test("rebase -u of a qcow2 image with bitmaps keeps them as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "mkdir q && cd q && qemu-img create -q -f qcow2 top.qcow2 1M && qemu-img bitmap --add top.qcow2 b0 && " +
      "qemu-img create -q -f qcow2 x.qcow2 1M && " +
      "cd .. && cp -r q m",
    dir.path,
  );
  const args = ["rebase", "-u", "-b", "x.qcow2", "-F", "qcow2", "top.qcow2"];
  assertEquals(await qimg(args, `${dir.path}/m`), await qemuImg(args, `${dir.path}/q`));
  await sh("qemu-img check -q m/top.qcow2", dir.path);
  assertEquals(
    await infoOf("top.qcow2", `${dir.path}/m`),
    await infoOf("top.qcow2", `${dir.path}/q`),
  );
});

Deno.test("commit -b keeps the qcow2 overlay as qemu-img (-b implies -d)", async () => {
  await using dir = await commitDir("", "-c 'write -P 3 512k 64k'");
  await compareRun(dir.path, ["commit", "-b", "base.qcow2", "top.qcow2"], [
    "top.qcow2",
    "base.qcow2",
  ]);
});

Deno.test("commit -b into a deeper base copies every layer above it as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "mkdir q && cd q && qemu-img create -q -f qcow2 base.qcow2 1M && " +
      "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 && " +
      "qemu-io -c 'write -P 2 0 64k' -c 'write -z 256k 64k' -c 'write -P 4 512k 64k' mid.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 && " +
      "qemu-io -c 'write -P 3 64k 64k' -c 'write -P 5 512k 4k' top.qcow2 >/dev/null && cd .. && cp -r q m",
    dir.path,
  );
  // qemu's job copies in its own order: the base matches in content, not layout.
  await compareRun(dir.path, ["commit", "-b", "base.qcow2", "top.qcow2"], [
    "top.qcow2",
    "mid.qcow2",
  ]);
  const same = await qemuImg(["compare", "q/base.qcow2", "m/base.qcow2"], dir.path);
  assertEquals(same.stdout, "Images are identical.\n");
  const check = await qemuImg(["check", "m/base.qcow2"], dir.path);
  assertEquals(check.code, 0, check.stdout);
});
