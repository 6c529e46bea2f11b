import { assertEquals } from "./_assert.ts";
import { hashFile, qemuImg, qimg, sh, tempDir } from "./_util.ts";

/** Test images, created by qemu-img. */
const SETUP = [
  "qemu-img create -q -f qcow2 v3.qcow2 1M",
  "qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M",
  "qemu-img create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 1M",
  "qemu-img create -q -f qcow2 zero.qcow2 1M",
  "qemu-io -c 'write -z 0 64k' -c 'write -P 1 64k 64k' -c 'write -P 2 128k 64k' -c 'write -z 128k 64k' zero.qcow2 >/dev/null",
  "qemu-img create -q -f qcow2 base.qcow2 1M",
  "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 over.qcow2",
  "qemu-io -c 'write -z 0 64k' -c 'write -P 2 128k 64k' -c 'write -z 128k 64k' over.qcow2 >/dev/null",
  "qemu-img create -q -f qcow2 -o cluster_size=512 small.qcow2 64M",
  "qemu-io -c 'write -z 0 64k' -c 'write -z 40M 64k' small.qcow2 >/dev/null",
  "qemu-img create -q -f qcow2 -o refcount_bits=8 r8.qcow2 1M",
  "qemu-img create -q -f qcow2 -o extended_l2=on ext.qcow2 1M",
  "qemu-img create -q -f qcow2 -o compression_type=zstd zstd.qcow2 1M",
].join(" && ");

/**
 * Runs `amend <args> <copy of image>` with qemu-img and qimg; asserts the
 * same stdout, stderr, exit code and resulting bytes, and a clean check.
 */
async function sameAmend(dir: string, image: string, args: string[]): Promise<void> {
  await sh(`cp ${image} q.qcow2 && cp ${image} m.qcow2`, dir);
  const theirs = await qemuImg(["amend", ...args, "q.qcow2"], dir);
  const ours = await qimg(["amend", ...args, "m.qcow2"], dir);
  const what = `amend ${args.join(" ")} ${image}`;
  assertEquals(
    { stdout: ours.stdout, stderr: ours.stderr.replaceAll("m.qcow2", "q.qcow2"), code: ours.code },
    { stdout: theirs.stdout, stderr: theirs.stderr, code: theirs.code },
    what,
  );
  assertEquals(await hashFile(`${dir}/m.qcow2`), await hashFile(`${dir}/q.qcow2`), what);
  const check = await qemuImg(["check", "m.qcow2"], dir);
  assertEquals(check.code, 0, `${what}: ${check.stdout}${check.stderr}`);
}

Deno.test("amend lazy_refcounts, compat and data_file_raw on qcow2 byte for byte as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(SETUP, dir.path);
  const cases: [string, string][] = [
    ["v3.qcow2", "lazy_refcounts=on"],
    ["v3.qcow2", "lazy_refcounts=off"],
    ["lazy.qcow2", "lazy_refcounts=off"],
    ["lazy.qcow2", "compat=0.10"],
    ["v3.qcow2", "compat=1.1"],
    ["v3.qcow2", "compat=v2"],
    ["v2.qcow2", "compat=1.1"],
    ["v2.qcow2", "compat=v3,lazy_refcounts=on"],
    ["v3.qcow2", "data_file_raw=off"],
    ["v3.qcow2", "size=2M"],
    ["v2.qcow2", "size=3M"],
    ["v3.qcow2", "refcount_bits=16"],
  ];
  for (const [image, o] of cases) await sameAmend(dir.path, image, ["-o", o]);
});

Deno.test("amend compat=0.10 expands qcow2 zero clusters as qemu-img, with its progress", async () => {
  await using dir = await tempDir();
  await sh(SETUP, dir.path);
  for (const image of ["zero.qcow2", "over.qcow2", "small.qcow2", "v3.qcow2"]) {
    await sameAmend(dir.path, image, ["-p", "-o", "compat=0.10"]);
  }
  await sameAmend(dir.path, "v2.qcow2", ["-p", "-o", "compat=1.1"]);
  await sameAmend(dir.path, "lazy.qcow2", ["-p", "-o", "lazy_refcounts=off"]);
});

