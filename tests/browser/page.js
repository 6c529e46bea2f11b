// The page's script: opens the picked File with qimg's browser bundle and
// shows what `qemu-img info --output=json` and `qemu-img map --output=json`
// print for it, and the SHA-256 of the guest's bytes (read through the
// backing chain, as `qemu-img convert -O raw` writes them) for images up to
// 64 MiB. #status ends as "done: <name>" or "error: <name>".
// The bundle is a build output (`deno task build`), absent from a fresh
// checkout: a computed specifier keeps `deno check tests/` from resolving it.
const BUNDLE = new URL("../../dist/qimg_browser.mjs", import.meta.url).href;
const { openImage, toQemuJson } = await import(BUNDLE);

const $ = (id) => document.getElementById(id);

/** qemu-img map's JSON: qemu's entry_mergeable over the extents, one run per line. */
async function mapJson(image) {
  const runs = [];
  for await (const e of image.extents()) {
    const run = {
      start: e.offset,
      length: e.length,
      depth: e.depth,
      present: e.present,
      zero: e.zero,
      data: e.data,
      offset: e.hostOffset,
      file: e.file,
    };
    const last = runs[runs.length - 1];
    if (
      last && last.zero === run.zero && last.data === run.data && last.depth === run.depth &&
      last.present === run.present && last.file === run.file &&
      (last.offset === undefined
        ? run.offset === undefined
        : run.offset !== undefined && last.offset + last.length === run.offset)
    ) {
      last.length += run.length;
    } else {
      runs.push(run);
    }
  }
  const lines = runs.map((r) =>
    `{ "start": ${r.start}, "length": ${r.length}, "depth": ${r.depth},` +
    ` "present": ${r.present}, "zero": ${r.zero}, "data": ${r.data}` +
    (r.offset === undefined ? "" : `, "offset": ${r.offset}`) + "}"
  );
  return "[" + lines.join(",\n") + "]\n";
}

const DIGEST_LIMIT = 64 << 20;

/** SHA-256 of the guest's bytes, hex; read in 1 MiB pieces. */
async function guestDigest(image) {
  if (image.size > DIGEST_LIMIT) return "(not computed: larger than 64 MiB)";
  const all = new Uint8Array(image.size);
  for (let at = 0; at < image.size; at += 1 << 20) {
    await image.read(at, all.subarray(at, Math.min(image.size, at + (1 << 20))));
  }
  const hash = new Uint8Array(await crypto.subtle.digest("SHA-256", all));
  return [...hash].map((b) => b.toString(16).padStart(2, "0")).join("");
}

async function show() {
  const file = $("file").files[0];
  if (!file) return;
  const files = {};
  for (const f of $("others").files) files[f.name] = f;
  for (const id of ["error", "info", "map", "sha256"]) $(id).textContent = "";
  $("status").textContent = `reading ${file.name}`;
  try {
    // As qemu-img info: never the backing file (but a vmdk's extent files).
    const top = await openImage(file, { backing: false, files });
    try {
      $("info").textContent = toQemuJson(await top.info());
    } finally {
      await top.close();
    }
    // As qemu-img map: through the backing chain, which must be given.
    const image = await openImage(file, { files });
    try {
      $("map").textContent = await mapJson(image);
      $("sha256").textContent = await guestDigest(image);
    } finally {
      await image.close();
    }
    $("status").textContent = `done: ${file.name}`;
  } catch (e) {
    $("error").textContent = `qimg: ${e instanceof Error ? e.message : String(e)}`;
    $("status").textContent = `error: ${file.name}`;
  }
}

$("file").addEventListener("change", show);
$("others").addEventListener("change", show);
$("status").textContent = "ready: pick an image";
