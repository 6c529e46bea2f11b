/**
 * qcow2 read side against Debian's qemu-img: info (human, json, backing
 * chain), block status (qemu-img map --output=json) and guest data
 * (qemu-img convert -O raw) on images made by qemu-img and qemu-io.
 */

import { createHash } from "node:crypto";
import { openImageChain } from "../src/image.ts";
import { type BlockFile, DenoFile } from "../src/file.ts";
import { assertEquals } from "./_assert.ts";
import {
  assertSameAsQemu,
  hashFile,
  haveSharedImages,
  qemuImg,
  qimg,
  runProgram,
  sh,
  SHARED_IMAGES,
  tempDir,
} from "./_util.ts";

/** Opens host files as a process running in `cwd` would (qcow2 data file names are cwd-relative). */
function opener(cwd: string): (path: string, write: boolean) => Promise<BlockFile> {
  return (path, write) => DenoFile.open(path.startsWith("/") ? path : `${cwd}/${path}`, { write });
}

/** SHA-256 of the whole guest as qimg reads it, in chunks. */
async function qimgGuestHash(cwd: string, name: string): Promise<string> {
  const image = await openImageChain(`${cwd}/${name}`, { openFile: opener(cwd) });
  try {
    const hash = createHash("sha256");
    const chunk = new Uint8Array(4 << 20);
    for (let off = 0; off < image.size; off += chunk.length) {
      const buf = chunk.subarray(0, Math.min(chunk.length, image.size - off));
      await image.read(off, buf);
      hash.update(buf);
    }
    return hash.digest("hex");
  } finally {
    await image.close();
  }
}

/** Asserts info (human, json, chain), map (human, json) and data (library read, CLI convert) are as qemu-img has them. */
async function assertReadsLikeQemu(
  cwd: string,
  name: string,
  options: { cliConvert?: boolean } = {},
): Promise<void> {
  for (
    const args of [
      ["info", name],
      ["info", "--output=json", name],
      ["info", "--backing-chain", name],
      ["info", "--backing-chain", "--output=json", name],
    ]
  ) await assertSameAsQemu(args, cwd);
  await assertSameAsQemu(["map", name], cwd);
  await assertSameAsQemu(["map", "--output=json", name], cwd);
  await sh(`qemu-img convert -O raw '${name}' '${name}.guest'`, cwd);
  const expected = await hashFile(`${cwd}/${name}.guest`);
  assertEquals(await qimgGuestHash(cwd, name), expected, `data ${name}`);
  await Deno.remove(`${cwd}/${name}.guest`);
  if (options.cliConvert === false) return;
  // And through the CLI: convert from qcow2.
  const r = await qimg(["convert", "-O", "raw", name, `${name}.qimg`], cwd);
  assertEquals(r.code, 0, r.stderr);
  assertEquals(await hashFile(`${cwd}/${name}.qimg`), expected, `convert ${name}`);
  await Deno.remove(`${cwd}/${name}.qimg`);
}

/** qemu-io commands that leave data, zero clusters and holes behind. */
const WRITES = "-c 'write -P 0x11 0 64k' -c 'write -P 0x22 100k 3k' -c 'write -z 1M 128k' " +
  "-c 'write -P 0x33 1152k 8k' -c 'write -P 0x44 5M 1M' -c 'discard 5M 64k' " +
  "-c 'write -P 0x55 15M 1M'";

Deno.test("qcow2Driver reads v2 (compat=0.10) images as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    `qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 16M && qemu-io -f qcow2 ${WRITES} v2.qcow2 >/dev/null`,
    dir.path,
  );
  await assertReadsLikeQemu(dir.path, "v2.qcow2");
});

for (const cs of ["512", "4k", "64k", "2M"]) {
  Deno.test(`qcow2Driver reads v3 images with ${cs} clusters as qemu-img`, async () => {
    await using dir = await tempDir();
    await sh(
      `qemu-img create -q -f qcow2 -o cluster_size=${cs} a.qcow2 16M && qemu-io -f qcow2 ${WRITES} a.qcow2 >/dev/null`,
      dir.path,
    );
    await assertReadsLikeQemu(dir.path, "a.qcow2");
  });
}

