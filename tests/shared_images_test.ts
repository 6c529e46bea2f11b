/**
 * Real images from other tools (../shared/images, described by its
 * manifest.json): for every image whose format qimg registers, `info`
 * (JSON and human, without the file-system dependent actual size), `check`
 * and `map` as the manifest recorded from qemu-img 7.2, and the guest
 * content's SHA-256 as `raw_sha256`. Images of formats qimg does not
 * register yet are listed as ignored tests naming the reason.
 */

import { createHash } from "node:crypto";
import { gunzipSync } from "node:zlib";
import { assertEquals } from "./_assert.ts";
import { haveSharedImages, qimg, sh, SHARED_IMAGES, tempDir } from "./_util.ts";
import { findFormat } from "../src/formats.ts";
import { openImageChain } from "../src/image.ts";

/** Guest sizes above this are not hashed (SHA-256 runs at well under 1 GB/s here). */
const HASH_LIMIT = 16 * 2 ** 30;

interface ManifestFile {
  file: string;
  compression: "gzip" | "bzip2" | null;
}

interface QemuRecord {
  info_rc: number;
  info: Record<string, unknown> | null;
  info_stderr: string | null;
  info_human: string | null;
  check_rc: number;
  check_output: string | null;
  convert_rc: number;
  convert_stderr: string | null;
  map_rc: number;
  map_stderr: string | null;
  map_summary: { extents: number; data_bytes: number; map?: Record<string, unknown>[] } | null;
  probed?: { info: Record<string, unknown>; raw_sha256: string; raw_size: number };
  explicit_format?: {
    args: string[];
    info_rc: number;
    info: Record<string, unknown>;
    info_human: string;
    check_rc: number;
    check_output: string;
    map_summary: { extents: number; data_bytes: number; map?: Record<string, unknown>[] };
  };
}

interface ManifestEntry {
  format: string;
  open: string;
  files: ManifestFile[];
  raw_sha256: string | null;
  raw_size: number | null;
  virtual_size: number | null;
  qemu_img: QemuRecord;
}

function loadManifest(): ManifestEntry[] {
  if (!haveSharedImages()) return [];
  return JSON.parse(Deno.readTextFileSync(`${SHARED_IMAGES}manifest.json`));
}

/** Copies an image's files into `dir`, decompressed, keeping their relative paths. */
async function unpack(entry: ManifestEntry, dir: string): Promise<void> {
  for (const f of entry.files) {
    const src = `${SHARED_IMAGES}${f.file}`;
    const dst = `${dir}/${f.file.replace(/\.(gz|bz2)$/, f.compression ? "" : "$&")}`;
    await Deno.mkdir(dst.slice(0, dst.lastIndexOf("/")), { recursive: true });
    if (f.compression === "gzip") {
      await Deno.writeFile(dst, gunzipSync(await Deno.readFile(src)));
    } else if (f.compression === "bzip2") {
      await sh(`bzip2 -dc '${src}' > '${dst}'`);
    } else {
      await Deno.copyFile(src, dst);
    }
  }
}

function withoutActualSize(info: Record<string, unknown>): Record<string, unknown> {
  const { "actual-size": _, ...rest } = info;
  return rest;
}

/** qemu-img's text as qimg prints it; the disk size line depends on the file system. */
function normalise(text: string): string {
  return text.replaceAll("qemu-img", "qimg").replace(/^disk size: .*$/m, "disk size: -").trim();
}

/** SHA-256 of the guest as qimg reads it; zero extents are hashed without reading. */
async function guestHash(path: string, format?: string): Promise<{ hash: string; size: number }> {
  const image = await openImageChain(path, { format });
  try {
    const hash = createHash("sha256");
    const zeroes = new Uint8Array(16 << 20);
    const buf = new Uint8Array(16 << 20);
    for await (const e of image.extents()) {
      for (let done = 0; done < e.length;) {
        const n = Math.min(buf.length, e.length - done);
        if (e.zero) {
          hash.update(zeroes.subarray(0, n));
        } else {
          await image.read(e.offset + done, buf.subarray(0, n));
          hash.update(buf.subarray(0, n));
        }
        done += n;
      }
    }
    return { hash: hash.digest("hex"), size: image.size };
  } finally {
    await image.close();
  }
}

/** The manifest's map summary of what `qimg map --output=json` prints. */
function mapSummary(stdout: string): { extents: number; data_bytes: number; map: unknown[] } {
  const map = JSON.parse(stdout) as { length: number; data: boolean }[];
  return {
    extents: map.length,
    data_bytes: map.filter((m) => m.data).reduce((a, m) => a + m.length, 0),
    map,
  };
}

async function assertInfo(
  cwd: string,
  name: string,
  args: string[],
  want: {
    rc: number;
    info: Record<string, unknown> | null;
    stderr: string | null;
    human: string | null;
  },
): Promise<void> {
  const json = await qimg(["info", ...args, "--output=json", name], cwd);
  assertEquals(json.code, want.rc, json.stderr);
  // Errors, and warnings printed while opening (dmg's missing modules).
  assertEquals(normalise(json.stderr), normalise(want.stderr ?? ""));
  if (want.rc !== 0) return;
  assertEquals(withoutActualSize(JSON.parse(json.stdout)), withoutActualSize(want.info!));
  const human = await qimg(["info", ...args, name], cwd);
  assertEquals(normalise(human.stdout), normalise(want.human ?? ""));
}

