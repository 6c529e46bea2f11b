import { assertEquals, assertTrue } from "./_assert.ts";
import { assertSameAsQemu, CLI, qemuImg, qimg, runProgram, sh, tempDir } from "./_util.ts";
import { reportError } from "../cli.ts";

/** Help and version text with the two lines that legitimately differ masked. */
function maskHelp(text: string): string {
  return text
    .replace(/^qimg version 7\.2\.\d+ \([^\n]*\)\n/, "qimg version 7.2.x (...)\n")
    .replace(/^Supported formats:.*$/m, "Supported formats: ...");
}

/** Runs both with the same arguments; asserts equal output up to the masked lines. */
async function assertSameHelp(args: string[], cwd?: string): Promise<void> {
  const ours = await qimg(args, cwd);
  const theirs = await qemuImg(args, cwd);
  assertEquals(
    { stdout: maskHelp(ours.stdout), stderr: ours.stderr, code: ours.code },
    { stdout: maskHelp(theirs.stdout), stderr: theirs.stderr, code: theirs.code },
    `qimg ${args.join(" ")}`,
  );
}

async function withImage(fn: (dir: string) => Promise<void>): Promise<void> {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f raw a.raw 1M && cp a.raw b.raw && mkdir sub", dir.path);
  await fn(dir.path);
}

Deno.test("main() prints qemu-img's help for -h, --help and a command's -h", async () => {
  await withImage(async (dir) => {
    for (
      const args of [
        ["-h"],
        ["--help"],
        ["--he"],
        ["-hV"],
        ["-h", "info"],
        ["info", "-h"],
        ["info", "--help"],
        ["info", "--h"],
        ["info", "a.raw", "-h"],
        ["info", "-h", "-x"],
        ["snapshot", "-h"],
        ["amend", "-h"],
        ["commit", "-h"],
        ["rebase", "-h"],
        ["bitmap", "-h"],
        ["map", "-h"],
        ["check", "-h"],
      ]
    ) await assertSameHelp(args, dir);
  });
});

Deno.test("main() help lists qimg's own formats, sorted", async () => {
  const r = await qimg(["--help"]);
  const line = r.stdout.split("\n").find((l) => l.startsWith("Supported formats:"))!;
  const names = line.slice("Supported formats:".length).trim().split(" ");
  assertTrue(names.includes("raw"), line);
  assertEquals(names, [...names].sort());
});

Deno.test("main() prints the version banner for -V and --version", async () => {
  for (const args of [["-V"], ["--version"], ["--v"], ["-Vx"], ["-V", "info"]]) {
    await assertSameHelp(args);
  }
  const r = await qimg(["-V"]);
  assertTrue(/^qimg version 7\.2\.\d+ \(qimg \d+\.\d+\.\d+\)\n/.test(r.stdout), r.stdout);
});

Deno.test("main() handles global options, missing commands and unknown ones as qemu-img", async () => {
  await withImage(async (dir) => {
    for (
      const args of [
        [],
        ["-x"],
        ["-q"],
        ["--foo"],
        ["--help=3"],
        ["-U", "info", "a.raw"],
        ["--"],
        ["--", "info", "a.raw"],
        ["-", "info"],
        ["nosuchcommand"],
        ["nosuchcommand", "-x"],
        ["INFO", "a.raw"],
        ["toString", "a.raw"],
        ["__proto__"],
        ["constructor"],
        ["hasOwnProperty", "a.raw"],
        ["-T"],
        ["--trace"],
        ["--tr"],
      ]
    ) await assertSameAsQemu(args, dir);
  });
});

Deno.test("main() names the program for an error in its first option cluster", async () => {
  // qemu-img names its own argv[0] there, as invoked (here through the shell).
  const theirs = await runProgram("bash", ["-c", "qemu-img -xV"]);
  const ours = await qimg(["-xV"]);
  assertEquals(ours.stderr, theirs.stderr.replaceAll("qemu-img", "qimg"));
  assertEquals([ours.code, ours.stdout], [theirs.code, theirs.stdout]);
});

