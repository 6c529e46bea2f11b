import { assertEquals } from "./_assert.ts";
import { qemuImg, qimg, sh, tempDir } from "./_util.ts";

/**
 * ok.qcow2: 1M, 64k clusters; clusters 0 header, 1 reftable, 2 refblock
 * (16-bit entries), 3 L1, 4 L2, 5 and 6 data. The others are broken copies.
 */
const SETUP = `
qemu-img create -q -f qcow2 ok.qcow2 1M
qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 128k 64k' ok.qcow2 >/dev/null
cp ok.qcow2 snap.qcow2 && qemu-img snapshot -c s1 snap.qcow2
python3 - <<'PY'
import shutil, struct
def poke(name, src, off, fmt, val):
    shutil.copy(src, name)
    with open(name, 'r+b') as f:
        f.seek(off); f.write(struct.pack(fmt, val))
def clear_copied(name, off):
    shutil.copy('ok.qcow2', name)
    with open(name, 'r+b') as f:
        f.seek(off); e = struct.unpack('>Q', f.read(8))[0]
        f.seek(off); f.write(struct.pack('>Q', e & ~(1 << 63)))
poke('leak.qcow2', 'ok.qcow2', 0x20000 + 2 * 5, '>H', 3)
poke('zero.qcow2', 'ok.qcow2', 0x20000 + 2 * 5, '>H', 0)
poke('low.qcow2', 'snap.qcow2', 0x20000 + 2 * 5, '>H', 1)
poke('lost.qcow2', 'ok.qcow2', 0x30000, '>Q', 0)
clear_copied('l2copied.qcow2', 0x40000)
clear_copied('l1copied.qcow2', 0x30000)
poke('zerol2.qcow2', 'ok.qcow2', 0x20000 + 2 * 4, '>H', 0)
poke('noblock.qcow2', 'ok.qcow2', 0x10000, '>Q', 0)
poke('mixed.qcow2', 'zerol2.qcow2', 0x20000 + 2 * 5, '>H', 7)
poke('rbdup.qcow2', 'ok.qcow2', 0x10008, '>Q', 0x20000)
poke('rbunaligned.qcow2', 'ok.qcow2', 0x10008, '>Q', 0x20200)
poke('rbreserved.qcow2', 'ok.qcow2', 0x10000, '>Q', 0x20001)
def mark(name, src, bits):
    shutil.copy(src, name)
    with open(name, 'r+b') as f:
        f.seek(72); v = struct.unpack('>Q', f.read(8))[0]
        f.seek(72); f.write(struct.pack('>Q', v | bits))
mark('corruptleak.qcow2', 'leak.qcow2', 2)
mark('corruptok.qcow2', 'ok.qcow2', 2)
mark('corruptlow.qcow2', 'low.qcow2', 2)
mark('dirtyleak.qcow2', 'leak.qcow2', 1)
mark('dirtylow.qcow2', 'low.qcow2', 1)
mark('dirtyzero.qcow2', 'zero.qcow2', 1)
mark('dirtycorrupt.qcow2', 'leak.qcow2', 3)
h = open('small.qcow2', 'rb').read()
poke('smallgap.qcow2', 'small.qcow2', struct.unpack('>Q', h[48:56])[0] + 8, '>Q', 0)
PY
`;

/** 512-byte clusters and a snapshot: many refblocks, shared clusters. */
const SMALL = `
qemu-img create -q -f qcow2 -o cluster_size=512 small.qcow2 1M
qemu-io -c 'write -P 3 0 200k' -c 'write -P 4 600k 100k' small.qcow2 >/dev/null
qemu-img snapshot -c s small.qcow2
qemu-io -c 'write -P 5 0 50k' small.qcow2 >/dev/null
`;

/**
 * Runs `check <args> img.qcow2` with qimg and qemu-img on identical copies
 * of `name`, asserting the same stdout, stderr and exit code; then that
 * qimg's result checks clean when qemu's does and holds the same guest data.
 */
async function assertRepairsAsQemu(dir: string, name: string, args: string[]): Promise<void> {
  await sh(
    `rm -rf q m && mkdir q m && cp ${name} q/img.qcow2 && cp ${name} m/img.qcow2`,
    dir,
  );
  const ours = await qimg(["check", ...args, "img.qcow2"], `${dir}/m`);
  const theirs = await qemuImg(["check", ...args, "img.qcow2"], `${dir}/q`);
  const what = `check ${args.join(" ")} ${name}`;
  assertEquals(
    { stdout: ours.stdout, stderr: ours.stderr, code: ours.code },
    { stdout: theirs.stdout, stderr: theirs.stderr, code: theirs.code },
    what,
  );
  const after = await qemuImg(["check", "m/img.qcow2"], dir);
  const expected = await qemuImg(["check", "q/img.qcow2"], dir);
  assertEquals(after.code, expected.code, `${what}: re-check`);
  assertEquals(after.stderr, expected.stderr, `${what}: re-check`);
  const same = await qemuImg(["compare", "-U", "m/img.qcow2", "q/img.qcow2"], dir);
  assertEquals(same.code, 0, `${what}: compare`);
}

