import { assertEquals, assertRejects } from "./_assert.ts";
import { assertSameAsQemu, hashFile, qemuImg, qimg, sh, tempDir } from "./_util.ts";
import { checkToJson, fixed2, renderCheckHuman, run } from "../src/cmd_check.ts";
import type { CheckResult, FormatDriver, FormatImage } from "../src/driver.ts";
import type { Io } from "../src/command.ts";
import { type BlockFile, DenoFile } from "../src/file.ts";
import { FORMATS } from "../src/formats.ts";
import { openImageChain } from "../src/image.ts";
import { toJsonPretty } from "../src/output.ts";

Deno.test("check reports raw images as unchecked (exit 63), human and json", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f raw a.raw 1M && truncate -s 0 empty", dir.path);
  for (
    const args of [
      ["a.raw"],
      ["--output=json", "a.raw"],
      ["-f", "raw", "--output", "human", "a.raw"],
      ["-q", "a.raw"],
      ["empty"],
      ["-r", "leaks", "a.raw"],
      ["-r", "all", "-f", "raw", "a.raw"],
      ["--repair=leaks", "-T", "none", "a.raw"],
      ["-U", "a.raw"],
      ["--image-opts", "driver=raw,file.filename=a.raw"],
    ]
  ) await assertSameAsQemu(["check", ...args], dir.path);
});

Deno.test("check refuses bad input with qemu-img's messages and exit codes", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f raw a.raw 1M && mkdir sub", dir.path);
  for (
    const args of [
      [],
      ["a.raw", "a.raw"],
      ["nofile"],
      ["sub"],
      ["-r"],
      ["-r", "bogus", "a.raw"],
      ["--repair=bogus", "a.raw"],
      ["-r", "bogus", "nofile"],
      ["--output=xml", "a.raw"],
      ["--output=xml", "nofile"],
      ["--output=xml"],
      ["--output=xml", "-r", "bogus", "a.raw"],
      ["--output=xml", "-T", "bogus", "a.raw"],
      ["-T", "bogus", "a.raw"],
      ["-x", "a.raw"],
      ["--bogus", "a.raw"],
      ["-f", "qcow2", "a.raw"],
      ["-f", "nosuch", "a.raw"],
      ["-U", "-r", "leaks", "a.raw"],
      ["--object", "bogus", "a.raw"],
    ]
  ) await assertSameAsQemu(["check", ...args], dir.path);
});

Deno.test("check leaves its input unmodified without -r", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f raw a.raw 1M", dir.path);
  const before = await hashFile(`${dir.path}/a.raw`);
  assertEquals((await qimg(["check", "a.raw"], dir.path)).code, 63);
  assertEquals(await hashFile(`${dir.path}/a.raw`), before);
});

/** qcow2 images with nothing wrong, two leaked clusters, and a corruption (refcount 0 of a used cluster). */
const QCOW2_SETUP =
  "qemu-img create -q -f qcow2 ok.qcow2 1M && qemu-io -c 'write 0 64k' ok.qcow2 >/dev/null && " +
  "qemu-img create -q -f qcow2 fresh.qcow2 1M && " +
  "cp ok.qcow2 leak.qcow2 && printf '\\0\\0\\0\\0\\0\\0\\0\\0' | dd of=leak.qcow2 bs=1 seek=$((0x30000)) conv=notrunc 2>/dev/null && " +
  "cp leak.qcow2 fix.qcow2 && cp ok.qcow2 bad.qcow2 && " +
  "printf '\\0\\0' | dd of=bad.qcow2 bs=1 seek=$((0x20000+10)) conv=notrunc 2>/dev/null";

/** Turns qemu-img's JSON check report back into the CheckResult it was rendered from. */
function fromQemuJson(text: string): CheckResult {
  const j = JSON.parse(text);
  return {
    corruptions: j["corruptions"] ?? 0,
    leaks: j["leaks"] ?? 0,
    checkErrors: j["check-errors"],
    corruptionsFixed: j["corruptions-fixed"] ?? 0,
    leaksFixed: j["leaks-fixed"] ?? 0,
    imageEndOffset: j["image-end-offset"],
    totalClusters: j["total-clusters"],
    allocatedClusters: j["allocated-clusters"],
    fragmentedClusters: j["fragmented-clusters"],
    compressedClusters: j["compressed-clusters"],
    messages: [],
  };
}

