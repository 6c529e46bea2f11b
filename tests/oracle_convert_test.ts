import { assertSameRun, CAN_TRACE, makePair } from "./_convert_util.ts";
import { assertEquals, assertTrue } from "./_assert.ts";
import { brokenCompressedQcow2, CLI, qemuImg, runProgram, sh, tempDir } from "./_util.ts";

/** Inputs every convert test can use, made by qemu-img and qemu-io. */
const INPUTS = [
  "qemu-img create -q -f raw a.raw 5M",
  "qemu-io -f raw -c 'write -P 0xab 1M 3M' a.raw",
  "qemu-img create -q -f raw mixed.raw 8M",
  "qemu-io -f raw -c 'write -P 1 0 64k' -c 'write -P 0 64k 8k' -c 'write -P 2 72k 4k'" +
  " -c 'write -P 0 2M 1M' -c 'write -P 3 3146240 1k' -c 'write -P 4 7M 1M'" +
  " -c 'write -P 5 5M 512' -c 'write -P 6 5251072 512' mixed.raw",
  "head -c 1000 /dev/zero | tr '\\0' x > odd.raw",
  "truncate -s 10M sparse.raw",
  "mkdir dir",
].join(" >/dev/null && ") + " >/dev/null";

/** A deterministic fully allocated file of `size`. */
function filled(name: string, size: string): string {
  return `yes abcdefgh | head -c ${size} > ${name}`;
}

Deno.test("convert writes the same sparse raw image as qemu-img (default -S 4k)", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  const pair = await makePair(dir.path);
  for (const src of ["a.raw", "mixed.raw", "odd.raw", "sparse.raw"]) {
    await assertSameRun(pair, ["convert", `../${src}`, "out.raw"], {
      outputs: ["out.raw"],
      exact: true,
    });
    await assertSameRun(pair, ["convert", "-f", "raw", "-O", "raw", `../${src}`, "out2.raw"], {
      outputs: ["out2.raw"],
      exact: true,
    });
  }
});

Deno.test("convert -S controls which zero runs stay holes, as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  const pair = await makePair(dir.path);
  for (const s of ["0", "512", "1k", "8k", "64k", "2M", "16M"]) {
    await assertSameRun(pair, ["convert", "-S", s, "../mixed.raw", `s${s}.raw`], {
      outputs: [`s${s}.raw`],
      exact: true,
    });
  }
  await assertSameRun(pair, ["convert", "-S", "0", "../sparse.raw", "full.raw"], {
    outputs: ["full.raw"],
  });
});

Deno.test("convert -p prints qemu-img's progress lines; -q silences them", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  await sh(
    "qemu-img create -q -f raw p.raw 64M && qemu-io -f raw -c 'write -P 7 1M 37M' p.raw >/dev/null",
    dir.path,
  );
  const pair = await makePair(dir.path);
  for (const src of ["a.raw", "mixed.raw", "p.raw", "sparse.raw"]) {
    const r = await assertSameRun(pair, ["convert", "-p", `../${src}`, `p-${src}`], {
      outputs: [`p-${src}`],
    });
    assertTrue(r.stdout.startsWith("    (0.00/100%)\r") && r.stdout.endsWith("\r\n"), r.stdout);
    await assertSameRun(pair, ["convert", "-p", "-S", "0", `../${src}`, `p0-${src}`], {
      outputs: [`p0-${src}`],
    });
    const q = await assertSameRun(pair, ["convert", "-p", "-q", `../${src}`, `q-${src}`], {
      outputs: [`q-${src}`],
    });
    assertEquals(q.stdout, "");
  }
});

Deno.test("convert concatenates several sources as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  const pair = await makePair(dir.path);
  await assertSameRun(
    pair,
    ["convert", "-p", "../a.raw", "../odd.raw", "../mixed.raw", "cat.raw"],
    {
      outputs: ["cat.raw"],
      exact: true,
    },
  );
  await assertSameRun(pair, ["convert", "../odd.raw", "../odd.raw", "../sparse.raw", "cat2.raw"], {
    outputs: ["cat2.raw"],
    exact: true,
  });
});

Deno.test("convert -m, -W and -C give the same image as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  const pair = await makePair(dir.path);
  for (
    const extra of [["-m", "1"], ["-m", "16"], ["-W"], ["-m", "3", "-W"], ["-m", "0x4"], ["-C"], [
      "-C",
      "-p",
    ]]
  ) {
    await assertSameRun(pair, ["convert", ...extra, "../mixed.raw", "m.raw"], {
      outputs: ["m.raw"],
      exact: true,
    });
  }
});