Deno.test("main() parses -T/--trace as qemu-img, with no trace events of its own", async () => {
  await withImage(async (dir) => {
    await Deno.writeTextFile(`${dir}/ev`, "foo\n#comment\n\n  bar  \n-baz\nqux*\n");
    for (
      const args of [
        ["-T", "foo"],
        ["-T", "foo", "info", "a.raw"],
        ["--trace", "enable=foo", "info", "a.raw"],
        ["--trace=-foo", "info", "a.raw"],
        ["--t", "x", "info", "a.raw"],
        ["-T", "pat*", "info", "a.raw"],
        ["-T", "", "info", "a.raw"],
        ["-T", "enable=", "info", "a.raw"],
        ["-T", "-", "info", "a.raw"],
        ["-T", "enable=a,,b", "info", "a.raw"],
        ["-T", "enable=x,enable=y", "info", "a.raw"],
        ["-T", "nofoo,enable=x", "info", "a.raw"],
        ["-T", "foo,nobar"],
        ["-T", "x=y", "info", "a.raw"],
        ["-T", "events=ev,foo"],
        ["-T", "foo,events=ev", "info", "a.raw"],
        ["-T", "events=nonexist", "-x"],
        ["-T", "events=sub", "info", "a.raw"],
        ["-T", "file=nodir/x", "info", "a.raw"],
        ["-T", "file=nodir/x"],
        ["-T", "file=nodir/x", "nosuchcommand"],
        ["-T", "foo", "-x"],
        ["-T", "foo,help", "info", "a.raw"],
        ["-T", "foo,?", "info", "a.raw"],
        ["-T", "help,foo", "info", "a.raw"],
        ["-T", "foo,bar,help", "info", "a.raw"],
        ["-T", "help=on", "info", "a.raw"],
      ]
    ) await assertSameAsQemu(args, dir);
  });
});

Deno.test("main() creates the -T file= trace file once a command runs, as qemu-img", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f raw a.raw 1M && mkdir q m", dir.path);
  await qemuImg(["-T", "file=q/t.log", "info", "a.raw"], dir.path);
  await qimg(["-T", "file=m/t.log", "info", "a.raw"], dir.path);
  await qemuImg(["-T", "file=q/none.log"], dir.path);
  await qimg(["-T", "file=m/none.log"], dir.path);
  const list = (d: string) => [...Deno.readDirSync(`${dir.path}/${d}`)].map((e) => e.name);
  assertEquals(list("m"), list("q"));
  assertEquals(list("m"), ["t.log"]);
});

Deno.test("getopt() shapes reach qemu-img's messages through info", async () => {
  await withImage(async (dir) => {
    for (
      const args of [
        ["info", "-fraw", "a.raw"],
        ["info", "-Uf", "raw", "a.raw"],
        ["info", "-Ufraw", "a.raw"],
        ["info", "-qf", "raw", "a.raw"],
        ["info", "--output", "json", "a.raw"],
        ["info", "--out=json", "a.raw"],
        ["info", "--ou", "json", "a.raw"],
        ["info", "--back", "a.raw"],
        ["info", "--b", "a.raw"],
        ["info", "--form", "raw", "a.raw"],
        ["info", "--force", "a.raw"],
        ["info", "--o=json", "a.raw"],
        ["info", "--backing-chain=1", "a.raw"],
        ["info", "--image-opts=3", "a.raw"],
        ["info", "a.raw", "--output=json"],
        ["info", "a.raw", "-x"],
        ["info", "a.raw", "-Ux"],
        ["info", "a.raw", "-xU"],
        ["info", "a.raw", "b.raw", "-xU"],
        ["info", "a.raw", "b.raw", "-Uxq"],
        ["info", "a.raw", "-U", "b.raw", "-xq"],
        ["info", "-U", "a.raw", "-f", "raw", "-xq"],
        ["info", "-f", "raw", "-xq", "a.raw"],
        ["info", "--output", "json", "-xq", "a.raw"],
        ["info", "-U", "-xq", "a.raw"],
        ["info", "-xU", "a.raw"],
        ["info", "-Ux", "a.raw"],
        ["info", "-:", "a.raw"],
        ["info", "a.raw", "-:U"],
        ["info", "-", "-xU"],
        ["info", "--", "a.raw"],
        ["info", "-U", "--", "-x"],
        ["info", "a.raw", "--", "-x"],
        ["info", "--"],
        ["info", "-"],
        ["info", ""],
        ["info", "-f", "raw", ""],
        ["snapshot", "-l", ""],
        ["rebase", "-u", ""],
        ["info", "--=x", "a.raw"],
        ["info", "---x", "a.raw"],
        ["info", "-f"],
        ["info", "a.raw", "-Uf"],
        ["info", "-f", "-U", "a.raw"],
        ["info", "-Uf", "-", "nonexist"],
        ["info", "nonexist", "-Uf", "-fraw"],
        ["info", "a.raw", "--output"],
        ["info", "a.raw", "--out"],
        ["info", "-x", "-f"],
      ]
    ) await assertSameAsQemu(args, dir);
  });
});

