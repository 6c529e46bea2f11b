/**
 * What commit and safe rebase read and write, counted per file in-process:
 * qemu-img's results (byte for byte) with only the I/O that can change them.
 */

import { assertEquals, assertTrue } from "./_assert.ts";
import { hashFile, qemuImg, sh, tempDir } from "./_util.ts";
import { main } from "../src/command.ts";
import type { Io } from "../src/command.ts";
import { type BlockFile, DenoFile } from "../src/file.ts";

/** Bytes read and write requests per file name and mode ("name r" / "name w"). */
type Counts = Map<string, { readBytes: number; writes: number }>;

/** Runs `qimg args` in this process with every file's reads and writes counted. */
async function countedRun(args: string[]): Promise<{ code: number; counts: Counts }> {
  const counts: Counts = new Map();
  const io: Io = {
    stdout: () => {},
    stderr: () => {},
    openFile: async (path, options) => {
      const file = await DenoFile.open(path, options);
      const key = `${path.split("/").at(-1)} ${options.write ? "w" : "r"}`;
      const c = counts.get(key) ?? { readBytes: 0, writes: 0 };
      counts.set(key, c);
      return new Proxy(file, {
        get(target, prop) {
          if (prop === "read") {
            return (offset: number, buf: Uint8Array) => {
              c.readBytes += buf.length;
              return target.read(offset, buf);
            };
          }
          if (prop === "write") {
            return (offset: number, data: Uint8Array) => {
              c.writes++;
              return target.write(offset, data);
            };
          }
          // Reads must pass through read() to be counted.
          if (prop === "view" || prop === "writeConcurrent") return undefined;
          const value = Reflect.get(target, prop);
          return typeof value === "function" ? value.bind(target) : value;
        },
      }) as BlockFile;
    },
  };
  const code = await main(args, io);
  return { code, counts };
}

const MIB = 1 << 20;

/** Runs qemu-img in q/ and qimg (counted) in m/ and compares the files byte for byte. */
async function sameAsQemu(dir: string, args: string[], files: string[]): Promise<Counts> {
  const theirs = await qemuImg(args, `${dir}/q`);
  assertEquals(theirs.code, 0, theirs.stderr);
  const m = `${dir}/m`;
  // The image by its full path; backing names stay as given (relative to it).
  const ours = await countedRun([...args.slice(0, -1), `${m}/${args.at(-1)}`]);
  assertEquals(ours.code, 0);
  for (const f of files) {
    assertEquals(await hashFile(`${m}/${f}`), await hashFile(`${dir}/q/${f}`), f);
  }
  const check = await qemuImg(["check", `${m}/${files[0]}`]);
  assertEquals(check.code, 0, check.stdout + check.stderr);
  return ours.counts;
}

/** Makes q/ with `script` run in it, and m/ as a copy. */
async function images(script: string) {
  const dir = await tempDir();
  await sh(`mkdir q && cd q && ${script} && cd .. && cp -r q m`, dir.path);
  return dir;
}

const QIO = (file: string, cmds: string) => `qemu-io -f qcow2 ${cmds} ${file} >/dev/null`;

Deno.test("rebase reads only where the old and the new backing chains can differ", async () => {
  // new.qcow2 is an overlay of the old backing file: only its own 1 MiB can differ.
  await using dir = await images(
    "qemu-img create -q -f qcow2 base.qcow2 64M && " +
      QIO("base.qcow2", "-c 'write -P 1 0 8M' -c 'write -P 2 32M 8M'") + " && " +
      "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 new.qcow2 && " +
      QIO("new.qcow2", "-c 'write -P 3 1M 1M' -c 'write -z 34M 64k'") + " && " +
      "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 && " +
      QIO("top.qcow2", "-c 'write -P 4 1536k 64k' -c 'write -P 5 40M 64k'"),
  );
  const counts = await sameAsQemu(
    dir.path,
    ["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
    ["top.qcow2", "new.qcow2", "base.qcow2"],
  );
  // Both chains' reads of base.qcow2: its 16 MiB of data twice without the
  // shared layer; now the 1 MiB + 64 KiB under new.qcow2's data and metadata.
  const base = counts.get("base.qcow2 r")!.readBytes;
  assertTrue(base < 2 * MIB, `read ${base} bytes of base.qcow2`);
});

Deno.test("rebase without a shared layer or onto nothing matches qemu-img byte for byte", async () => {
  const setup = "qemu-img create -q -f qcow2 base.qcow2 8M && " +
    QIO("base.qcow2", "-c 'write -P 1 0 1M' -c 'write -z 2M 1M' -c 'write -P 0 4M 64k'") + " && " +
    "qemu-img create -q -f qcow2 other.qcow2 6M && " +
    QIO("other.qcow2", "-c 'write -P 1 0 512k' -c 'write -P 6 5M 64k'") + " && " +
    "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 && " +
    QIO("mid.qcow2", "-c 'write -P 7 3M 64k'") + " && " +
    "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 && " +
    QIO("top.qcow2", "-c 'write -P 4 100k 3k'");
  for (
    const args of [
      ["rebase", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
      ["rebase", "-b", "", "top.qcow2"],
      // The new backing file in the old chain; then a shorter one sharing base.qcow2.
      ["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
      ["rebase", "-b", "short.qcow2", "-F", "qcow2", "top.qcow2"],
    ]
  ) {
    await using dir = await images(
      setup + " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 short.qcow2 5M",
    );
    await sameAsQemu(dir.path, args, ["top.qcow2"]);
  }
});

Deno.test("commit asks only the overlay and writes host-contiguous clusters at once", async () => {
  // base.qcow2 has data in each of its eight L2 tables' ranges; the overlay
  // overwrites 2 MiB of allocated base clusters and allocates 1 MiB more.
  const writes = Array.from({ length: 8 }, (_, i) => `-c 'write -P ${i + 1} ${i * 512}M 4M'`);
  await using dir = await images(
    "qemu-img create -q -f qcow2 base.qcow2 4G && " + QIO("base.qcow2", writes.join(" ")) +
      " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 && " +
      QIO("top.qcow2", "-c 'write -P 9 1M 2M' -c 'write -P 10 8M 1M'"),
  );
  const counts = await sameAsQemu(dir.path, ["commit", "top.qcow2"], ["top.qcow2", "base.qcow2"]);
  // The chain's read-only base.qcow2 answers no block status: header and L1 only.
  const asked = counts.get("base.qcow2 r")!.readBytes;
  assertTrue(asked < 4 * 65536, `read ${asked} bytes of base.qcow2 through the chain`);
  // 2 MiB in place in one request (not 32), 1 MiB fresh, then metadata.
  const written = counts.get("base.qcow2 w")!.writes;
  assertTrue(written <= 8, `${written} writes to base.qcow2`);
});
