/**
 * Crash safety: qimg is SIGKILLed at many points during convert, commit,
 * snapshot -c and resize. After each kill the sources are byte-identical,
 * every qcow2 image involved passes `qemu-img check` without corruption
 * (leaks allowed, and qimg's `check -r leaks` then removes them), and the
 * images a command works on in place still read the same guest data.
 *
 * The kill points come from src/file.ts's hook: QIMG_CRASH_AFTER_WRITES=N
 * makes qimg SIGKILL itself just before its N-th file change. A count run
 * (N=0) says how many changes a command makes; the test then kills it before
 * up to QIMG_CRASH_POINTS of them, spread evenly (`all`: every one). A few
 * kills after seeded random delays, from outside, cover what the hook cannot
 * see (a kill between a write and whatever follows it in memory).
 */

import { assertEquals, assertTrue } from "./_assert.ts";
import { CLI, hashFile, qemuImg, sh, tempDir } from "./_util.ts";

const HOOK = "QIMG_CRASH_AFTER_WRITES";
/** Kill points per command: QIMG_CRASH_POINTS=N, or `all`. */
const POINTS = Deno.env.get("QIMG_CRASH_POINTS") ?? "24";
/** Kill points run at the same time. */
const PARALLEL = 3;

const decoder = new TextDecoder();

/** What a qimg run ended with. */
interface Run {
  code: number;
  signal: Deno.Signal | null;
  stderr: string;
}

/**
 * The qimg command with the hook's permissions: the env variable to read it,
 * run for Deno.kill. Always Deno's cli.ts, whatever QIMG_RUNNER says: the hook is there.
 */
function qimgCommand(args: string[], cwd: string, crashAt?: number): Deno.Command {
  return new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--no-prompt",
      "--allow-read",
      "--allow-write",
      "--allow-ffi",
      "--allow-run",
      `--allow-env=QIMG_DEBUG,${HOOK}`,
      CLI,
      ...args,
    ],
    cwd,
    env: crashAt === undefined ? {} : { [HOOK]: String(crashAt) },
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  });
}

async function runQimg(args: string[], cwd: string, crashAt?: number): Promise<Run> {
  const out = await qimgCommand(args, cwd, crashAt).output();
  return { code: out.code, signal: out.signal, stderr: decoder.decode(out.stderr) };
}

/** One command to crash, on inputs made once and copied before each run. */
interface Scenario {
  /** Shell script run in the golden directory to make the inputs. */
  setup: string;
  /** The qimg command line. */
  args: string[];
  /** Files that must stay byte-identical. */
  sources: string[];
  /** qcow2 images that must check without corruption when they exist as qcow2. */
  images: string[];
  /** Image -> raw file (made by setup) with the guest data it must still read. */
  guest?: Record<string, string>;
  /** Further checks after a kill. */
  extra?: (dir: string) => Promise<string | undefined>;
}

const QCOW2_MAGIC = [0x51, 0x46, 0x49, 0xfb];

/** Whether `path` exists and starts as a qcow2 image (a crash mid-create leaves neither). */
async function isQcow2(path: string): Promise<boolean> {
  try {
    const head = (await Deno.readFile(path)).subarray(0, 4);
    return QCOW2_MAGIC.every((b, i) => head[i] === b);
  } catch {
    return false;
  }
}

/** Problems with the files in `dir` after a kill (empty: none). */
async function inspect(s: Scenario, dir: string, hashes: Map<string, string>): Promise<string[]> {
  const bad: string[] = [];
  for (const f of s.sources) {
    if (await hashFile(`${dir}/${f}`) !== hashes.get(f)) bad.push(`source ${f} changed`);
  }
  for (const f of s.images) {
    if (!await isQcow2(`${dir}/${f}`)) {
      if (s.sources.includes(f) || s.guest?.[f]) bad.push(`${f} is no qcow2 image any more`);
      continue;
    }
    const c = await qemuImg(["check", f], dir);
    if (c.code === 3 && !c.stdout.includes("ERROR")) {
      const r = await runQimg(["check", "-r", "leaks", f], dir);
      if (r.code !== 0) bad.push(`qimg check -r leaks ${f}: exit ${r.code}\n${r.stderr}`);
      const again = await qemuImg(["check", f], dir);
      if (again.code !== 0) {
        bad.push(`${f} after check -r leaks: exit ${again.code}\n${again.stdout}`);
      }
    } else if (c.code !== 0) {
      bad.push(`qemu-img check ${f}: exit ${c.code}\n${c.stdout}${c.stderr}`);
    }
  }
  for (const [image, raw] of Object.entries(s.guest ?? {})) {
    const c = await qemuImg(["compare", image, raw], dir);
    if (c.code !== 0) bad.push(`${image} reads other data: ${c.stdout}${c.stderr}`);
  }
  const more = await s.extra?.(dir);
  if (more) bad.push(more);
  return bad;
}

