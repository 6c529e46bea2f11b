/** snapshot -c/-a/-d on qcow2: the same images, listings and guest data as qemu-img 7.2. */

import { assertEquals, assertTrue } from "./_assert.ts";
import { hashFile, qemuImg, qimg, sh, tempDir } from "./_util.ts";

/** A step: a snapshot command run by the tool under test, or a qemu-io command run by both. */
type Step = { snap: string[] } | { io: string };

/** What an image looks like to qemu-img, dates masked. */
async function state(dir: string, file: string): Promise<Record<string, unknown>> {
  const check = await qemuImg(["check", file], dir);
  const list = await qemuImg(["snapshot", "-l", file], dir);
  const info = await qemuImg(["info", "--output=json", file], dir);
  const json = JSON.parse(info.stdout);
  for (const s of json.snapshots ?? []) {
    delete s["date-sec"];
    delete s["date-nsec"];
  }
  delete json.filename;
  // actual-size also counts ext4's extent blocks, which depend on physical
  // placement; the file's holes (freed clusters punched as qemu's) are compared instead.
  delete json["actual-size"];
  const holes = await qemuImg(["map", "-f", "raw", "--output=json", file], dir);
  const ids = (json.snapshots ?? []).map((s: { id: string }) => s.id);
  const data: string[] = [];
  await sh(`qemu-img convert -O raw ${file} ${file}.raw`, dir);
  data.push(await hashFile(`${dir}/${file}.raw`));
  for (const id of ids) {
    await sh(`qemu-img convert -l snapshot.id=${id} -O raw ${file} ${file}.raw`, dir);
    data.push(`${id}:` + await hashFile(`${dir}/${file}.raw`));
  }
  return {
    check: check.stdout.replace(/Image end offset.*\n/, ""),
    checkCode: check.code,
    list: list.stdout.replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, "DATE"),
    info: json,
    holes: holes.stdout,
    data,
  };
}

/**
 * Runs `steps` on a copy of `base` with qemu-img and with qimg and compares
 * after every step: exit code and messages, check (clean), listing, info,
 * the file's holes and the data of
 * the active layer and of every snapshot.
 */
async function sameSequence(
  dir: string,
  base: string,
  steps: Step[],
  options: { holes?: boolean } = {},
): Promise<void> {
  await sh(`cp ${base} q.qcow2 && cp ${base} x.qcow2`, dir);
  for (const step of steps) {
    if ("io" in step) {
      await sh(`qemu-io -f qcow2 -c '${step.io}' q.qcow2 >/dev/null`, dir);
      await sh(`qemu-io -f qcow2 -c '${step.io}' x.qcow2 >/dev/null`, dir);
      continue;
    }
    const theirs = await qemuImg(["snapshot", ...step.snap, "q.qcow2"], dir);
    const ours = await qimg(["snapshot", ...step.snap, "x.qcow2"], dir);
    assertEquals(ours, theirs, step.snap.join(" "));
    const a = await state(dir, "q.qcow2");
    const b = await state(dir, "x.qcow2");
    if (options.holes === false) delete a.holes, delete b.holes;
    assertEquals(b, a, `after snapshot ${step.snap.join(" ")}`);
  }
  // The same allocation order gives the same file size.
  const q = await Deno.stat(`${dir}/q.qcow2`);
  const x = await Deno.stat(`${dir}/x.qcow2`);
  assertEquals(x.size, q.size);
}

Deno.test("createSnapshot applySnapshot deleteSnapshot leave qcow2 images as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 1 0 192k' base.qcow2 >/dev/null",
    dir.path,
  );
  await sameSequence(dir.path, "base.qcow2", [
    { snap: ["-c", "s1"] },
    { io: "write -P 2 32k 64k" },
    { snap: ["-c", "s2"] },
    // Duplicate names are allowed: IDs tell them apart.
    { snap: ["-c", "s1"] },
    { io: "write -P 3 100k 8k" },
    { io: "write -P 4 3M 64k" },
    { snap: ["-a", "s1"] },
    { io: "write -P 5 0 4k" },
    { snap: ["-a", "2"] },
    { snap: ["-d", "s1"] },
    { snap: ["-c", ""] },
    { snap: ["-d", "s2"] },
    { snap: ["-d", "s1"] },
    { snap: ["-d", ""] },
    { snap: ["-d", "s1"] },
    { snap: ["-a", "s1"] },
  ]);
});

