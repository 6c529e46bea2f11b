import { assertSameRun, CAN_TRACE, makePair } from "./_convert_util.ts";
import { assertEquals, assertTrue } from "./_assert.ts";
import { brokenCompressedQcow2, CLI, qemuImg, runProgram, sh, tempDir } from "./_util.ts";

const INPUTS = [
  "qemu-img create -q -f raw a.raw 5M",
  "qemu-io -f raw -c 'write -P 0xab 1M 3M' -c 'write -P 0xcd 4200k 3k' a.raw",
  "head -c 1000 /dev/zero | tr '\\0' x > odd.raw",
  "truncate -s 3M sparse.raw",
  "mkdir dir",
].join(" >/dev/null && ") + " >/dev/null";

Deno.test("dd copies blocks as qemu-img: bs, count, skip and the output size rules", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  const pair = await makePair(dir.path);
  const cases = [
    ["if=../a.raw", "of=o1"],
    ["bs=1M", "count=2", "if=../a.raw", "of=o2"],
    ["bs=1M", "skip=2", "if=../a.raw", "of=o3"],
    ["bs=1k", "count=3", "skip=1", "if=../a.raw", "of=o4"],
    ["bs=1.5k", "if=../a.raw", "of=o5"],
    ["count=0", "if=../a.raw", "of=o6"],
    ["bs=1000", "count=3", "if=../a.raw", "of=o7"],
    ["bs=1000", "count=3", "skip=1", "if=../a.raw", "of=o8"],
    ["bs=4096", "skip=1024", "if=../a.raw", "of=o9"],
    ["bs=1M", "count=99", "if=../a.raw", "of=o10"],
    ["if=../odd.raw", "of=o11"],
    ["bs=7", "count=5", "skip=3", "if=../odd.raw", "of=o12"],
    ["if=../sparse.raw", "of=o13"],
    ["bs=64k", "skip=3", "if=../a.raw", "of=o14", "if=../sparse.raw"],
    ["-f", "raw", "-O", "raw", "-U", "if=../a.raw", "of=o15"],
    ["if=../a.raw", "-O", "raw", "bs=2M", "of=o16"],
    ["--image-opts", "if=driver=raw,file.filename=../a.raw", "of=o17"],
    ["bs=0x1k", "count=0x2", "if=../a.raw", "of=o18"],
    ["--object", "secret,id=s0,data=x", "if=../a.raw", "of=o19"],
  ];
  for (const args of cases) {
    const out = args.find((a) => a.startsWith("of="))!.slice(3);
    await assertSameRun(pair, ["dd", ...args], { outputs: [out], exact: true });
  }
});

Deno.test("dd skipping past the end prints qemu-img's message and writes an empty image", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  const pair = await makePair(dir.path);
  const r = await assertSameRun(pair, ["dd", "bs=1M", "skip=9", "if=../a.raw", "of=e1"], {
    outputs: ["e1"],
  });
  assertTrue(r.stderr.includes("cannot skip to specified offset"), r.stderr);
  await assertSameRun(pair, ["dd", "skip=99999999999999999", "if=../a.raw", "of=e2"], {
    outputs: ["e2"],
  });
});

Deno.test("dd refuses bad operands and options with qemu-img's messages", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  const pair = await makePair(dir.path);
  const cases = [
    [],
    ["if=../a.raw"],
    ["of=x"],
    ["bs=0", "if=../a.raw", "of=x"],
    ["bs=abc", "if=../a.raw", "of=x"],
    ["bs=3G", "if=../a.raw", "of=x"],
    ["bs=", "if=../a.raw", "of=x"],
    ["count=-1", "if=../a.raw", "of=x"],
    ["count=99999999999999999999", "if=../a.raw", "of=x"],
    ["skip=x", "if=../a.raw", "of=x"],
    ["foo", "if=../a.raw", "of=x"],
    ["foo=1", "if=../a.raw", "of=x"],
    ["if=../a.raw", "of=x", "bar"],
    ["if=../nonexistent", "of=x"],
    ["if=../dir", "of=x"],
    ["if=", "of=x"],
    ["-O", "foo", "if=../a.raw", "of=x"],
    ["-f", "qcow2", "if=../a.raw", "of=x"],
    ["-f", "foo", "if=../a.raw", "of=x"],
    ["if=../a.raw", "of=../dir"],
    ["-x", "if=../a.raw", "of=x"],
    ["--foo", "if=../a.raw", "of=x"],
    ["-O"],
    ["--object", "help"],
    ["--object", "foo,id=x", "if=../a.raw", "of=x"],
    ["--image-opts", "if=../a.raw", "of=x"],
    ["--image-opts", "-f", "raw", "if=driver=raw,file.filename=../a.raw", "of=x"],
  ];
  for (const args of cases) await assertSameRun(pair, ["dd", ...args], { outputs: ["x"] });
});

Deno.test({
  name: "dd of a 1 TiB sparse image reads no holes and stays in bounded memory",
  ignore: !CAN_TRACE,
}, async () => {
  await using dir = await tempDir();
  await sh(
    "truncate -s 1T big.raw && qemu-io -f raw -c 'write -P 9 512G 1M' big.raw >/dev/null",
    dir.path,
  );
  const pair = await makePair(dir.path);
  const args = ["dd", "bs=1M", "skip=524287", "count=524290", "if=../big.raw", "of=big.out"];
  const ours = await runProgram("/usr/bin/time", [
    "-f",
    "maxrss=%M",
    "strace",
    "-f",
    "-qq",
    "-e",
    "trace=read,pread64,readv,preadv",
    "-o",
    `${dir.path}/reads.txt`,
    Deno.execPath(),
    "run",
    "--no-prompt",
    "--allow-read",
    "--allow-write",
    "--allow-ffi",
    CLI,
    ...args,
  ], pair.o);
  const theirs = await qemuImg(args, pair.q);
  assertEquals([ours.code, theirs.code], [0, 0], ours.stderr);
  const rss = Number(/maxrss=(\d+)/.exec(ours.stderr)![1]) * 1024;
  assertTrue(rss < 200 * 1024 * 1024, `peak RSS ${rss}`);
  let readBytes = 0;
  let reads = 0;
  for (const line of (await Deno.readTextFile(`${dir.path}/reads.txt`)).split("\n")) {
    const m = /= (\d+)$/.exec(line.trim());
    if (m) {
      readBytes += Number(m[1]);
      reads++;
    }
  }
  assertTrue(reads > 0, "strace saw no reads");
  assertTrue(readBytes < 64 * 1024 * 1024, `read ${readBytes} bytes`);
  const cmp = await runProgram("qemu-img", ["compare", `${pair.q}/big.out`, `${pair.o}/big.out`]);
  assertEquals(cmp.code, 0, cmp.stdout);
  const [sq, so] = [await Deno.stat(`${pair.q}/big.out`), await Deno.stat(`${pair.o}/big.out`)];
  assertEquals([so.size, so.blocks], [sq.size, sq.blocks]);
});

Deno.test("dd reports an unreadable input block as qemu-img", async () => {
  await using dir = await tempDir();
  await brokenCompressedQcow2(dir.path);
  const pair = await makePair(dir.path);
  await assertSameRun(pair, ["dd", "if=../c.qcow2", "of=o1"], { outputs: ["o1"] });
  await assertSameRun(pair, ["dd", "bs=64k", "skip=1", "if=../c.qcow2", "of=o2"], {
    outputs: ["o2"],
    exact: true,
  });
});