/** The golden inputs of a scenario, made once, with the hashes of its sources. */
async function prepare(s: Scenario, golden: string): Promise<Map<string, string>> {
  await sh(s.setup, golden);
  const hashes = new Map<string, string>();
  for (const f of s.sources) hashes.set(f, await hashFile(`${golden}/${f}`));
  return hashes;
}

/** Copies the golden files into a fresh directory under `root`. */
async function fresh(golden: string, root: string, name: string): Promise<string> {
  const dir = `${root}/${name}`;
  await Deno.mkdir(dir);
  for await (const e of Deno.readDir(golden)) {
    if (e.isFile) await Deno.copyFile(`${golden}/${e.name}`, `${dir}/${e.name}`);
  }
  return dir;
}

/** Which of the changes 1..total to kill before. */
function killPoints(total: number): number[] {
  const n = POINTS === "all" ? total : Math.min(total, Math.max(1, Number(POINTS)));
  const set = new Set<number>();
  for (let i = 0; i < n; i++) set.add(1 + Math.round(i * (total - 1) / Math.max(1, n - 1)));
  return [...set];
}

/** Runs `jobs` with at most PARALLEL at once. */
async function pool<T>(items: T[], job: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await job(items[next++]);
  };
  await Promise.all(Array.from({ length: PARALLEL }, worker));
}

/**
 * Kills `s` before each chosen file change and inspects what it leaves.
 * Returns how many changes the whole command makes.
 */
async function crashEverywhere(s: Scenario): Promise<number> {
  await using tmp = await tempDir();
  const golden = `${tmp.path}/golden`;
  await Deno.mkdir(golden);
  const hashes = await prepare(s, golden);

  // The count run: the command completes and leaves everything clean.
  const whole = await fresh(golden, tmp.path, "whole");
  const done = await runQimg(s.args, whole, 0);
  assertEquals(done.code, 0, `qimg ${s.args.join(" ")}: ${done.stderr}`);
  const total = Number(/crash hook: (\d+) file changes/.exec(done.stderr)?.[1]);
  assertTrue(total > 0, `no file changes counted: ${done.stderr}`);
  assertEquals(await inspect(s, whole, hashes), [], "after the whole command");

  const failures: string[] = [];
  await pool(killPoints(total), async (n) => {
    const dir = await fresh(golden, tmp.path, `kill${n}`);
    const r = await runQimg(s.args, dir, n);
    if (r.signal !== "SIGKILL") {
      failures.push(`kill before change ${n}/${total}: not killed (exit ${r.code}) ${r.stderr}`);
      return;
    }
    for (const p of await inspect(s, dir, hashes)) {
      failures.push(`kill before change ${n}/${total}: ${p}`);
    }
    await Deno.remove(dir, { recursive: true });
  });
  assertEquals(failures.sort(), [], `qimg ${s.args.join(" ")}`);
  return total;
}

