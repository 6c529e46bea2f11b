/**
 * The test task: makes sure Debian's qemu-img (the oracle) is installed,
 * runs the whole suite with `deno test`, and ends with the plain line
 * `N passed, M failed` that CI reads.
 *
 * Test files run in parallel. Tests run with `--no-check` so that one file's type error costs one
 * failure, not the whole run: tests/project_test.ts runs `deno check`
 * (and fmt, lint, doc lint) as tests of their own.
 */

/** Counts from deno test's last summary line, or null when there is none. */
export function parseSummary(text: string): { passed: number; failed: number } | null {
  // "ok | 12 passed (3 steps) | 0 failed | 2 ignored (1s)",
  // "FAILED | 1 passed | 2 failed (1 step) (84ms)".
  const re = /^(?:ok|FAILED) \| (\d+) passed(?: \(\d+ steps?\))? \| (\d+) failed/gm;
  let last: RegExpExecArray | null = null;
  for (let m = re.exec(text); m; m = re.exec(text)) last = m;
  return last ? { passed: Number(last[1]), failed: Number(last[2]) } : null;
}

async function has(cmd: string): Promise<boolean> {
  try {
    const r = await new Deno.Command("sh", {
      args: ["-c", `command -v ${cmd}`],
      stdout: "null",
      stderr: "null",
    }).output();
    return r.success;
  } catch {
    return false;
  }
}

async function ensureQemuImg(): Promise<void> {
  if (await has("qemu-img") && await has("qemu-io")) return;
  const isRoot = Deno.uid?.() === 0;
  if (!isRoot || !(await has("apt-get"))) {
    console.error(
      "qemu-img is needed for the oracle tests: install Debian's qemu-utils (sudo apt-get install qemu-utils) and run again.",
    );
    console.log("0 passed, 1 failed");
    Deno.exit(1);
  }
  console.error("Installing qemu-utils (the oracle for the tests)...");
  for (const args of [["update", "-qq"], ["install", "-y", "-qq", "qemu-utils"]]) {
    const r = await new Deno.Command("apt-get", {
      args,
      env: { DEBIAN_FRONTEND: "noninteractive" },
      stdin: "null",
      stdout: "null",
      stderr: "inherit",
    }).output();
    if (!r.success) {
      console.error(`apt-get ${args.join(" ")} failed; install qemu-utils by hand and run again.`);
      console.log("0 passed, 1 failed");
      Deno.exit(1);
    }
  }
}

async function main(): Promise<number> {
  await ensureQemuImg();
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "test",
      "--no-prompt",
      "--no-check",
      "--allow-read",
      "--allow-write",
      "--allow-run",
      "--allow-env",
      "--allow-ffi",
      "--allow-sys",
      "--doc",
      // Test files in parallel (DENO_JOBS, default: the core count): most of a test's time is
      // spent waiting on qemu-img and qimg subprocesses. QIMG_TEST_SERIAL=1 turns it off.
      ...(Deno.env.get("QIMG_TEST_SERIAL") === "1" || Deno.args.includes("--parallel")
        ? []
        : ["--parallel"]),
      ...Deno.args,
    ],
    env: { NO_COLOR: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();

  const decoder = new TextDecoder();
  let tail = "";
  const reader = child.stdout.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    await Deno.stdout.write(value);
    tail = (tail + decoder.decode(value, { stream: true })).slice(-8192);
  }
  const status = await child.status;
  const summary = parseSummary(tail);
  const passed = summary?.passed ?? 0;
  // No summary means deno test itself failed (bad flags, a config error): one failure.
  let failed = summary?.failed ?? 1;
  if (!status.success && failed === 0) failed = 1;
  if (passed === 0 && failed === 0) failed = 1;
  console.log(`${passed} passed, ${failed} failed`);
  return failed === 0 ? 0 : 1;
}

if (import.meta.main) Deno.exit(await main());