Deno.test("qcow2Driver reads extended L2 images (subclusters) as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k base.qcow2 16M && " +
      `qemu-io -f qcow2 ${WRITES} base.qcow2 >/dev/null && ` +
      "qemu-img create -q -f qcow2 -o extended_l2=on -b base.qcow2 -F qcow2 top.qcow2 && " +
      "qemu-io -f qcow2 -c 'write -P 0x66 2k 2k' -c 'write -P 0x77 70k 6k' -c 'write -z 5M 4k' " +
      "-c 'write -P 0x12 15M 2k' top.qcow2 >/dev/null",
    dir.path,
  );
  await assertReadsLikeQemu(dir.path, "base.qcow2");
  await assertReadsLikeQemu(dir.path, "top.qcow2");
});

Deno.test("qcow2Driver reads zlib and zstd compressed clusters as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "head -c 3M /dev/urandom > r && seq 1 400000 > s && cat s r s > src.raw && truncate -s 12M src.raw && " +
      "qemu-img convert -c -O qcow2 src.raw zlib.qcow2 && " +
      "qemu-img convert -c -O qcow2 -o compression_type=zstd src.raw zstd.qcow2 && " +
      "qemu-img convert -c -O qcow2 -o cluster_size=4k,compression_type=zstd src.raw z4k.qcow2 && " +
      "qemu-img convert -c -O qcow2 -o cluster_size=2M src.raw z2m.qcow2 && " +
      // a compressed cluster partly overwritten, and one overwritten with zeroes
      "qemu-io -f qcow2 -c 'write -P 0x5a 8k 4k' -c 'write -z 128k 64k' zlib.qcow2 >/dev/null",
    dir.path,
  );
  for (const name of ["zlib.qcow2", "zstd.qcow2", "z4k.qcow2", "z2m.qcow2"]) {
    await assertReadsLikeQemu(dir.path, name);
  }
});

Deno.test("qcow2Driver reads a depth-3 chain with a raw base as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f raw base.raw 6M && qemu-io -f raw -c 'write -P 0xa1 0 6M' base.raw >/dev/null && " +
      "qemu-img create -q -f qcow2 -o compat=0.10 -b base.raw -F raw mid.qcow2 12M && " +
      "qemu-io -f qcow2 -c 'write -P 0xb2 1M 1M' -c 'write -P 0xb3 7M 64k' mid.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -o cluster_size=4k -b mid.qcow2 -F qcow2 top.qcow2 16M && " +
      "qemu-io -f qcow2 -c 'write -P 0xc4 1536k 4k' -c 'write -z 3M 64k' -c 'write -P 0xc5 13M 8k' top.qcow2 >/dev/null && " +
      // a backing file without a stored format (probed)
      "qemu-img create -q -f qcow2 -b top.qcow2 -F qcow2 up.qcow2 && " +
      "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 nofmt.qcow2 16M && " +
      // turn the backing format extension into an unknown one: qemu then probes
      `python3 -c "import sys; b=bytearray(open('nofmt.qcow2','rb').read()); i=b.index(bytes.fromhex('e2792aca')); b[i:i+4]=bytes.fromhex('12345678'); open('nofmt.qcow2','wb').write(b)"`,
    dir.path,
  );
  await assertReadsLikeQemu(dir.path, "top.qcow2");
  await assertReadsLikeQemu(dir.path, "up.qcow2");
  await assertReadsLikeQemu(dir.path, "nofmt.qcow2");
});