Deno.test("convert -n writes into an existing target: holes punched, or kept with --target-is-zero", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  const prepare = [
    filled("t1.raw", "8M"),
    filled("t2.raw", "8M"),
    filled("t3.raw", "16M"),
    filled(
      "small.raw",
      "1M",
    ),
  ].join(" && ");
  const pair = await makePair(dir.path, prepare);
  await assertSameRun(pair, ["convert", "-n", "../mixed.raw", "t1.raw"], { outputs: ["t1.raw"] });
  await assertSameRun(pair, ["convert", "-n", "--target-is-zero", "../a.raw", "t2.raw"], {
    outputs: ["t2.raw"],
    exact: true,
  });
  await assertSameRun(pair, ["convert", "-n", "-S", "0", "../sparse.raw", "t3.raw"], {
    outputs: ["t3.raw"],
  });
  await assertSameRun(pair, ["convert", "-n", "../a.raw", "small.raw"], { outputs: ["small.raw"] });
  await assertSameRun(pair, ["convert", "-n", "../a.raw", "nonexistent.raw"], {
    outputs: ["nonexistent.raw"],
  });
  await assertSameRun(
    pair,
    ["convert", "-pn", "--target-is-zero", "-B", "x", "../a.raw", "t1.raw"],
    {
      outputs: ["t1.raw"],
    },
  );
});

Deno.test("convert refuses bad options with qemu-img's messages and exit codes", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  const pair = await makePair(dir.path);
  const cases = [
    [],
    ["../a.raw"],
    ["-m", "0", "../a.raw", "o.raw"],
    ["-m", "17", "../a.raw", "o.raw"],
    ["-m", "abc", "../a.raw", "o.raw"],
    ["-m", "16x", "../a.raw", "o.raw"],
    ["-S", "513", "../a.raw", "o.raw"],
    ["-S", "abc", "../a.raw", "o.raw"],
    ["-S", "17M", "../a.raw", "o.raw"],
    ["-S", "-1", "../a.raw", "o.raw"],
    ["-S", "99999999999999999999999", "../a.raw", "o.raw"],
    ["-r", "abc", "../a.raw", "o.raw"],
    ["-r", "99999999999999999999999", "../a.raw", "o.raw"],
    ["-n", "-o", "size=1M", "../a.raw", "o.raw"],
    ["-B", "base", "../a.raw", "o.raw"],
    ["-F", "raw", "../a.raw", "o.raw"],
    ["-c", "../a.raw", "o.raw"],
    ["--target-is-zero", "../a.raw", "o.raw"],
    ["-C", "-c", "../a.raw", "o.raw"],
    ["-C", "-S", "4k", "../a.raw", "o.raw"],
    ["-C", "--salvage", "../a.raw", "o.raw"],
    ["--target-image-opts", "../a.raw", "o.raw"],
    ["--skip-broken-bitmaps", "../a.raw", "o.raw"],
    ["--bitmaps", "../a.raw", "o.raw"],
    ["-O", "foo", "../a.raw", "o.raw"],
    ["-T", "foo", "../a.raw", "o.raw"],
    ["-o", "foo=1", "../a.raw", "o.raw"],
    ["-o", "size=abc", "../a.raw", "o.raw"],
    ["-o", ",", "../a.raw", "o.raw"],
    ["-o", "a,", "../a.raw", "o.raw"],
    ["-o", "preallocation=bad", "../a.raw", "o.raw"],
    ["-l", "snap", "../a.raw", "o.raw"],
    ["-l", "snapshot.foo=1", "../a.raw", "o.raw"],
    ["-l", "x", "../a.raw", "../a.raw", "o.raw"],
    ["../nonexistent", "o.raw"],
    ["../a.raw", "../nonexistent", "o.raw"],
    ["-f", "foo", "../a.raw", "o.raw"],
    ["../dir", "o.raw"],
    ["../a.raw", "../dir"],
    ["-x", "../a.raw", "o.raw"],
    ["--foo", "../a.raw", "o.raw"],
    ["--ta", "../a.raw", "o.raw"],
    ["-m"],
    ["../a.raw", "o.raw", "-O"],
    ["-p", "../nonexistent", "o.raw"],
    ["-p", "-c", "../a.raw", "o.raw"],
    ["--object", "help"],
    ["--object", "secret,id=s0", "../a.raw", "o.raw"],
    ["--object", "foo,id=x", "../a.raw", "o.raw"],
    ["--image-opts", "../a.raw", "o.raw"],
    ["--image-opts", "-f", "raw", "driver=raw,file.filename=../a.raw", "o.raw"],
    ["-n", "--target-image-opts", "../a.raw", "driver=raw,file.filename=nonexistent"],
    ["-U", "-n", "../a.raw", "nonexistent"],
  ];
  for (const args of cases) {
    await assertSameRun(pair, ["convert", ...args], { outputs: ["o.raw"] });
  }
  // -t is checked after the target is created: both leave the same empty image.
  await assertSameRun(pair, ["convert", "-t", "foo", "../a.raw", "t.raw"], { outputs: ["t.raw"] });
});