Deno.test("Qcow2Repairer repairs leaks, low refcounts and OFLAG_COPIED as qemu-img check -r", async () => {
  await using dir = await tempDir();
  await sh(SMALL + SETUP, dir.path);
  for (const name of ["leak", "lost", "low", "l2copied", "l1copied", "ok"]) {
    for (const mode of ["leaks", "all"]) {
      await assertRepairsAsQemu(dir.path, `${name}.qcow2`, ["-r", mode]);
    }
  }
  for (const name of ["leak", "low", "l2copied"]) {
    await assertRepairsAsQemu(dir.path, `${name}.qcow2`, ["-r", "all", "--output=json"]);
    await assertRepairsAsQemu(dir.path, `${name}.qcow2`, ["-q", "-r", "all"]);
  }
});

Deno.test("Qcow2Repairer fails -r leaks where qemu-img must rebuild the refcount structures", async () => {
  await using dir = await tempDir();
  await sh(SMALL + SETUP, dir.path);
  await assertRepairsAsQemu(dir.path, "zero.qcow2", ["-r", "leaks"]);
  await assertRepairsAsQemu(dir.path, "zero.qcow2", ["-r", "leaks", "--output=json"]);
  // Broken refcount table entries also need a rebuild.
  for (const name of ["rbdup", "rbunaligned", "rbreserved"]) {
    await assertRepairsAsQemu(dir.path, `${name}.qcow2`, ["-r", "leaks"]);
  }
});

Deno.test("Qcow2Repairer rebuilds the refcount structures with -r all as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(SMALL + SETUP, dir.path);
  for (const name of ["zero", "zerol2", "noblock", "mixed", "smallgap", "rbdup", "rbunaligned"]) {
    await assertRepairsAsQemu(dir.path, `${name}.qcow2`, ["-r", "all"]);
  }
  await assertRepairsAsQemu(dir.path, "mixed.qcow2", ["-r", "all", "--output=json"]);
  // Built in the same places: the files match byte for byte.
  await sh(
    "cp smallgap.qcow2 a.qcow2 && cp smallgap.qcow2 b.qcow2 && qemu-img check -q -r all a.qcow2",
    dir.path,
  );
  assertEquals((await qimg(["check", "-q", "-r", "all", "b.qcow2"], dir.path)).code, 0);
  await sh("cmp a.qcow2 b.qcow2", dir.path);
});

Deno.test("Qcow2Repairer opens images marked corrupt and clears the mark after repairing as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(SMALL + SETUP, dir.path);
  for (const name of ["corruptleak", "corruptok", "corruptlow"]) {
    for (const mode of ["leaks", "all"]) {
      await assertRepairsAsQemu(dir.path, `${name}.qcow2`, ["-r", mode]);
      await sh("cmp q/img.qcow2 m/img.qcow2", dir.path);
    }
  }
});

Deno.test("Qcow2Repairer clears the dirty bit of lazy-refcount images as qemu-img check -r", async () => {
  await using dir = await tempDir();
  await sh(SMALL + SETUP, dir.path);
  for (const name of ["dirtyleak", "dirtylow", "dirtyzero", "dirtycorrupt"]) {
    for (const mode of ["leaks", "all"]) {
      await assertRepairsAsQemu(dir.path, `${name}.qcow2`, ["-r", mode]);
      await sh("cmp q/img.qcow2 m/img.qcow2", dir.path);
    }
  }
});

Deno.test("Qcow2Repairer punches the clusters it frees as qemu-img (identical files)", async () => {
  await using dir = await tempDir();
  await sh(SMALL + SETUP, dir.path);
  await sh(
    "cp lost.qcow2 a.qcow2 && cp lost.qcow2 b.qcow2 && qemu-img check -q -r leaks a.qcow2",
    dir.path,
  );
  assertEquals((await qimg(["check", "-q", "-r", "leaks", "b.qcow2"], dir.path)).code, 0);
  await sh("cmp a.qcow2 b.qcow2", dir.path);
});