Deno.test("qcow2Driver reads images with an external data file as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 -o data_file=d.raw df.qcow2 8M && " +
      "qemu-io -f qcow2 -c 'write -P 0x31 64k 4k' -c 'write -z 128k 64k' -c 'write -P 0x32 2M 1M' df.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -o data_file=r.raw,data_file_raw=on dr.qcow2 8M && " +
      "qemu-io -f qcow2 -c 'write -P 0x41 1M 4k' dr.qcow2 >/dev/null && " +
      // data file names are relative to the working directory, not the image
      "mkdir sub && qemu-img create -q -f qcow2 -o data_file=s.raw sub/ds.qcow2 1M && " +
      "qemu-io -f qcow2 -c 'write -P 0x51 0 4k' sub/ds.qcow2 >/dev/null",
    dir.path,
  );
  await assertReadsLikeQemu(dir.path, "df.qcow2");
  await assertReadsLikeQemu(dir.path, "dr.qcow2");
  await assertReadsLikeQemu(dir.path, "sub/ds.qcow2");
  // info needs no data file (qemu opens metadata only); reading does.
  await sh("mv d.raw gone.raw", dir.path);
  await assertSameAsQemu(["info", "df.qcow2"], dir.path);
  await assertSameAsQemu(["info", "--output=json", "df.qcow2"], dir.path);
  await assertSameAsQemu(["map", "df.qcow2"], dir.path);
  await assertSameAsQemu(["convert", "-O", "raw", "df.qcow2", "out.raw"], dir.path);
});

Deno.test("qcow2Driver info shows bitmaps, encryption, lazy refcounts and refcount widths as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 bm.qcow2 10M && qemu-img bitmap --add bm.qcow2 b1 && " +
      "qemu-img bitmap --add -g 128k --disable bm.qcow2 second && " +
      "qemu-img create -q -f qcow2 -o lazy_refcounts=on,refcount_bits=1 lazy.qcow2 1M && " +
      "qemu-img create -q -f qcow2 -o refcount_bits=64,compression_type=zstd r64.qcow2 1M && " +
      "qemu-img create -q -f qcow2 --object secret,id=s0,data=x -o encrypt.format=aes,encrypt.key-secret=s0 aes.qcow2 1M && " +
      // qemu's PBKDF benchmark sometimes fails on a busy machine ("Unable to get
      // accurate CPU usage"): try a few times.
      "luks() { for i in 1 2 3 4 5 6; do qemu-img create -q -f qcow2 --object secret,id=s0,data=x " +
      "-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=50$1 $2 1M 2>/dev/null && return; done; return 1; } && " +
      "luks '' luks.qcow2 && luks ,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv," +
      "encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512 luks2.qcow2",
    dir.path,
  );
  const names = ["bm.qcow2", "lazy.qcow2", "r64.qcow2", "aes.qcow2", "luks.qcow2", "luks2.qcow2"];
  for (const name of names) {
    await assertSameAsQemu(["info", name], dir.path);
    await assertSameAsQemu(["info", "--output=json", name], dir.path);
  }
  // Reading needs the key, which qimg does not take.
  for (const name of ["aes.qcow2", "luks.qcow2"]) {
    await assertSameAsQemu(["map", name], dir.path);
    await assertSameAsQemu(["convert", "-O", "raw", name, "out.raw"], dir.path);
  }
});

Deno.test("qcow2Driver reads the README demo image as qemu-img", async () => {
  const root = new URL("..", import.meta.url).pathname;
  await assertSameAsQemu(["info", "testdata/demo.qcow2"], root);
  await assertSameAsQemu(["info", "--output=json", "testdata/demo.qcow2"], root);
  // The README's command line itself: `deno task qimg info testdata/demo.qcow2`.
  const task = await runProgram(Deno.execPath(), [
    "task",
    "-q",
    "qimg",
    "info",
    "testdata/demo.qcow2",
  ], root);
  const theirs = await qemuImg(["info", "testdata/demo.qcow2"], root);
  assertEquals({ stdout: task.stdout, code: task.code }, { stdout: theirs.stdout, code: 0 });
});

