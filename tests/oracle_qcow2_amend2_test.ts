/**
 * `amend -o refcount_bits=N` and `amend -o size=...` on qcow2 against
 * Debian's qemu-img: the refcount structures rewritten in the new width
 * (byte for byte as qemu-img's), its progress meter, its refusals; shrinking
 * and growing through amend as resize does.
 */

import { assertEquals } from "./_assert.ts";
import { qemuImg, qimg } from "./_util.ts";
import { runBoth, twins } from "./_qcow2_oracle.ts";

const WRITE = "qemu-io -c 'write -P 1 0 3M' -c 'write -P 2 5M 3M' a.qcow2 >/dev/null";
const image = (o: string) => `qemu-img create -q -f qcow2 -o ${o} a.qcow2 8M && ${WRITE}`;
const READS = ["1 0 3M", "0 3M 2M", "2 5M 3M"];

/** runBoth with the two files byte for byte the same. */
function amendBoth(setup: string, args: string[], reads = READS): Promise<void> {
  return runBoth({ setup, args, image: "a.qcow2", reads, identical: true });
}

Deno.test("amend -o refcount_bits rewrites the refcounts in every width as qemu-img, byte for byte", async () => {
  for (const bits of [1, 8, 64]) {
    await amendBoth(image("compat=1.1"), ["amend", "-o", `refcount_bits=${bits}`, "a.qcow2"]);
  }
});

Deno.test("amend -o refcount_bits over many refcount blocks, with -p, as qemu-img", async () => {
  // 512-byte clusters: hundreds of new blocks, and a third pass for the ones
  // the new table itself needs (the meter goes back, as qemu-img's).
  await amendBoth(image("cluster_size=512"), ["amend", "-p", "-o", "refcount_bits=64", "a.qcow2"]);
  await amendBoth(image("extended_l2=on,refcount_bits=8"), [
    "amend",
    "-o",
    "refcount_bits=32",
    "a.qcow2",
  ]);
});

Deno.test("amend -o refcount_bits with compat changes and snapshots as qemu-img", async () => {
  const snap = `${image("compat=1.1")} && qemu-img snapshot -c s a.qcow2`;
  await runBoth({
    setup: snap,
    args: ["amend", "-p", "-o", "refcount_bits=2", "a.qcow2"],
    image: "a.qcow2",
    reads: READS,
  });
  // Upgrade and width change share one meter.
  await amendBoth(image("compat=0.10"), [
    "amend",
    "-p",
    "-o",
    "compat=1.1,refcount_bits=4",
    "a.qcow2",
  ]);
  await amendBoth(image("refcount_bits=8"), [
    "amend",
    "-p",
    "-o",
    "compat=0.10,refcount_bits=16",
    "a.qcow2",
  ]);
});

Deno.test("amend -o refcount_bits refuses as qemu-img and leaves the image as it was", async () => {
  const snap = `${image("compat=1.1")} && qemu-img snapshot -c s a.qcow2`;
  const compressed = "qemu-img create -q -f qcow2 r.qcow2 8M && " +
    "qemu-io -c 'write -P 1 0 3M' r.qcow2 >/dev/null && qemu-img convert -c -O qcow2 r.qcow2 a.qcow2";
  for (
    const [setup, o] of [
      [snap, "refcount_bits=1"], // a refcount of 2 does not fit
      [compressed, "refcount_bits=1"], // clusters shared by compressed data
      [image("refcount_bits=8"), "compat=0.10"],
      [image("compat=1.1"), "compat=0.10,refcount_bits=8"],
      [image("compat=1.1"), "refcount_bits=3"],
      [image("compat=1.1"), "refcount_bits=128"],
      [image("compat=1.1"), "refcount_bits=0"],
    ]
  ) {
    const args = ["amend", "-o", o, "a.qcow2"];
    await using d = await twins(setup);
    const before = await Deno.readFile(`${d.ours}/a.qcow2`);
    const a = await qimg(args, d.ours);
    const b = await qemuImg(args, d.theirs);
    assertEquals(a, b, o);
    assertEquals(b.code, 1, o);
    assertEquals(await Deno.readFile(`${d.ours}/a.qcow2`), before, o);
  }
});

Deno.test("amend -o size shrinks and grows qcow2 images as qemu-img", async () => {
  await amendBoth(image("compat=1.1"), ["amend", "-o", "size=2M", "a.qcow2"], ["1 0 2M"]);
  await amendBoth(image("compat=1.1"), ["amend", "-o", "size=2M,refcount_bits=1", "a.qcow2"], [
    "1 0 2M",
  ]);
  await amendBoth(image("cluster_size=4k"), ["amend", "-o", "size=5200k", "a.qcow2"], [
    "1 0 3M",
    "2 5M 80k",
  ]);
  await amendBoth(image("compat=1.1"), ["amend", "-o", "size=16M", "a.qcow2"], [
    ...READS,
    "0 8M 8M",
  ]);
  for (
    const [setup, o] of [
      [image("compat=1.1"), "size=1000"],
      [`${image("compat=0.10")} && qemu-img snapshot -c s a.qcow2`, "size=2M"],
    ]
  ) {
    await runBoth({ setup, args: ["amend", "-o", o, "a.qcow2"], image: "a.qcow2", reads: READS });
  }
});

Deno.test("amend -o compat=0.10 of a zstd image without compressed clusters switches to zlib, as qemu-img", async () => {
  const zstd = "qemu-img create -q -f qcow2 -o compression_type=zstd a.qcow2 1M && ";
  await runBoth({
    setup: zstd + "qemu-io -c 'write -P 1 0 64k' -c 'write -z 128k 64k' a.qcow2 >/dev/null",
    args: ["amend", "-p", "-o", "compat=0.10", "a.qcow2"],
    image: "a.qcow2",
    reads: ["1 0 64k", "0 64k 960k"],
    identical: true,
  });
  // Compressed clusters refuse, after zero clusters were expanded (as qemu-img).
  await runBoth({
    setup: zstd + "qemu-io -c 'write -c -P 1 0 64k' -c 'write -z 128k 64k' a.qcow2 >/dev/null",
    args: ["amend", "-o", "compat=0.10", "a.qcow2"],
    image: "a.qcow2",
    reads: ["1 0 64k", "0 64k 960k"],
    identical: true,
  });
});

Deno.test("amend -o size over a longer backing file zeroes the grown range as qemu-img", async () => {
  await runBoth({
    setup: "qemu-img create -q -f qcow2 base.qcow2 4M && " +
      "qemu-io -c 'write -P 7 0 4M' base.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 a.qcow2 1000k && " +
      "qemu-io -c 'write -P 1 0 100k' a.qcow2 >/dev/null",
    args: ["amend", "-o", "size=4M", "a.qcow2"],
    image: "a.qcow2",
    reads: ["1 0 100k", "7 100k 900k", "0 1000k 3096k"],
    identical: true,
  });
});
