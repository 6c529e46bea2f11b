/**
 * The library on a Blob/File (src/blob_file.ts, `openImage(file)`), first
 * under Deno, then in a browser: tests/browser/index.html with the browser
 * bundle (`buildBrowser()`), driven in headless Chromium (Debian's
 * `chromium`, installed with apt-get when absent and root) by
 * tests/browser/chromium.ts, compared with Debian's qemu-img.
 *
 * What the page shows, per image, against qemu-img run on the same file:
 * - info: `qemu-img info --output=json NAME` (run in the image's directory,
 *   so "filename" is the File's name), every field in qemu's order except
 *   "actual-size", which a Blob cannot know (qemu leaves it out too when the
 *   size on disk is unknown);
 * - map: `qemu-img map --output=json NAME`, byte for byte. A Blob has no
 *   holes, so the images are made dense (`cp --sparse=never`) first: on a
 *   file with holes qemu-img reports them as zero runs, a Blob cannot;
 * - the SHA-256 of the guest's bytes: that of `qemu-img convert -O raw`.
 */

import { buildBrowser } from "../scripts/build_node.ts";
import { BlobFile } from "../src/blob_file.ts";
import { openImage, QimgError, toQemuJson } from "../mod.ts";
import type { PageResult } from "./browser/chromium.ts";
import { assertEquals, assertRejects, assertTrue } from "./_assert.ts";
import { hashFile, qemuImg, runProgram, sh, tempDir } from "./_util.ts";

const ROOT = new URL("..", import.meta.url).pathname;

async function has(cmd: string): Promise<boolean> {
  return (await runProgram("sh", ["-c", `command -v ${cmd}`])).code === 0;
}