Deno.test("commands refuse bad arguments before opening anything, as qemu-img", async () => {
  await withImage(async (dir) => {
    for (
      const args of [
        // info
        ["info"],
        ["info", "a.raw", "b.raw"],
        ["info", "--output=xml", "a.raw"],
        // map
        ["map"],
        ["map", "-x", "a.raw"],
        ["map", "a.raw", "b.raw"],
        ["map", "--output=xml", "a.raw"],
        ["map", "--start-offset=abc", "a.raw"],
        ["map", "--max-length=-1", "a.raw"],
        ["map", "a.raw", "--output"],
        // check
        ["check"],
        ["check", "-r", "bogus", "a.raw"],
        ["check", "--output=xml", "a.raw"],
        ["check", "a.raw", "b.raw"],
        ["check", "-T", "bogus", "a.raw"],
        ["check", "a.raw", "-r"],
        // convert
        ["convert"],
        ["convert", "a.raw"],
        ["convert", "-x", "a.raw", "b"],
        ["convert", "-O"],
        ["convert", "-n", "-o", "x=1", "a.raw", "b"],
        ["convert", "-S", "abc", "a.raw", "b"],
        ["convert", "-m", "0", "a.raw", "b"],
        ["convert", "-t", "bogus", "a.raw", "b"],
        // dd
        ["dd"],
        ["dd", "-x"],
        ["dd", "if=a.raw"],
        ["dd", "bs=0", "if=a.raw", "of=b"],
        ["dd", "count=x", "if=a.raw", "of=b"],
        ["dd", "foo=bar"],
        ["dd", "-O"],
        // create
        ["create"],
        ["create", "-x", "c.raw"],
        ["create", "-f", "raw", "c.raw", "1M", "extra"],
        ["create", "-f", "raw", "c.raw", "abc"],
        ["create", "-o", ",", "c.raw", "1M"],
        // resize
        ["resize"],
        ["resize", "a.raw"],
        ["resize", "-x", "a.raw", "1M"],
        ["resize", "a.raw", "1M", "extra"],
        ["resize", "--preallocation=bogus", "a.raw", "1M"],
        // measure
        ["measure"],
        ["measure", "--size", "1M", "a.raw"],
        ["measure", "--size", "abc"],
        ["measure", "--output=xml", "--size", "1M"],
        ["measure", "a.raw", "b.raw"],
        // compare
        ["compare"],
        ["compare", "a.raw"],
        ["compare", "-x", "a.raw", "b.raw"],
        ["compare", "a.raw", "b.raw", "c"],
        ["compare", "-T", "bogus", "a.raw", "b.raw"],
        // bench
        ["bench"],
        ["bench", "-x"],
        ["bench", "a.raw", "b.raw"],
        ["bench", "-c", "abc", "a.raw"],
        ["bench", "-s", "abc", "a.raw"],
        ["bench", "-t", "bogus", "a.raw"],
        ["bench", "-i", "bogus", "a.raw"],
        ["bench", "--pattern=abc", "a.raw"],
        // snapshot
        ["snapshot"],
        ["snapshot", "-l", "a.raw", "b.raw"],
        ["snapshot", "-l", "-c", "x", "a.raw"],
        ["snapshot", "-a", "x", "-d", "y", "a.raw"],
        ["snapshot", "-c"],
        ["snapshot", "-f", "raw", "-l", "a.raw"],
        ["snapshot", "--object", "foo", "-l", "a.raw"],
        // amend
        ["amend", "a.raw"],
        ["amend", "-o", "size=1M"],
        ["amend", "-o", "size=1M", "a.raw", "b.raw"],
        ["amend", "-o", ",", "a.raw"],
        ["amend", "-o", "a,", "a.raw"],
        ["amend", "-t", "bogus", "-o", "size=1M", "a.raw"],
        ["amend", "-U", "-o", "size=1M", "a.raw"],
        ["amend", "--image-opts", "-f", "raw", "-o", "x=1", "a.raw"],
        // commit
        ["commit"],
        ["commit", "a.raw", "b.raw"],
        ["commit", "-r", "-5", "a.raw"],
        ["commit", "-r", "99999E", "a.raw"],
        ["commit", "-t", "bogus", "a.raw"],
        ["commit", "-s", "1", "a.raw"],
        ["commit", "-b"],
        // rebase
        ["rebase"],
        ["rebase", "a.raw"],
        ["rebase", "-F", "raw", "a.raw"],
        ["rebase", "-b", "x", "a.raw", "b.raw"],
        ["rebase", "-t", "bogus", "-b", "x", "a.raw"],
        ["rebase", "-T", "bogus", "-b", "x", "a.raw"],
        ["rebase", "-c", "-b", "x", "a.raw"],
        // bitmap
        ["bitmap"],
        ["bitmap", "a.raw", "b1"],
        ["bitmap", "--add", "a.raw"],
        ["bitmap", "--add", "a.raw", "b1", "c"],
        ["bitmap", "--remove", "-g", "64k", "a.raw", "b1"],
        ["bitmap", "--add", "-b", "x", "a.raw", "b1"],
        ["bitmap", "-F", "raw", "--add", "a.raw", "b1"],
        ["bitmap", "--add", "-g", "abc", "a.raw", "b1"],
        ["bitmap", "--add", "-g", "8E", "a.raw", "b1"],
        ["bitmap", "--merge"],
        ["bitmap", "--add", "-q", "a.raw", "b1"],
        ["bitmap", "--add", "--image-opts", "-f", "raw", "a.raw", "b1"],
      ]
    ) await assertSameAsQemu(args, dir);
  });
});

