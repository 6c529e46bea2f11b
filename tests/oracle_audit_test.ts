/**
 * Gaps found by auditing convert, dd and the qcow2 read commands option by
 * option against Debian's qemu-img 7.2: each test covers one that differed.
 */

import { assertSameRun, makePair } from "./_convert_util.ts";
import { assertSameAsQemu, sh, tempDir } from "./_util.ts";

const CHAIN = [
  "qemu-img create -q -f raw b0.raw 8M",
  "qemu-io -f raw -c 'write -P 5 0 3M' b0.raw",
  "qemu-img create -q -f qcow2 -b b0.raw -F raw b1.qcow2 8M",
  "qemu-io -c 'write -P 6 1M 1M' b1.qcow2",
  "qemu-img create -q -f qcow2 -b b1.qcow2 -F qcow2 b2.qcow2 12M",
  "qemu-io -c 'write -P 7 2560k 1M' -c 'write -z 0 512k' b2.qcow2",
].join(" >/dev/null && ") + " >/dev/null";

Deno.test("info --image-opts, -U and --object open and answer as qemu-img 7.2", async () => {
  await using dir = await tempDir();
  await sh(CHAIN, dir.path);
  const spec = "driver=qcow2,file.filename=b2.qcow2";
  for (
    const args of [
      ["--image-opts", spec],
      ["--image-opts", "--backing-chain", spec],
      ["--image-opts", "--output=json", "--backing-chain", spec],
      ["--image-opts", "file.filename=b2.qcow2"],
      ["--image-opts", "driver=raw,file.filename=b2.qcow2"],
      ["--image-opts", `driver=qcow2,file.filename=${dir.path}/b2.qcow2,read-only=on`],
      ["--image-opts", "-f", "qcow2", spec],
      ["--image-opts", "b2.qcow2"],
      ["--image-opts", "driver=qcow2,file.filename=nonexistent"],
      ["-U", "--backing-chain", "b2.qcow2"],
      ["--force-share", "--output=json", "b1.qcow2"],
      ["--object", "help"],
      ["--object", "secret,help"],
      ["--object", "foo,id=x", "b2.qcow2"],
      ["--object", "secret,id=s0", "b2.qcow2"],
      ["--object", "secret,id=s0,data=x", "b2.qcow2"],
    ]
  ) await assertSameAsQemu(["info", ...args], dir.path);
});

Deno.test("convert leaves no target when qcow2 creation refuses its options, as qemu-img", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f raw a.raw 1M", dir.path);
  const pair = await makePair(dir.path);
  for (
    const o of [
      "cluster_size=3k",
      "compat=0.10,extended_l2=on",
      "compat=0.10,lazy_refcounts=on",
      "refcount_bits=3",
      "encrypt.format=luks",
      "extended_l2=on,cluster_size=4k",
      "data_file_raw=on",
    ]
  ) {
    await assertSameRun(pair, ["convert", "-O", "qcow2", "-o", o, "../a.raw", "o.qcow2"], {
      outputs: ["o.qcow2"],
    });
  }
});

Deno.test("measure -O and -o help of formats qimg does not drive answer as qemu-img 7.2", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f qcow2 s.qcow2 1M", dir.path);
  for (const f of ["qed", "qcow", "parallels", "cloop", "nbd", "file", "host_device", "nosuch"]) {
    await assertSameAsQemu(["measure", "-O", f, "--size", "1M"], dir.path);
    await assertSameAsQemu(["measure", "-O", f, "s.qcow2"], dir.path);
    await assertSameAsQemu(["measure", "-O", f, "-o", "foo=1", "--size", "1M"], dir.path);
  }
  await assertSameAsQemu(["measure", "-O", "luks", "-o", "foo=1", "--size", "1M"], dir.path);
  await assertSameAsQemu(["measure", "-O", "qed", "-o", "cluster_size=1M", "s.qcow2"], dir.path);
  for (const f of ["qcow", "qed", "luks", "parallels"]) {
    await assertSameAsQemu(["create", "-f", f, "-o", "help"], dir.path);
    await assertSameAsQemu(["create", "-f", f, "-o", "foo=1", "x.img", "1M"], dir.path);
    await assertSameAsQemu(["convert", "-O", f, "-o", "help", "s.qcow2", "x.img"], dir.path);
  }
});

Deno.test("create and convert -O vmdk leave no file when vmdk refuses its options, as qemu-img", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f raw a.raw 1M", dir.path);
  const pair = await makePair(dir.path);
  for (
    const o of [
      "subformat=foo",
      "adapter_type=foo",
      "backing_fmt=raw,backing_file=../a.raw",
      "compat6=on,hwversion=7",
      "subformat=monolithicFlat,zeroed_grain=on",
      "subformat=twoGbMaxExtentFlat,zeroed_grain=on",
    ]
  ) {
    await assertSameRun(pair, ["create", "-f", "vmdk", "-o", o, "o.vmdk", "1M"], {
      outputs: ["o.vmdk"],
    });
    await assertSameRun(pair, ["convert", "-O", "vmdk", "-o", o, "../a.raw", "o.vmdk"], {
      outputs: ["o.vmdk"],
    });
  }
});

Deno.test("convert -n into an extended L2 qcow2 marks zeroed subclusters zero, as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    [
      "qemu-img create -q -f qcow2 base.qcow2 16M",
      "qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 4M 64k' base.qcow2",
      "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2",
      "qemu-io -c 'write -P 3 512k 64k' -c 'write -z 4M 32k' -c 'write -P 4 12M 100k' top.qcow2",
    ].join(" >/dev/null && ") + " >/dev/null",
    dir.path,
  );
  const pair = await makePair(
    dir.path,
    "qemu-img create -q -f qcow2 -o extended_l2=on t.qcow2 16M",
  );
  for (const extra of [[], ["-S", "0"]]) {
    await assertSameRun(
      pair,
      ["convert", "-n", ...extra, "-O", "qcow2", "../top.qcow2", "t.qcow2"],
      {
        outputs: ["t.qcow2"],
        exact: true,
      },
    );
  }
});

Deno.test("info --backing-chain opens each layer on its own and reports loops as qemu-img 7.2", async () => {
  await using dir = await tempDir();
  await sh(
    CHAIN + " && qemu-img create -q -f qcow2 -u -b nosuch.qcow2 -F qcow2 miss.qcow2 1M" +
      " && qemu-img create -q -f qcow2 -u -b miss.qcow2 -F qcow2 miss2.qcow2 1M" +
      " && qemu-img create -q -f qcow2 -u -b loop2.qcow2 -F qcow2 loop1.qcow2 1M" +
      " && qemu-img create -q -f qcow2 -u -b loop1.qcow2 -F qcow2 loop2.qcow2 1M" +
      " && mkdir sub && qemu-img create -q -f qcow2 -b ../b2.qcow2 -F qcow2 sub/top.qcow2",
    dir.path,
  );
  for (const img of ["miss.qcow2", "miss2.qcow2", "loop1.qcow2", "sub/top.qcow2"]) {
    for (const extra of [[], ["--output=json"]]) {
      await assertSameAsQemu(["info", "--backing-chain", ...extra, img], dir.path);
      await assertSameAsQemu(
        ["info", "--backing-chain", ...extra, "--image-opts", `driver=qcow2,file.filename=${img}`],
        dir.path,
      );
    }
    await assertSameAsQemu(["info", img], dir.path);
  }
});