/** Runs apt-get quietly; its stderr when it fails. */
async function aptGet(args: string[]): Promise<string | undefined> {
  const r = await new Deno.Command("apt-get", {
    args,
    env: { DEBIAN_FRONTEND: "noninteractive" },
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).output();
  return r.success ? undefined : new TextDecoder().decode(r.stderr);
}

/**
 * Debian's chromium, installed (apt-get, as root) when absent; else why not.
 * The package lists may be stale on a fresh machine: update once on failure.
 */
async function ensureChromium(): Promise<{ path?: string; why?: string }> {
  for (const c of ["chromium", "chromium-browser"]) if (await has(c)) return { path: c };
  let root = false;
  try {
    root = Deno.uid() === 0;
  } catch { /* no --allow-sys=uid: not known to be root */ }
  if (!root || !(await has("apt-get"))) {
    return {
      why: "chromium is absent and this is not root with apt-get: apt-get install chromium",
    };
  }
  console.error("browser_test: installing Debian's chromium...");
  let err = await aptGet(["install", "-y", "-qq", "chromium"]);
  if (err !== undefined) {
    err = await aptGet(["update", "-qq"]) ??
      await aptGet(["install", "-y", "-qq", "chromium"]);
  }
  if (err === undefined && await has("chromium")) return { path: "chromium" };
  return { why: `apt-get install chromium failed: ${err?.trim().split("\n").pop()}` };
}

const CHROMIUM = await ensureChromium();
if (!CHROMIUM.path) console.error(`browser_test: the Chromium test is skipped: ${CHROMIUM.why}`);

/**
 * Images made by qemu-img/qemu-io, one of each format the page reads: a
 * qcow2 with data (text, so its compressed copy holds real deflate streams),
 * zero and unallocated clusters; its zlib- and zstd-compressed copies, an
 * overlay, and vmdk (sparse, and flat: a descriptor naming f-flat.vmdk),
 * vpc, vhdx, vdi and raw copies. All are made dense.
 */
const IMAGES = [
  "raw.img",
  "d.qcow2",
  "c.qcow2",
  "d.vmdk",
  "f.vmdk",
  "d.vpc",
  "d.vhdx",
  "d.vdi",
  "top.qcow2",
  "z.qcow2",
];

async function makeImages(dir: string): Promise<void> {
  await sh(
    `
    qemu-img create -q -f raw t.raw 4M
    seq 1 120000 | dd of=t.raw bs=64k seek=40 conv=notrunc status=none
    qemu-img convert -f raw -O qcow2 t.raw d.qcow2
    qemu-io -f qcow2 -c 'write -P 0x22 0 192k' -c 'write -z 1M 64k' -c 'write -P 0x33 2M 4k' d.qcow2 >/dev/null
    qemu-img convert -c -O qcow2 d.qcow2 c.qcow2
    qemu-img convert -c -O qcow2 -o compression_type=zstd d.qcow2 z.qcow2
    qemu-img convert -O vmdk d.qcow2 d.vmdk
    qemu-img convert -O vmdk -o subformat=monolithicFlat d.qcow2 f.vmdk
    qemu-img convert -O vpc d.qcow2 d.vpc
    qemu-img convert -O vhdx d.qcow2 d.vhdx
    qemu-img convert -O vdi d.qcow2 d.vdi
    qemu-img convert -O raw d.qcow2 raw.img
    qemu-img create -q -f qcow2 -b d.qcow2 -F qcow2 top.qcow2
    qemu-io -f qcow2 -c 'write -P 0x44 64k 64k' top.qcow2 >/dev/null
    rm t.raw
    for f in *; do cp --sparse=never "$f" "$f.dense" && mv "$f.dense" "$f"; done
    `,
    dir,
  );
}

/** qemu-img info's JSON text without its "actual-size" line. */
async function qemuInfo(name: string, dir: string): Promise<string> {
  const r = await qemuImg(["info", "--output=json", name], dir);
  assertEquals(r.code, 0, r.stderr);
  const text = r.stdout.replace(/^ {4}"actual-size": \d+,\n/m, "");
  assertTrue(text !== r.stdout, `no actual-size in ${r.stdout}`);
  return text;
}

/** The SHA-256 of the guest's bytes, as qemu-img converts them to raw. */
async function qemuDigest(name: string, dir: string): Promise<string> {
  const out = `${dir}/${name}.guest`;
  const r = await qemuImg(["convert", "-O", "raw", name, out], dir);
  assertEquals(r.code, 0, r.stderr);
  const digest = await hashFile(out);
  await Deno.remove(out);
  return digest;
}

async function file(dir: string, name: string): Promise<File> {
  return new File([await Deno.readFile(`${dir}/${name}`)], name);
}

Deno.test("BlobFile read() is positional, short only at the end; write() and truncate() reject with a QimgError", async () => {
  const f = new BlobFile(new Blob([new Uint8Array(100).map((_, i) => i)]), "a.img");
  assertEquals(f.name, "a.img");
  assertEquals(f.writable, false);
  assertEquals(await f.size(), 100);
  const buf = new Uint8Array(8);
  assertEquals(await f.read(10, buf), 8);
  assertEquals([...buf], [10, 11, 12, 13, 14, 15, 16, 17]);
  assertEquals(await f.read(96, buf), 4);
  assertEquals([...buf.subarray(0, 4)], [96, 97, 98, 99]);
  assertEquals(await f.read(100, buf), 0);
  assertEquals(await f.extent(0, 1 << 20), { length: 1 << 20, data: true });
  assertEquals(f.resolve("b.qcow2"), "b.qcow2");
  await assertRejects(() => f.write(0, buf), /a Blob or File is read-only/);
  await assertRejects(() => f.truncate(0), /a Blob or File is read-only/);
  assertTrue(await f.write(0, buf).catch((e) => e instanceof QimgError));
  await f.close();
  await assertRejects(() => f.read(0, buf), /closed/);
  assertEquals(new BlobFile(new File([], "x.vmdk")).name, "x.vmdk");
  assertEquals(new BlobFile(new Blob([])).name, "blob");
});

Deno.test("openImage() of a File gives qemu-img's info (but actual-size) and guest bytes for every format", async () => {
  await using dir = await tempDir();
  await makeImages(dir.path);
  const files = {
    "d.qcow2": await file(dir.path, "d.qcow2"),
    "f-flat.vmdk": await file(dir.path, "f-flat.vmdk"),
  };
  for (const name of IMAGES) {
    await using image = await openImage(await file(dir.path, name), { files });
    assertEquals(toQemuJson(await image.info()), await qemuInfo(name, dir.path), name);
    const guest = new Uint8Array(image.size);
    // z.qcow2 too: Deno's node:zlib has zstd (a browser has not: checked below).
    await image.read(0, guest);
    const digest = Array.from(
      new Uint8Array(await crypto.subtle.digest("SHA-256", guest)),
      (b) => b.toString(16).padStart(2, "0"),
    ).join("");
    assertEquals(digest, await qemuDigest(name, dir.path), name);
  }
});

Deno.test("openImage() of a File refuses writing, and a backing file not given fails as a missing file", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 d.qcow2 1M && qemu-img create -q -f qcow2 -b d.qcow2 -F qcow2 top.qcow2",
    dir.path,
  );
  const top = await file(dir.path, "top.qcow2");
  await assertRejects(
    () => openImage(top, { write: true }),
    /^QimgError: Could not open 'top.qcow2': a Blob or File is read-only$/,
  );
  // qemu-img's words for a backing file that is not there.
  await Deno.remove(`${dir.path}/d.qcow2`);
  const missing = (await qemuImg(["map", "top.qcow2"], dir.path)).stderr;
  assertEquals(
    missing,
    "qimg: Could not open 'top.qcow2': Could not open backing file: Could not open 'd.qcow2': No such file or directory\n",
  );
  const e = await openImage(top).then(() => null, (e) => e);
  assertTrue(e instanceof QimgError, String(e));
  assertEquals(`qimg: ${e.message}\n`, missing);
  // Only the files given open: a name elsewhere is as missing.
  const e2 = await openImage(top, { files: { "/etc/passwd": new Blob([]) } }).then(
    () => null,
    (e) => e,
  );
  assertEquals(`qimg: ${e2?.message}\n`, missing);
  await using alone = await openImage(top, { backing: false });
  assertEquals((await alone.info())["backing-filename"], "d.qcow2");
});

