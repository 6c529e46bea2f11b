/**
 * The fast paths of the copy engine: data mapped from host files instead of
 * read (DenoFile.view), pwrite through libc, and convert's cache=unsafe
 * target that never syncs. Each needs the ffi permission (granted to tests
 * by `deno test -A`, as to the CLI); without it the ordinary paths run.
 */

import { DenoFile } from "../src/file.ts";
import { convert, type CopyTarget, type SourceImage } from "../src/convert.ts";
import { assertEquals, assertTrue } from "./_assert.ts";
import { qemuImg, qimg, runProgram, sh, tempDir } from "./_util.ts";

const MIB = 1 << 20;
const ffi = (await Deno.permissions.query({ name: "ffi" })).state === "granted" &&
  Deno.build.os === "linux";

Deno.test({
  name: "DenoFile.view() maps the bytes read() returns, and nothing past the end",
  ignore: !ffi,
  async fn() {
    await using dir = await tempDir();
    await sh("head -c 3000000 /dev/urandom > f", dir.path);
    const f = await DenoFile.open(`${dir.path}/f`);
    try {
      // An offset inside a page: the view starts exactly there.
      const want = new Uint8Array(MIB);
      await f.read(12345, want);
      const v = await f.view!(12345, MIB);
      assertTrue(v !== undefined, "mapped");
      assertEquals(v!.bytes.length, MIB);
      assertTrue(v!.bytes.every((b, i) => b === want[i]), "same bytes as read()");
      v!.release();
      v!.release(); // a second release is harmless
      assertEquals(await f.view!(3000000 - 10, 11), undefined, "past the end of the file");
      assertEquals(await f.view!(0, 0), undefined);
    } finally {
      await f.close();
    }
  },
});

Deno.test({
  name: "DenoFile.write() and view() keep to the file opened when its path is replaced",
  ignore: !ffi,
  async fn() {
    await using dir = await tempDir();
    await sh("head -c 65536 /dev/zero > a && head -c 65536 /dev/zero | tr '\\0' x > b", dir.path);
    const f = await DenoFile.open(`${dir.path}/a`, { write: true });
    try {
      // The libc descriptor opens by path on first use: after this rename it
      // would be b's, so the inode check must keep I/O on Deno's handle.
      await Deno.rename(`${dir.path}/b`, `${dir.path}/a`);
      await f.write(0, new Uint8Array(2 * MIB).fill(7));
      assertEquals(await f.view!(0, 4096), undefined, "no view of another file");
      const back = new Uint8Array(4);
      await f.read(2 * MIB - 4, back);
      assertEquals([...back], [7, 7, 7, 7]);
    } finally {
      await f.close();
    }
    assertEquals((await Deno.stat(`${dir.path}/a`)).size, 65536, "the new file is untouched");
  },
});

Deno.test({
  name: "DenoFile.writeConcurrent() (pwrite on another thread) lands at every offset",
  ignore: !ffi,
  async fn() {
    await using dir = await tempDir();
    const f = await DenoFile.open(`${dir.path}/f`, { create: true, write: true });
    try {
      const big = new Uint8Array(3 * MIB + 5).map((_, i) => (i * 7) & 0xff);
      await Promise.all([
        f.writeConcurrent(513, big),
        f.writeConcurrent(16 * MIB, big.subarray(0, MIB)),
      ]);
      const back = new Uint8Array(big.length);
      assertEquals(await f.read(513, back), big.length);
      assertTrue(back.every((b, i) => b === big[i]), "bytes as written");
      assertEquals(await f.size(), 17 * MIB);
    } finally {
      await f.close();
    }
  },
});

/** A source whose data lies in a host file as it is, and whose read() fails: only a mapping can copy it. */
function mappedOnlySource(file: DenoFile, size: number): SourceImage {
  return {
    size,
    chain: [0],
    read: () => Promise.reject(new Error("read() called: data was not mapped")),
    blockStatus: (offset, length) =>
      Promise.resolve({
        length: Math.min(length, size - offset),
        data: true,
        zero: false,
        present: true,
        depth: 0,
        hostOffset: offset,
        file: file.name,
      }),
    formatInfo: () => Promise.resolve({}),
    plainFile: (_depth, name) => name === file.name ? file : undefined,
  };
}

