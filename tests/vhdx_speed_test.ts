/**
 * vhdx's faster convert paths against Debian's qemu-img: copyMap (zero
 * blocks and host holes not read, payload mapped) leaves convert's output
 * byte for byte and allocation for allocation qemu-img's, while map and
 * info still print qemu's (all data, no offsets); writeConcurrent
 * allocates blocks in call order.
 */

import { assertEquals, assertTrue as assert } from "./_assert.ts";
import { assertSameAsQemu, qimg, sh, tempDir } from "./_util.ts";
import { convert } from "../src/convert.ts";
import { DenoFile } from "../src/file.ts";
import type { BlockFile } from "../src/file.ts";
import { Image } from "../src/image.ts";
import { openVhdx, vhdxDriver } from "../src/vhdx.ts";

const MiB = 1 << 20;

/**
 * qemu-io writes over 24 MiB: a block holding 4 KiB and holes, unaligned
 * sectors, written zeroes, data ending inside a 4 KiB block before a hole,
 * runs across block boundaries (1 MiB and 8 MiB) and a long run.
 */
const WRITES = [
  "write -P 0x11 0 4k",
  "write -P 0x22 1049088 1536",
  "write -z 2M 64k",
  "write -P 0 2200k 64k",
  "write -P 0x33 3142144 3584",
  "write -P 0x44 8386560 4k",
  "write -P 0x55 12M 3M",
  "write -P 0x66 15872k 8k",
].map((w) => `-c '${w}'`).join(" ");

/** Makes `name` (24 MiB vhdx, `opts` for create) with WRITES. */
async function makeVhdx(dir: string, name: string, opts: string): Promise<void> {
  await sh(
    `qemu-img create -q -f vhdx ${opts} ${name} 24M && qemu-io -f vhdx ${WRITES} ${name} >/dev/null`,
    dir,
  );
}

const IMAGES: [string, string][] = [
  ["zero8m.vhdx", ""],
  ["absent1m.vhdx", "-o block_state_zero=off,block_size=1M"],
  ["zero1m.vhdx", "-o block_size=1M"],
  ["fixed.vhdx", "-o subformat=fixed"],
];

Deno.test("VhdxImage.copyMap() calls zero-state blocks and host holes zero, payload data at its host offset", async () => {
  await using dir = await tempDir();
  for (const [name, opts] of IMAGES) {
    await makeVhdx(dir.path, name, opts);
    const file = await DenoFile.open(`${dir.path}/${name}`);
    const image = await openVhdx(file);
    try {
      const runs = await image.copyMap(0, image.size);
      assertEquals(runs.reduce((n, r) => n + r.length, 0), image.size, name);
      const guest = new Uint8Array(image.size);
      await image.read(0, guest);
      let pos = 0;
      let zeroes = 0;
      for (const r of runs) {
        const want = guest.subarray(pos, pos + r.length);
        if (r.zero) {
          assert(want.every((b) => b === 0), `${name}: zero run at ${pos} holds data`);
          zeroes += r.length;
        } else if (r.hostOffset !== undefined) {
          const host = new Uint8Array(r.length);
          await file.read(r.hostOffset, host);
          assertEquals(host, want, `${name}: data run at ${pos}`);
        }
        pos += r.length;
      }
      // Most of the guest is zero blocks or holes: the block with 4 KiB at 0 is mostly hole.
      assert(zeroes > image.size / 2, `${name}: ${zeroes} zero bytes`);
      const first = runs[0];
      assert(
        !first.zero && first.length < 64 * 1024,
        `${name}: first run ${JSON.stringify(first)}`,
      );
      // map and info stay qemu's: all data, no offsets.
      for (const args of [["map"], ["map", "--output=json"], ["info", "--output=json"]]) {
        await assertSameAsQemu([...args, name], dir.path);
      }
    } finally {
      await image.close();
    }
  }
});

Deno.test("convert() from vhdx reads neither zero blocks nor host holes", async () => {
  await using dir = await tempDir();
  await sh(
    `qemu-img create -q -f vhdx v.vhdx 64M && qemu-io -f vhdx -c 'write -P 0x11 0 4k' \
       -c 'write -P 0x22 40M 8k' v.vhdx >/dev/null && qemu-img convert -O raw v.vhdx want.raw`,
    dir.path,
  );
  const host = await DenoFile.open(`${dir.path}/v.vhdx`);
  let read = 0;
  // No view: every payload byte convert gets comes through read().
  const counting: BlockFile = {
    name: host.name,
    writable: false,
    size: () => host.size(),
    allocated: () => host.allocated(),
    read: (offset, buf) => {
      read += buf.length;
      return host.read(offset, buf);
    },
    write: (offset, data) => host.write(offset, data),
    truncate: (size) => host.truncate(size),
    flush: () => host.flush(),
    close: () => host.close(),
    resolve: (name) => host.resolve(name),
    extent: (offset, length) => host.extent(offset, length),
  };
  const image = await openVhdx(counting);
  const source = new Image([{ image, driver: vhdxDriver, filename: "v.vhdx" }]);
  const out = new Uint8Array(image.size);
  read = 0;
  try {
    await convert([source], {
      size: out.length,
      write: (offset, data) => Promise.resolve(void out.set(data, offset)),
    }, { targetIsZero: true });
  } finally {
    await source.close();
  }
  assertEquals(out, await Deno.readFile(`${dir.path}/want.raw`));
  // 12 KiB of data in two 8 MiB blocks, the rest holes and zero blocks (was 16 MiB read).
  assert(read <= 64 * 1024, `${read} bytes read`);
});

