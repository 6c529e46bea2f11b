/**
 * qcow2 internal snapshots against Debian's qemu-img: `snapshot -l` and
 * info's snapshot list (human and JSON, local time zones), snapshot tables
 * with poked fields and hostile sizes, and guest reads at a snapshot
 * compared with `qemu-img convert -l`.
 */

import { createHash } from "node:crypto";
import { assertEquals, assertRejects } from "./_assert.ts";
import { assertSameAsQemu, hashFile, sh, tempDir } from "./_util.ts";
import { DenoFile } from "../src/file.ts";
import { openQcow2, type Qcow2Image } from "../src/qcow2.ts";
import { findSnapshot } from "../src/qcow2_snapshot.ts";

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}
const get64 = (b: Uint8Array, o: number) => view(b).getBigUint64(o);
const set64 = (b: Uint8Array, o: number, v: bigint) => view(b).setBigUint64(o, v);
const set32 = (b: Uint8Array, o: number, v: number) => view(b).setUint32(o, v);
const set16 = (b: Uint8Array, o: number, v: number) => view(b).setUint16(o, v);
/** The snapshot table offset from the header. */
const layout = (b: Uint8Array) => ({ snapshots: Number(get64(b, 64)) });

/** Runs `snapshot -l` and info (human, JSON) under `tz` with both programs. */
async function assertListsLikeQemu(dir: string, name: string, tz = "UTC"): Promise<void> {
  const saved = Deno.env.get("TZ");
  Deno.env.set("TZ", tz);
  try {
    for (
      const args of [
        ["snapshot", "-l", name],
        ["info", name],
        ["info", "--output=json", name],
        ["check", name],
      ]
    ) await assertSameAsQemu(args, dir);
  } finally {
    if (saved === undefined) Deno.env.delete("TZ");
    else Deno.env.set("TZ", saved);
  }
}

Deno.test("snapshot -l and info list qcow2 snapshots as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 none.qcow2 1M && " +
      "qemu-img create -q -f qcow2 s.qcow2 4M && qemu-io -f qcow2 -c 'write -P 1 0 64k' s.qcow2 >/dev/null && " +
      "qemu-img snapshot -c first s.qcow2 && qemu-img snapshot -c 'a much longer snapshot tag here' s.qcow2 && " +
      "qemu-img snapshot -c 3rd s.qcow2 && " +
      "qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 4M && qemu-img snapshot -c old v2.qcow2",
    dir.path,
  );
  for (const name of ["none.qcow2", "s.qcow2", "v2.qcow2"]) {
    await assertListsLikeQemu(dir.path, name);
    await assertListsLikeQemu(dir.path, name, "Asia/Kolkata");
    await assertListsLikeQemu(dir.path, name, "America/New_York");
  }
});

type Poke = (b: Uint8Array, sn: number) => void;

Deno.test("snapshot -l and info show poked snapshot entries as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 s.qcow2 4M && qemu-img snapshot -c first s.qcow2 && " +
      "qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 4M && qemu-img snapshot -c old v2.qcow2",
    dir.path,
  );
  const cases: [string, Poke][] = [
    ["date and clock", (b, sn) => {
      set32(b, sn + 16, 0xfffffff0);
      set32(b, sn + 20, 999999999);
      set64(b, sn + 24, 123456789012345678n);
    }],
    ["huge clock", (b, sn) => set64(b, sn + 24, 0xffffffffffffffffn)],
    ["vm state sizes", (b, sn) => {
      set32(b, sn + 32, 12345);
      set64(b, sn + 40, 5n << 30n);
    }],
    ["vm state size above 2^63", (b, sn) => set64(b, sn + 40, 0xfffffffffffffff0n)],
    ["icount", (b, sn) => set64(b, sn + 56, 987654321n)],
    ["icount absent", (b, sn) => set64(b, sn + 56, 0xffffffffffffffffn)],
    ["icount negative", (b, sn) => set64(b, sn + 56, 0xfffffffffffffffen)],
    ["empty id and name", (b, sn) => {
      set16(b, sn + 12, 0);
      set16(b, sn + 14, 0);
    }],
    ["id with a NUL", (b, sn) => b[sn + 40 + 24] = 0],
    ["extra data of 8 bytes", (b, sn) => set32(b, sn + 36, 8)],
    ["extra data of 0 bytes", (b, sn) => set32(b, sn + 36, 0)],
    ["extra data of 1024 bytes", (b, sn) => set32(b, sn + 36, 1024)],
    ["too much extra data", (b, sn) => set32(b, sn + 36, 1025)],
    ["name running past the table", (b, sn) => set16(b, sn + 14, 0xffff)],
    ["two entries, the second beyond", (b) => set32(b, 60, 2)],
    ["a thousand entries", (b) => set32(b, 60, 1000)],
    ["too many entries", (b) => set32(b, 60, 65537)],
    ["table offset unaligned", (b) => set64(b, 64, get64(b, 64) + 8n)],
    ["table far away", (b) => set64(b, 64, 1n << 56n)],
    ["table at the very end", (b) => set64(b, 64, 0x7fffffffffff0000n)],
  ];
  for (const base of ["s.qcow2", "v2.qcow2"]) {
    const clean = await Deno.readFile(`${dir.path}/${base}`);
    for (const [what, poke] of cases) {
      const b = clean.slice();
      poke(b, layout(b).snapshots);
      await Deno.writeFile(`${dir.path}/x.qcow2`, b);
      await assertListsLikeQemu(dir.path, "x.qcow2").catch((e) => {
        throw new Error(`${base}: ${what}: ${e.message}`);
      });
    }
  }
});