Deno.test({
  name: "convert() maps data a source holds as it is in a host file instead of reading it",
  ignore: !ffi,
  async fn() {
    await using dir = await tempDir();
    // 5 MiB: random, then 1 MiB of zeroes inside, so zero detection still splits the writes.
    await sh(
      "head -c 5242880 /dev/urandom > src && " +
        "dd if=/dev/zero of=src bs=1M seek=2 count=1 conv=notrunc status=none",
      dir.path,
    );
    const file = await DenoFile.open(`${dir.path}/src`);
    const out = new Uint8Array(5 * MIB);
    const writes: [number, number][] = [];
    const target: CopyTarget = {
      size: out.length,
      write: (offset, data) => {
        out.set(data, offset);
        writes.push([offset, data.length]);
        return Promise.resolve();
      },
    };
    try {
      await convert([mappedOnlySource(file, 5 * MIB)], target, { targetIsZero: true });
    } finally {
      await file.close();
    }
    const want = await Deno.readFile(`${dir.path}/src`);
    assertTrue(out.every((b, i) => b === want[i]), "copied bytes");
    // 2 MiB requests as qemu-img's; the zeroed MiB left out.
    assertEquals(writes, [[0, 2 * MIB], [3 * MIB, MIB], [4 * MIB, MIB]]);
  },
});

const strace = await runProgram("strace", ["-V"]).then((r) => r.code === 0, () => false);

/** fdatasync calls of one qimg run, from strace. */
async function syncCalls(args: string[], cwd: string): Promise<number> {
  const log = `${cwd}/strace.log`;
  const r = await runProgram("strace", [
    "-f",
    "-qq",
    "-e",
    "trace=fdatasync,fsync",
    "-o",
    log,
    Deno.execPath(),
    "run",
    "-A",
    new URL("../cli.ts", import.meta.url).pathname,
    ...args,
  ], cwd);
  assertEquals(r.code, 0, r.stderr);
  return (await Deno.readTextFile(log)).split("\n").filter((l) => /sync\(/.test(l)).length;
}

Deno.test({
  name: "convert with cache=unsafe (the default) never syncs the target's data; -t writeback does",
  ignore: !strace,
  async fn() {
    await using dir = await tempDir();
    await sh("head -c 4194304 /dev/urandom > src", dir.path);
    // Only create's own flush of the new, nearly empty file: as qemu-img, no sync of the data.
    const unsafe = await syncCalls(["convert", "-O", "qcow2", "src", "a.qcow2"], dir.path);
    assertTrue(unsafe <= 1, `${unsafe} syncs with cache=unsafe`);
    const safe = await syncCalls(
      ["convert", "-t", "writeback", "-O", "qcow2", "src", "b.qcow2"],
      dir.path,
    );
    assertTrue(safe > unsafe, `${safe} syncs with cache=writeback`);
    for (const img of ["a.qcow2", "b.qcow2"]) {
      assertEquals((await qemuImg(["check", img], dir.path)).code, 0);
      assertEquals((await qemuImg(["compare", "src", img], dir.path)).code, 0);
    }
  },
});

Deno.test("convert to qcow2 writes unaligned data runs as qemu-img: same map, same image", async () => {
  await using dir = await tempDir();
  // Data runs that start and end inside clusters (64 KiB), some spanning many clusters.
  await sh(
    "truncate -s 16M src && " +
      "dd if=/dev/urandom of=src bs=4k seek=3 count=100 conv=notrunc status=none && " +
      "dd if=/dev/urandom of=src bs=4k seek=700 count=1 conv=notrunc status=none && " +
      "dd if=/dev/urandom of=src bs=4k seek=1000 count=1000 conv=notrunc status=none && " +
      "dd if=/dev/zero of=src bs=4k seek=1200 count=5 conv=notrunc status=none",
    dir.path,
  );
  const ours = await qimg(["convert", "-f", "raw", "-O", "qcow2", "src", "a.qcow2"], dir.path);
  assertEquals(ours.code, 0, ours.stderr);
  await qemuImg(["convert", "-f", "raw", "-O", "qcow2", "src", "b.qcow2"], dir.path);
  assertEquals((await qemuImg(["check", "a.qcow2"], dir.path)).code, 0);
  assertEquals((await qemuImg(["compare", "a.qcow2", "b.qcow2"], dir.path)).code, 0);
  const map = async (f: string) => (await qemuImg(["map", "--output=json", f], dir.path)).stdout;
  assertEquals(await map("a.qcow2"), await map("b.qcow2"));
});
