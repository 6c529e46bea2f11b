/**
 * The test task: makes sure Debian's qemu-img (the oracle) is installed,
 * runs the whole suite with `deno test`, and ends with the plain line
 * `N passed, M failed` that CI reads.
 */

const decoder = new TextDecoder();

async function has(cmd: string): Promise<boolean> {
  try {
    const r = await new Deno.Command("sh", {
      args: ["-c", `command -v ${cmd}`],
      stdout: "null",
      stderr: "null",
    })
      .output();
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
    Deno.exit(1);
  }
  console.error("Installing qemu-utils (the oracle for the tests)...");
  for (const args of [["update", "-qq"], ["install", "-y", "-qq", "qemu-utils"]]) {
    const r = await new Deno.Command("apt-get", {
      args,
      env: { DEBIAN_FRONTEND: "noninteractive" },
      stdout: "null",
      stderr: "inherit",
    }).output();
    if (!r.success) {
      console.error(`apt-get ${args.join(" ")} failed; install qemu-utils by hand and run again.`);
      Deno.exit(1);
    }
  }
}

await ensureQemuImg();

const child = new Deno.Command(Deno.execPath(), {
  args: [
    "test",
    "--no-prompt",
    "--allow-read",
    "--allow-write",
    "--allow-run",
    "--allow-env",
    "--allow-ffi",
    "--doc",
    ...Deno.args,
  ],
  env: { NO_COLOR: "1" },
  stdout: "piped",
  stderr: "inherit",
}).spawn();

let tail = "";
const reader = child.stdout.getReader();
for (;;) {
  const { value, done } = await reader.read();
  if (done) break;
  await Deno.stdout.write(value);
  tail = (tail + decoder.decode(value, { stream: true })).slice(-4096);
}
const status = await child.status;
// Deno's summary: "ok | 12 passed (3 steps) | 0 failed | 1 ignored (1s)".
const m = /(\d+) passed(?: \(\d+ steps?\))? \| (\d+) failed/.exec(tail);
const passed = m ? Number(m[1]) : 0;
const failed = m ? Number(m[2]) : (status.success ? 0 : 1);
console.log(`${passed} passed, ${failed} failed`);
Deno.exit(status.success && failed === 0 && passed > 0 ? 0 : 1);
