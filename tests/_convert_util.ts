/**
 * Shared code of the convert, dd and bench oracle tests: run qemu-img and
 * qimg side by side on the same inputs (each in its own output directory),
 * compare what they print, the images they write, and the inputs after.
 */

import { assertEquals, assertTrue } from "./_assert.ts";
import { hashFile, qemuImg, qimg, runProgram, type RunResult, sh } from "./_util.ts";

/** Where a side-by-side run happens: inputs in `dir`, outputs in `dir/q` (qemu-img) and `dir/o` (qimg). */
export interface Pair {
  dir: string;
  q: string;
  o: string;
}

/** Makes `dir/q` and `dir/o`, running `prepare` (a shell script) in each. */
export async function makePair(dir: string, prepare = ""): Promise<Pair> {
  const pair = { dir, q: `${dir}/q`, o: `${dir}/o` };
  await sh(`rm -rf q o && mkdir q o`, dir);
  if (prepare) {
    await sh(prepare, pair.q);
    await sh(prepare, pair.o);
  }
  return pair;
}

/** Hashes of every regular file directly in `dir`. */
export async function hashInputs(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for await (const e of Deno.readDir(dir)) {
    if (e.isFile) out[e.name] = await hashFile(`${dir}/${e.name}`);
  }
  return out;
}

async function stat(path: string): Promise<{ size: number; blocks: number } | null> {
  try {
    const s = await Deno.stat(path);
    return { size: s.size, blocks: s.blocks ?? -1 };
  } catch {
    return null;
  }
}

/** How to compare the outputs of one side-by-side run. */
export interface CompareOptions {
  /** Files written in the output directories to compare (`qemu-img compare`, size, allocation). */
  outputs?: string[];
  /** Compare the output files byte for byte too (raw outputs). */
  exact?: boolean;
  /** Rewrites printed text before comparing (bench's timing). */
  mask?: (text: string) => string;
}

/**
 * Runs `qemu-img <args>` in `pair.q` and `qimg <args>` in `pair.o`; asserts
 * the same stdout, stderr and exit code, the same output images (content,
 * size, allocated blocks) and unchanged inputs in `pair.dir`.
 */
export async function assertSameRun(
  pair: Pair,
  args: string[],
  options: CompareOptions = {},
): Promise<RunResult> {
  const before = await hashInputs(pair.dir);
  const theirs = await qemuImg(args, pair.q);
  const ours = await qimg(args, pair.o);
  const mask = options.mask ?? ((t: string) => t);
  assertEquals(
    { stdout: mask(ours.stdout), stderr: mask(ours.stderr), code: ours.code },
    { stdout: mask(theirs.stdout), stderr: mask(theirs.stderr), code: theirs.code },
    `qimg ${args.join(" ")}`,
  );
  for (const name of options.outputs ?? []) {
    const sq = await stat(`${pair.q}/${name}`);
    const so = await stat(`${pair.o}/${name}`);
    assertEquals(so === null, sq === null, `${name} exists after qimg ${args.join(" ")}`);
    if (!sq || !so) continue;
    assertEquals(so.size, sq.size, `size of ${name} after qimg ${args.join(" ")}`);
    // st_blocks also counts the file system's own extent-tree blocks, which
    // depend on where the data landed on disk: allow two of those (8 sectors each).
    assertTrue(
      Math.abs(so.blocks - sq.blocks) <= 16,
      `allocated blocks of ${name} after qimg ${
        args.join(" ")
      }: ${so.blocks}, qemu-img ${sq.blocks}`,
    );
    const cmp = await runProgram("qemu-img", ["compare", `${pair.q}/${name}`, `${pair.o}/${name}`]);
    assertEquals(cmp.code, 0, `qemu-img compare ${name}: ${cmp.stdout}${cmp.stderr}`);
    if (options.exact) {
      // The allocated ranges themselves must match exactly.
      const map = async (d: string) =>
        (await runProgram("qemu-img", ["map", "--output=json", "-f", "raw", `${d}/${name}`]))
          .stdout;
      assertEquals(await map(pair.o), await map(pair.q), `allocated ranges of ${name}`);
      assertEquals(
        await hashFile(`${pair.o}/${name}`),
        await hashFile(`${pair.q}/${name}`),
        `bytes of ${name}`,
      );
    }
  }
  assertEquals(await hashInputs(pair.dir), before, `inputs unchanged by ${args.join(" ")}`);
  return ours;
}

/** Whether a program is installed (the memory and read-count tests need /usr/bin/time and strace). */
export function installed(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

/** /usr/bin/time and strace are both there. */
export const CAN_TRACE = installed("/usr/bin/time") && installed("/usr/bin/strace");