Deno.test("renderCheckHuman() and checkToJson() print qemu-img's reports", async () => {
  await using dir = await tempDir();
  await sh(QCOW2_SETUP + " && qemu-img convert -c -O qcow2 ok.qcow2 comp.qcow2", dir.path);
  for (const name of ["ok.qcow2", "fresh.qcow2", "leak.qcow2", "bad.qcow2", "comp.qcow2"]) {
    const json = await qemuImg(["check", "--output=json", name], dir.path);
    const human = await qemuImg(["check", name], dir.path);
    const result = fromQemuJson(json.stdout);
    assertEquals(renderCheckHuman(result), human.stdout, name);
    assertEquals(toJsonPretty(checkToJson(result, name, "qcow2")) + "\n", json.stdout, name);
  }
  // The repaired report: fixed counts from the first pass, the rest from the second.
  const fixed = await qemuImg(["check", "-r", "all", "--output=json", "fix.qcow2"], dir.path);
  const result = fromQemuJson(fixed.stdout);
  assertEquals(result.leaksFixed, 2);
  assertEquals(toJsonPretty(checkToJson(result, "fix.qcow2", "qcow2")) + "\n", fixed.stdout);
});

Deno.test("fixed2() rounds as C's %0.2f on the exact double", () => {
  assertEquals(
    [0, 6.25, 0.125, 0.375, 1e-7, 0.005, 0.015, 99.995, 100, 200 / 3, 12.345].map(fixed2),
    ["0.00", "6.25", "0.12", "0.38", "0.00", "0.01", "0.01", "100.00", "100.00", "66.67", "12.35"],
  );
});

/** Whether the qcow2 driver can check images yet (its check lands separately). */
async function qcow2CanCheck(): Promise<boolean> {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f qcow2 a.qcow2 1M", dir.path);
  const image = await openImageChain(`${dir.path}/a.qcow2`);
  try {
    return image.chain[0].image.check !== undefined;
  } finally {
    await image.close();
  }
}

Deno.test({
  name: "check renders qcow2 results as qemu-img",
  ignore: !(await qcow2CanCheck()),
  fn: async () => {
    await using dir = await tempDir();
    await sh(QCOW2_SETUP, dir.path);
    for (
      const args of [
        ["ok.qcow2"],
        ["--output=json", "ok.qcow2"],
        ["leak.qcow2"],
        ["--output=json", "leak.qcow2"],
        ["bad.qcow2"],
        ["--output=json", "bad.qcow2"],
        ["-q", "bad.qcow2"],
        ["-U", "ok.qcow2"],
      ]
    ) await assertSameAsQemu(["check", ...args], dir.path);
  },
});

/** Whether qimg's qcow2 check can repair yet (the repair lands after the check). */
async function qcow2CanRepair(): Promise<boolean> {
  if (!(await qcow2CanCheck())) return false;
  await using dir = await tempDir();
  await sh(QCOW2_SETUP, dir.path);
  const r = await qimg(["check", "-q", "-r", "leaks", "leak.qcow2"], dir.path);
  return !r.stderr.includes("not supported yet");
}