Deno.test("convert from vhdx writes qemu-img's bytes and allocation for every -S, block size and block state", async () => {
  await using dir = await tempDir();
  for (const [name, opts] of IMAGES) await makeVhdx(dir.path, name, opts);
  const cases: [string, string[]][] = [];
  for (const [name] of IMAGES) cases.push([name, []]);
  for (const s of ["0", "512", "64k", "1M"]) {
    for (const name of ["zero8m.vhdx", "absent1m.vhdx"]) cases.push([name, ["-S", s]]);
  }
  for (const [name, extra] of cases) {
    const args = ["convert", "-f", "vhdx", "-O", "raw", ...extra, name];
    await sh(`qemu-img ${args.join(" ")} want.raw && rm -f got.raw`, dir.path);
    const r = await qimg([...args, "got.raw"], dir.path);
    assertEquals(r.code, 0, r.stderr);
    const maps = await sh(
      "cmp got.raw want.raw && qemu-img map --output=json -f raw got.raw && echo && " +
        "qemu-img map --output=json -f raw want.raw",
      dir.path,
    );
    const [got, want] = maps.trim().split("\n\n");
    assertEquals(got, want, `${name} ${extra.join(" ")}`);
  }
  // A qcow2 target, and -n onto a target that is not zero (zero runs are written).
  for (const name of ["zero8m.vhdx", "absent1m.vhdx"]) {
    await sh("rm -f got.qcow2 && qemu-img convert -O qcow2 " + name + " want.qcow2", dir.path);
    const q = await qimg(["convert", "-O", "qcow2", name, "got.qcow2"], dir.path);
    assertEquals(q.code, 0, q.stderr);
    const qmaps = await sh(
      "qemu-img map --output=json got.qcow2 && echo && qemu-img map --output=json want.qcow2",
      dir.path,
    );
    const [qgot, qwant] = qmaps.trim().split("\n\n");
    assertEquals(qgot, qwant, `${name} -O qcow2`);
    await sh(
      "rm -f got.raw want.raw && qemu-img create -q -f raw want.raw 24M && " +
        "qemu-io -f raw -c 'write -P 0xff 0 24M' want.raw >/dev/null && cp want.raw got.raw && " +
        `qemu-img convert -n -f vhdx -O raw ${name} want.raw`,
      dir.path,
    );
    const n = await qimg(["convert", "-n", "-f", "vhdx", "-O", "raw", name, "got.raw"], dir.path);
    assertEquals(n.code, 0, n.stderr);
    const nmaps = await sh(
      "cmp got.raw want.raw && qemu-img map --output=json -f raw got.raw && echo && " +
        "qemu-img map --output=json -f raw want.raw",
      dir.path,
    );
    const [ngot, nwant] = nmaps.trim().split("\n\n");
    assertEquals(ngot, nwant, `${name} -n`);
  }
});

Deno.test("VhdxImage.writeConcurrent() allocates blocks in call order, later writes over earlier ones", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f vhdx -o block_size=1M w.vhdx 8M", dir.path);
  const file = await DenoFile.open(`${dir.path}/w.vhdx`, { write: true });
  const image = await openVhdx(file, { write: true });
  const a = new Uint8Array(MiB).fill(0xaa);
  const b = new Uint8Array(4096).fill(0xbb);
  const c = new Uint8Array(8192).fill(0xcc);
  // Called without waiting, as convert does: blocks 5, 0 and 1 (zeroes, two 1 MiB chunks),
  // 2 and 3; 0xbb over 0xaa in block 5.
  await Promise.all([
    image.writeConcurrent(5 * MiB, a),
    image.writeZeroes(0, 1.5 * MiB),
    image.writeConcurrent(5 * MiB + 512, b),
    image.writeConcurrent(3 * MiB - 4096, c),
  ]);
  const runs = await image.copyMap(0, image.size);
  await image.close();
  const host = (at: number) => {
    let pos = 0;
    for (const r of runs) {
      if (at < pos + r.length) return r.hostOffset! + at - pos;
      pos += r.length;
    }
    return -1;
  };
  // Allocation order is call order.
  const order = [5, 0, 1, 2, 3].map((block) => host(block * MiB) - host(block * MiB) % MiB);
  assertEquals(order, [...order].sort((x, y) => x - y), `host offsets ${order}`);
  await sh(
    "qemu-img create -q -f raw want.raw 8M && qemu-io -f raw -c 'write -P 0xaa 5M 1M' " +
      "-c 'write -P 0xbb 5243392 4k' -c 'write -P 0xcc 3141632 8k' want.raw >/dev/null && " +
      "qemu-img compare -f vhdx -F raw w.vhdx want.raw && qemu-img check -q w.vhdx",
    dir.path,
  );
});
