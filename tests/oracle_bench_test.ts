import { assertSameRun, CAN_TRACE, makePair } from "./_convert_util.ts";
import { assertEquals, assertTrue } from "./_assert.ts";
import { CLI, qemuImg, runProgram, sh, tempDir } from "./_util.ts";

/** The timing differs by nature: mask the figure, keep the line's shape. */
function maskTime(text: string): string {
  return text.replace(/Run completed in \d+\.\d{3} seconds\./g, "Run completed in X.XXX seconds.");
}

const INPUTS = [
  "qemu-img create -q -f raw a.raw 5M",
  "qemu-img create -q -f qcow2 base.qcow2 5M",
  "qemu-io -f qcow2 -c 'write -P 1 0 1M' base.qcow2",
  "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2",
  "qemu-io -f raw -c 'write -P 0xab 1M 3M' a.raw",
  "mkdir dir",
].join(" >/dev/null && ") + " >/dev/null";

Deno.test("bench read runs print qemu-img's lines and leave the image untouched", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  const pair = await makePair(dir.path);
  const cases = [
    ["-c", "1000", "../a.raw"],
    ["-c", "100", "-d", "4", "-s", "64k", "-S", "128k", "-o", "1M", "../a.raw"],
    ["-c", "0x10", "../a.raw"],
    ["-c", "0", "../a.raw"],
    ["-c", "3", "-s", "1000", "../a.raw"],
    ["-c", "2", "-s", "5M", "../a.raw"],
    ["-c", "2", "-s", "0", "../a.raw"],
    ["-c", "10", "-d", "100", "-q", "-U", "--no-drain", "../a.raw"],
    ["-c", "10", "-i", "threads", "-t", "none", "-f", "raw", "../a.raw"],
    ["-c", "10", "-n", "-t", "none", "../a.raw"],
    ["-c", "10", "--pattern=0x12", "../a.raw"],
    ["-c", "2000", "-S", "1M", "../a.raw"],
    ["-c", "3000", "-s", "2k", "../top.qcow2"],
    ["-c", "30", "-s", "1M", "-S", "3M", "-f", "qcow2", "../base.qcow2"],
    ["-c", "5", "-s", "0x1k", "../a.raw"],
    ["-c", "5", "--image-opts", "driver=raw,file.filename=../a.raw"],
  ];
  for (const args of cases) {
    const r = await assertSameRun(pair, ["bench", ...args], { mask: maskTime });
    assertTrue(/^Sending \d+ read requests/.test(r.stdout), r.stdout);
  }
});

Deno.test("bench -w writes the pattern where qemu-img writes it", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  const pair = await makePair(dir.path, "cp ../a.raw w.raw");
  const cases = [
    ["-w", "-c", "100", "w.raw"],
    ["-w", "-f", "raw", "-c", "50", "--pattern=0x5a", "-S", "96k", "-o", "512", "w.raw"],
    ["-w", "-f", "raw", "-c", "200", "--flush-interval=64", "--pattern=7", "-s", "8k", "w.raw"],
    ["-w", "-f", "raw", "-c", "130", "-d", "2", "--flush-interval=2", "--no-drain", "w.raw"],
    ["-w", "-f", "raw", "-c", "5000", "--pattern=255", "-d", "7", "-S", "3k", "-s", "1k", "w.raw"],
  ];
  for (const args of cases) {
    await assertSameRun(pair, ["bench", ...args], {
      mask: maskTime,
      outputs: ["w.raw"],
      exact: true,
    });
  }
});

Deno.test("bench refuses bad options with qemu-img's messages", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  const pair = await makePair(dir.path);
  const cases = [
    [],
    ["../a.raw", "../a.raw"],
    ["--flush-interval=10", "../a.raw"],
    ["-w", "--flush-interval=10", "../a.raw"],
    ["--flush-interval=x", "-w", "../a.raw"],
    ["-c", "-1", "../a.raw"],
    ["-c", "abc", "../a.raw"],
    ["-c", "2147483648", "../a.raw"],
    ["-d", "x", "../a.raw"],
    ["-d", "-1", "../a.raw"],
    ["-s", "abc", "../a.raw"],
    ["-s", "3G", "../a.raw"],
    ["-S", "3G", "../a.raw"],
    ["-o", "-1", "../a.raw"],
    ["-o", "5M", "-c", "3", "../a.raw"],
    ["-o", "1G", "-c", "10", "../a.raw"],
    ["-c", "5", "-s", "4k", "-o", "5118k", "../a.raw"],
    ["--pattern=256", "../a.raw"],
    ["--pattern=-1", "../a.raw"],
    ["-i", "foo", "../a.raw"],
    ["-i", "native", "-c", "1", "../a.raw"],
    ["-n", "-c", "1", "../a.raw"],
    ["-t", "foo", "../a.raw"],
    ["-w", "-U", "-c", "1", "../a.raw"],
    ["-x", "../a.raw"],
    ["--foo", "../a.raw"],
    ["-c"],
    ["-f", "qcow2", "../a.raw"],
    ["../nonexistent"],
    ["../dir"],
    ["--image-opts", "../a.raw"],
    ["--image-opts", "-f", "raw", "driver=raw,file.filename=../a.raw"],
  ];
  for (const args of cases) await assertSameRun(pair, ["bench", ...args], { mask: maskTime });
});

Deno.test(
  { name: "bench on a 1 TiB sparse image runs in bounded memory", ignore: !CAN_TRACE },
  async () => {
    await using dir = await tempDir();
    await sh("truncate -s 1T big.raw", dir.path);
    const before = await Deno.stat(`${dir.path}/big.raw`);
    const args = [
      "bench",
      "-c",
      "20000",
      "-d",
      "16",
      "-s",
      "64k",
      "-S",
      "1G",
      "-f",
      "raw",
      "big.raw",
    ];
    const ours = await runProgram("/usr/bin/time", [
      "-f",
      "maxrss=%M",
      Deno.execPath(),
      "run",
      "--no-prompt",
      "--allow-read",
      "--allow-write",
      "--allow-ffi",
      CLI,
      ...args,
    ], dir.path);
    const theirs = await qemuImg(args, dir.path);
    assertEquals(maskTime(ours.stdout), maskTime(theirs.stdout));
    const rss = Number(/maxrss=(\d+)/.exec(ours.stderr)![1]) * 1024;
    assertTrue(rss < 200 * 1024 * 1024, `peak RSS ${rss}`);
    // Too big to hash: a read-only run leaves the file's size, blocks and mtime as they were.
    const after = await Deno.stat(`${dir.path}/big.raw`);
    assertEquals([after.size, after.blocks, after.mtime], [
      before.size,
      before.blocks,
      before.mtime,
    ]);
  },
);
