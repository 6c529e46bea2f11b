/** Size parsing (qemu_strtosz rules) and printing (qemu's size_to_str). */

import { QimgError } from "./errors.ts";

const SUFFIX_SHIFT: Record<string, number> = {
  b: 0,
  B: 0,
  k: 10,
  K: 10,
  m: 20,
  M: 20,
  g: 30,
  G: 30,
  t: 40,
  T: 40,
  p: 50,
  P: 50,
  e: 60,
  E: 60,
};

/** Why a size string was rejected: qemu distinguishes bad syntax from out of range. */
export type SizeError = "invalid" | "range";

/**
 * Parses a size as qemu_strtosz does: a decimal number with an optional
 * fraction and one suffix (k K M G T P E, b/B = bytes; `defaultSuffix`
 * applies when there is none). Hex (`0x...`) is allowed only without a
 * fraction. Returns the byte count as a bigint, or the kind of error.
 */
export function parseSizeExact(
  text: string,
  defaultSuffix = "B",
): bigint | SizeError {
  const m = /^[ \t\n\v\f\r]*(0[xX][0-9a-fA-F]+|[0-9]+)(\.[0-9]*)?([a-zA-Z]?)$/.exec(text);
  if (!m) {
    // A leading minus or anything strtoull would reject is simply invalid.
    return "invalid";
  }
  const [, intPart, frac, suffixRaw] = m;
  const isHex = /^0[xX]/.test(intPart);
  if (isHex && frac !== undefined) return "invalid";
  const suffix = suffixRaw || defaultSuffix;
  const shift = SUFFIX_SHIFT[suffix];
  if (shift === undefined) return "invalid";
  const whole = BigInt(intPart);
  if (frac !== undefined && frac.length > 1 && /[1-9]/.test(frac)) {
    // qemu refuses a fraction with no unit multiplier, and fractional bytes.
    if (shift === 0) return "invalid";
    const digits = frac.slice(1);
    const num = BigInt(digits);
    const den = 10n ** BigInt(digits.length);
    // qemu truncates the fractional product (it computes in double; this
    // is exact for the inputs people write, such as 1.5G).
    const value = (whole << BigInt(shift)) + ((num << BigInt(shift)) / den);
    if (value > 0xffffffffffffffffn) return "range";
    return value;
  }
  const value = whole << BigInt(shift);
  if (value > 0xffffffffffffffffn) return "range";
  return value;
}

/** The two-line message qemu-img prints for a size it cannot parse. */
export const INVALID_SIZE_MESSAGE =
  "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n" +
  "qimg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.";

/**
 * Parses a size string as qemu-img does and returns it in bytes.
 * Throws a QimgError with qemu-img's message when it is invalid.
 *
 * @param text A size such as `1G`, `1.5M`, `512`, `4k`.
 * @returns The size in bytes.
 * @example Usage
 * ```ts
 * import { parseSize } from "@qimg/qimg";
 * console.log(parseSize("1.5G")); // 1610612736
 * ```
 */
export function parseSize(text: string): number {
  const v = parseSizeExact(text);
  if (typeof v !== "bigint") throw new QimgError(INVALID_SIZE_MESSAGE);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new QimgError(INVALID_SIZE_MESSAGE);
  return Number(v);
}

const SIZE_SUFFIXES = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];

/** Formats a size as qemu's size_to_str: `"%0.3g %sB"` on a binary unit, e.g. `1 GiB`, `1e+03 KiB`. */
export function sizeToStr(bytes: number | bigint): string {
  const val = Number(bytes);
  let i = 0;
  if (val > 0) {
    // frexp(val / (1000/1024)) exponent e: 2^(e-1) <= x < 2^e.
    const e = Math.floor(Math.log2(val / (1000 / 1024))) + 1;
    i = Math.trunc((e - 1) / 10);
    // Guard against log2 rounding at exact powers.
    if (i > 6) i = 6;
  }
  const div = 2 ** (i * 10);
  return `${formatG(val / div, 3)} ${SIZE_SUFFIXES[i]}B`;
}

/** C's `%.<precision>g`, with round-half-even on exact ties as glibc does. */
export function formatG(value: number, precision: number): string {
  if (value === 0) return "0";
  if (!Number.isFinite(value)) return String(value);
  const neg = value < 0;
  const exact = exactDecimal(Math.abs(value)); // digits and exponent of the exact value
  let { digits, exp } = roundHalfEven(exact.digits, exact.exp, precision);
  let out: string;
  if (exp < -4 || exp >= precision) {
    let mant = digits[0] + (digits.length > 1 ? "." + digits.slice(1) : "");
    mant = stripZeros(mant);
    out = `${mant}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  } else {
    // Fixed notation with precision-1-exp fraction digits.
    if (exp >= 0) {
      digits = digits.padEnd(exp + 1, "0");
      out = digits.slice(0, exp + 1) + "." + digits.slice(exp + 1);
    } else {
      out = "0." + "0".repeat(-exp - 1) + digits;
    }
    out = stripZeros(out);
  }
  return neg ? "-" + out : out;
}

function stripZeros(s: string): string {
  if (!s.includes(".")) return s;
  return s.replace(/0+$/, "").replace(/\.$/, "");
}

/** The exact decimal expansion of a positive double: digit string d1d2... and exponent of d1. */
function exactDecimal(v: number): { digits: string; exp: number } {
  const s = v.toPrecision(100); // exact for the dyadic values we format
  const [mant, e] = s.includes("e") ? s.split("e") : [s, "0"];
  let exp = Number(e);
  let [ip, fp = ""] = mant.split(".");
  // Normalise to a digit string whose first digit is nonzero.
  let all = ip + fp;
  exp += ip.length - 1;
  const lead = all.search(/[1-9]/);
  all = all.slice(lead);
  exp -= lead;
  all = all.replace(/0+$/, "") || "0";
  ip = fp = "";
  return { digits: all, exp };
}

function roundHalfEven(
  digits: string,
  exp: number,
  precision: number,
): { digits: string; exp: number } {
  if (digits.length <= precision) return { digits, exp };
  const keep = digits.slice(0, precision);
  const rest = digits.slice(precision);
  let up: boolean;
  if (rest[0] > "5") up = true;
  else if (rest[0] < "5") up = false;
  else if (/[1-9]/.test(rest.slice(1))) up = true;
  else up = Number(keep[keep.length - 1]) % 2 === 1;
  if (!up) return { digits: keep, exp };
  const n = (BigInt(keep) + 1n).toString();
  if (n.length > precision) return { digits: n.slice(0, precision), exp: exp + 1 };
  return { digits: n, exp };
}