Deno.test({
  name: "qcow2Driver reads the plaso qcow2 images (older writer) as qemu-img",
  ignore: !haveSharedImages(),
  async fn() {
    await using dir = await tempDir();
    for (const name of ["image.qcow2", "vsstest.qcow2"]) {
      await Deno.copyFile(`${SHARED_IMAGES}qcow2/plaso/${name}`, `${dir.path}/${name}`);
      // vsstest is 1 GiB of guest: its data is compared once, in-process.
      await assertReadsLikeQemu(dir.path, name, { cliConvert: name !== "vsstest.qcow2" });
    }
  },
});

Deno.test("qcow2Driver block status of preallocated images asks the host file, as qemu-img map", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 -o preallocation=metadata pm.qcow2 4M && " +
      "qemu-io -c 'write -P 3 0 4k' -c 'write -P 4 1M 64k' pm.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -o preallocation=metadata,cluster_size=4k,refcount_bits=1 pm1.qcow2 1M && " +
      "qemu-img create -q -f qcow2 -o preallocation=falloc pf.qcow2 2M && " +
      "qemu-img create -q -f qcow2 -o preallocation=full pfull.qcow2 2M",
    dir.path,
  );
  for (const name of ["pm.qcow2", "pm1.qcow2", "pf.qcow2", "pfull.qcow2"]) {
    await assertReadsLikeQemu(dir.path, name);
  }
});

Deno.test("qcow2Driver reads zero-allocated clusters and compressed extended-L2 clusters as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 za.qcow2 4M && " +
      "qemu-io -c 'write -P 1 0 256k' -c 'write -z 64k 64k' -c 'write -z -u 128k 64k' -c 'discard 192k 64k' za.qcow2 >/dev/null && " +
      "head -c 2M /dev/urandom > r.raw && seq 1 300000 >> r.raw && truncate -s 8M r.raw && " +
      "qemu-img convert -c -O qcow2 -o extended_l2=on r.raw cx.qcow2 && " +
      "qemu-io -c 'write -P 9 4k 4k' -c 'write -z 3M 8k' cx.qcow2 >/dev/null",
    dir.path,
  );
  await assertReadsLikeQemu(dir.path, "za.qcow2");
  await assertReadsLikeQemu(dir.path, "cx.qcow2");
});

Deno.test("qcow2Driver info leaves a missing backing file alone unless --backing-chain", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f qcow2 -u -b gone.qcow2 -F qcow2 mb.qcow2 1M", dir.path);
  for (
    const args of [
      ["info", "mb.qcow2"],
      ["info", "--output=json", "mb.qcow2"],
      ["info", "--backing-chain", "mb.qcow2"],
    ]
  ) await assertSameAsQemu(args, dir.path);
});

Deno.test("qcow2Driver reads extended L2 at 16k and 2M clusters and compressed v2 images as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    `qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=16k e16k.qcow2 16M && qemu-io -f qcow2 ${WRITES} e16k.qcow2 >/dev/null && ` +
      `qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=2M e2m.qcow2 16M && qemu-io -f qcow2 ${WRITES} e2m.qcow2 >/dev/null && ` +
      "seq 1 200000 > s.raw && truncate -s 4M s.raw && qemu-img convert -c -O qcow2 -o compat=0.10 s.raw cv2.qcow2 && " +
      // an extended-L2 overlay over a plain v2 base, and the other way round
      "qemu-img create -q -f qcow2 -o extended_l2=on -b cv2.qcow2 -F qcow2 ext-over-v2.qcow2 && " +
      "qemu-io -c 'write -P 0x7e 6k 2k' -c 'write -z 1M 2k' ext-over-v2.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -o cluster_size=4k -b e2m.qcow2 -F qcow2 v3-over-ext.qcow2 && " +
      "qemu-io -c 'write -P 0x6d 1M 4k' v3-over-ext.qcow2 >/dev/null",
    dir.path,
  );
  for (
    const name of ["e16k.qcow2", "e2m.qcow2", "cv2.qcow2", "ext-over-v2.qcow2", "v3-over-ext.qcow2"]
  ) {
    await assertReadsLikeQemu(dir.path, name);
  }
});