Deno.test("convert -o help lists the target's options as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  const pair = await makePair(dir.path);
  for (
    const args of [
      ["-o", "help", "../a.raw", "o.raw"],
      ["-O", "raw", "-o", "help"],
      ["-o", "help"],
      ["-o", "help,size=1", "o.raw"],
      ["-o", "?", "../a.raw", "../a.raw", "o.raw"],
    ]
  ) await assertSameRun(pair, ["convert", ...args], { outputs: ["o.raw"] });
});

Deno.test("convert accepts qemu-img's other options and long forms", async () => {
  await using dir = await tempDir();
  await sh(INPUTS, dir.path);
  const pair = await makePair(dir.path);
  for (
    const args of [
      ["-U", "-T", "none", "-t", "writeback", "../a.raw", "o1.raw"],
      ["--force-share", "--salvage", "-r", "1G", "../a.raw", "o2.raw"],
      ["-o", "size=1M", "../a.raw", "o3.raw"],
      ["-o", "preallocation=full", "../a.raw", "o4.raw"],
      ["--image-opts", "driver=raw,file.filename=../a.raw", "o5.raw"],
      ["-qp", "-fraw", "-Oraw", "../a.raw", "o6.raw"],
      ["-S", "0x1k", "--object", "secret,id=s0,data=x", "../a.raw", "o7.raw"],
      ["-o", "size=0x1k", "../a.raw", "o8.raw"],
    ]
  ) {
    const out = args[args.length - 1];
    await assertSameRun(pair, ["convert", ...args], { outputs: [out], exact: true });
  }
});

Deno.test({
  name: "convert copies a 1 TiB sparse raw image quickly, in bounded memory, reading no holes",
  ignore: !CAN_TRACE,
}, async () => {
  await using dir = await tempDir();
  await sh(
    "truncate -s 1T big.raw && qemu-io -f raw -c 'write -P 9 512G 1M' -c 'write -P 8 1023G 64k' big.raw >/dev/null",
    dir.path,
  );
  const pair = await makePair(dir.path);
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
    "convert",
    "-p",
    "../big.raw",
    "big.out",
  ], pair.o);
  const theirs = await qemuImg(["convert", "-p", "../big.raw", "big.out"], pair.q);
  assertEquals(ours.code, 0, ours.stderr);
  assertEquals(ours.stdout, theirs.stdout);
  const rss = Number(/maxrss=(\d+)/.exec(ours.stderr)![1]) * 1024;
  assertTrue(rss < 200 * 1024 * 1024, `peak RSS ${rss}`);
  let readBytes = 0;
  for (const line of (await Deno.readTextFile(`${dir.path}/reads.txt`)).split("\n")) {
    const m = /= (\d+)$/.exec(line.trim());
    if (m) readBytes += Number(m[1]);
  }
  assertTrue(readBytes < 64 * 1024 * 1024, `read ${readBytes} bytes`);
  const cmp = await runProgram("qemu-img", ["compare", `${pair.q}/big.out`, `${pair.o}/big.out`]);
  assertEquals(cmp.code, 0, cmp.stdout);
  const [sq, so] = [await Deno.stat(`${pair.q}/big.out`), await Deno.stat(`${pair.o}/big.out`)];
  assertEquals([so.size, so.blocks], [sq.size, sq.blocks]);
});

