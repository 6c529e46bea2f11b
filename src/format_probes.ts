/**
 * Each format's probe: the magic check qemu's `bdrv_probe` runs on a file's
 * first bytes, scoring 0-100. Kept apart from the drivers so that probing a
 * file loads none of them (formats.ts loads only the driver that wins).
 */

/** "QFI\xfb": qcow and qcow2. */
export const QCOW_MAGIC = 0x514649fb;
const VMDK3_MAGIC = 0x434f5744; // "COWD"
const VMDK4_MAGIC = 0x4b444d56; // "KDMV"
const VDI_SIGNATURE = 0xbeda107f;
/** Where the vdi header keeps its signature. */
const VDI_SIGNATURE_OFFSET = 64;

function be32(b: Uint8Array, off: number): number {
  return ((b[off] << 24) | (b[off + 1] << 16) | (b[off + 2] << 8) | b[off + 3]) >>> 0;
}

function startsWith(head: Uint8Array, magic: string): boolean {
  if (head.length < magic.length) return false;
  for (let i = 0; i < magic.length; i++) if (head[i] !== magic.charCodeAt(i)) return false;
  return true;
}

/** qcow2: the magic and a version of at least 2. */
export function probeQcow2(head: Uint8Array): number {
  // qemu probes a zero-padded 2 KiB buffer, so a short file's missing bytes count as zeroes.
  const b = new Uint8Array(8);
  b.set(head.subarray(0, 8));
  return be32(b, 0) === QCOW_MAGIC && be32(b, 4) >= 2 ? 100 : 0;
}

/** vdi: the signature at offset 64. */
export function probeVdi(head: Uint8Array): number {
  // qemu probes a zero-padded 2 KiB buffer, so short files count too.
  const o = VDI_SIGNATURE_OFFSET;
  if (head.length < o + 4) return 0;
  const le = (head[o] | (head[o + 1] << 8) | (head[o + 2] << 16) | (head[o + 3] << 24)) >>> 0;
  return le === VDI_SIGNATURE ? 100 : 0;
}

/** vpc: the footer's cookie, "conectix", at the start (qemu probes only there). */
export function probeVpc(head: Uint8Array): number {
  return startsWith(head, "conectix") ? 100 : 0;
}

/** vhdx: the file identifier's signature. */
export function probeVhdx(head: Uint8Array): number {
  return startsWith(head, "vhdxfile") ? 100 : 0;
}

/** qemu's vmdk_probe: a sparse magic, or a descriptor whose first non-comment line is `version=1..3`. */
export function probeVmdk(head: Uint8Array): number {
  if (head.length < 4) return 0;
  const magic = be32(head, 0);
  if (magic === VMDK3_MAGIC || magic === VMDK4_MAGIC) return 100;
  const end = head.length;
  const at = (p: number) => String.fromCharCode(head[p]);
  let p = 0;
  while (p < end) {
    if (at(p) === "#") {
      while (p < end && at(p) !== "\n") p++;
      p++;
      continue;
    }
    if (at(p) === " ") {
      while (p < end && at(p) === " ") p++;
      if (p < end && at(p) === "\r") p++;
      if (p === end || at(p) !== "\n") return 0;
      p++;
      continue;
    }
    for (const v of ["1", "2", "3"]) {
      if (
        startsWith(head.subarray(p), `version=${v}\n`) ||
        startsWith(head.subarray(p), `version=${v}\r\n`)
      ) return 100;
    }
    return 0;
  }
  return 0;
}