Deno.test({
  name:
    "tests/browser/index.html in headless Chromium shows qemu-img's info, map and guest bytes for qcow2 (zlib clusters), vmdk, vpc, vhdx, vdi, raw and an overlay",
  ignore: !CHROMIUM.path,
  async fn() {
    await using dir = await tempDir();
    await makeImages(dir.path);
    const dist = `${dir.path}/dist`;
    await buildBrowser({ outDir: dist });
    // The test task grants no network: the page is served and driven by a
    // process of its own, allowed 127.0.0.1 only.
    const r = await runProgram(Deno.execPath(), [
      "run",
      "--no-prompt",
      "--allow-net=127.0.0.1",
      "--allow-read",
      "--allow-write",
      "--allow-run",
      "--allow-env",
      `${ROOT}tests/browser/chromium.ts`,
      "--chromium",
      CHROMIUM.path!,
      "--dist",
      dist,
      "--others",
      `${dir.path}/d.qcow2,${dir.path}/f-flat.vmdk`,
      ...IMAGES.map((n) => `${dir.path}/${n}`),
    ], ROOT);
    assertEquals(r.code, 0, r.stderr);
    const results: PageResult[] = JSON.parse(r.stdout);
    assertEquals(results.map((p) => p.name), IMAGES);
    for (const page of results) {
      const name = page.name;
      // zstd: no decoder in a browser; info and map need none, reading fails clearly.
      const zstd = name === "z.qcow2";
      assertEquals(page.status, `${zstd ? "error" : "done"}: ${name}`, page.error);
      assertEquals(page.info, await qemuInfo(name, dir.path), `info of ${name}`);
      const map = await qemuImg(["map", "--output=json", name], dir.path);
      assertEquals(page.map, map.stdout, `map of ${name}`);
      if (zstd) {
        assertEquals(page.error, "qimg: This runtime cannot decompress zstd clusters");
      } else {
        assertEquals(page.error, "");
        assertEquals(page.sha256, await qemuDigest(name, dir.path), `guest bytes of ${name}`);
      }
    }
  },
});
