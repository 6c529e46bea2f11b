/** Shared test code: run qimg and Debian's qemu-img on the same input and compare. */

import { assertEquals } from "./_assert.ts";

const ROOT = new URL("..", import.meta.url).pathname;
/** The qimg entry point the tests run. */
export const CLI = ROOT + "cli.ts";

/** What a process printed and returned. */
export interface RunResult {
  stdout: string;
  stderr: string;
  code: number;
}

const decoder = new TextDecoder();

/** Runs a program to completion. */
export async function runProgram(cmd: string, args: string[], cwd?: string): Promise<RunResult> {
  const out = await new Deno.Command(cmd, {
    args,
    cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  return { stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr), code: out.code };
}

/**
 * The command line that runs qimg: `QIMG_RUNNER` (e.g. `node dist/qimg.mjs`)
 * selects another build; the default runs cli.ts with Deno.
 */
function qimgCommand(): [string, string[]] {
  const runner = Deno.env.get("QIMG_RUNNER");
  if (runner) {
    const [cmd, ...rest] = runner.split(" ");
    return [cmd, rest];
  }
  return [Deno.execPath(), [
    "run",
    "--no-prompt",
    "--allow-read",
    "--allow-write",
    "--allow-ffi",
    "--allow-env=QIMG_DEBUG",
    CLI,
  ]];
}

/**
 * Runs qimg with `args` in `cwd`; `runner` (e.g. `["node", "dist/qimg.mjs"]`)
 * picks another build for one call without touching the environment.
 */
export function qimg(args: string[], cwd?: string, runner?: string[]): Promise<RunResult> {
  const [cmd, pre] = runner ? [runner[0], runner.slice(1)] : qimgCommand();
  return runProgram(cmd, [...pre, ...args], cwd);
}

/** Runs Debian's qemu-img with `args` in `cwd`; its program name is shown as `qimg`. */
export async function qemuImg(args: string[], cwd?: string): Promise<RunResult> {
  const r = await runProgram("qemu-img", args, cwd);
  return {
    ...r,
    stdout: r.stdout.replaceAll("qemu-img", "qimg"),
    stderr: r.stderr.replaceAll("qemu-img", "qimg"),
  };
}

/** Runs a shell command for test setup; throws when it fails. */
export async function sh(script: string, cwd?: string): Promise<string> {
  const r = await runProgram("bash", ["-ec", script], cwd);
  if (r.code !== 0) throw new Error(`setup failed (${r.code}): ${script}\n${r.stderr}`);
  return r.stdout;
}

/** Runs qimg and qemu-img with the same arguments and asserts identical stdout, stderr and exit code. */
export async function assertSameAsQemu(
  args: string[],
  cwd?: string,
  runner?: string[],
): Promise<RunResult> {
  const ours = await qimg(args, cwd, runner);
  const theirs = await qemuImg(args, cwd);
  assertEquals(
    { stdout: ours.stdout, stderr: ours.stderr, code: ours.code },
    { stdout: theirs.stdout, stderr: theirs.stderr, code: theirs.code },
    `qimg ${args.join(" ")}`,
  );
  return ours;
}

/** A fresh temporary directory, removed when the returned object is disposed. */
export async function tempDir(): Promise<{ path: string } & AsyncDisposable> {
  const path = await Deno.makeTempDir({ prefix: "qimg-test-" });
  return {
    path,
    async [Symbol.asyncDispose]() {
      await Deno.remove(path, { recursive: true });
    },
  };
}

/** SHA-256 of a file, hex. */
export async function hashFile(path: string): Promise<string> {
  const data = await Deno.readFile(path);
  const digest = await crypto.subtle.digest("SHA-256", data);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Where the real images from other tools live (absent on some machines). */
export const SHARED_IMAGES = new URL("../../shared/images/", import.meta.url).pathname;

/** Whether ../shared/images is present. */
export function haveSharedImages(): boolean {
  try {
    return Deno.statSync(SHARED_IMAGES).isDirectory;
  } catch {
    return false;
  }
}