Deno.test("convert reads qcow2 sources (backing chains, zero and compressed clusters) as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    [
      "qemu-img create -q -f qcow2 base.qcow2 16M",
      "qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write -P 2 4M 64k' -c 'write -z 8M 1M' base.qcow2",
      "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2",
      "qemu-io -f qcow2 -c 'write -P 3 512k 64k' -c 'write -z 4M 32k' -c 'write -P 4 12M 100k' top.qcow2",
      "qemu-img convert -c -O qcow2 base.qcow2 comp.qcow2",
      "qemu-img create -q -f qcow2 -o cluster_size=4k odd.qcow2 1000000",
      "qemu-io -f qcow2 -c 'write -P 5 4096 8192' -c 'write -P 6 990000 512' odd.qcow2",
      "qemu-img create -q -f qcow2 -o cluster_size=2M big.qcow2 64M",
      "qemu-io -f qcow2 -c 'write -P 7 3M 37M' big.qcow2",
    ].join(" >/dev/null && ") + " >/dev/null",
    dir.path,
  );
  const pair = await makePair(dir.path);
  for (const src of ["base.qcow2", "top.qcow2", "comp.qcow2", "odd.qcow2", "big.qcow2"]) {
    for (const extra of [["-p"], ["-S", "0"], ["-S", "64k", "-p"], ["-m", "1", "-W"]]) {
      await assertSameRun(pair, ["convert", ...extra, `../${src}`, "out.raw"], {
        outputs: ["out.raw"],
        exact: true,
      });
    }
  }
  await assertSameRun(pair, ["convert", "-p", "../top.qcow2", "../none.raw", "cat.raw"], {
    outputs: ["cat.raw"],
  });
  await assertSameRun(pair, [
    "convert",
    "-p",
    "../top.qcow2",
    "../odd.qcow2",
    "../comp.qcow2",
    "c.raw",
  ], {
    outputs: ["c.raw"],
    exact: true,
  });
});

Deno.test("convert -l copies a qcow2 internal snapshot as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 s.qcow2 8M && qemu-io -c 'write -P 1 0 1M' s.qcow2 >/dev/null && " +
      "qemu-img snapshot -c snap1 s.qcow2 && qemu-io -c 'write -P 2 512k 1M' s.qcow2 >/dev/null && " +
      "qemu-img snapshot -c snap2 s.qcow2 && qemu-io -c 'write -z 0 4M' s.qcow2 >/dev/null",
    dir.path,
  );
  const pair = await makePair(dir.path);
  for (
    const l of [
      "snap1",
      "1",
      "snap2",
      "nosuch",
      "snapshot.name=snap1",
      "snapshot.id=2",
      "snapshot.id=1,snapshot.name=snap2",
      "snapshot.id=9",
    ]
  ) {
    await assertSameRun(pair, ["convert", "-p", "-l", l, "../s.qcow2", "out.raw"], {
      outputs: ["out.raw"],
      exact: true,
    });
  }
});

const QCOW2_SOURCES = [
  "qemu-img create -q -f qcow2 base.qcow2 16M",
  "qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write -P 2 4M 64k' -c 'write -z 8M 1M' base.qcow2",
  "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2",
  "qemu-io -f qcow2 -c 'write -P 3 512k 64k' -c 'write -z 4M 32k' -c 'write -P 4 12M 100k' top.qcow2",
].join(" >/dev/null && ") + " >/dev/null";

Deno.test({
  name: "convert -O qcow2 writes what qemu-img writes (content, size, allocation, check)",
  fn: async () => {
    await using dir = await tempDir();
    await sh(INPUTS + " && " + QCOW2_SOURCES, dir.path);
    const pair = await makePair(dir.path);
    const cases = [
      ["-O", "qcow2", "../a.raw", "o1.qcow2"],
      ["-O", "qcow2", "../mixed.raw", "o2.qcow2"],
      ["-O", "qcow2", "-p", "../top.qcow2", "o3.qcow2"],
      ["-O", "qcow2", "-S", "0", "../a.raw", "o4.qcow2"],
      ["-O", "qcow2", "-o", "cluster_size=4k", "../mixed.raw", "o5.qcow2"],
      ["-O", "qcow2", "-o", "preallocation=metadata", "../a.raw", "o6.qcow2"],
      ["-O", "qcow2", "-B", "../base.qcow2", "-F", "qcow2", "../top.qcow2", "o7.qcow2"],
      [
        "-O",
        "qcow2",
        "-o",
        "backing_file=../base.qcow2,backing_fmt=qcow2",
        "../top.qcow2",
        "o8.qcow2",
      ],
      ["-O", "qcow2", "-W", "-m", "16", "../mixed.raw", "o9.qcow2"],
      ["-O", "qcow2", "../a.raw", "../odd.raw", "../sparse.raw", "o10.qcow2"],
    ];
    for (const args of cases) {
      const out = args[args.length - 1];
      await assertSameRun(pair, ["convert", ...args], { outputs: [out] });
      const check = await runProgram("qemu-img", ["check", `${pair.o}/${out}`]);
      assertEquals(check.code, 0, check.stdout + check.stderr);
    }
    await sh("qemu-img create -q -f qcow2 n.qcow2 16M", pair.q);
    await sh("qemu-img create -q -f qcow2 n.qcow2 16M", pair.o);
    await assertSameRun(pair, ["convert", "-n", "-O", "qcow2", "../top.qcow2", "n.qcow2"], {
      outputs: ["n.qcow2"],
    });
  },
});

