/** Test helpers for qcow2 persistent bitmaps, read straight from the files. */

import { qemuImg } from "./_util.ts";

const decoder = new TextDecoder();

/** The persistent bitmaps of a qcow2 file, parsed here from qcow2.txt: name, flags, granularity bits, bits. */
export async function bitmapsIn(path: string): Promise<string[]> {
  const f = await Deno.readFile(path);
  const v = new DataView(f.buffer);
  const u64 = (at: number) => Number(v.getBigUint64(at));
  const cs = 2 ** v.getUint32(20);
  const size = u64(24);
  let p = v.getUint32(100);
  const out: string[] = [];
  for (;;) {
    const [type, len] = [v.getUint32(p), v.getUint32(p + 4)];
    if (type === 0) return out;
    if (type === 0x23852875) {
      let q = u64(p + 24);
      for (let i = 0; i < v.getUint32(p + 8); i++) {
        const [table, entries, flags, gbits] = [
          u64(q),
          v.getUint32(q + 8),
          v.getUint32(q + 12),
          f[q + 17],
        ];
        const nameSize = v.getUint16(q + 18);
        const name = decoder.decode(f.subarray(q + 24, q + 24 + nameSize));
        const bytes = Math.ceil(size / 2 ** gbits / 8);
        const bits = new Uint8Array(bytes);
        for (let k = 0; k < entries; k++) {
          const at = u64(table + k * 8) % 2 ** 56 - (u64(table + k * 8) % 512);
          if (at) bits.set(f.subarray(at, at + Math.min(cs, bytes - k * cs)), k * cs);
        }
        const set = [...bits].map((b, i) => b ? `${i}:${b}` : "").filter((s) => s).join(",");
        out.push(`${name} flags=${flags} granularity=2^${gbits} bits=${set}`);
        q += Math.ceil((24 + nameSize) / 8) * 8;
      }
    }
    p += 8 + Math.ceil(len / 8) * 8;
  }
}

/** `info --output=json` without what differs between two files of the same content. */
export async function infoOf(path: string, cwd: string): Promise<string> {
  const r = await qemuImg(["info", "--output=json", path], cwd);
  return r.stdout.replace(/"(filename|actual-size)": [^\n]*\n/g, "");
}
