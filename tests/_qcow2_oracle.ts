/** Oracle helpers for qcow2 write tests: twin directories, qemu-img check/info, qemu-io patterns. */

import { assertEquals, assertTrue } from "./_assert.ts";
import { qemuImg, qimg, runProgram, sh, tempDir } from "./_util.ts";

/** Two twin directories prepared by `setup`. */
export async function twins(setup: string) {
  const ours = await tempDir();
  const theirs = await tempDir();
  await Promise.all([sh(setup, ours.path), sh(setup, theirs.path)]);
  return {
    ours: ours.path,
    theirs: theirs.path,
    async [Symbol.asyncDispose]() {
      await ours[Symbol.asyncDispose]();
      await theirs[Symbol.asyncDispose]();
    },
  };
}

/** `qemu-img info --output=json` without what may differ (disk use, paths). */
export async function info(path: string, cwd: string): Promise<unknown> {
  const r = await runProgram("qemu-img", ["info", "--output=json", path], cwd);
  assertEquals(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  delete j["actual-size"];
  delete j["disk-size"];
  delete j["dirty-flag"];
  for (const s of j.snapshots ?? []) {
    delete s["date-sec"];
    delete s["date-nsec"];
  }
  return j;
}

export async function assertClean(path: string, cwd: string): Promise<void> {
  const r = await runProgram("qemu-img", ["check", path], cwd);
  assertEquals(r.code, 0, `qemu-img check ${path}: ${r.stdout}${r.stderr}`);
  assertTrue(!/ERROR|[Ll]eaked/.test(r.stdout + r.stderr), r.stdout);
}

/** qemu-io `read -P` of each [pattern, offset, length] in `path`. */
export async function assertPatterns(path: string, cwd: string, reads: string[]): Promise<void> {
  if (!reads.length) return;
  const args = reads.flatMap((r) => ["-c", `read -P ${r}`]);
  const r = await runProgram("qemu-io", [...args, path], cwd);
  assertTrue(r.code === 0 && !/fail|error/i.test(r.stdout + r.stderr), `${path}: ${r.stdout}`);
}

/** One command run by qimg and qemu-img on twin inputs. */
export interface Case {
  setup: string;
  args: string[];
  /** The image the command changes. */
  image: string;
  /** qemu-io `read -P` arguments that hold afterwards. */
  reads?: string[];
  /** File size within this fraction of qemu-img's (default: equal). */
  sizeSlack?: number;
  /** The two files byte for byte the same (qemu-img's layout reproduced). */
  identical?: boolean;
}

/**
 * Runs `c.args` with qimg and qemu-img on twin inputs: the same output and
 * exit code; qimg's image clean, identical to qemu-img's, the same info,
 * the patterns read back, the file size within `sizeSlack`.
 */
export async function runBoth(c: Case): Promise<void> {
  await using d = await twins(c.setup);
  const label = c.args.join(" ");
  const a = await qimg(c.args, d.ours);
  const b = await qemuImg(c.args, d.theirs);
  assertEquals(a, b, label);
  await assertClean(c.image, d.ours);
  const cmp = await runProgram("qemu-img", ["compare", `${d.ours}/${c.image}`, c.image], d.theirs);
  assertEquals(cmp.code, 0, `${label}: ${cmp.stdout}`);
  assertEquals(await info(c.image, d.ours), await info(c.image, d.theirs), label);
  await assertPatterns(c.image, d.ours, c.reads ?? []);
  const so = (await Deno.stat(`${d.ours}/${c.image}`)).size;
  const st = (await Deno.stat(`${d.theirs}/${c.image}`)).size;
  assertTrue(Math.abs(so - st) <= st * (c.sizeSlack ?? 0), `${label}: file size ${so} vs ${st}`);
  if (c.identical) {
    const r = await runProgram("cmp", [`${d.ours}/${c.image}`, `${d.theirs}/${c.image}`]);
    assertEquals(r.code, 0, `${label}: ${r.stdout}`);
  }
}