Deno.test("amend refuses on qcow2 what qemu-img refuses, with its messages", async () => {
  await using dir = await tempDir();
  await sh(SETUP, dir.path);
  const cases: [string, string[]][] = [
    ["v3.qcow2", ["-o", "compat=2"]],
    ["v3.qcow2", ["-o", "cluster_size=4k"]],
    ["v3.qcow2", ["-o", "refcount_bits=3"]],
    ["v3.qcow2", ["-o", "backing_file=x.qcow2"]],
    ["v3.qcow2", ["-o", "backing_fmt=qcow2"]],
    ["over.qcow2", ["-o", "backing_file=base.qcow2"]],
    ["over.qcow2", ["-o", "backing_file=base.qcow2,backing_fmt=qcow2"]],
    ["v3.qcow2", ["-o", "data_file=d.raw"]],
    ["v3.qcow2", ["-o", "data_file_raw=on"]],
    ["v3.qcow2", ["-o", "encrypt.new-secret=x"]],
    ["v3.qcow2", ["-o", "compat=0.10,lazy_refcounts=on"]],
    ["v2.qcow2", ["-p", "-o", "lazy_refcounts=on"]],
    ["v2.qcow2", ["-p", "-o", "refcount_bits=8"]],
    ["r8.qcow2", ["-o", "compat=0.10"]],
    ["ext.qcow2", ["-o", "compat=0.10"]],
  ];
  for (const [image, args] of cases) await sameAmend(dir.path, image, args);
});

Deno.test("amend compat on qcow2 with snapshots: downgrade expands their zero clusters, upgrade as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    [
      "qemu-img create -q -f qcow2 s1.qcow2 1M",
      "qemu-io -c 'write -z 0 64k' -c 'write -P 1 64k 64k' s1.qcow2 >/dev/null",
      "qemu-img snapshot -c a s1.qcow2",
      "qemu-io -c 'write -z 64k 64k' -c 'write -P 2 0 64k' s1.qcow2 >/dev/null",
      "qemu-img snapshot -c b s1.qcow2",
      "qemu-img create -q -f qcow2 base.qcow2 1M",
      "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 s5.qcow2 1M",
      "qemu-io -c 'write -z 0 128k' s5.qcow2 >/dev/null",
      "qemu-img snapshot -c a s5.qcow2",
      "qemu-img create -q -f qcow2 s3.qcow2 1M",
      "qemu-img snapshot -c a s3.qcow2",
      "qemu-img resize -q s3.qcow2 2M",
      "qemu-img create -q -f qcow2 -o compat=0.10 v2s.qcow2 1M",
      "qemu-img snapshot -c a v2s.qcow2",
    ].join(" && "),
    dir.path,
  );
  for (const image of ["s1.qcow2", "s5.qcow2", "s3.qcow2"]) {
    await sameAmend(dir.path, image, ["-p", "-o", "compat=0.10"]);
  }
  // Snapshots qemu 7.2 wrote carry v3's extra data already.
  await sameAmend(dir.path, "v2s.qcow2", ["-p", "-o", "compat=1.1"]);
});

Deno.test("amend data_file and data_file_raw on qcow2 with an external data file as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 -o data_file=d.raw df.qcow2 1M && " +
      "qemu-img create -q -f qcow2 -o data_file=d2.raw,data_file_raw=on dfr.qcow2 1M",
    dir.path,
  );
  const cases: [string, string][] = [
    ["df.qcow2", "data_file=other.raw"],
    ["df.qcow2", "data_file="],
    ["df.qcow2", "compat=0.10"],
    ["df.qcow2", "lazy_refcounts=on"],
    ["dfr.qcow2", "data_file_raw=off"],
    ["dfr.qcow2", "data_file_raw=on"],
  ];
  for (const [image, o] of cases) {
    await sh(`cp ${image} q.qcow2 && cp ${image} m.qcow2`, dir.path);
    const theirs = await qemuImg(["amend", "-o", o, "q.qcow2"], dir.path);
    const ours = await qimg(["amend", "-o", o, "m.qcow2"], dir.path);
    assertEquals(
      { stderr: ours.stderr.replaceAll("m.qcow2", "q.qcow2"), code: ours.code },
      { stderr: theirs.stderr, code: theirs.code },
      o,
    );
    assertEquals(await hashFile(`${dir.path}/m.qcow2`), await hashFile(`${dir.path}/q.qcow2`), o);
  }
});