Deno.test("createSnapshot handles compressed clusters, zero clusters and extended L2 as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 -o cluster_size=4k base.qcow2 1M && " +
      "qemu-io -c 'write -c -P 7 0 4k' -c 'write -c -P 8 4k 4k' -c 'write -P 9 64k 12k' " +
      "-c 'write -z 128k 8k' base.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k ext.qcow2 1M && " +
      "qemu-io -c 'write -P 1 0 8k' -c 'write -P 2 100k 4k' -c 'write -z 200k 64k' ext.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -o compat=0.10,refcount_bits=16 v2.qcow2 1M && " +
      "qemu-io -c 'write -P 3 0 64k' v2.qcow2 >/dev/null",
    dir.path,
  );
  // One cluster per compressed write: qemu-io compresses several in parallel, in no fixed order.
  const steps = (cluster: string): Step[] => [
    { snap: ["-c", "a"] },
    { io: "write -P 6 2k 4k" },
    { io: `write -c -P 5 128k ${cluster}` },
    { snap: ["-c", "b"] },
    { snap: ["-a", "a"] },
    { snap: ["-d", "a"] },
    { snap: ["-a", "b"] },
    { snap: ["-d", "b"] },
  ];
  await sameSequence(dir.path, "base.qcow2", steps("4k"));
  await sameSequence(dir.path, "ext.qcow2", steps("64k"));
  await sameSequence(dir.path, "v2.qcow2", steps("64k"));
});

Deno.test("createSnapshot fails as qemu-img where refcounts cannot grow or data lives outside", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 -o refcount_bits=1 r.qcow2 1M && " +
      "qemu-io -c 'write 0 64k' r.qcow2 >/dev/null && " +
      "qemu-img create -q -f qcow2 -o data_file=d.raw d.qcow2 1M",
    dir.path,
  );
  await sameSequence(dir.path, "r.qcow2", [{ snap: ["-c", "s"] }]);
  const before = await hashFile(`${dir.path}/d.qcow2`);
  for (const action of [["-c", "s"], ["-a", "s"], ["-d", "s"]]) {
    const theirs = await qemuImg(["snapshot", ...action, "d.qcow2"], dir.path);
    const ours = await qimg(["snapshot", ...action, "d.qcow2"], dir.path);
    assertEquals(ours, theirs);
  }
  assertEquals(await hashFile(`${dir.path}/d.qcow2`), before);
});

Deno.test("createSnapshot stores qemu-img's fields: next ID, wall-clock date, no VM state", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f qcow2 q.qcow2 1M && qemu-img snapshot -c x q.qcow2", dir.path);
  // An ID that is not the next number: new IDs continue after the largest.
  const start = Math.floor(Date.now() / 1000);
  assertEquals((await qimg(["snapshot", "-c", "y", "q.qcow2"], dir.path)).code, 0);
  const info = JSON.parse((await qemuImg(["info", "--output=json", "q.qcow2"], dir.path)).stdout);
  const sn = info.snapshots[1];
  assertEquals(
    { id: sn.id, name: sn.name, vm: sn["vm-state-size"], clock: sn["vm-clock-sec"], ic: sn.icount },
    { id: "2", name: "y", vm: 0, clock: 0, ic: 0 },
  );
  assertTrue(sn["date-sec"] >= start && sn["date-sec"] <= start + 60);
  const check = await qemuImg(["check", "q.qcow2"], dir.path);
  assertEquals(check.code, 0);
});

Deno.test("createSnapshot deleteSnapshot walk hundreds of L2 tables and refcount blocks as qemu-img", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 -o cluster_size=512 base.qcow2 64M && " +
      "qemu-io -c 'write -P 1 0 8M' base.qcow2 >/dev/null",
    dir.path,
  );
  // Holes differ: qemu punches its discards in batches as its caches flush,
  // and 512-byte clusters only free whole 4 KiB file blocks where runs meet.
  await sameSequence(dir.path, "base.qcow2", [
    { snap: ["-c", "a"] },
    { io: "write -P 2 1M 2M" },
    { snap: ["-c", "b"] },
    { snap: ["-a", "a"] },
    { snap: ["-d", "b"] },
    { snap: ["-d", "a"] },
  ], { holes: false });
});
