/**
 * `deno task bench`: qimg against Debian's qemu-img on the same inputs.
 *
 * Builds a sparse raw image (QIMG_BENCH_GIB GiB, default 4; about 40% data:
 * random, text-like and written zeroes, the rest holes) and, with qemu-img,
 * a qcow2, vmdk, vpc, vhdx and vdi of it plus overlays, then runs each
 * operation with both tools in turn, QIMG_BENCH_RUNS times (default 5),
 * after one untimed run of each whose result is verified (same output,
 * `qemu-img compare` / `check` of the written image). Prints per operation
 * the median seconds, the ratio qimg/qemu-img, the ratio to a
 * `cp --sparse=always` of the source (copies), the ratio to the runtime's
 * start-up floor (an empty program started the same way, for operations
 * qemu-img finishes in under 20 ms), peak RSS, and the issue's target with
 * "ok" or "MISSED". Then peak RSS on a 16 GiB sparse input
 * (QIMG_BENCH_SPARSE_GIB, 0 skips it), and last
 * `geomean ratio X.XX over K ops` over the operations that take qemu-img at
 * least 100 ms. QIMG_BENCH_OPS (a regular expression) picks operations.
 * An operation qimg fails on is reported as "skipped: not supported yet".
 */

const ROOT = new URL("..", import.meta.url).pathname;
const CLI = `${ROOT}cli.ts`;
const GIB = Number(Deno.env.get("QIMG_BENCH_GIB") ?? "4");
const RUNS = Math.max(1, Number(Deno.env.get("QIMG_BENCH_RUNS") ?? "5"));
const SPARSE_GIB = Number(Deno.env.get("QIMG_BENCH_SPARSE_GIB") ?? "16");
const PICK = new RegExp(Deno.env.get("QIMG_BENCH_OPS") ?? "");
const MIB = 1 << 20;
const decoder = new TextDecoder();

/** The command line that runs qimg: the CLI under Deno with only the permissions it needs. */
const QIMG = [
  Deno.execPath(),
  "run",
  "--no-prompt",
  "--allow-read",
  "--allow-write",
  "--allow-ffi",
  "--allow-env=QIMG_DEBUG",
  CLI,
];

interface Measured {
  seconds: number;
  /** Peak resident set size in KiB, when it could be measured. */
  rssKiB?: number;
  code: number;
  stdout: string;
  stderr: string;
}

/** Whether /usr/bin/time (GNU time, for peak RSS) is usable; installs it as root if absent. */
async function ensureGnuTime(): Promise<boolean> {
  const works = async () => {
    try {
      const r = await new Deno.Command("/usr/bin/time", { args: ["-v", "true"], stderr: "piped" })
        .output();
      return r.success && decoder.decode(r.stderr).includes("Maximum resident set size");
    } catch {
      return false;
    }
  };
  if (await works()) return true;
  if (Deno.uid() === 0) {
    console.error("Installing GNU time (peak RSS)...");
    await new Deno.Command("apt-get", {
      args: ["install", "-y", "-qq", "time"],
      env: { DEBIAN_FRONTEND: "noninteractive" },
      stdout: "null",
      stderr: "null",
    }).output().catch(() => undefined);
  }
  return await works();
}

let gnuTime = false;