Deno.test({
  name: "check -r repairs qcow2 leaks and reports the re-check as qemu-img",
  ignore: !(await qcow2CanRepair()),
  fn: async () => {
    await using dir = await tempDir();
    // Each program repairs its own copy, under the same name (the JSON report names it).
    await sh(QCOW2_SETUP + " && cp leak.qcow2 fix2.qcow2 && mkdir q && cp fix*.qcow2 q/", dir.path);
    for (
      const args of [["-r", "leaks", "fix.qcow2"], ["-r", "all", "--output=json", "fix2.qcow2"]]
    ) {
      const ours = await qimg(["check", ...args], dir.path);
      const theirs = await qemuImg(["check", ...args], `${dir.path}/q`);
      assertEquals([ours.stdout, ours.stderr, ours.code], [
        theirs.stdout,
        theirs.stderr,
        theirs.code,
      ]);
    }
    // Both repaired the same way: the files match byte for byte.
    await sh(
      "cp leak.qcow2 q1.qcow2 && cp leak.qcow2 q2.qcow2 && qemu-img check -q -r leaks q1.qcow2",
      dir.path,
    );
    assertEquals((await qimg(["check", "-q", "-r", "leaks", "q2.qcow2"], dir.path)).code, 0);
    assertEquals(await hashFile(`${dir.path}/q2.qcow2`), await hashFile(`${dir.path}/q1.qcow2`));
  },
});

/** Captures what a command writes; relative paths open in `cwd`, as for a process there. */
function captureIo(cwd: string): Io & { out: string; err: string } {
  const io = {
    out: "",
    err: "",
    stdout(text: string) {
      io.out += text;
    },
    stderr(text: string) {
      io.err += text;
    },
    openFile: (path: string, options: { write?: boolean }) =>
      DenoFile.open(path.startsWith("/") ? path : `${cwd}/${path}`, options),
  };
  return io;
}

/**
 * A format whose check replays qemu's two passes over a leaking qcow2
 * image repaired with -r: the repair pass, then the clean re-check.
 */
function replayDriver(passes: CheckResult[]): FormatDriver {
  return {
    name: "replay",
    open(file: BlockFile): Promise<FormatImage> {
      return Promise.resolve({
        size: 1 << 20,
        file,
        read: (_offset: number, buf: Uint8Array) => Promise.resolve(void buf.fill(0)),
        blockStatus: (_offset: number, length: number) =>
          Promise.resolve({ length, data: false, zero: true }),
        info: () => Promise.resolve({}),
        flush: () => Promise.resolve(),
        close: () => file.close(),
        check: () => Promise.resolve(passes.shift()!),
      });
    },
  };
}

Deno.test("check reports a repair and the re-check as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(QCOW2_SETUP + " && cp leak.qcow2 fix2.qcow2", dir.path);
  for (const output of ["human", "json"]) {
    const name = output === "human" ? "fix.qcow2" : "fix2.qcow2";
    const theirs = await qemuImg(["check", "-r", "leaks", `--output=${output}`, name], dir.path);
    // The driver's own progress lines (qcow2's "Leaked cluster ..."), replayed.
    const repair = {
      ...fromQemuJson('{"check-errors": 0, "leaks-fixed": 2}'),
      messages: theirs.stderr.trimEnd().split("\n"),
    };
    const recheck = fromQemuJson(
      '{"check-errors": 0, "image-end-offset": 262144, "total-clusters": 16}',
    );
    const driver = replayDriver([repair, recheck]);
    const entry = { name: driver.name, load: () => Promise.resolve(driver) };
    FORMATS.push(entry);
    try {
      const io = captureIo(dir.path);
      const code = await run(["-f", "replay", "-r", "leaks", `--output=${output}`, name], io);
      assertEquals(
        // The stand-in driver's name is the only difference allowed.
        { stdout: io.out.replace('"replay"', '"qcow2"'), stderr: io.err, code },
        { stdout: theirs.stdout, stderr: theirs.stderr, code: theirs.code },
      );
    } finally {
      FORMATS.splice(FORMATS.indexOf(entry), 1);
    }
  }
});

Deno.test("check prints the report, then fails with exit 1 on internal check errors", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f raw a.raw 1M", dir.path);
  const driver = replayDriver([{ ...fromQemuJson('{"check-errors": 3}'), messages: [] }]);
  const entry = { name: driver.name, load: () => Promise.resolve(driver) };
  FORMATS.push(entry);
  try {
    const io = captureIo(dir.path);
    await assertRejects(() => run(["-f", "replay", "a.raw"], io), /^QimgError: Check failed$/);
    assertEquals(io.out, "\n3 internal errors have occurred during the check.\n");
  } finally {
    FORMATS.splice(FORMATS.indexOf(entry), 1);
  }
});