async function assertCheckAndMap(
  cwd: string,
  name: string,
  args: string[],
  want: {
    checkRc: number;
    checkOutput: string | null;
    mapSummary: QemuRecord["map_summary"];
  },
): Promise<void> {
  const check = await qimg(["check", ...args, name], cwd);
  assertEquals(
    { code: check.code, output: normalise(check.stderr + check.stdout) },
    { code: want.checkRc, output: normalise(want.checkOutput ?? "") },
  );
  if (!want.mapSummary) return;
  const map = await qimg(["map", ...args, "--output=json", name], cwd);
  assertEquals(map.code, 0, map.stderr);
  const got = mapSummary(map.stdout);
  assertEquals(got.extents, want.mapSummary.extents);
  assertEquals(got.data_bytes, want.mapSummary.data_bytes);
  if (want.mapSummary.map) assertEquals(got.map, want.mapSummary.map);
}

async function assertHash(path: string, format: string | undefined, sha: string, size: number) {
  const got = await guestHash(path, format);
  assertEquals(got, { hash: sha, size });
}

for (const entry of loadManifest()) {
  const q = entry.qemu_img;
  const probedFormat = (q.info?.format as string | undefined) ?? entry.format;
  const missing = [...new Set([entry.format, probedFormat])].filter((f) => !findFormat(f));
  const label = `shared image ${entry.open} (${entry.format})`;
  if (missing.length) {
    Deno.test({
      name: `${label} skipped: format ${missing.join(", ")} not registered in qimg`,
      ignore: true,
      fn() {},
    });
    continue;
  }
  const size = entry.raw_size ?? 0;
  const hashable = entry.raw_sha256 !== null && size <= HASH_LIMIT;
  const suffix = entry.raw_sha256 !== null && !hashable
    ? ` (raw hash skipped: ${size} bytes is above ${HASH_LIMIT}; map checked instead)`
    : "";
  Deno.test({
    name: `${label} reads as qemu-img 7.2: info, check, map, raw_sha256${suffix}`,
    ignore: !haveSharedImages(),
    async fn(t) {
      await using dir = await tempDir();
      await unpack(entry, dir.path);
      const path = `${dir.path}/${entry.open}`;
      const cwd = path.slice(0, path.lastIndexOf("/"));
      const name = path.slice(path.lastIndexOf("/") + 1);
      await t.step("info", () =>
        assertInfo(cwd, name, [], {
          rc: q.info_rc,
          info: q.info,
          stderr: q.info_stderr,
          human: q.info_human,
        }));
      if (q.info_rc === 0) {
        await t.step("check and map", () =>
          assertCheckAndMap(cwd, name, [], {
            checkRc: q.check_rc,
            checkOutput: q.check_output,
            mapSummary: q.map_summary,
          }));
      }
      const explicit = q.explicit_format;
      if (explicit) {
        await t.step(`info, check and map with ${explicit.args.join(" ")}`, async () => {
          await assertInfo(cwd, name, explicit.args, {
            rc: explicit.info_rc,
            info: explicit.info,
            stderr: null,
            human: explicit.info_human,
          });
          await assertCheckAndMap(cwd, name, explicit.args, {
            checkRc: explicit.check_rc,
            checkOutput: explicit.check_output,
            mapSummary: explicit.map_summary,
          });
        });
      }
      if (q.convert_rc !== 0) {
        await t.step("convert -O raw fails as qemu-img", async () => {
          const r = await qimg(["convert", "-O", "raw", name, `${name}.raw`], cwd);
          assertEquals(
            { code: r.code, stderr: normalise(r.stderr) },
            { code: q.convert_rc, stderr: normalise(q.convert_stderr ?? "") },
          );
        });
      }
      if (hashable && q.info_rc !== 0) {
        // The manifest hashed these after `qemu-img check -r all` on a copy (a replayed log).
        await t.step("raw_sha256 after check -r all", async () => {
          const r = await qimg(["check", "-r", "all", name], cwd);
          assertEquals(r.code, 0, r.stderr);
          await assertHash(path, undefined, entry.raw_sha256!, size);
        });
      } else if (hashable) {
        // raw_sha256 is of the explicit format's view when the manifest has one.
        const format = explicit ? explicit.args[explicit.args.indexOf("-f") + 1] : undefined;
        await t.step("raw_sha256", () => assertHash(path, format, entry.raw_sha256!, size));
        if (q.probed) {
          await t.step(
            "probed raw_sha256",
            () => assertHash(path, undefined, q.probed!.raw_sha256, q.probed!.raw_size),
          );
        }
      }
    },
  });
}

if (!haveSharedImages()) {
  Deno.test({ name: "shared images skipped: ../shared/images is absent", ignore: true, fn() {} });
}
