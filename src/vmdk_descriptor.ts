/**
 * The VMDK text descriptor: the fields qemu reads from it (createType,
 * extent lines, CID, parentCID, parentFileNameHint) and the descriptor
 * qemu writes when it creates an image. qemu scans the text with strstr and
 * sscanf, so a field is found anywhere (even in a comment) and an extent
 * line's fields may run on into the next line; the parsers here keep that.
 */

import { QimgError } from "./errors.ts";

/** What one `RW <sectors> <TYPE> "<file>" [offset]` line says. */
export interface ExtentLine {
  /** Size in 512-byte sectors (> 0). */
  sectors: number;
  /** FLAT, SPARSE, VMFS, VMFSSPARSE or SESPARSE. */
  type: string;
  /** The file name as written. */
  fileName: string;
  /** Start of the data in a flat file, in sectors (flat extents only). */
  flatOffset: number;
}

/** The create types qemu opens from a descriptor file. */
const DESCRIPTOR_TYPES = [
  "monolithicFlat",
  "vmfs",
  "vmfsSparse",
  "seSparse",
  "twoGbMaxExtentSparse",
  "twoGbMaxExtentFlat",
];

const EXTENT_TYPES = ["FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"];

/** The text as C sees it: up to the first NUL. */
export function cString(text: string): string {
  const nul = text.indexOf("\0");
  return nul < 0 ? text : text.slice(0, nul);
}

/**
 * The value of `name="..."` found by qemu's strstr scan (two characters
 * after the name are skipped), or undefined when absent or unterminated.
 */
export function descriptorValue(desc: string, name: string, maxLength: number): string | undefined {
  const at = desc.indexOf(name);
  if (at < 0) return undefined;
  const start = at + name.length + 2;
  if (start >= desc.length) return undefined;
  const end = desc.indexOf('"', start);
  if (end < 0 || maxLength < end - start + 1) return undefined;
  return desc.slice(start, end);
}

/** The createType of a descriptor file, checked as qemu does. */
export function parseCreateType(desc: string): string {
  const ct = descriptorValue(desc, "createType", 128);
  if (ct === undefined) throw new QimgError("invalid VMDK image descriptor");
  if (!DESCRIPTOR_TYPES.includes(ct)) throw new QimgError(`Unsupported image type '${ct}'`);
  return ct;
}

const isSpace = (c: string | undefined) =>
  c === " " || c === "\t" || c === "\n" || c === "\v" || c === "\f" || c === "\r";

/** A cursor over the text doing what glibc's sscanf directives do. */
class Scanner {
  pos: number;
  constructor(readonly s: string, pos: number) {
    this.pos = pos;
  }
  skipSpace(): void {
    while (isSpace(this.s[this.pos])) this.pos++;
  }
  /** `%Ns`: skips white space, then 1..max non-space characters. */
  word(max: number): string | undefined {
    this.skipSpace();
    const start = this.pos;
    while (this.pos < this.s.length && this.pos - start < max && !isSpace(this.s[this.pos])) {
      this.pos++;
    }
    return this.pos > start ? this.s.slice(start, this.pos) : undefined;
  }
  /** `%ld` (base 10): skips white space, optional sign, digits; saturates like strtol. */
  integer(): bigint | undefined {
    this.skipSpace();
    let i = this.pos;
    let neg = false;
    if (this.s[i] === "+" || this.s[i] === "-") neg = this.s[i++] === "-";
    const start = i;
    while (i < this.s.length && this.s[i] >= "0" && this.s[i] <= "9") i++;
    if (i === start) return undefined;
    this.pos = i;
    let v = BigInt(this.s.slice(start, i));
    if (neg) v = -v;
    const max = (1n << 63n) - 1n;
    return v > max ? max : v < -max - 1n ? -max - 1n : v;
  }
  /** A literal character after optional white space (a format's `" \""`). */
  literal(c: string, skip: boolean): boolean {
    if (skip) this.skipSpace();
    if (this.s[this.pos] !== c) return false;
    this.pos++;
    return true;
  }
  /** `%N[^\n\r"]`: 1..max characters up to a newline or quote. */
  quotedBody(max: number): string | undefined {
    const start = this.pos;
    while (
      this.pos < this.s.length && this.pos - start < max &&
      !'\n\r"'.includes(this.s[this.pos])
    ) this.pos++;
    return this.pos > start ? this.s.slice(start, this.pos) : undefined;
  }
}

/** One line's sscanf("%10s %ld %10s \"%511[^\n\r\"]\" %ld"): matches and fields. */
function scanExtentLine(desc: string, p: number) {
  const sc = new Scanner(desc, p);
  const r: {
    matches: number;
    access?: string;
    sectors?: bigint;
    type?: string;
    fname?: string;
    offset?: bigint;
  } = {
    matches: 0,
  };
  r.access = sc.word(10);
  if (r.access === undefined) return r;
  r.matches++;
  r.sectors = sc.integer();
  if (r.sectors === undefined) return r;
  r.matches++;
  r.type = sc.word(10);
  if (r.type === undefined) return r;
  r.matches++;
  if (!sc.literal('"', true)) return r;
  r.fname = sc.quotedBody(511);
  if (r.fname === undefined) return r;
  r.matches++;
  if (!sc.literal('"', false)) return r;
  r.offset = sc.integer();
  if (r.offset !== undefined) r.matches++;
  return r;
}

