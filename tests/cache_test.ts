import { MetadataCache } from "../src/cache.ts";
import { assertEquals, assertRejects, assertTrue } from "./_assert.ts";

/** A backend over a Map of tables that counts loads and records write-backs. */
function backend(tableSize = 16) {
  const loads: number[] = [];
  const writes: number[] = [];
  let gate: Promise<void> = Promise.resolve();
  return {
    loads,
    writes,
    hold(p: Promise<void>) {
      gate = p;
    },
    load: async (offset: number) => {
      loads.push(offset);
      await gate;
      return new Uint8Array(tableSize).fill(offset & 0xff);
    },
    writeBack: (offset: number) => {
      writes.push(offset);
      return Promise.resolve();
    },
  };
}

Deno.test("MetadataCache.get() loads once and answers repeats from memory", async () => {
  const b = backend();
  const cache = new MetadataCache(b, { maxBytes: 64 });
  const t1 = await cache.get(1);
  const t2 = await cache.get(1);
  assertTrue(t1 === t2);
  assertEquals(b.loads, [1]);
  assertEquals({ hits: cache.hits, misses: cache.misses }, { hits: 1, misses: 1 });
});

Deno.test("MetadataCache.get() shares one load between concurrent requests", async () => {
  const b = backend();
  let release!: () => void;
  b.hold(new Promise<void>((r) => (release = r)));
  const cache = new MetadataCache(b, { maxBytes: 64 });
  const p = Promise.all([cache.get(7), cache.get(7), cache.get(7)]);
  release();
  const [a, c, d] = await p;
  assertTrue(a === c && c === d);
  assertEquals(b.loads, [7]);
});

Deno.test("MetadataCache evicts the least recently used table to stay within maxBytes", async () => {
  const b = backend(16);
  const cache = new MetadataCache(b, { maxBytes: 48 });
  await cache.get(1);
  await cache.get(2);
  await cache.get(3);
  await cache.get(1); // 2 is now the least recently used
  await cache.get(4);
  assertEquals(cache.bytes, 48);
  assertEquals(cache.size, 3);
  await cache.get(1);
  await cache.get(3);
  await cache.get(4);
  assertEquals(b.loads, [1, 2, 3, 4]);
  await cache.get(2);
  assertEquals(b.loads, [1, 2, 3, 4, 2]);
  assertTrue(cache.bytes <= 48);
});

Deno.test("MetadataCache keeps one table even when it exceeds maxBytes", async () => {
  const b = backend(100);
  const cache = new MetadataCache(b, { maxBytes: 10 });
  await cache.get(1);
  assertEquals(cache.size, 1);
  await cache.get(2);
  assertEquals(cache.size, 1);
  await cache.get(2);
  assertEquals(b.loads, [1, 2]);
});

Deno.test("MetadataCache writes dirty tables back before evicting them, dependencies first", async () => {
  const order: string[] = [];
  const refcounts = new MetadataCache({
    load: () => Promise.resolve(new Uint8Array(16)),
    writeBack: (o) => (order.push(`refcount ${o}`), Promise.resolve()),
  }, { maxBytes: 64 });
  const l2 = new MetadataCache({
    load: () => Promise.resolve(new Uint8Array(16)),
    writeBack: (o) => (order.push(`l2 ${o}`), Promise.resolve()),
  }, { maxBytes: 32 });
  l2.dependsOn(refcounts);
  await refcounts.put(100, new Uint8Array(16), { dirty: true });
  await l2.get(1);
  l2.markDirty(1);
  await l2.get(2);
  await l2.get(3); // evicts dirty table 1
  assertEquals(order, ["refcount 100", "l2 1"]);
  await l2.put(2, new Uint8Array(16), { dirty: true });
  await l2.flush();
  assertEquals(order, ["refcount 100", "l2 1", "l2 2"]);
  // Clean now: flushing again writes nothing.
  await l2.flush();
  assertEquals(order.length, 3);
});

Deno.test("MetadataCache.get() forgets a failed load so a later get() retries", async () => {
  let fail = true;
  const cache = new MetadataCache({
    load: () => fail ? Promise.reject(new Error("EIO")) : Promise.resolve(new Uint8Array(4)),
  }, { maxBytes: 64 });
  await assertRejects(() => cache.get(5), /EIO/);
  fail = false;
  assertEquals((await cache.get(5)).length, 4);
});

Deno.test("MetadataCache.discard() drops a table without writing it", async () => {
  const b = backend();
  const cache = new MetadataCache(b, { maxBytes: 64 });
  await cache.put(9, new Uint8Array(16), { dirty: true });
  cache.discard(9);
  await cache.flush();
  assertEquals(b.writes, []);
  assertEquals(cache.bytes, 0);
});
