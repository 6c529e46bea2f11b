import { createHash } from "node:crypto";
import { compressedDescriptor, entryOffset, L2_CACHE_BYTES } from "../src/qcow2_cluster.ts";
import { ClusterMapper, readL1Table } from "../src/qcow2_cluster.ts";
import { Qcow2Image } from "../src/qcow2.ts";
import { readQcow2Header, unsupportedFeatureMessage } from "../src/qcow2_header.ts";
import { DenoFile } from "../src/file.ts";
import { openImageChain } from "../src/image.ts";
import { assertEquals, assertTrue } from "./_assert.ts";
import { hashFile, sh, tempDir } from "./_util.ts";

Deno.test("compressedDescriptor() splits offset and sector count at 62 - (cluster_bits - 8)", () => {
  // 64 KiB clusters: offset in bits 0-53, (sectors - 1) in bits 54-61.
  const offset = 0x123456789a3n;
  const entry = (1n << 62n) | (5n << 54n) | offset;
  const hi = Number(entry >> 32n);
  const lo = Number(entry & 0xffffffffn);
  assertEquals(compressedDescriptor(hi, lo, 16), {
    hostOffset: Number(offset),
    size: 6 * 512 - Number(offset & 511n),
  });
  // 512-byte clusters: offset in bits 0-60, (sectors - 1) in bit 61.
  const e2 = (1n << 62n) | (1n << 61n) | 0x3ffn;
  assertEquals(compressedDescriptor(Number(e2 >> 32n), Number(e2 & 0xffffffffn), 9), {
    hostOffset: 0x3ff,
    size: 2 * 512 - 0x1ff,
  });
});

Deno.test("entryOffset() keeps bits 9-55 exactly, above 2^53 too", () => {
  assertEquals(entryOffset(0xffffffff, 0xffffffff), 2 ** 56 - 512);
  assertEquals(entryOffset(0x80000000, 0x00010001), 0x10000);
});

Deno.test("unsupportedFeatureMessage() names known bits from the table, then the rest in hex", () => {
  const table = [
    { type: 0, bit: 9, name: "frobnication" },
    { type: 1, bit: 8, name: "not incompatible" },
  ];
  assertEquals(
    unsupportedFeatureMessage(table, (1n << 9n) | (1n << 8n) | (1n << 40n)),
    "Unsupported qcow2 feature(s): frobnication, Unknown incompatible feature: 10000000100",
  );
});

Deno.test("ClusterMapper reads each L2 table once on a sequential read, with a one-table cache", async () => {
  await using dir = await tempDir();
  // 512-byte clusters: an L2 table maps 32 KiB, so 4 MiB of data spans 128 tables.
  await sh(
    "head -c 4M /dev/urandom > src.raw && qemu-img convert -O qcow2 -o cluster_size=512 src.raw a.qcow2",
    dir.path,
  );
  const file = await DenoFile.open(`${dir.path}/a.qcow2`);
  const header = await readQcow2Header(file);
  const mapper = new ClusterMapper(file, header, await readL1Table(file, header), {
    cacheBytes: 512,
  });
  const image = new Qcow2Image(file, header, mapper, file);
  try {
    const hash = createHash("sha256");
    const buf = new Uint8Array(256 << 10);
    for (let off = 0; off < image.size; off += buf.length) {
      await image.read(off, buf);
      hash.update(buf);
    }
    assertEquals(hash.digest("hex"), await hashFile(`${dir.path}/src.raw`));
    assertEquals(mapper.l2Cache.misses, 128);
    assertTrue(mapper.l2Cache.bytes <= 512);
  } finally {
    await image.close();
  }
});

Deno.test("Qcow2Image walks a 1 TiB sparse image touching each L2 table once, in bounded memory", async () => {
  await using dir = await tempDir();
  await sh(
    "qemu-img create -q -f qcow2 big.qcow2 1T && " +
      "qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 300G 128k' -c 'write -P 0x33 1048575M 1M' big.qcow2 >/dev/null",
    dir.path,
  );
  const started = performance.now();
  const image = await openImageChain(`${dir.path}/big.qcow2`);
  try {
    const q = image.chain[0].image as Qcow2Image;
    let data = 0;
    const hash = createHash("sha256");
    for await (const e of image.extents()) {
      if (!e.data) continue;
      const buf = new Uint8Array(e.length);
      await image.read(e.offset, buf);
      hash.update(buf);
      data += e.length;
    }
    assertEquals(data, (64 << 10) + (128 << 10) + (1 << 20));
    // Three allocated L2 tables, each loaded once; unallocated L1 entries cost nothing.
    assertEquals(q.mapper.l2Cache.misses, 3);
    assertTrue(q.mapper.l2Cache.bytes <= L2_CACHE_BYTES);
    // Plain reads across unallocated space are answered without metadata I/O.
    const window = new Uint8Array(64 << 20);
    await image.read(500 * 2 ** 30, window);
    assertTrue(window.every((b) => b === 0));
    assertEquals(q.mapper.l2Cache.misses, 3);
    assertTrue(performance.now() - started < 20000, "too slow");
  } finally {
    await image.close();
  }
});
