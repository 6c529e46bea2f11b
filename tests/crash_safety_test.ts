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
const POINTS = Deno.env.get("QIMG_CRASH_POINTS") ?? "10";
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

/** The gist of a failed check: its first ERROR lines. */
function errorsOf(out: string): string {
  const lines = out.split("\n").filter((l) => /ERROR|errors were found|Could not/.test(l));
  return lines.slice(0, 4).join("\n") + (lines.length > 4 ? ` (+${lines.length - 4})` : "");
}

/**
 * Whether every error is a cluster with refcount 1 whose entry lacks the
 * COPIED flag. A new reference (snapshot -c) changes a refcount and the
 * entries' flags in different clusters, so a kill between the two writes
 * leaves either this or the reverse, whatever the order (qemu too). This
 * one is harmless: the next write to the cluster copies it needlessly,
 * and `check -r all` sets the flag. The reverse (COPIED with a refcount
 * above 1) would let a write overwrite a snapshot's data: never accepted.
 */
function onlyCopiedLag(out: string): boolean {
  const errors = out.split("\n").filter((l) => l.startsWith("ERROR"));
  const count = Number(/(\d+) errors were found/.exec(out)?.[1]);
  return errors.length === count && errors.every((l) => {
    const m = /^ERROR OFLAG_COPIED (?:data|L2) cluster: .*(?:l2|l1)_entry=([0-9a-f]+) refcount=1$/
      .exec(l);
    return m !== null && !(BigInt("0x" + m[1]) >> 63n);
  });
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
    const out = c.stdout + c.stderr;
    if (c.code === 0) continue;
    // Leaks are allowed; so is the one harmless mismatch qcow2 cannot avoid (below).
    const repair = c.code === 3 ? "leaks" : c.code === 2 && onlyCopiedLag(out) ? "all" : undefined;
    if (!repair) {
      bad.push(`qemu-img check ${f}: exit ${c.code}\n${errorsOf(out)}`);
      continue;
    }
    const r = await runQimg(["check", "-r", repair, f], dir);
    if (r.code !== 0) bad.push(`qimg check -r ${repair} ${f}: exit ${r.code}\n${r.stderr}`);
    const again = await qemuImg(["check", f], dir);
    if (again.code !== 0) {
      bad.push(
        `${f} after check -r ${repair}: exit ${again.code}\n${
          errorsOf(again.stdout + again.stderr)
        }`,
      );
    }
  }
  for (const [image, raw] of Object.entries(s.guest ?? {})) {
    const c = await qemuImg(["compare", image, raw], dir);
    if (c.code !== 0) bad.push(`${image} reads other data: ${(c.stdout + c.stderr).trim()}`);
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

/**
 * Which of the changes 1..total to kill before: POINTS spread evenly, plus
 * the first and last few, where files are created and commands end with
 * their header and table switches.
 */
function killPoints(total: number): number[] {
  const n = POINTS === "all" ? total : Math.min(total, Math.max(1, Number(POINTS)));
  const set = new Set<number>();
  for (let i = 0; i < n; i++) set.add(1 + Math.round(i * (total - 1) / Math.max(1, n - 1)));
  for (let i = 1; i <= Math.min(total, 3); i++) set.add(i);
  for (let i = Math.max(1, total - 5); i <= total; i++) set.add(i);
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
  failures.sort((a, b) => Number(/\d+/.exec(a)![0]) - Number(/\d+/.exec(b)![0]));
  assertEquals(failures, [], `qimg ${s.args.join(" ")}`);
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

/**
 * A base and an overlay (`opts` for both) that changes `runs` scattered runs
 * of it, with the overlay's guest view in top.raw.
 */
function chain(opts: string, runs = 41, extra = ""): string {
  return `qemu-img create -q -f qcow2 -o ${opts} base.qcow2 8M && ` +
    "qemu-io -c 'write -P 1 0 6M' base.qcow2 >/dev/null && " +
    `qemu-img create -q -f qcow2 -o ${opts} -b base.qcow2 -F qcow2 top.qcow2 ${extra} && ` +
    `for i in $(seq 0 ${runs - 1}); do echo "write -P $((i + 7)) $((i * 196608)) 8k"; done | ` +
    "qemu-io top.qcow2 >/dev/null && qemu-img convert -O raw top.qcow2 top.raw";
}

/** commit of top.qcow2 (made by `setup`) into base.qcow2. */
function commit(setup: string): Scenario {
  return {
    setup,
    args: ["commit", "top.qcow2"],
    sources: [],
    images: ["base.qcow2", "top.qcow2"],
    guest: { "top.qcow2": "top.raw" },
  };
}

Deno.test("convert -O qcow2 killed at any file change leaves the source intact and the target without corruption", async () => {
  // 512-byte clusters: refcount blocks are added as it goes. Also the case
  // that made create write the header last.
  await crashEverywhere({
    setup: SCATTERED,
    args: ["convert", "-O", "qcow2", "-o", "cluster_size=512", "src.raw", "dst.qcow2"],
    sources: ["src.raw"],
    images: ["dst.qcow2"],
  });
});

Deno.test("convert -B of an overlay killed at any file change leaves its chain intact and the target without corruption", async () => {
  await crashEverywhere({
    setup: chain("cluster_size=4096"),
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
  // The overlay is emptied in place (qemu's make_completely_empty layout).
  await crashEverywhere(commit(chain("cluster_size=4096")));
});

Deno.test("commit of a v2 overlay killed at any file change keeps its guest data and both images without corruption", async () => {
  // v2: emptied by discarding every cluster (was: clusters freed and punched
  // while the L2 table still mapped them).
  await crashEverywhere(commit(chain("cluster_size=4096,compat=0.10", 16)));
});

Deno.test("commit of a resized overlay killed at any file change keeps its guest data and both images without corruption", async () => {
  // The resize moved the overlay's L1 table: emptying moves it back to cluster 3.
  await crashEverywhere(
    commit(
      chain("cluster_size=512", 5, "1M") + " && qemu-img resize -q top.qcow2 8M && " +
        "qemu-io -c 'write -P 98 1M 200k' -c 'write -P 99 7M 64k' top.qcow2 >/dev/null && " +
        "qemu-img convert -O raw top.qcow2 top.raw",
    ),
  );
});

Deno.test("snapshot -c killed at any file change keeps the image's data and any snapshot it wrote complete", async () => {
  // 512-byte clusters: 96 L2 tables and 6144 data clusters gain a reference.
  await crashEverywhere({
    setup: "qemu-img create -q -f qcow2 -o cluster_size=512 top.qcow2 4M && " +
      "qemu-io -c 'write -P 3 0 3M' top.qcow2 >/dev/null && qemu-img snapshot -c old top.qcow2 && " +
      "qemu-io -c 'write -P 4 1M 64k' top.qcow2 >/dev/null && qemu-img convert -O raw top.qcow2 top.raw",
    args: ["snapshot", "-c", "new", "top.qcow2"],
    sources: [],
    images: ["top.qcow2"],
    guest: { "top.qcow2": "top.raw" },
    extra: async (dir) => {
      // A snapshot that made it into the table holds the data it was taken of.
      const list = await qemuImg(["snapshot", "-l", "top.qcow2"], dir);
      if (!/\sold\s/.test(list.stdout)) return "snapshot old is gone";
      if (!/\snew\s/.test(list.stdout)) return undefined;
      await sh("qemu-img convert -l snapshot.name=new -O raw top.qcow2 new.raw", dir);
      const c = await qemuImg(["compare", "-f", "raw", "-F", "raw", "new.raw", "top.raw"], dir);
      return c.code === 0 ? undefined : `snapshot new reads other data: ${c.stdout}`;
    },
  });
});

Deno.test("resize killed at any file change keeps the image's data and the image without corruption", async () => {
  // 512-byte clusters: the L1 table grows to 1024 clusters, which need new
  // refcount blocks (was: a block referenced before its own refcount was written).
  await crashEverywhere({
    setup: "qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 4M && " +
      "qemu-io -c 'write -P 3 0 3M' img.qcow2 >/dev/null && qemu-img convert -O raw img.qcow2 img.raw",
    args: ["resize", "img.qcow2", "2G"],
    sources: [],
    images: ["img.qcow2"],
    guest: { "img.qcow2": "img.raw" },
  });
});

Deno.test("resize --preallocation=metadata killed at any file change keeps the image's data and the image without corruption", async () => {
  // Was: L2 entries pointing past the end of the file until its last step.
  await crashEverywhere({
    setup: "qemu-img create -q -f qcow2 -o cluster_size=4096 img.qcow2 4M && " +
      "qemu-io -c 'write -P 3 0 3M' img.qcow2 >/dev/null && qemu-img convert -O raw img.qcow2 img.raw",
    args: ["resize", "--preallocation=metadata", "img.qcow2", "12M"],
    sources: [],
    images: ["img.qcow2"],
    guest: { "img.qcow2": "img.raw" },
  });
});

Deno.test("snapshot -d killed at any file change keeps the image's data and the image without corruption", async () => {
  // Was: COPIED set in shared L2 tables before their lowered refcounts were written.
  await crashEverywhere({
    setup: "qemu-img create -q -f qcow2 -o cluster_size=4096 img.qcow2 8M && " +
      "qemu-io -c 'write -P 3 0 6M' img.qcow2 >/dev/null && qemu-img snapshot -c a img.qcow2 && " +
      "qemu-io -c 'write -P 4 1M 1M' img.qcow2 >/dev/null && qemu-img convert -O raw img.qcow2 img.raw",
    args: ["snapshot", "-d", "a", "img.qcow2"],
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
  await crashAtRandom(commit(chain("cluster_size=4096")), 4, 2);
});

Deno.test("convert -n writing zeroes over data killed at any file change leaves the target without corruption", async () => {
  // Was: the lowered refcount of a cluster reached the disk before the L2
  // table that stopped pointing at it (refcount=0 reference=1 after a kill).
  await crashEverywhere({
    setup: "qemu-img create -q -f qcow2 n1.qcow2 8M && " +
      "qemu-io -c 'write -P 1 0 64k' -c 'write -P 1 7M 64k' -c 'write -P 1 3M 64k' n1.qcow2 >/dev/null && " +
      "qemu-img create -q -f raw s.raw 8M && " +
      "qemu-io -f raw -c 'write -P 2 1M 1M' -c 'write -P 3 5M 100k' s.raw >/dev/null",
    args: ["convert", "-n", "-O", "qcow2", "s.raw", "n1.qcow2"],
    sources: ["s.raw"],
    images: ["n1.qcow2"],
  });
});