Deno.test("--object is checked as qemu-img checks it", async () => {
  await withImage(async (dir) => {
    for (
      const object of [
        "foo",
        "",
        "id=s0",
        "secret",
        "secret,id=s0",
        "secret,id=s0,data=x",
        "qom-type=secret,id=s0,data=x",
        "throttle-group,id=t",
        "help",
        "?",
        "secret,help",
        "secret,id=s,data=x,help",
        "secret,bogus=1",
        "secret,id=1s,bogus=1",
        "secret,id=s,bogus=1,format=x",
        "secret,id=s,format=x",
        "secret,id=s,data=x,format=base64",
        "secret,id=s,data=x,loaded=on",
        "secret,id=s,data=x,file=y",
        "secret,id=s,keyid=k",
        "secret,id=s,data=x,keyid=k",
        "secret,id=1s,data=x",
        "secret,id=,data=x",
        "secret,id=a.b-c_d,data=x",
      ]
    ) await assertSameAsQemu(["snapshot", "-l", "--object", object, "a.raw"], dir);
  });
});

Deno.test("reportError() prints one line for an unexpected exception, a stack only when debugging", () => {
  let text = "";
  const code = reportError(new TypeError("boom\nsecond line"), (t) => (text += t));
  assertEquals(code, 1);
  assertEquals(text, "qimg: internal error: boom\n");
  text = "";
  reportError(new RangeError("deep"), (t) => (text += t), true);
  assertTrue(text.startsWith("qimg: internal error: deep\nRangeError: deep\n    at "), text);
  text = "";
  assertEquals(reportError("a string", (t) => (text += t)), 1);
  assertEquals(text, "qimg: internal error: a string\n");
});

Deno.test("runCli() turns a command's unexpected exception into one line and exit 1", async () => {
  await using dir = await tempDir();
  const script = `${dir.path}/boom.ts`;
  const root = new URL("..", import.meta.url).href;
  await Deno.writeTextFile(
    script,
    `import { COMMANDS } from "${root}src/command.ts";\n` +
      `import { runCli } from "${root}cli.ts";\n` +
      `COMMANDS.info = () => Promise.resolve(() => Promise.reject(new TypeError("x is undefined")));\n` +
      `Deno.exit(await runCli(["info", "a"]));\n`,
  );
  const run = (env: string[]) =>
    runProgram("env", [
      ...env,
      Deno.execPath(),
      "run",
      "--no-prompt",
      "--allow-env",
      // The script lives outside the project: use its import map.
      "--config",
      new URL("../deno.json", import.meta.url).pathname,
      script,
    ]);
  const plain = await run([]);
  assertEquals(plain, { stdout: "", stderr: "qimg: internal error: x is undefined\n", code: 1 });
  const debug = await run(["QIMG_DEBUG=1"]);
  assertEquals(debug.code, 1);
  assertTrue(
    debug.stderr.startsWith("qimg: internal error: x is undefined\nTypeError: x is undefined\n"),
    debug.stderr,
  );
  assertTrue(CLI.endsWith("cli.ts"));
});

