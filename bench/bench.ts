/**
 * `deno task bench`: qimg against Debian's qemu-img on the same inputs.
 *
 * Builds a sparse raw image (QIMG_BENCH_GIB GiB, default 4; about 40% data:
 * random, text-like and written zeroes, the rest holes) and a qcow2 made
 * from it by qemu-img, then runs each operation with both tools in turn,
 * QIMG_BENCH_RUNS times (default 3), after one untimed run of each whose
 * result is verified (same output, or `qemu-img compare` of the written
 * image). Prints median seconds, the ratio qimg/qemu-img and peak RSS per
 * operation, Deno's start-up floor, and last `geomean ratio X.XX over K ops`.
 * An operation qimg fails on is reported as "skipped: not supported yet".
 */

const ROOT = new URL("..", import.meta.url).pathname;
const CLI = `${ROOT}cli.ts`;
const GIB = Number(Deno.env.get("QIMG_BENCH_GIB") ?? "4");
const RUNS = Math.max(1, Number(Deno.env.get("QIMG_BENCH_RUNS") ?? "3"));
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
 * and 1.4 MiB of written zeroes (6.4 MiB, 40%), the rest left as a hole.
 */
async function makeRaw(path: string, size: number): Promise<void> {
  const unit = 16 * MIB;
  const random = new Uint8Array(2.5 * MIB);
  const text = new Uint8Array(2.5 * MIB);
  const zeroes = new Uint8Array(1.4 * MIB);
  using f = await Deno.open(path, { write: true, create: true, truncate: true });
  await f.truncate(size);
  for (let u = 0; u * unit < size; u++) {
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

interface Op {
  name: string;
  /** Arguments for both tools (the program name aside). */
  args: string[];
  /** A file the op writes, removed before each run. */
  output?: string;
  /** Checks qimg's result against qemu-img's; returns a problem or "". */
  verify(qimg: Measured, qemu: Measured, dir: string): Promise<string>;
}

const sameOutput = (q: Measured, r: Measured): Promise<string> => {
  const theirs = r.stdout.replaceAll("qemu-img", "qimg");
  if (q.code !== r.code) return Promise.resolve(`exit code ${q.code}, qemu-img ${r.code}`);
  return Promise.resolve(q.stdout === theirs ? "" : "output differs from qemu-img's");
};

/** The written image must read the same as the source (qemu-img compare). */
function sameImage(source: string, sourceFormat: string, out = "out.raw", outFormat = "raw") {
  return async (q: Measured, _r: Measured, dir: string): Promise<string> => {
    if (q.code !== 0) return `exit code ${q.code}`;
    const c = await new Deno.Command("qemu-img", {
      args: ["compare", "-f", sourceFormat, "-F", outFormat, source, out],
      cwd: dir,
      stdout: "null",
      stderr: "piped",
    }).output();
    return c.code === 0 ? "" : `qemu-img compare: ${decoder.decode(c.stderr).trim() || c.code}`;
  };
}

const OPS: Op[] = [
  { name: "info", args: ["info", "--output=json", "src.qcow2"], verify: sameOutput },
  { name: "map --output=json", args: ["map", "--output=json", "src.qcow2"], verify: sameOutput },
  { name: "check", args: ["check", "src.qcow2"], verify: sameOutput },
  {
    name: "convert raw->raw",
    args: ["convert", "-f", "raw", "-O", "raw", "src.raw", "out.raw"],
    output: "out.raw",
    verify: sameImage("src.raw", "raw"),
  },
  {
    name: "convert qcow2->raw",
    args: ["convert", "-f", "qcow2", "-O", "raw", "src.qcow2", "out.raw"],
    output: "out.raw",
    verify: sameImage("src.qcow2", "qcow2"),
  },
  {
    name: "dd",
    args: ["dd", "-f", "raw", "-O", "raw", "bs=1M", "if=src.raw", "of=out.raw"],
    output: "out.raw",
    verify: sameImage("src.raw", "raw"),
  },
  ...(["zlib", "zstd"] as const).map((c) => ({
    name: `convert -c -O qcow2 ${c}`,
    args: [
      "convert",
      ...["-c", "-f", "raw", "-O", "qcow2", "-o", `compression_type=${c}`],
      ...["src.raw", "out.qcow2"],
    ],
    output: "out.qcow2",
    verify: sameImage("src.raw", "raw", "out.qcow2", "qcow2"),
  })),
];

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

const fmtRss = (kib?: number) => kib === undefined ? "?" : `${(kib / 1024).toFixed(0)} MiB`;

async function main(): Promise<number> {
  if (!(GIB > 0) || !(RUNS >= 1)) {
    console.error("QIMG_BENCH_GIB must be a positive number of GiB, QIMG_BENCH_RUNS at least 1");
    return 2;
  }
  gnuTime = await ensureGnuTime();
  const dir = await Deno.makeTempDir({ prefix: "qimg-bench-" });
  try {
    const size = Math.round(GIB * 1024) * MIB;
    console.log(`# inputs: ${GIB} GiB raw (~40% data) and its qcow2, in ${dir}`);
    let t = performance.now();
    await makeRaw(`${dir}/src.raw`, size);
    await sh("qemu-img convert -f raw -O qcow2 src.raw src.qcow2", dir);
    const du = (await sh("du -k --apparent-size src.raw; du -k src.raw src.qcow2", dir))
      .trim().split("\n").map((l) => Number(l.split("\t")[0]) / 1024);
    console.log(
      `# built in ${((performance.now() - t) / 1000).toFixed(1)} s: raw ${du[1].toFixed(0)} MiB ` +
        `allocated of ${du[0].toFixed(0)} MiB, qcow2 ${du[2].toFixed(0)} MiB; ` +
        `${RUNS} timed runs each, peak RSS from ${gnuTime ? "/usr/bin/time -v" : "/proc VmHWM"}`,
    );

    await Deno.writeTextFile(`${dir}/empty.ts`, "");
    const floor: number[] = [];
    for (let i = 0; i < RUNS + 1; i++) {
      const m = await measure([Deno.execPath(), "run", "--no-prompt", "empty.ts"], dir);
      if (i > 0) floor.push(m.seconds);
    }
    console.log(`# floor: an empty \`deno run\` takes ${median(floor).toFixed(3)} s`);
    console.log("");
    const header = ["op", "qimg s", "qemu-img s", "ratio", "qimg RSS", "qemu-img RSS"];
    const rows: string[][] = [header];
    const ratios: number[] = [];
    let wrong = 0;
    const removeOutput = (op: Op) =>
      op.output ? Deno.remove(`${dir}/${op.output}`).catch(() => undefined) : undefined;

    for (const op of OPS) {
      t = performance.now();
      // Untimed first runs: warm caches (Deno's module cache too) and verify qimg's result.
      await removeOutput(op);
      const theirs = await measure(["qemu-img", ...op.args], dir);
      await removeOutput(op);
      const ours = await measure([...QIMG, ...op.args], dir);
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
      for (let i = 0; i < RUNS; i++) {
        await removeOutput(op);
        r.push(await measure(["qemu-img", ...op.args], dir));
        await removeOutput(op);
        q.push(await measure([...QIMG, ...op.args], dir));
      }
      await removeOutput(op);
      const qs = median(q.map((m) => m.seconds));
      const rs = median(r.map((m) => m.seconds));
      ratios.push(qs / rs);
      const peak = (ms: Measured[]) =>
        ms.some((m) => m.rssKiB !== undefined)
          ? Math.max(...ms.map((m) => m.rssKiB ?? 0))
          : undefined;
      rows.push([
        op.name,
        qs.toFixed(3),
        rs.toFixed(3),
        (qs / rs).toFixed(2),
        fmtRss(peak(q)),
        fmtRss(peak(r)),
      ]);
      console.error(`# ${op.name}: ${((performance.now() - t) / 1000).toFixed(1)} s`);
    }

    const widths = header.map((_, i) =>
      Math.max(...rows.filter((r) => i === 0 || r.length > 2).map((r) => r[i].length))
    );
    for (const row of rows) {
      console.log(
        row.length === 2
          ? `${row[0].padEnd(widths[0])}  ${row[1]}`
          : row.map((c, i) => i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i])).join("  "),
      );
    }
    const geomean = ratios.length
      ? Math.exp(ratios.reduce((s, x) => s + Math.log(x), 0) / ratios.length)
      : NaN;
    console.log("");
    console.log(`geomean ratio ${geomean.toFixed(2)} over ${ratios.length} ops`);
    return wrong ? 1 : 0;
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) Deno.exit(await main());