/** mulberry32: the same delays in every run. */
function seeded(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Kills `s` from outside after `count` seeded random delays up to its measured run time. */
async function crashAtRandom(s: Scenario, count: number, seed: number): Promise<void> {
  await using tmp = await tempDir();
  const golden = `${tmp.path}/golden`;
  await Deno.mkdir(golden);
  const hashes = await prepare(s, golden);
  const whole = await fresh(golden, tmp.path, "whole");
  const t0 = performance.now();
  const done = await runQimg(s.args, whole);
  const elapsed = performance.now() - t0;
  assertEquals(done.code, 0, done.stderr);

  const random = seeded(seed);
  const failures: string[] = [];
  let killed = 0;
  for (let i = 0; i < count; i++) {
    const delay = Math.round(random() * elapsed);
    const dir = await fresh(golden, tmp.path, `random${i}`);
    const child = qimgCommand(s.args, dir).spawn();
    const timer = setTimeout(() => {
      try {
        child.kill("SIGKILL");
      } catch {
        // Already gone.
      }
    }, delay);
    const status = await child.status;
    clearTimeout(timer);
    if (status.signal === "SIGKILL") killed++;
    for (const p of await inspect(s, dir, hashes)) failures.push(`kill after ${delay} ms: ${p}`);
  }
  assertEquals(failures, [], `qimg ${s.args.join(" ")}`);
  // Delays spread over the run time: most of them land before the end.
  assertTrue(killed > 0, `no run was killed (run time ${elapsed} ms)`);
}

/** 41 runs of 20 KiB over 16 MiB: hundreds of clusters, each its own write. */
const SCATTERED = "qemu-img create -q -f raw src.raw 16M && " +
  'for i in $(seq 0 40); do echo "write -P $((i % 200 + 1)) $((i * 393216)) 20k"; done | ' +
  "qemu-io -f raw src.raw >/dev/null";

const CONVERT_RAW: Scenario = {
  // 512-byte clusters: refcount blocks and the refcount table grow as it goes.
  setup: SCATTERED,
  args: ["convert", "-O", "qcow2", "-o", "cluster_size=512", "src.raw", "dst.qcow2"],
  sources: ["src.raw"],
  images: ["dst.qcow2"],
};

/** A base and an overlay that changes 41 scattered runs of it, with the overlay's guest view. */
const CHAIN = "qemu-img create -q -f qcow2 -o cluster_size=4096 base.qcow2 8M && " +
  "qemu-io -c 'write -P 1 0 6M' base.qcow2 >/dev/null && " +
  "qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 top.qcow2 && " +
  'for i in $(seq 0 40); do echo "write -P $((i + 7)) $((i * 196608)) 8k"; done | ' +
  "qemu-io top.qcow2 >/dev/null && qemu-img convert -O raw top.qcow2 top.raw";

Deno.test("convert -O qcow2 killed at any file change leaves the source intact and the target without corruption", async () => {
  await crashEverywhere(CONVERT_RAW);
});

Deno.test("convert -B of an overlay killed at any file change leaves its chain intact and the target without corruption", async () => {
  await crashEverywhere({
    setup: CHAIN,
    args: [
      "convert",
      "-O",
      "qcow2",
      "-B",
      "base.qcow2",
      "-F",
      "qcow2",
      "-o",
      "cluster_size=4096",
      "top.qcow2",
      "dst.qcow2",
    ],
    sources: ["base.qcow2", "top.qcow2"],
    images: ["dst.qcow2"],
  });
});

Deno.test("convert -c killed at any file change leaves the source intact and the target without corruption", async () => {
  await crashEverywhere({
    setup: SCATTERED,
    args: ["convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", "src.raw", "dst.qcow2"],
    sources: ["src.raw"],
    images: ["dst.qcow2"],
  });
});

Deno.test("commit killed at any file change keeps the overlay's guest data and both images without corruption", async () => {
  await crashEverywhere({
    setup: CHAIN,
    args: ["commit", "top.qcow2"],
    sources: [],
    images: ["base.qcow2", "top.qcow2"],
    guest: { "top.qcow2": "top.raw" },
  });
});

Deno.test("snapshot -c killed at any file change keeps the image's data and any snapshot it wrote complete", async () => {
  await crashEverywhere({
    setup: CHAIN + " && qemu-img rebase -q -b '' top.qcow2 && qemu-img snapshot -c old top.qcow2",
    args: ["snapshot", "-c", "new", "top.qcow2"],
    sources: [],
    images: ["top.qcow2"],
    guest: { "top.qcow2": "top.raw" },
    extra: async (dir) => {
      // A snapshot that made it into the table holds the image's data.
      const list = await qemuImg(["snapshot", "-l", "top.qcow2"], dir);
      for (const name of ["old", "new"]) {
        if (name === "new" && !/\snew\s/.test(list.stdout)) continue;
        await sh(`qemu-img convert -l snapshot.name=${name} -O raw top.qcow2 ${name}.raw`, dir);
        const c = await qemuImg(
          ["compare", "-f", "raw", "-F", "raw", `${name}.raw`, "top.raw"],
          dir,
        );
        if (c.code !== 0) return `snapshot ${name} reads other data: ${c.stdout}`;
      }
      return undefined;
    },
  });
});

Deno.test("resize killed at any file change keeps the image's data and the image without corruption", async () => {
  // 512-byte clusters: 32 L1 entries grow to 4096, the L1 table moves.
  await crashEverywhere({
    setup: "qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 1M && " +
      "qemu-io -c 'write -P 3 0 1M' img.qcow2 >/dev/null && qemu-img convert -O raw img.qcow2 img.raw",
    args: ["resize", "img.qcow2", "128M"],
    sources: [],
    images: ["img.qcow2"],
    guest: { "img.qcow2": "img.raw" },
  });
});

Deno.test("convert -O qcow2 and commit killed after random delays leave sources intact and images without corruption", async () => {
  await crashAtRandom(
    {
      setup: "qemu-img create -q -f raw src.raw 32M && " +
        "qemu-io -f raw -c 'write -P 9 0 6M' -c 'write -P 10 12M 7M' src.raw >/dev/null",
      args: ["convert", "-O", "qcow2", "-o", "cluster_size=4096", "src.raw", "dst.qcow2"],
      sources: ["src.raw"],
      images: ["dst.qcow2"],
    },
    4,
    1,
  );
  await crashAtRandom(
    {
      setup: CHAIN,
      args: ["commit", "top.qcow2"],
      sources: [],
      images: ["base.qcow2", "top.qcow2"],
      guest: { "top.qcow2": "top.raw" },
    },
    4,
    2,
  );
});
