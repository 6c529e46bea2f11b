/**
 * `resize` of qcow2 images beyond a plain grow, against Debian's qemu-img:
 * --shrink, --preallocation=metadata|falloc|full, grows over a longer
 * backing file, external data files, snapshots. Each case runs qimg and
 * qemu-img on twin inputs; then the same output and exit code, qimg's image
 * clean under `qemu-img check`, identical under `qemu-img compare`, the
 * same `qemu-img info` (but disk size), and qemu-io pattern reads.
 */

import { assertEquals } from "./_assert.ts";
import { qemuImg, qimg, sh } from "./_util.ts";
import { assertClean, assertPatterns, runBoth, twins } from "./_qcow2_oracle.ts";

const TWO_RUNS = (o: string) =>
  `qemu-img create -q -f qcow2 -o ${o} a.qcow2 8M && ` +
  "qemu-io -c 'write -P 1 0 3M' -c 'write -P 2 5M 3M' a.qcow2 >/dev/null";

Deno.test("resize --shrink frees clusters past the end as qemu-img (v2, v3, cluster sizes, refcount widths)", async () => {
  for (
    const [o, size, reads] of [
      ["compat=1.1", "2M", ["1 0 2M"]],
      ["compat=0.10", "513k", ["1 0 513k"]],
      ["cluster_size=512", "1000k", ["1 0 1000k"]], // many L2 tables and refcount blocks dropped
      ["cluster_size=512,refcount_bits=1", "512", ["1 0 512"]],
      ["cluster_size=2M", "1M", ["1 0 1M"]],
      ["extended_l2=on", "5200k", ["1 0 3M", "0 3M 2M", "2 5M 80k"]],
      ["cluster_size=4k,refcount_bits=64", "6M", ["2 5M 1M"]],
    ] as [string, string, string[]][]
  ) {
    await runBoth({
      setup: TWO_RUNS(o),
      args: ["resize", "--shrink", "a.qcow2", size],
      image: "a.qcow2",
      reads,
    });
  }
});

Deno.test("resize --shrink of compressed images and images with snapshots matches qemu-img", async () => {
  await runBoth({
    setup: `${TWO_RUNS("cluster_size=64k")} && qemu-img convert -c -O qcow2 a.qcow2 c.qcow2`,
    args: ["resize", "--shrink", "c.qcow2", "5200k"],
    image: "c.qcow2",
    reads: ["1 0 3M", "2 5M 80k"],
  });
  // An L2 table shared with the snapshot is copied, not changed.
  const setup = `${TWO_RUNS("cluster_size=4k")} && qemu-img snapshot -c s1 a.qcow2 && ` +
    "qemu-io -c 'write -P 3 1M 6M' a.qcow2 >/dev/null";
  await runBoth({
    setup,
    args: ["resize", "--shrink", "a.qcow2", "2050k"],
    image: "a.qcow2",
    reads: ["1 0 1M", "3 1M 1026k"],
  });
  await using d = await twins(setup);
  assertEquals((await qimg(["resize", "--shrink", "a.qcow2", "2050k"], d.ours)).code, 0);
  await sh("qemu-img snapshot -a s1 a.qcow2", d.ours);
  await assertClean("a.qcow2", d.ours);
  await assertPatterns("a.qcow2", d.ours, ["1 0 3M", "0 3M 2M", "2 5M 3M"]);
});

Deno.test("resize --shrink with an external data file truncates it as qemu-img", async () => {
  const setup = "qemu-img create -q -f qcow2 -o data_file=d.raw a.qcow2 4M && " +
    "qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 3M 1M' a.qcow2 >/dev/null";
  for (const args of [["resize", "--shrink", "a.qcow2", "1M"], ["resize", "a.qcow2", "5M"]]) {
    await runBoth({ setup, args, image: "a.qcow2", reads: ["1 0 1M"] });
    await using d = await twins(setup);
    await qimg(args, d.ours);
    await qemuImg(args, d.theirs);
    const so = (await Deno.stat(`${d.ours}/d.raw`)).size;
    assertEquals(so, (await Deno.stat(`${d.theirs}/d.raw`)).size, args.join(" "));
  }
});

Deno.test("resize --preallocation allocates the grown range as qemu-img", async () => {
  for (const mode of ["metadata", "falloc", "full"]) {
    for (
      const o of [
        "compat=1.1",
        "compat=0.10",
        "cluster_size=4k",
        "extended_l2=on",
        "cluster_size=512,refcount_bits=1",
      ]
    ) {
      await runBoth({
        setup: `qemu-img create -q -f qcow2 -o size=1000k,${o} a.qcow2 && ` +
          "qemu-io -c 'write -P 1 0 100k' a.qcow2 >/dev/null",
        args: ["resize", `--preallocation=${mode}`, "a.qcow2", "+3001k"],
        image: "a.qcow2",
        reads: ["1 0 100k", "0 100k 3901k"],
        sizeSlack: o === "extended_l2=on" ? 0.01 : 0,
      });
    }
  }
});

Deno.test("resize --preallocation with an external data file grows it as qemu-img", async () => {
  for (const mode of ["metadata", "falloc", "full"]) {
    await runBoth({
      setup: "qemu-img create -q -f qcow2 -o data_file=d.raw a.qcow2 4M && " +
        "qemu-io -c 'write -P 1 0 1M' a.qcow2 >/dev/null",
      args: ["resize", `--preallocation=${mode}`, "a.qcow2", "5M"],
      image: "a.qcow2",
      reads: ["1 0 1M", "0 1M 4M"],
    });
  }
});

