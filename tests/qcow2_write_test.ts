/**
 * Unit tests of the qcow2 write side: refcount entry encoding for every
 * width, the cluster compressor, and the allocator's placement rules.
 */

import { assertEquals, assertRejects, assertTrue } from "./_assert.ts";
import { sh, tempDir } from "./_util.ts";
import { compressCluster } from "../src/qcow2_write.ts";
import { getRefcount, Qcow2Refcounts, setRefcount } from "../src/qcow2_refcounts.ts";
import { inflateRawCluster, zstdDecompressCluster } from "../src/codec.ts";
import { DenoFile } from "../src/file.ts";
import { readQcow2Header } from "../src/qcow2_header.ts";
import { loadPako, loadZlib } from "../src/zlib_loader.ts";

// The codecs load node:zlib and pako lazily; the synchronous ones tested here need them loaded.
await Promise.all([loadZlib(), loadPako()]);

Deno.test("setRefcount() writes one entry of every width and leaves its neighbours", () => {
  for (let order = 0; order <= 6; order++) {
    const block = new Uint8Array(64);
    const entries = 64 * 8 / 2 ** order;
    const max = order === 6 ? 2 ** 53 - 1 : 2 ** (2 ** order) - 1;
    setRefcount(block, 5, order, max);
    setRefcount(block, 6, order, 1);
    for (let i = 0; i < entries; i++) {
      const want = i === 5 ? max : i === 6 ? 1 : 0;
      assertEquals(getRefcount(block, i, order), want, `order ${order} entry ${i}`);
    }
    setRefcount(block, 5, order, 0);
    assertEquals(getRefcount(block, 5, order), 0);
    assertEquals(getRefcount(block, 6, order), 1);
  }
  // Sub-byte entries are packed from the least significant bit (qcow2.txt).
  const b = new Uint8Array(1);
  setRefcount(b, 0, 1, 3);
  assertEquals(b[0], 0x03);
  setRefcount(b, 3, 1, 1);
  assertEquals(b[0], 0x43);
});

Deno.test("compressCluster() makes raw deflate and zstd frames that decode to the cluster", () => {
  const cluster = new Uint8Array(65536);
  for (let i = 0; i < cluster.length; i++) cluster[i] = (i >> 7) & 0x3f;
  const z = compressCluster("zlib", cluster)!;
  assertTrue(z.length < 4096, `zlib ${z.length}`);
  assertEquals(inflateRawCluster(z, cluster.length), cluster);
  const s = compressCluster("zstd", cluster)!;
  assertEquals(zstdDecompressCluster(s, cluster.length), cluster);
  // The frame header carries the content size, as qemu's ZSTD_e_end frames do.
  assertEquals(s[4] & 0xc0, 0x40);
});

async function freshImage(dir: string, options: string) {
  await sh(`qemu-img create -q -f qcow2 -o ${options} a.qcow2 64M`, dir);
  const file = await DenoFile.open(`${dir}/a.qcow2`, { write: true });
  const header = await readQcow2Header(file);
  return { file, header, refs: await Qcow2Refcounts.open(file, header) };
}

Deno.test("Qcow2Refcounts allocates from the end, reuses freed clusters, packs compressed bytes", async () => {
  await using dir = await tempDir();
  const { file, refs } = await freshImage(dir.path, "cluster_size=64k");
  const cs = 65536;
  // Header, refcount table, refcount block, L1 table come first.
  assertEquals(await refs.allocClusters(1), 4 * cs);
  assertEquals(await refs.allocClusters(3), 5 * cs);
  assertEquals(await refs.get(7), 1);
  await refs.change(5, -1);
  assertEquals(await refs.allocClusters(1), 5 * cs);
  // A hole of one cluster cannot take two.
  await refs.change(6, -1);
  assertEquals(await refs.allocClusters(2), 8 * cs);
  // The free index moved past the one-cluster hole, as qemu's free_cluster_index.
  // Compressed clusters share host clusters, one reference each.
  assertEquals(await refs.allocBytes(40000), 10 * cs);
  assertEquals(await refs.allocBytes(20000), 10 * cs + 40000);
  assertEquals(await refs.get(10), 2);
  // Spilling over into the directly following cluster references both.
  assertEquals(await refs.allocBytes(10000), 10 * cs + 60000);
  assertEquals(await refs.get(10), 3);
  assertEquals(await refs.get(11), 1);
  assertEquals(await refs.allocClusters(1), 12 * cs);
  assertEquals(await refs.allocBytes(60000), 11 * cs + 4464);
  // The next cluster is taken: start over in a fresh one.
  assertEquals(await refs.allocBytes(10000), 13 * cs);
  await file.close();
});

Deno.test("Qcow2Refcounts gives 1-bit refcounts a fresh cluster per compressed cluster and refuses overflow", async () => {
  await using dir = await tempDir();
  const { file, refs } = await freshImage(dir.path, "cluster_size=4k,refcount_bits=1");
  const first = await refs.allocBytes(100);
  const second = await refs.allocBytes(100);
  assertEquals(second - first, 4096);
  await assertRejects(() => refs.change(first / 4096, 1), /refcount overflow/);
  await file.close();
});