Deno.test({
  name: "convert -c writes compressed qcow2 clusters as qemu-img",
  fn: async () => {
    await using dir = await tempDir();
    await sh(INPUTS + " && " + QCOW2_SOURCES, dir.path);
    const pair = await makePair(dir.path);
    for (
      const args of [
        ["-c", "-O", "qcow2", "../a.raw", "c1.qcow2"],
        ["-c", "-O", "qcow2", "-p", "../top.qcow2", "c2.qcow2"],
        ["-c", "-O", "qcow2", "-o", "cluster_size=4k", "../mixed.raw", "c3.qcow2"],
      ]
    ) {
      const out = args[args.length - 1];
      await assertSameRun(pair, ["convert", ...args], { outputs: [out] });
      const check = await runProgram("qemu-img", ["check", `${pair.o}/${out}`]);
      assertEquals(check.code, 0, check.stdout + check.stderr);
    }
  },
});

Deno.test("convert --salvage turns unreadable clusters into zeroes with qemu-img's warnings", async () => {
  await using dir = await tempDir();
  await brokenCompressedQcow2(dir.path);
  const pair = await makePair(dir.path);
  const r = await assertSameRun(pair, ["convert", "--salvage", "../c.qcow2", "out.raw"], {
    outputs: ["out.raw"],
    exact: true,
  });
  assertTrue(r.stderr.includes("warning: error while reading offset 0: Input/output error"));
  await assertSameRun(pair, ["convert", "--salvage", "-q", "../c.qcow2", "q.raw"], {
    outputs: ["q.raw"],
    exact: true,
  });
  for (const m of ["1", "2", "8", "16"]) {
    await assertSameRun(pair, ["convert", "-p", "-m", m, "../c.qcow2", "e.raw"], {
      outputs: ["e.raw"],
    });
  }
});

/** Sets the in-use flag of every persistent bitmap of a qcow2 file (an inconsistent bitmap). */
async function markBitmapsInUse(path: string): Promise<void> {
  const b = await Deno.readFile(path);
  const v = new DataView(b.buffer);
  let off = v.getUint32(100);
  for (;;) {
    const type = v.getUint32(off);
    const len = v.getUint32(off + 4);
    if (type === 0) break;
    if (type === 0x23852875) {
      const count = v.getUint32(off + 8);
      let dir = Number(v.getBigUint64(off + 8 + 16));
      for (let i = 0; i < count; i++) {
        v.setUint32(dir + 12, v.getUint32(dir + 12) | 1);
        const nameSize = v.getUint16(dir + 18);
        const extra = v.getUint32(dir + 20);
        dir += Math.ceil((24 + extra + nameSize) / 8) * 8;
      }
    }
    off += 8 + Math.ceil(len / 8) * 8;
  }
  await Deno.writeFile(path, b);
}

Deno.test("convert --bitmaps checks sources and targets as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 plain.qcow2 4M && qemu-img create -q -f qcow2 bm.qcow2 4M && " +
      "qemu-img bitmap --add bm.qcow2 b0 && qemu-img bitmap --add bm.qcow2 b1 && cp bm.qcow2 bad.qcow2 && " +
      "qemu-img create -q -f raw r.raw 4M",
    dir.path,
  );
  await markBitmapsInUse(`${dir.path}/bad.qcow2`);
  const pair = await makePair(dir.path);
  for (
    const args of [
      ["--bitmaps", "../plain.qcow2", "o.raw"],
      ["--bitmaps", "../bm.qcow2", "o.raw"],
      ["--bitmaps", "../bad.qcow2", "o.raw"],
      ["--bitmaps", "--skip-broken-bitmaps", "../bad.qcow2", "o.raw"],
      ["--bitmaps", "../r.raw", "o.raw"],
      ["--bitmaps", "../plain.qcow2", "../plain.qcow2", "o.raw"],
      ["-p", "--bitmaps", "../bad.qcow2", "o.raw"],
    ]
  ) await assertSameRun(pair, ["convert", ...args], { outputs: ["o.raw"] });
});