Deno.test("resize over a longer backing file zeroes the grown range as qemu-img (v2 refused)", async () => {
  const base = "qemu-img create -q -f qcow2 base.qcow2 4M && " +
    "qemu-io -c 'write -P 7 0 4M' base.qcow2 >/dev/null && ";
  for (const o of ["compat=1.1", "compat=0.10", "extended_l2=on"]) {
    for (
      const args of [
        ["resize", "ov.qcow2", "4M"],
        ["resize", "--preallocation=metadata", "ov.qcow2", "3M"],
        ["resize", "--preallocation=falloc", "ov.qcow2", "3M"],
        ["resize", "--preallocation=full", "ov.qcow2", "3M"],
      ]
    ) {
      const v2Fails = o === "compat=0.10" && !/falloc|full/.test(args[1]);
      await runBoth({
        setup: base +
          `qemu-img create -q -f qcow2 -o ${o} -b base.qcow2 -F qcow2 ov.qcow2 1000k && ` +
          "qemu-io -c 'write -P 1 0 100k' ov.qcow2 >/dev/null",
        args,
        image: "ov.qcow2",
        reads: v2Fails ? ["1 0 100k", "7 100k 900k"] : ["1 0 100k", "7 100k 900k", "0 1000k 1M"],
        sizeSlack: 0.05,
      });
    }
  }
});

Deno.test("resize refuses what qemu-img refuses on qcow2 and leaves the image as it was", async () => {
  const setup =
    `${TWO_RUNS("compat=1.1")} && qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M && ` +
    "qemu-img snapshot -c s v2.qcow2";
  for (
    const args of [
      ["resize", "a.qcow2", "2M"],
      ["resize", "a.qcow2", "--", "-1M"],
      ["resize", "--preallocation=metadata", "a.qcow2", "4M"],
      ["resize", "--preallocation=full", "--shrink", "a.qcow2", "4M"],
      ["resize", "--preallocation=bogus", "a.qcow2", "16M"],
      ["resize", "--shrink", "v2.qcow2", "512k"],
      ["resize", "--preallocation=falloc", "v2.qcow2", "2M"],
      ["resize", "--shrink", "a.qcow2", "1000"],
    ]
  ) {
    await using d = await twins(setup);
    const before = await Deno.readFile(`${d.ours}/a.qcow2`);
    const a = await qimg(args, d.ours);
    const b = await qemuImg(args, d.theirs);
    assertEquals(a, b, args.join(" "));
    if (b.code !== 0) {
      assertEquals(await Deno.readFile(`${d.ours}/a.qcow2`), before, args.join(" "));
    }
  }
});

Deno.test("snapshot -a of a snapshot taken at another size restores its size as qemu-img", async () => {
  const base = "qemu-img create -q -f qcow2 a.qcow2 4M && " +
    "qemu-io -c 'write -P 1 0 4M' a.qcow2 >/dev/null && qemu-img snapshot -c s a.qcow2 && ";
  for (
    const [then, reads] of [
      ["qemu-img resize -q a.qcow2 8M && qemu-io -c 'write -P 2 4M 4M' a.qcow2 >/dev/null", [
        "1 0 4M",
      ]],
      ["qemu-img resize -q --shrink a.qcow2 1M", ["1 0 4M"]],
      [
        "qemu-img resize -q --shrink a.qcow2 1M && qemu-io -c 'write -P 3 0 64k' a.qcow2 >/dev/null",
        [
          "1 0 4M",
        ],
      ],
    ] as [string, string[]][]
  ) {
    await runBoth({
      setup: base + then,
      args: ["snapshot", "-a", "s", "a.qcow2"],
      image: "a.qcow2",
      reads,
    });
  }
});

Deno.test("resize --preallocation moves the cluster the old end cuts through, as qemu-img", async () => {
  for (const [o, mode] of [["compat=1.1", "falloc"], ["compat=0.10", "full"]]) {
    await runBoth({
      setup: `qemu-img create -q -f qcow2 -o ${o} a.qcow2 1000k && ` +
        "qemu-io -c 'write -P 1 0 1000k' a.qcow2 >/dev/null",
      args: ["resize", `--preallocation=${mode}`, "a.qcow2", "3M"],
      image: "a.qcow2",
      reads: ["1 0 1000k", "0 1000k 2072k"],
      identical: true,
    });
  }
  // Shared with a snapshot: the snapshot keeps the old cluster.
  await runBoth({
    setup: "qemu-img create -q -f qcow2 -o cluster_size=4k a.qcow2 1001k && " +
      "qemu-io -c 'write -P 1 0 1001k' a.qcow2 >/dev/null && qemu-img snapshot -c s a.qcow2",
    args: ["resize", "--preallocation=full", "a.qcow2", "3M"],
    image: "a.qcow2",
    reads: ["1 0 1001k", "0 1001k 2071k"],
  });
});

Deno.test("resize --preallocation=metadata over a backing file copies the cut cluster's head as qemu-img", async () => {
  for (const o of ["compat=1.1", "extended_l2=on"]) {
    await runBoth({
      setup: "qemu-img create -q -f qcow2 base.qcow2 512k && " +
        "qemu-io -c 'write -P 7 0 512k' base.qcow2 >/dev/null && " +
        `qemu-img create -q -f qcow2 -o ${o} -b base.qcow2 -F qcow2 ov.qcow2 1000k && ` +
        "qemu-io -c 'write -P 1 0 100k' ov.qcow2 >/dev/null",
      args: ["resize", "--preallocation=metadata", "ov.qcow2", "3M"],
      image: "ov.qcow2",
      reads: ["1 0 100k", "7 100k 412k", "0 512k 2560k"],
      identical: true,
    });
  }
});