Deno.test("snapshot -l and info list no snapshots of images with a data file, as qemu-img", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f qcow2 -o data_file=df.raw df.qcow2 4M", dir.path);
  const b = await Deno.readFile(`${dir.path}/df.qcow2`);
  set32(b, 60, 1);
  set64(b, 64, 0x20000n);
  await Deno.writeFile(`${dir.path}/df.qcow2`, b);
  await assertListsLikeQemu(dir.path, "df.qcow2");
});

Deno.test("snapshot -l shows long names and ids cut as qemu-img", async () => {
  await using dir = await tempDir();
  const long = "n".repeat(300);
  await sh(
    `qemu-img create -q -f qcow2 s.qcow2 1M && qemu-img snapshot -c ${long} s.qcow2`,
    dir.path,
  );
  // Make the stored name 300 bytes long (qemu cut it at creation) and the id long too.
  const b = await Deno.readFile(`${dir.path}/s.qcow2`);
  await assertListsLikeQemu(dir.path, "s.qcow2");
  const sn = layout(b).snapshots;
  const grown = new Uint8Array(b.length + 1024);
  grown.set(b);
  set16(grown, sn + 12, 200);
  grown.fill(0x31, sn + 64, sn + 64 + 200);
  set16(grown, sn + 14, 300);
  grown.fill(0x6d, sn + 264, sn + 564);
  await Deno.writeFile(`${dir.path}/x.qcow2`, grown);
  await assertListsLikeQemu(dir.path, "x.qcow2");
});

/** SHA-256 of the guest as qimg reads it at a snapshot. */
async function hashAtSnapshot(path: string, name: string): Promise<string> {
  const image = await openQcow2(await DenoFile.open(path, {}));
  try {
    const list = await image.snapshots();
    const i = findSnapshot(list, { name });
    const view: Qcow2Image = await image.atSnapshot(list[i]);
    const hash = createHash("sha256");
    const chunk = new Uint8Array(1 << 20);
    for (let off = 0; off < view.size; off += chunk.length) {
      const buf = chunk.subarray(0, Math.min(chunk.length, view.size - off));
      await view.read(off, buf);
      hash.update(buf);
    }
    await view.close();
    return hash.digest("hex");
  } finally {
    await image.close();
  }
}

Deno.test("Qcow2Image.atSnapshot() reads the guest as qemu-img convert -l does", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 s.qcow2 8M && " +
      "qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write -c -P 2 2M 64k' s.qcow2 >/dev/null && " +
      "qemu-img snapshot -c one s.qcow2 && " +
      "qemu-io -f qcow2 -c 'write -P 3 0 64k' -c 'write -z 2M 64k' -c 'write -P 4 6M 1M' s.qcow2 >/dev/null && " +
      "qemu-img snapshot -c two s.qcow2 && qemu-io -f qcow2 -c 'discard 0 8M' s.qcow2 >/dev/null && " +
      "qemu-img convert -l snapshot.name=one -O raw s.qcow2 one.raw && " +
      "qemu-img convert -l snapshot.name=two -O raw s.qcow2 two.raw",
    dir.path,
  );
  for (const name of ["one", "two"]) {
    assertEquals(
      await hashAtSnapshot(`${dir.path}/s.qcow2`, name),
      await hashFile(`${dir.path}/${name}.raw`),
      name,
    );
  }
  // A snapshot the image does not have is refused as qemu's load_tmp does.
  const image = await openQcow2(await DenoFile.open(`${dir.path}/s.qcow2`, {}));
  await assertRejects(
    () =>
      image.atSnapshot({
        id: "9",
        name: "nine",
        vmStateSize: 0n,
        dateSec: 0,
        dateNsec: 0,
        vmClockNsec: 0n,
      }),
    /^QimgError: Can't find snapshot$/,
  );
  await image.close();
  // An unaligned snapshot L1 table is refused with qemu's message.
  const b = await Deno.readFile(`${dir.path}/s.qcow2`);
  const sn = layout(b).snapshots;
  set64(b, sn, get64(b, sn) + 8n);
  await Deno.writeFile(`${dir.path}/x.qcow2`, b);
  await assertRejects(
    () => hashAtSnapshot(`${dir.path}/x.qcow2`, "one"),
    /^QimgError: Snapshot L1 table offset invalid$/,
  );
});
