import { DenoFile } from "../src/file.ts";
import {
  INCOMPAT_DATA_FILE,
  probeQcow2,
  readBitmapDirectory,
  readQcow2Header,
} from "../src/qcow2_header.ts";
import { assertEquals, assertRejects } from "./_assert.ts";
import { sh, tempDir } from "./_util.ts";

function head(bytes: number[], length: number): Uint8Array {
  const b = new Uint8Array(length);
  b.set(bytes);
  return b;
}

Deno.test("probeQcow2() wants the magic and a version of at least 2", () => {
  const magic = [0x51, 0x46, 0x49, 0xfb];
  assertEquals(probeQcow2(head([...magic, 0, 0, 0, 3], 8)), 100);
  assertEquals(probeQcow2(head([...magic, 0, 0, 0, 2], 2048)), 100);
  // Version 1 is the qcow driver's; a short file's missing bytes are zeroes.
  assertEquals(probeQcow2(head([...magic, 0, 0, 0, 1], 2048)), 0);
  assertEquals(probeQcow2(head([...magic, 0, 0, 0], 7)), 0);
  assertEquals(probeQcow2(head([...magic, 0, 0, 3], 7)), 100);
  assertEquals(probeQcow2(head([0x51, 0x46, 0x49, 0xfa, 0, 0, 0, 3], 2048)), 0);
});

Deno.test("readQcow2Header() gives v2 images v3's defaults and reads the backing name", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f raw b.raw 1M && " +
      "qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k -b b.raw -F raw v2.qcow2 3M",
    dir.path,
  );
  const file = await DenoFile.open(`${dir.path}/v2.qcow2`);
  try {
    const h = await readQcow2Header(file);
    assertEquals({
      version: h.version,
      clusterSize: h.clusterSize,
      size: h.size,
      refcountOrder: h.refcountOrder,
      headerLength: h.headerLength,
      incompatible: h.incompatibleFeatures,
      compressionType: h.compressionType,
      backingFile: h.backingFile,
      backingFormat: h.backingFormat,
      l2Size: h.l2Size,
      extendedL2: h.extendedL2,
    }, {
      version: 2,
      clusterSize: 4096,
      size: 3 << 20,
      refcountOrder: 4,
      headerLength: 72,
      incompatible: 0n,
      compressionType: "zlib",
      backingFile: "b.raw",
      backingFormat: "raw",
      l2Size: 512,
      extendedL2: false,
    });
  } finally {
    await file.close();
  }
});

Deno.test("readQcow2Header() reads v3 extensions: feature names, data file, extended L2", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 -o data_file=d.raw,extended_l2=on,compression_type=zstd a.qcow2 1M && " +
      "qemu-img bitmap --add a.qcow2 bm",
    dir.path,
  );
  const file = await DenoFile.open(`${dir.path}/a.qcow2`);
  try {
    const h = await readQcow2Header(file);
    assertEquals(h.dataFile, "d.raw");
    assertEquals((h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n, true);
    assertEquals([h.extendedL2, h.l2EntrySize, h.l2Size], [true, 16, 4096]);
    assertEquals(h.compressionType, "zstd");
    assertEquals(
      h.featureTable.find((f) => f.type === 0 && f.bit === 4)?.name,
      "extended L2 entries",
    );
    const bitmaps = await readBitmapDirectory(file, h);
    assertEquals(bitmaps.map((b) => [b.name, b.granularityBits, b.flags]), [["bm", 16, 2]]);
  } finally {
    await file.close();
  }
});

Deno.test("readQcow2Header() refuses a non-qcow2 file with qemu's message", async () => {
  await using dir = await tempDir();
  await sh("qemu-img create -q -f raw r.raw 1M", dir.path);
  const file = await DenoFile.open(`${dir.path}/r.raw`);
  try {
    await assertRejects(() => readQcow2Header(file), /^QimgError: Image is not in qcow2 format$/);
  } finally {
    await file.close();
  }
});
