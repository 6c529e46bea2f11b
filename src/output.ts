/**
 * Output writers: QEMU's JSON pretty printer and its human "dump" of
 * QAPI objects. Commands build plain data and render it here; no command
 * calls JSON.stringify.
 */

/**
 * A JSON value as qemu prints it; bigint keeps 64-bit integers exact.
 *
 * @example Usage
 * ```ts
 * import type { JsonValue } from "@qimg/qimg";
 * const v: JsonValue = { "virtual-size": 18446744073709551615n, "dirty-flag": false };
 * console.log(typeof (v as { "virtual-size": bigint })["virtual-size"]); // bigint
 * ```
 */
export type JsonValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | JsonValue[]
  | { [key: string]: JsonValue | undefined };

/** Quotes a string as QEMU's JSON writer: non-ASCII and controls as `\uXXXX` (uppercase hex). */
export function jsonString(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    const ch = s[i];
    if (ch === '"') out += '\\"';
    else if (ch === "\\") out += "\\\\";
    else if (ch === "\b") out += "\\b";
    else if (ch === "\f") out += "\\f";
    else if (ch === "\n") out += "\\n";
    else if (ch === "\r") out += "\\r";
    else if (ch === "\t") out += "\\t";
    else if (c < 0x20 || c >= 0x7f) out += "\\u" + c.toString(16).toUpperCase().padStart(4, "0");
    else out += ch;
  }
  return out + '"';
}

/** QEMU's QDict hash (tdb_hash) of a key. */
function qdictHash(key: string): number {
  const b = new TextEncoder().encode(key);
  let value = Math.imul(0x238f13af, b.length) >>> 0;
  for (let i = 0; i < b.length; i++) value = (value + ((b[i] << ((i * 5) % 24)) >>> 0)) >>> 0;
  return (Math.imul(1103515243, value) + 12345) >>> 0;
}

const QDICT_BUCKETS = 512;

/**
 * An object's members in the order QEMU's QDict iterates them: by hash
 * bucket, and within a bucket the last inserted first. qemu-img prints
 * QAPI results through a QDict, so this is its key order, human and JSON.
 */
export function qdictEntries(obj: { [key: string]: JsonValue | undefined }): [string, JsonValue][] {
  const entries = Object.entries(obj).filter(([, v]) => v !== undefined) as [string, JsonValue][];
  return entries
    .map((e, i) => ({ e, i, b: qdictHash(e[0]) % QDICT_BUCKETS }))
    .sort((x, y) => x.b - y.b || y.i - x.i)
    .map((x) => x.e);
}

function jsonNumber(v: number | bigint): string {
  if (typeof v === "bigint") return v.toString();
  // Above 2^53, toString() gives the shortest round-trip digits, not the exact value.
  if (Number.isInteger(v)) return Number.isSafeInteger(v) ? v.toString() : BigInt(v).toString();
  // QEMU prints doubles with %.17g then trims; qimg's outputs hold integers only.
  return String(v);
}

/**
 * Renders a value as QEMU's pretty JSON: 4-space indentation, `"key": value`,
 * members in QDict order, containers closed on their own line (an empty
 * one as `{` newline `}`). Undefined members are left out.
 */
export function toJsonPretty(value: JsonValue, indent = 0): string {
  const pad = (n: number) => " ".repeat(4 * n);
  if (value === null) return "null";
  if (typeof value === "boolean") return value ? "true" : "false";
  if (typeof value === "number" || typeof value === "bigint") return jsonNumber(value);
  if (typeof value === "string") return jsonString(value);
  if (Array.isArray(value)) {
    if (value.length === 0) return `[\n${pad(indent)}]`;
    const items = value.map((v) => pad(indent + 1) + toJsonPretty(v, indent + 1));
    return `[\n${items.join(",\n")}\n${pad(indent)}]`;
  }
  const entries = qdictEntries(value);
  if (entries.length === 0) return `{\n${pad(indent)}}`;
  const items = entries.map(([k, v]) =>
    `${pad(indent + 1)}${jsonString(k)}: ${toJsonPretty(v, indent + 1)}`
  );
  return `{\n${items.join(",\n")}\n${pad(indent)}}`;
}

/**
 * QEMU's human dump of a QAPI object (dump_qobject): `key: value` lines,
 * `-` in keys shown as spaces, nested objects and lists indented by four.
 */
export function dumpHuman(value: JsonValue, indent = 0): string {
  let out = "";
  const pad = " ".repeat(indent * 4);
  if (Array.isArray(value)) {
    value.forEach((v, i) => {
      const composite = v !== null && typeof v === "object" && typeof v !== "bigint";
      out += `${pad}[${i}]:${composite ? "\n" : " "}`;
      out += composite ? dumpHuman(v, indent + 1) : scalar(v) + "\n";
    });
    return out;
  }
  if (value !== null && typeof value === "object" && typeof value !== "bigint") {
    for (const [k, v] of qdictEntries(value)) {
      const key = k.replaceAll("-", " ");
      const composite = v !== null && typeof v === "object" && typeof v !== "bigint";
      out += `${pad}${key}:${composite ? "\n" : " "}`;
      out += composite ? dumpHuman(v, indent + 1) : scalar(v) + "\n";
    }
    return out;
  }
  return pad + scalar(value) + "\n";
}

function scalar(v: JsonValue): string {
  if (v === null) return "null";
  if (typeof v === "boolean") return v ? "true" : "false";
  return String(v);
}
