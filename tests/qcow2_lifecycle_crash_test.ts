/**
 * Kills qimg (SIGKILL, src/file.ts's hook QIMG_CRASH_AFTER_WRITES) at
 * points spread over `resize --shrink`, `resize --preallocation`, `amend -o
 * refcount_bits` and `snapshot -a` (to another disk size): afterwards
 * Debian's `qemu-img check` finds leaks at worst, never corruption, and
 * the guest data the command does not change still reads back.
 */

import { assertEquals, assertTrue } from "./_assert.ts";
import { CLI, runProgram, sh, tempDir } from "./_util.ts";

const HOOK = "QIMG_CRASH_AFTER_WRITES";
/** Kill points per command. */
const POINTS = 8;

async function runHooked(args: string[], cwd: string, at: number) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-read",
      "--allow-write",
      "--allow-ffi",
      `--allow-env=QIMG_DEBUG,${HOOK}`,
      CLI,
      ...args,
    ],
    cwd,
    env: { [HOOK]: String(at) },
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).output();
  return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
}

/** Runs `args` on copies of the image `setup` makes, killed before each sampled change. */
async function crashEverywhere(setup: string, args: string[], reads: string[]): Promise<void> {
  await using dir = await tempDir();
  await sh(`${setup} && cp a.qcow2 golden.qcow2`, dir.path);
  const count = await runHooked(args, dir.path, 0);
  assertEquals(count.code, 0, count.stderr);
  const total = Number(/crash hook: (\d+) file changes/.exec(count.stderr)?.[1]);
  assertTrue(total > 0, count.stderr);
  const points = new Set<number>();
  for (let k = 0; k < POINTS; k++) points.add(1 + Math.floor(k * (total - 1) / (POINTS - 1)));
  for (const at of points) {
    await sh("cp golden.qcow2 a.qcow2", dir.path);
    const r = await runHooked(args, dir.path, at);
    const label = `${args.join(" ")} killed before change ${at} of ${total}`;
    assertTrue(r.code !== 0, `${label}: not killed`);
    const c = await runProgram("qemu-img", ["check", "a.qcow2"], dir.path);
    // 0: clean, 3: leaks only.
    assertTrue(c.code === 0 || c.code === 3, `${label}: ${c.stdout.slice(0, 400)}${c.stderr}`);
    const q = await runProgram("qemu-io", [
      ...reads.flatMap((x) => ["-c", `read -P ${x}`]),
      "a.qcow2",
    ], dir.path);
    assertTrue(!/fail|error/i.test(q.stdout + q.stderr), `${label}: ${q.stdout}`);
  }
}

const IMAGE = (o: string) =>
  `qemu-img create -q -f qcow2 -o ${o} a.qcow2 8M && ` +
  "qemu-io -c 'write -P 1 0 3M' -c 'write -P 2 5M 3M' a.qcow2 >/dev/null";

Deno.test("resize --shrink killed anywhere leaves leaks at worst", async () => {
  await crashEverywhere(IMAGE("cluster_size=4k"), ["resize", "--shrink", "a.qcow2", "2050k"], [
    "1 0 2M",
  ]);
});

Deno.test("resize --preallocation killed anywhere leaves leaks at worst", async () => {
  await crashEverywhere(IMAGE("cluster_size=4k"), [
    "resize",
    "--preallocation=falloc",
    "a.qcow2",
    "12M",
  ], [
    "1 0 3M",
    "2 5M 3M",
  ]);
});

Deno.test("amend -o refcount_bits killed anywhere leaves leaks at worst", async () => {
  await crashEverywhere(IMAGE("cluster_size=512"), ["amend", "-o", "refcount_bits=64", "a.qcow2"], [
    "1 0 3M",
    "2 5M 3M",
  ]);
});

Deno.test("snapshot -a of a snapshot of another size killed anywhere leaves leaks at worst", async () => {
  const setup = `${IMAGE("cluster_size=4k")} && qemu-img snapshot -c s a.qcow2 && ` +
    "qemu-io -c 'write -P 3 1M 6M' a.qcow2 >/dev/null && qemu-img resize -q a.qcow2 12M";
  await crashEverywhere(setup, ["snapshot", "-a", "s", "a.qcow2"], []);
});