/**
 * The extent lines qemu uses, in order: `RW` lines of a known type with a
 * positive size. A FLAT line without an offset, a VMFS line with one, or
 * another type with one is qemu's "Invalid extent line".
 */
export function parseExtentLines(desc: string): ExtentLine[] {
  return [...extentLines(desc)];
}

/**
 * The extent lines one at a time, as qemu parses and opens them: an
 * invalid line throws only once the extents before it have been opened.
 */
export function* extentLines(desc: string): Generator<ExtentLine> {
  for (let p = 0; p < desc.length;) {
    const nl = desc.indexOf("\n", p);
    const next = nl < 0 ? desc.length : nl + 1;
    const r = scanExtentLine(desc, p);
    let flatOffset = -1n;
    if (r.matches < 4 || r.access !== "RW") {
      p = next;
      continue;
    }
    const invalid = () =>
      new QimgError(`Invalid extent line: ${desc.slice(p, nl < 0 ? desc.length : nl)}`);
    if (r.type === "FLAT") {
      if (r.matches !== 5 || r.offset! < 0n) throw invalid();
      flatOffset = r.offset!;
    } else if (r.type === "VMFS") {
      if (r.matches !== 4) throw invalid();
      flatOffset = 0n;
    } else if (r.matches !== 4) {
      throw invalid();
    }
    if (r.sectors! > 0n && EXTENT_TYPES.includes(r.type!)) {
      yield {
        sectors: Number(r.sectors),
        type: r.type!,
        fileName: r.fname!,
        // qemu multiplies by 512 in int64: huge offsets wrap (INT64_MAX sectors is byte -512).
        flatOffset: Number(BigInt.asIntN(64, flatOffset * 512n)) / 512,
      };
    }
    p = next;
  }
}

/**
 * CID (or parentCID) as qemu's vmdk_read_cid: the first "CID" (which may be
 * the one inside "parentCID"), one character skipped, then sscanf's %x.
 * Undefined when qemu fails (EINVAL).
 */
export function readCid(desc: string, parent: boolean): number | undefined {
  const name = parent ? "parentCID" : "CID";
  const at = desc.indexOf(name);
  if (at < 0) return undefined;
  const m = /^[ \t\n\v\f\r]*([+-]?)(?:0[xX](?=[0-9a-fA-F]))?([0-9a-fA-F]+)/.exec(
    desc.slice(at + name.length + 1),
  );
  if (!m) return undefined;
  // strtoul: too large saturates to UINT32 (scanf stores the low bits of ULONG_MAX).
  let v = BigInt("0x" + m[2]);
  if (v > 0xffffffffffffffffn) v = 0xffffffffffffffffn;
  if (m[1] === "-") v = -v;
  return Number(BigInt.asUintN(32, v));
}

/**
 * parentFileNameHint as qemu's vmdk_parent_open: absent (undefined), the
 * name, or null when qemu fails to open (no closing quote, name too long).
 */
export function parentFileNameHint(desc: string): string | undefined | null {
  const name = "parentFileNameHint";
  const at = desc.indexOf(name);
  if (at < 0) return undefined;
  const start = at + name.length + 2;
  if (start > desc.length) return null;
  const end = desc.indexOf('"', start);
  if (end < 0 || end - start > 4095) return null;
  return desc.slice(start, end);
}

/** What qemu puts in a descriptor it creates. */
export interface DescriptorFields {
  cid: number;
  parentCid: number;
  createType: string;
  /** Empty, or `parentFileNameHint="..."` (no newline: qemu's template). */
  parentHint: string;
  /** The extent lines, each ending in a newline. */
  extentLines: string;
  hwVersion: string;
  cylinders: number;
  heads: number;
  adapterType: string;
  toolsVersion: string;
}

/** qemu's descriptor template, filled in. */
export function buildDescriptor(f: DescriptorFields): string {
  return "# Disk DescriptorFile\n" +
    "version=1\n" +
    `CID=${f.cid.toString(16)}\n` +
    `parentCID=${f.parentCid.toString(16)}\n` +
    `createType="${f.createType}"\n` +
    f.parentHint +
    "\n" +
    "# Extent description\n" +
    f.extentLines +
    "\n" +
    "# The Disk Data Base\n" +
    "#DDB\n" +
    "\n" +
    `ddb.virtualHWVersion = "${f.hwVersion}"\n` +
    `ddb.geometry.cylinders = "${f.cylinders}"\n` +
    `ddb.geometry.heads = "${f.heads}"\n` +
    'ddb.geometry.sectors = "63"\n' +
    `ddb.adapterType = "${f.adapterType}"\n` +
    `ddb.toolsVersion = "${f.toolsVersion}"\n`;
}

/**
 * The descriptor with its CID replaced, as qemu's vmdk_write_cid: the text
 * after the first "CID" + 1 becomes the new CID, a newline, then everything
 * from "parentCID" on. Undefined when there is no parentCID (EINVAL).
 */
export function replaceCid(desc: string, cid: number): string | undefined {
  const parentAt = desc.indexOf("parentCID");
  if (parentAt < 0) return undefined;
  const tail = desc.slice(parentAt);
  const at = desc.indexOf("CID");
  return desc.slice(0, at + 4) + cid.toString(16) + "\n" + tail;
}