/** Peak RSS (VmHWM) of a running process from /proc, polled until it exits. */
async function pollPeakRss(pid: number, done: Promise<unknown>): Promise<number | undefined> {
  let peak: number | undefined;
  let finished = false;
  done.finally(() => finished = true);
  while (!finished) {
    try {
      const m = /VmHWM:\s+(\d+) kB/.exec(await Deno.readTextFile(`/proc/${pid}/status`));
      if (m) peak = Math.max(peak ?? 0, Number(m[1]));
    } catch {
      break;
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  return peak;
}

/** Runs a command once: wall-clock seconds, peak RSS, exit code and output. */
async function measure(argv: string[], cwd: string): Promise<Measured> {
  const timeFile = `${cwd}/.time`;
  const [cmd, ...args] = gnuTime ? ["/usr/bin/time", "-v", "-o", timeFile, ...argv] : argv;
  const start = performance.now();
  const child = new Deno.Command(cmd, {
    args,
    cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const output = child.output();
  const polled = gnuTime ? Promise.resolve(undefined) : pollPeakRss(child.pid, output);
  const out = await output;
  const seconds = (performance.now() - start) / 1000;
  let rssKiB = await polled;
  if (gnuTime) {
    const report = await Deno.readTextFile(timeFile).catch(() => "");
    const m = /Maximum resident set size \(kbytes\): (\d+)/.exec(report);
    if (m) rssKiB = Number(m[1]);
  }
  return {
    seconds,
    rssKiB,
    code: out.code,
    stdout: decoder.decode(out.stdout),
    stderr: decoder.decode(out.stderr),
  };
}

async function sh(script: string, cwd: string): Promise<string> {
  const r = await new Deno.Command("bash", {
    args: ["-ec", script],
    cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!r.success) throw new Error(`${script}: ${decoder.decode(r.stderr)}`);
  return decoder.decode(r.stdout);
}

/** xorshift32: fast incompressible bytes, seeded per region so regions differ. */
function fillRandom(buf: Uint8Array, seed: number): void {
  const words = new Uint32Array(buf.buffer, buf.byteOffset, buf.length >> 2);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
}

/** Log-like text: compresses well, but is not zero and not one repeated block. */
function fillText(buf: Uint8Array, seed: number): void {
  const enc = new TextEncoder();
  let off = 0;
  for (let line = 0; off < buf.length; line++) {
    const text = enc.encode(
      `${seed}.${line} kernel: [${(line * 0.0173).toFixed(4)}] eth0: link up, ` +
        `${(line % 7) * 100} Mbps, flow control ${line % 3 ? "off" : "rx/tx"}\n`,
    );
    buf.set(text.subarray(0, buf.length - off), off);
    off += text.length;
  }
}

/**
 * Writes the raw input: in each 16 MiB unit, 2.5 MiB random, 2.5 MiB text
 * and 1.4 MiB of written zeroes (6.4 MiB, 40%), the rest left as a hole;
 * with `every` > 1 only every so many units get data (a sparse input).
 */
async function makeRaw(path: string, size: number, every = 1): Promise<void> {
  const unit = 16 * MIB;
  const random = new Uint8Array(2.5 * MIB);
  const text = new Uint8Array(2.5 * MIB);
  const zeroes = new Uint8Array(1.4 * MIB);
  using f = await Deno.open(path, { write: true, create: true, truncate: true });
  await f.truncate(size);
  for (let u = 0; u * unit < size; u += every) {
    // The runs move around inside their unit so that data is not unit-aligned.
    let off = u * unit + ((u * 37) % 64) * 64 * 1024;
    fillRandom(random, u + 1);
    fillText(text, u);
    for (const part of u % 2 ? [random, zeroes, text] : [text, random, zeroes]) {
      if (off + part.length > size) break;
      await f.seek(off, Deno.SeekMode.Start);
      for (let done = 0; done < part.length;) done += await f.write(part.subarray(done));
      off += part.length;
    }
  }
}

/** What an issue asks of an operation; checked against the medians of one run. */
interface Target {
  /** qimg/qemu-img at most this. */
  qemu?: number;
  /** qimg/`cp --sparse=always` of the source at most this. */
  cp?: number;
  /** For operations qemu-img finishes in under 20 ms: qimg/start-up floor at most this. */
  floor?: number;
}

interface Op {
  name: string;
  /** Arguments for both tools (the program name aside). */
  args: string[];
  /** A file the op writes, removed before each run. */
  output?: string;
  /** Untimed set-up before every run of either tool (an op that changes its input). */
  prepare?(dir: string): Promise<unknown>;
  /** The source a `cp --sparse=always` baseline copies. */
  cp?: string;
  /** Run qimg's Node build instead of the Deno CLI. */
  node?: boolean;
  target: Target;
  /** Checks qimg's result against qemu-img's; returns a problem or "". */
  verify(qimg: Measured, qemu: Measured, dir: string): Promise<string>;
}

const sameOutput = (q: Measured, r: Measured): Promise<string> => {
  const theirs = r.stdout.replaceAll("qemu-img", "qimg");
  if (q.code !== r.code) return Promise.resolve(`exit code ${q.code}, qemu-img ${r.code}`);
  return Promise.resolve(q.stdout === theirs ? "" : "output differs from qemu-img's");
};

/** Runs qemu-img; returns "" when it exits 0, else what it said. */
async function qemuOk(args: string[], dir: string): Promise<string> {
  const c = await new Deno.Command("qemu-img", {
    args,
    cwd: dir,
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (c.code === 0) return "";
  const said = (decoder.decode(c.stderr) + decoder.decode(c.stdout)).trim().split("\n")[0];
  return `qemu-img ${args[0]}: ${said || `exit ${c.code}`}`;
}

/**
 * The written image must read the same as the reference (qemu-img compare)
 * and, for formats qemu-img can check, be clean (no errors, no leaks).
 */
function sameImage(reference: string, out = "out.raw", outFormat = "raw") {
  return async (q: Measured, _r: Measured, dir: string): Promise<string> => {
    if (q.code !== 0) return `exit code ${q.code}`;
    const checked = ["qcow2", "vmdk", "vhdx", "vdi"].includes(outFormat)
      ? await qemuOk(["check", "-f", outFormat, out], dir)
      : "";
    return checked || await qemuOk(["compare", "-F", outFormat, reference, out], dir);
  };
}

/** Creates `name` as an overlay of `base` with 8 MiB written at eight places spread over `size`. */
function overlay(name: string, base: string, pattern: number, size: number, len = "8M"): string {
  const writes = Array.from({ length: 8 }, (_, i) => {
    const at = Math.floor(i * size / 8 / MIB) + (i * 3) % 13;
    return `-c 'write -P ${pattern + i} ${at}M ${len}'`;
  });
  return `qemu-img create -q -f qcow2 -b ${base} -F qcow2 ${name} && ` +
    `qemu-io -f qcow2 ${writes.join(" ")} ${name} >/dev/null`;
}

const COPY = { qemu: 1.0, cp: 1.2 };
const SHORT = { floor: 1.5 };

function buildOps(size: number): Op[] {
  const converts: Op[] = [
    ["raw", "raw", "src.raw"],
    ["raw", "qcow2", "src.raw"],
    ["qcow2", "raw", "src.qcow2"],
    ["qcow2", "qcow2", "src.qcow2"],
  ].map(([from, to, source]) => ({
    name: `convert ${from}->${to}`,
    args: ["convert", "-f", from, "-O", to, source, `out.${to}`],
    output: `out.${to}`,
    cp: source,
    target: from === to && to === "raw" ? { cp: 1.2 } : COPY,
    verify: sameImage(source, `out.${to}`, to),
  }));
  const formats: [string, string, string[]][] = [
    ["vmdk", "vmdk", []],
    ["vmdk streamOptimized", "vmdk", ["-o", "subformat=streamOptimized"]],
    ["vpc", "vpc", []],
    ["vhdx", "vhdx", []],
    ["vdi", "vdi", []],
  ];
  const formatOps: Op[] = formats.flatMap(([label, fmt, opts]) => {
    const file = `src.${label.replace(" ", "-")}.${fmt}`;
    return [{
      name: `convert raw->${label}`,
      args: ["convert", "-f", "raw", "-O", fmt, ...opts, "src.raw", `out.${fmt}`],
      output: `out.${fmt}`,
      cp: "src.raw",
      target: { qemu: fmt === "vmdk" ? 0.5 : 1.0 },
      verify: sameImage("src.raw", `out.${fmt}`, fmt),
    }, {
      name: `convert ${label}->raw`,
      args: ["convert", "-f", fmt, "-O", "raw", file, "out.raw"],
      output: "out.raw",
      cp: file,
      target: { qemu: 1.0 },
      verify: sameImage(file),
    }];
  });
  const all: Op[] = [
    {
      name: "info",
      args: ["info", "--output=json", "src.qcow2"],
      target: SHORT,
      verify: sameOutput,
    },
    {
      name: "info (Node build)",
      args: ["info", "--output=json", "src.qcow2"],
      node: true,
      target: SHORT,
      verify: sameOutput,
    },
    {
      name: "map --output=json",
      args: ["map", "--output=json", "src.qcow2"],
      target: SHORT,
      verify: sameOutput,
    },
    { name: "check", args: ["check", "src.qcow2"], target: SHORT, verify: sameOutput },
    {
      name: "snapshot -c",
      args: ["snapshot", "-c", "s1", "snap.qcow2"],
      // Deleting the previous run's snapshot keeps the image the same size run after run.
      prepare: (dir) => sh("qemu-img snapshot -d s1 snap.qcow2 2>/dev/null || true", dir),
      target: SHORT,
      verify: async (q, _r, dir) =>
        q.code ? `exit code ${q.code}` : await qemuOk(["check", "snap.qcow2"], dir),
    },
    {
      name: "rebase -u",
      args: ["rebase", "-u", "-b", "rb_new.qcow2", "-F", "qcow2", "rb_ovl.qcow2"],
      prepare: (dir) => sh("cp rb_tmpl.qcow2 rb_ovl.qcow2", dir),
      target: SHORT,
      verify: async (q, _r, dir) => {
        if (q.code) return `exit code ${q.code}`;
        const info = await sh("qemu-img info --output=json rb_ovl.qcow2", dir);
        return JSON.parse(info)["backing-filename"] === "rb_new.qcow2" ? "" : "backing not set";
      },
    },
    {
      name: "rebase (safe)",
      args: ["rebase", "-b", "rb_new.qcow2", "-F", "qcow2", "rb_ovl.qcow2"],
      prepare: (dir) => sh("cp rb_tmpl.qcow2 rb_ovl.qcow2", dir),
      target: { qemu: 1.0 },
      // The guest view must not change: the template still sits on the old backing.
      verify: sameImage("rb_tmpl.qcow2", "rb_ovl.qcow2", "qcow2"),
    },
    {
      name: "commit",
      args: ["commit", "-f", "qcow2", "cm_ovl.qcow2"],
      prepare: (dir) =>
        sh(
          `cp --sparse=always src.qcow2 cm_base.qcow2 && ${
            overlay("cm_ovl.qcow2", "cm_base.qcow2", 0x30, size)
          }`,
          dir,
        ),
      target: { qemu: 1.0 },
      verify: sameImage("cm_ref.qcow2", "cm_base.qcow2", "qcow2"),
    },
    ...converts,
    {
      name: "convert -B qcow2->qcow2",
      args: [
        "convert",
        ...["-f", "qcow2", "-O", "qcow2", "-B", "src.qcow2", "-F", "qcow2"],
        ...["b_ovl.qcow2", "out.qcow2"],
      ],
      output: "out.qcow2",
      target: { qemu: 1.0 },
      verify: sameImage("b_ovl.qcow2", "out.qcow2", "qcow2"),
    },
    ...(["zlib", "zstd"] as const).map((c) => ({
      name: `convert -c -O qcow2 ${c}`,
      args: [
        "convert",
        ...["-c", "-f", "raw", "-O", "qcow2", "-o", `compression_type=${c}`],
        ...["src.raw", "out.qcow2"],
      ],
      output: "out.qcow2",
      target: { qemu: c === "zlib" ? 0.4 : 0.7 },
      verify: sameImage("src.raw", "out.qcow2", "qcow2"),
    })),
    {
      name: "dd",
      args: ["dd", "-f", "raw", "-O", "raw", "bs=1M", "if=src.raw", "of=out.raw"],
      output: "out.raw",
      cp: "src.raw",
      target: { qemu: 1.0 },
      verify: sameImage("src.raw"),
    },
    ...formatOps,
  ];
  return all.filter((op) => PICK.test(op.name));
}

/** Builds every input the chosen operations read, with qemu-img and qemu-io. */
async function buildInputs(dir: string, size: number, ops: Op[]): Promise<void> {
  const wanted = (re: RegExp) => ops.some((op) => re.test(op.name));
  await makeRaw(`${dir}/src.raw`, size);
  await sh("qemu-img convert -f raw -O qcow2 src.raw src.qcow2", dir);
  if (wanted(/snapshot/)) await sh("cp --sparse=always src.qcow2 snap.qcow2", dir);
  if (wanted(/rebase/)) {
    await sh(overlay("rb_new.qcow2", "src.qcow2", 0x50, size), dir);
    await sh(overlay("rb_tmpl.qcow2", "src.qcow2", 0x70, size, "1M"), dir);
  }
  if (wanted(/commit/)) {
    // The guest view commit must leave in the base: the overlay's, flattened.
    await sh(
      `${overlay("cm_ovl.qcow2", "src.qcow2", 0x30, size)} && ` +
        "qemu-img convert -O qcow2 cm_ovl.qcow2 cm_ref.qcow2 && rm cm_ovl.qcow2",
      dir,
    );
  }
  if (wanted(/-B/)) await sh(overlay("b_ovl.qcow2", "src.qcow2", 0x90, size), dir);
  for (const op of ops) {
    const m = /^convert (vmdk|vmdk streamOptimized|vpc|vhdx|vdi)->raw$/.exec(op.name);
    if (!m) continue;
    const fmt = m[1].split(" ")[0];
    const opts = m[1].includes(" ") ? "-o subformat=streamOptimized" : "";
    await sh(`qemu-img convert -f raw -O ${fmt} ${opts} src.raw ${op.args.at(-2)}`, dir);
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

const fmtRss = (kib?: number) => kib === undefined ? "?" : `${(kib / 1024).toFixed(0)} MiB`;
const peakOf = (ms: Measured[]) =>
  ms.some((m) => m.rssKiB !== undefined) ? Math.max(...ms.map((m) => m.rssKiB ?? 0)) : undefined;
const RSS_LIMIT_KIB = 256 * 1024;

/** Median seconds of `runs` runs of argv (after one untimed run). */
async function timed(argv: string[], dir: string, runs: number, before?: () => Promise<unknown>) {
  const seconds: number[] = [];
  for (let i = 0; i <= runs; i++) {
    await before?.();
    const m = await measure(argv, dir);
    if (i > 0) seconds.push(m.seconds);
  }
  return median(seconds);
}

/** Prints rows as a table: the first column left-aligned, the rest right-aligned. */
function printTable(rows: string[][]): void {
  const full = rows.filter((r) => r.length > 2);
  const widths = rows[0].map((_, i) => Math.max(...full.map((r) => (r[i] ?? "").length)));
  for (const row of rows) {
    console.log(
      row.length === 2
        ? `${row[0].padEnd(widths[0])}  ${row[1]}`
        : row.map((c, i) => i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i])).join("  ")
          .trimEnd(),
    );
  }
}

/** Peak RSS of qimg and qemu-img on a large sparse input: memory must not grow with size. */
async function sparseRss(dir: string): Promise<void> {
  if (!(SPARSE_GIB > 0)) return;
  const size = Math.round(SPARSE_GIB * 1024) * MIB;
  // One 16 MiB unit of data per GiB: about 100 MiB of data in 16 GiB.
  await makeRaw(`${dir}/big.raw`, size, 64);
  await sh("qemu-img convert -f raw -O qcow2 big.raw big.qcow2", dir);
  console.log("");
  console.log(`# peak RSS on a ${SPARSE_GIB} GiB sparse input (one run each, verified)`);
  const rows: string[][] = [["op", "qimg s", "qemu-img s", "qimg RSS", "qemu-img RSS", "target"]];
  const cases: [string, string[], string, string][] = [
    ["convert raw->qcow2", ["convert", "-O", "qcow2", "big.raw", "big.out"], "big.raw", "qcow2"],
    ["convert qcow2->raw", ["convert", "-O", "raw", "big.qcow2", "big.out"], "big.qcow2", "raw"],
    ["convert -c zlib", ["convert", "-c", "-O", "qcow2", "big.raw", "big.out"], "big.raw", "qcow2"],
    ["map --output=json", ["map", "--output=json", "big.qcow2"], "", ""],
  ];
  for (const [name, args, source, fmt] of cases) {
    if (!PICK.test(name)) continue;
    await sh("rm -f big.out", dir);
    const theirs = await measure(["qemu-img", ...args], dir);
    await sh("rm -f big.out", dir);
    const ours = await measure([...QIMG, ...args], dir);
    const problem = ours.code !== 0
      ? `exit code ${ours.code}: ${ours.stderr.trim().split("\n")[0]}`
      : source
      ? await sameImage(source, "big.out", fmt)(ours, theirs, dir)
      : await sameOutput(ours, theirs);
    const ok = (ours.rssKiB ?? 0) <= RSS_LIMIT_KIB;
    rows.push(
      problem ? [name, `WRONG RESULT: ${problem}`] : [
        name,
        ours.seconds.toFixed(3),
        theirs.seconds.toFixed(3),
        fmtRss(ours.rssKiB),
        fmtRss(theirs.rssKiB),
        `RSS<=256MiB ${ok ? "ok" : "MISSED"}`,
      ],
    );
  }
  await sh("rm -f big.out big.raw big.qcow2", dir);
  printTable(rows);
}

/** "ok" or "MISSED" for each part of a target, e.g. "qemu<=1.0 ok, cp<=1.2 MISSED". */
function judge(target: Target, ratio: number, vsCp?: number, vsFloor?: number, rss?: number) {
  const parts: string[] = [];
  const mark = (what: string, limit: number, value?: number) => {
    if (value !== undefined) parts.push(`${what}<=${limit} ${value <= limit ? "ok" : "MISSED"}`);
  };
  if (target.floor !== undefined && vsFloor !== undefined) mark("floor", target.floor, vsFloor);
  else if (target.qemu !== undefined) mark("qemu", target.qemu, ratio);
  if (target.cp !== undefined) mark("cp", target.cp, vsCp);
  if (rss !== undefined && rss > RSS_LIMIT_KIB) parts.push("RSS<=256MiB MISSED");
  return parts.join(", ");
}

async function main(): Promise<number> {
  if (!(GIB > 0) || !(RUNS >= 1)) {
    console.error("QIMG_BENCH_GIB must be a positive number of GiB, QIMG_BENCH_RUNS at least 1");
    return 2;
  }
  gnuTime = await ensureGnuTime();
  const dir = await Deno.makeTempDir({ prefix: "qimg-bench-" });
  try {
    const size = Math.round(GIB * 1024) * MIB;
    const ops = buildOps(size);
    console.log(`# inputs: ${GIB} GiB raw (~40% data), its qcow2 and others, in ${dir}`);
    let t = performance.now();
    await buildInputs(dir, size, ops);
    const du = (await sh("du -k --apparent-size src.raw; du -k src.raw src.qcow2", dir))
      .trim().split("\n").map((l) => Number(l.split("\t")[0]) / 1024);
    console.log(
      `# built in ${((performance.now() - t) / 1000).toFixed(1)} s: raw ${du[1].toFixed(0)} MiB ` +
        `allocated of ${du[0].toFixed(0)} MiB, qcow2 ${du[2].toFixed(0)} MiB; ` +
        `${RUNS} timed runs each, peak RSS from ${gnuTime ? "/usr/bin/time -v" : "/proc VmHWM"}`,
    );

    // The Node build, bundled into the temp dir (the checkout's dist/ may be stale).
    let nodeQimg: string[] = [];
    if (ops.some((op) => op.node)) {
      const { build } = await import("../scripts/build_node.ts");
      nodeQimg = ["node", await build({ outDir: `${dir}/node` })];
    }

    await Deno.writeTextFile(`${dir}/empty.mjs`, "");
    // Started the same way as qimg: its flags, and a module of this project (same config).
    const floorArgv = (node?: boolean) =>
      node ? ["node", "empty.mjs"] : [...QIMG.slice(0, -1), `${ROOT}bench/empty.ts`];
    const floor = await timed(floorArgv(false), dir, RUNS * 2);
    const nodeFloor = nodeQimg.length ? await timed(floorArgv(true), dir, RUNS * 2) : NaN;
    console.log(
      `# floor: an empty \`deno run\` (qimg's flags and config) takes ${floor.toFixed(3)} s` +
        (nodeQimg.length ? `, an empty \`node\` ${nodeFloor.toFixed(3)} s` : ""),
    );
    console.log("");
    const header = [
      "op",
      "qimg s",
      "qemu-img s",
      "ratio",
      "x cp",
      "x floor",
      "qimg RSS",
      "qemu-img RSS",
      "target",
    ];
    const rows: string[][] = [header];
    const longRatios: number[] = [];
    let wrong = 0;
    const removeOutput = (op: Op) =>
      op.output ? Deno.remove(`${dir}/${op.output}`).catch(() => undefined) : undefined;
    const before = async (op: Op) => {
      await removeOutput(op);
      await op.prepare?.(dir);
      // Each run starts with nothing left to write back: the previous run's output (or the
      // inputs just built) would otherwise be flushed during this one, whichever tool it is.
      // And with its inputs in the page cache, as the figures in the issues assume: this
      // machine's memory reclaim (kdamond) evicts cold pages within seconds. cp reads only
      // the data of a sparse file.
      const inputs = op.args.map((a) => a.replace(/^if=/, "")) // dd's if= (its of= is left out)
        .filter((a) => a !== op.output && /^[^=]+\.(raw|qcow2|vmdk|vpc|vhdx|vdi)$/.test(a));
      await sh(
        `sync && for f in ${inputs.join(" ")}; do cp --sparse=always "$f" /dev/null; done`,
        dir,
      );
    };

    for (const op of ops) {
      t = performance.now();
      const qimg = op.node ? nodeQimg : QIMG;
      // Untimed first runs: warm caches (the runtime's module cache too) and verify qimg.
      await before(op);
      const theirs = await measure(["qemu-img", ...op.args], dir);
      await before(op);
      const ours = await measure([...qimg, ...op.args], dir);
      if (ours.code !== 0 && theirs.code === 0) {
        const why = ours.stderr.trim().split("\n")[0] ?? "";
        rows.push([op.name, `skipped: not supported yet (${why})`]);
        continue;
      }
      const problem = await op.verify(ours, theirs, dir);
      if (problem) {
        wrong++;
        rows.push([op.name, `WRONG RESULT, not timed: ${problem}`]);
        continue;
      }
      const q: Measured[] = [];
      const r: Measured[] = [];
      // Short operations are judged against the floor: it runs beside them, so that both
      // meet the same machine (writeback of the inputs, other load) rather than the floor's
      // single measurement at the start.
      const f: number[] = [];
      for (let i = 0; i < RUNS; i++) {
        await before(op);
        r.push(await measure(["qemu-img", ...op.args], dir));
        await before(op);
        q.push(await measure([...qimg, ...op.args], dir));
        if (op.target.floor !== undefined) f.push((await measure(floorArgv(op.node), dir)).seconds);
      }
      await removeOutput(op);
      const qs = median(q.map((m) => m.seconds));
      const rs = median(r.map((m) => m.seconds));
      const cpSeconds = op.cp
        ? await timed(
          ["cp", "--sparse=always", op.cp, "cp.out"],
          dir,
          RUNS,
          () => Deno.remove(`${dir}/cp.out`).catch(() => undefined),
        )
        : undefined;
      await Deno.remove(`${dir}/cp.out`).catch(() => undefined);
      const runtimeFloor = f.length ? median(f) : op.node ? nodeFloor : floor;
      const vsFloor = rs < 0.02 ? qs / runtimeFloor : undefined;
      const vsCp = cpSeconds ? qs / cpSeconds : undefined;
      if (rs >= 0.1) longRatios.push(qs / rs);
      rows.push([
        op.name,
        qs.toFixed(3),
        rs.toFixed(3),
        (qs / rs).toFixed(2),
        vsCp?.toFixed(2) ?? "",
        vsFloor?.toFixed(2) ?? "",
        fmtRss(peakOf(q)),
        fmtRss(peakOf(r)),
        judge(op.target, qs / rs, vsCp, vsFloor, peakOf(q)),
      ]);
      console.error(`# ${op.name}: ${((performance.now() - t) / 1000).toFixed(1)} s`);
    }
    printTable(rows);
    await sparseRss(dir);

    const geomean = longRatios.length
      ? Math.exp(longRatios.reduce((s, x) => s + Math.log(x), 0) / longRatios.length)
      : NaN;
    console.log("");
    console.log(`geomean ratio ${geomean.toFixed(2)} over ${longRatios.length} ops`);
    return wrong ? 1 : 0;
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) Deno.exit(await main());
