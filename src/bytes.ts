/** Endian reads and writes, zero detection and alignment helpers. */

/** Reads a big-endian u64 as a number; values above 2^53 are an error for the caller to report. */
export function be64(b: Uint8Array, off: number): number {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const hi = v.getUint32(off, false);
  const lo = v.getUint32(off + 4, false);
  if (hi > 0x1fffff) return Number.POSITIVE_INFINITY;
  return hi * 0x100000000 + lo;
}

/** Reads a little-endian u64 as a number (Infinity when above 2^53). */
export function le64(b: Uint8Array, off: number): number {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const lo = v.getUint32(off, true);
  const hi = v.getUint32(off + 4, true);
  if (hi > 0x1fffff) return Number.POSITIVE_INFINITY;
  return hi * 0x100000000 + lo;
}

/** Reads a big-endian u64 exactly. */
export function be64n(b: Uint8Array, off: number): bigint {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getBigUint64(off, false);
}

/** Reads a big-endian u32. */
export function be32(b: Uint8Array, off: number): number {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(off, false);
}

/** Reads a big-endian u16. */
export function be16(b: Uint8Array, off: number): number {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getUint16(off, false);
}

/** Reads a little-endian u32. */
export function le32(b: Uint8Array, off: number): number {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(off, true);
}

/** Reads a little-endian u16. */
export function le16(b: Uint8Array, off: number): number {
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getUint16(off, true);
}

/** Writes a big-endian u64 from a number or bigint. */
export function putBe64(b: Uint8Array, off: number, value: number | bigint): void {
  new DataView(b.buffer, b.byteOffset, b.byteLength).setBigUint64(off, BigInt(value), false);
}

/** Writes a big-endian u32. */
export function putBe32(b: Uint8Array, off: number, value: number): void {
  new DataView(b.buffer, b.byteOffset, b.byteLength).setUint32(off, value >>> 0, false);
}

/** Writes a big-endian u16. */
export function putBe16(b: Uint8Array, off: number, value: number): void {
  new DataView(b.buffer, b.byteOffset, b.byteLength).setUint16(off, value, false);
}

/** Writes a little-endian u64 from a number or bigint. */
export function putLe64(b: Uint8Array, off: number, value: number | bigint): void {
  new DataView(b.buffer, b.byteOffset, b.byteLength).setBigUint64(off, BigInt(value), true);
}

/** Writes a little-endian u32. */
export function putLe32(b: Uint8Array, off: number, value: number): void {
  new DataView(b.buffer, b.byteOffset, b.byteLength).setUint32(off, value >>> 0, true);
}

/** True when every byte of `b` is zero; scans four bytes at a time where aligned. */
export function isZero(b: Uint8Array): boolean {
  const n = b.length;
  let i = 0;
  if ((b.byteOffset & 3) === 0 && n >= 64) {
    const words = new Uint32Array(b.buffer, b.byteOffset, n >>> 2);
    for (let w = 0; w < words.length; w++) if (words[w] !== 0) return false;
    i = words.length << 2;
  }
  for (; i < n; i++) if (b[i] !== 0) return false;
  return true;
}

/** Rounds `n` up to a multiple of `align`. */
export function alignUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}

/** Rounds `n` down to a multiple of `align`. */
export function alignDown(n: number, align: number): number {
  return Math.floor(n / align) * align;
}

/** Reads an ASCII/UTF-8 string from bytes. */
export function text(b: Uint8Array): string {
  return new TextDecoder().decode(b);
}