/** Argument vectors built from each command's own tokens, seeded so a failure reproduces. */
const GENERATED: Record<string, string[]> = {
  info: [
    "-U",
    "-f",
    "raw",
    "-x",
    "-Ux",
    "-xU",
    "-fraw",
    "a.raw",
    "b",
    "--",
    "-",
    "--output",
    "json",
  ]
    .concat(["--out=json", "--o", "--foo", "-qf", "-:", "--back=1", "--image-opts", "-Uf"]),
  snapshot: ["-l", "-c", "-a", "-d", "s1", "a.raw", "b", "-q", "-U", "-x", "-lq", "-qlU", "-cs"]
    .concat(["--", "-", "--force", "--image-opts", "-f"]),
  rebase: ["-u", "-b", "x", "-F", "raw", "-f", "a.raw", "b", "-p", "-q", "-t", "none", "-T"]
    .concat(["-U", "-x", "-ub", "-pqx", "--", "--force-share", "-c"]),
  commit: ["-d", "-b", "x", "-f", "raw", "a.raw", "b", "-p", "-q", "-t", "none", "-r", "1M", "-x"]
    .concat(["-dq", "-qx", "--", "-s", "--image"]),
  bitmap: ["--add", "--remove", "--merge", "s", "-b", "x", "-F", "raw", "-f", "-g", "64k", "a.raw"]
    .concat(["b1", "--en", "--dis", "-x", "--", "--clear", "-gx"]),
  amend: ["-o", "size=1M", "help", "-f", "raw", "a.raw", "b", "-p", "-q", "-t", "none", "--force"]
    .concat(["-x", "-po", "-qx", "--", "a,", "--f"]),
};

Deno.test("getopt() matches qemu-img on generated argument vectors for every command of this file", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f raw a.raw 1M", dir.path);
  let seed = 20221214;
  const next = (n: number) => (seed = (seed * 1103515245 + 12345) % 2147483648) % n;
  // qemu names its bitmap node "#block1" and two random digits.
  const mask = (s: string) => s.replace(/#block1\d\d:/g, "#block1NN:");
  for (const [command, tokens] of Object.entries(GENERATED)) {
    const vectors: string[][] = [];
    for (let k = 0; k < 16; k++) {
      const argv = [command];
      for (let i = 1 + next(5); i > 0; i--) argv.push(tokens[next(tokens.length)]);
      vectors.push(argv);
    }
    for (const argv of vectors) {
      const [ours, theirs] = await Promise.all([qimg(argv, dir.path), qemuImg(argv, dir.path)]);
      assertEquals(
        { ...ours, stderr: mask(ours.stderr) },
        { ...theirs, stderr: mask(theirs.stderr) },
        JSON.stringify(argv),
      );
    }
  }
});

Deno.test("denoIo drops a stream that fails, as qemu-img's stdio: a full disk or a closed pipe", async () => {
  await using dir = await tempDir();
  // A map listing far longer than a pipe's buffer.
  await sh(
    "qemu-img create -q -f qcow2 -o cluster_size=512 frag.qcow2 8M && " +
      'for i in $(seq 0 2 2000); do echo "write -P 1 $((i*1024)) 512"; done | qemu-io frag.qcow2 >/dev/null',
    dir.path,
  );
  const deno = `'${Deno.execPath()}' run --no-prompt --allow-read '${CLI}'`;
  for (
    const tail of [
      "--help >/dev/full",
      "info frag.qcow2 >/dev/full",
      "map --output=json frag.qcow2 | head -c 10 >/dev/null; exit ${PIPESTATUS[0]}",
      "info nonexist 2>/dev/full",
    ]
  ) {
    const ours = await runProgram("bash", ["-c", `${deno} ${tail}`], dir.path);
    const theirs = await runProgram("bash", ["-c", `qemu-img ${tail}`], dir.path);
    assertEquals(ours, theirs, tail);
  }
});
