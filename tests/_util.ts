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

/** qemu-io writes that give a 10 MiB image data at four places, two of them unaligned. */
export const GUEST_WRITES = "-c 'write -P 0x11 0 64k' -c 'write -P 0x22 3M 4k' " +
  "-c 'write -P 0x33 5M 2M' -c 'write -P 0x44 9M 512'";

/**
 * Asserts info, map and check (human and JSON) print what qemu-img prints
 * for `name`, and that `convert -O raw` gives qemu-img's bytes; `fmt` (e.g.
 * `["-f", "vpc"]`) goes to every command.
 */
export async function assertReadsLikeQemu(
  cwd: string,
  name: string,
  fmt: string[] = [],
): Promise<void> {
  for (const cmd of ["info", "map", "check"]) {
    await assertSameAsQemu([cmd, ...fmt, name], cwd);
    await assertSameAsQemu([cmd, ...fmt, "--output=json", name], cwd);
  }
  await sh(`qemu-img convert ${fmt.join(" ")} -O raw '${name}' '${name}.want'`, cwd);
  const r = await qimg(["convert", ...fmt, "-O", "raw", name, `${name}.got`], cwd);
  assertEquals(r.code, 0, r.stderr);
  assertEquals(await hashFile(`${cwd}/${name}.got`), await hashFile(`${cwd}/${name}.want`));
  await Deno.remove(`${cwd}/${name}.want`);
  await Deno.remove(`${cwd}/${name}.got`);
}

/** The 4 bytes of `n` (an unsigned 32-bit number), little-endian. */
export function le32(n: number): number[] {
  return [n & 255, (n >>> 8) & 255, (n >>> 16) & 255, n >>> 24];
}

/** The 8 bytes of `n`, little-endian. */
export function le64(n: bigint): number[] {
  return [...le32(Number(n & 0xffffffffn)), ...le32(Number((n >> 32n) & 0xffffffffn))];
}

/** The 4 bytes of `n`, big-endian. */
export function be32(n: number): number[] {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255];
}

/** The 8 bytes of `n`, big-endian. */
export function be64(n: bigint): number[] {
  return [...be32(Number((n >> 32n) & 0xffffffffn)), ...be32(Number(n & 0xffffffffn))];
}

/**
 * Makes `c.qcow2` in `dir`: 1 MiB of text compressed by qemu-img, its first
 * compressed cluster's deflate stream corrupted, so reading it fails (EIO).
 */
export async function brokenCompressedQcow2(dir: string): Promise<void> {
  await sh(
    "seq 1 100000 > s.raw && truncate -s 1M s.raw && qemu-img convert -c -O qcow2 s.raw c.qcow2",
    dir,
  );
  const b = await Deno.readFile(`${dir}/c.qcow2`);
  const view = new DataView(b.buffer);
  const l2 = Number(view.getBigUint64(Number(view.getBigUint64(40))) & 0x00fffffffffffe00n);
  // 64 KiB clusters: the compressed data's host offset is in bits 0-53.
  const data = Number(view.getBigUint64(l2) & ((1n << 54n) - 1n));
  for (let i = data + 10; i < data + 60; i++) b[i] ^= 0x5a;
  await Deno.writeFile(`${dir}/c.qcow2`, b);
}
