/**
 * An LRU cache of metadata tables (L2 tables, refcount blocks) keyed by
 * host offset and bounded in bytes. Loads of the same table in flight at
 * once share one read. Entries can be marked dirty: a dirty entry is never
 * evicted silently; it is written back through `writeBack` first, after
 * every cache it `dependsOn` has been flushed (QEMU's L2-after-refcount order).
 */

/** One cached table. */
interface Entry {
  data: Uint8Array;
  dirty: boolean;
}

/** How a cache reads and writes its tables. */
export interface CacheBackend {
  /** Reads the table at `offset`. */
  load(offset: number): Promise<Uint8Array>;
  /** Writes a dirty table back; absent for read-only caches. */
  writeBack?(offset: number, data: Uint8Array): Promise<void>;
}

/** LRU metadata cache, bounded in bytes. */
export class MetadataCache {
  readonly maxBytes: number;
  #backend: CacheBackend;
  /** Map order is the LRU order: first = least recently used. */
  #entries = new Map<number, Entry>();
  #loading = new Map<number, Promise<Uint8Array>>();
  #bytes = 0;
  #dependencies: MetadataCache[] = [];
  #hits = 0;
  #misses = 0;

  /**
   * @param backend reads (and, for writers, writes) tables.
   * @param options `maxBytes`: the bound; at least one table is always kept.
   */
  constructor(backend: CacheBackend, options: { maxBytes: number }) {
    this.#backend = backend;
    this.maxBytes = options.maxBytes;
  }

  /** Bytes currently held. */
  get bytes(): number {
    return this.#bytes;
  }

  /** Number of tables currently held. */
  get size(): number {
    return this.#entries.size;
  }

  /** Loads from the backend so far (each distinct in-flight load counts once). */
  get misses(): number {
    return this.#misses;
  }

  /** Lookups answered from memory. */
  get hits(): number {
    return this.#hits;
  }

  /** The table at `offset`, loading it on a miss. */
  get(offset: number): Promise<Uint8Array> {
    const e = this.#entries.get(offset);
    if (e) {
      this.#hits++;
      this.#entries.delete(offset);
      this.#entries.set(offset, e);
      return Promise.resolve(e.data);
    }
    const pending = this.#loading.get(offset);
    if (pending) {
      this.#hits++;
      return pending;
    }
    this.#misses++;
    const p = this.#load(offset);
    this.#loading.set(offset, p);
    return p;
  }

  async #load(offset: number): Promise<Uint8Array> {
    try {
      const data = await this.#backend.load(offset);
      // A writer may have put a newer copy in while this load was in flight.
      const raced = this.#entries.get(offset);
      if (raced) return raced.data;
      await this.#insert(offset, { data, dirty: false });
      return data;
    } finally {
      this.#loading.delete(offset);
    }
  }

  /** Puts a table in the cache (a writer's new or changed table); `dirty` schedules its write-back. */
  async put(offset: number, data: Uint8Array, options: { dirty?: boolean } = {}): Promise<void> {
    const old = this.#entries.get(offset);
    if (old) {
      this.#entries.delete(offset);
      this.#bytes -= old.data.length;
    }
    await this.#insert(offset, { data, dirty: (options.dirty ?? false) || (old?.dirty ?? false) });
  }

  /** Marks a held table as changed. */
  markDirty(offset: number): void {
    const e = this.#entries.get(offset);
    if (!e) throw new Error(`markDirty: no table at ${offset} in the cache`);
    e.dirty = true;
  }

  /** Drops a table without writing it (its clusters were freed). */
  discard(offset: number): void {
    const e = this.#entries.get(offset);
    if (!e) return;
    this.#entries.delete(offset);
    this.#bytes -= e.data.length;
  }

  /** Makes this cache flush `other` before writing any of its own tables. */
  dependsOn(other: MetadataCache): void {
    if (!this.#dependencies.includes(other)) this.#dependencies.push(other);
  }

  /** Writes back every dirty table, dependencies first. */
  async flush(): Promise<void> {
    const dirty = [...this.#entries].filter(([, e]) => e.dirty);
    if (dirty.length === 0) return;
    for (const d of this.#dependencies) await d.flush();
    // Offset order turns many small writes into a near-sequential pass.
    dirty.sort((a, b) => a[0] - b[0]);
    for (const [offset, e] of dirty) await this.#writeBack(offset, e);
  }

  /** Forgets every table (after flushing, if any is dirty). */
  async clear(): Promise<void> {
    await this.flush();
    this.#entries.clear();
    this.#bytes = 0;
  }

  async #writeBack(offset: number, e: Entry): Promise<void> {
    if (!this.#backend.writeBack) throw new Error("dirty table in a read-only cache");
    await this.#backend.writeBack(offset, e.data);
    e.dirty = false;
  }

  async #insert(offset: number, e: Entry): Promise<void> {
    this.#entries.set(offset, e);
    this.#bytes += e.data.length;
    while (this.#bytes > this.maxBytes && this.#entries.size > 1) {
      const [victimOffset, victim] = this.#entries.entries().next().value!;
      if (victimOffset === offset) break;
      if (victim.dirty) {
        for (const d of this.#dependencies) await d.flush();
        await this.#writeBack(victimOffset, victim);
      }
      // The victim may have been touched while its write-back ran.
      if (this.#entries.get(victimOffset) === victim) {
        this.#entries.delete(victimOffset);
        this.#bytes -= victim.data.length;
      }
    }
  }
}
