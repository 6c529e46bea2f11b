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

const U64_LIMIT = 1n << 64n;
/** INT64_MAX, the largest size qemu-img's cvtnum accepts. */
export const INT64_MAX = (1n << 63n) - 1n;

/** Why a size string was rejected: qemu distinguishes bad syntax from out of range. */
export type SizeError = "invalid" | "range";

/** What qemu_strtosz makes of a string. */
export interface StrtoszResult {
  /** The byte count, or why there is none. */
  value: bigint | SizeError;
  /** A hex number with a unit suffix (`0x10k`): accepted, but qemu warns. */
  hexWithSuffix: boolean;
}

// C's isspace in the C locale: strtoull skips these before the number.
const C_SPACE = /^[ \t\n\v\f\r]*/;

/**
 * Parses a size exactly as qemu 7.2's qemu_strtosz: an unsigned decimal
 * integer (strtoull: leading blanks and `+` allowed, no `-`), then either a
 * hex form `0x...` (no fraction) or an optional `.fraction`, then at most
 * one unit suffix (k K M G T P E, b/B = bytes). A fraction needs a unit;
 * the product is rounded half up, computed in 64.64 fixed point.
 */
export function strtosz(text: string, defaultSuffix = "B"): StrtoszResult {
  const invalid: StrtoszResult = { value: "invalid", hexWithSuffix: false };
  const lead = C_SPACE.exec(text)![0].length;
  let i = lead;
  if (text[i] === "+") i++;
  else if (text[i] === "-") return invalid;
  const digits = /^[0-9]+/.exec(text.slice(i));
  if (!digits) return invalid;
  i += digits[0].length;
  let whole = BigInt(digits[0]);
  if (whole >= U64_LIMIT) return { value: "range", hexWithSuffix: false };
  let fraction = 0n; // 0.64 fixed point
  let hex = false;
  if (whole === 0n && (text[i] === "x" || text[i] === "X")) {
    // Reparse from the start as hex; strtoull wants at least one hex digit.
    const m = /^[+]?0[xX]([0-9a-fA-F]+)/.exec(text.slice(lead));
    if (!m) return invalid;
    i = lead + m[0].length;
    whole = BigInt("0x" + m[1]);
    if (whole >= U64_LIMIT) return { value: "range", hexWithSuffix: false };
    if (text[i] === ".") return invalid;
    hex = true;
  } else if (text[i] === ".") {
    // strtod on ".ddd"; with no digits qemu just steps over the dot ("1." and "1.k").
    const m = /^\.([0-9]*)/.exec(text.slice(i))!;
    if (m[1] === "") {
      i++;
    } else {
      i += m[0].length;
      // An exponent would belong to strtod's number: qemu rejects it outright.
      if (/^[eE][+-]?[0-9]/.test(text.slice(i))) return invalid;
      const f = Number("0." + m[1]); // the double strtod returns
      fraction = BigInt(Math.floor(f * 2 ** 64)); // exact: scaling by 2^64
      // A fraction that rounds to 1.0 overflows qemu's cast to uint64, which yields 0 on x86-64.
      if (fraction >= U64_LIMIT) fraction = 0n;
    }
  }
  let shift = SUFFIX_SHIFT[text[i] ?? ""];
  const suffixed = shift !== undefined;
  if (suffixed) i++;
  else shift = SUFFIX_SHIFT[defaultSuffix];
  const hexWithSuffix = hex && suffixed; // qemu warns before it looks further
  if (i !== text.length) return { value: "invalid", hexWithSuffix };
  if (shift === 0) {
    if (fraction !== 0n) return invalid; // a fraction needs a unit
    return { value: whole, hexWithSuffix };
  }
  const scaledFraction = fraction << BigInt(shift);
  let value = (whole << BigInt(shift)) + (scaledFraction >> 64n);
  // Round half up on the fractional bits left over.
  value += (scaledFraction >> 63n) & 1n;
  if (value >= U64_LIMIT) return { value: "range", hexWithSuffix };
  return { value, hexWithSuffix };
}

/**
 * qemu_strtosz's value or error kind for `text` (see `strtosz`), without
 * the hex-suffix warning.
 */
export function parseSizeExact(
  text: string,
  defaultSuffix = "B",
): bigint | SizeError {
  return strtosz(text, defaultSuffix).value;
}

/** qemu's warning (without the `qimg: ` prefix) for `0x10k`-style sizes. */
export function hexSuffixWarning(text: string): string {
  return `warning: Using a multiplier suffix on hex numbers is deprecated: ${text}`;
}

/** The two-line message qemu-img prints for a size it cannot parse. */
export const INVALID_SIZE_MESSAGE =
  "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n" +
  "qimg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.";

/**
 * qemu-img's cvtnum: parses a size-like argument named `name` ("image
 * size", "buffer size for sparse output", ...) that must lie in
 * [min, max]. Bad syntax gets the two-line suffix message, anything out of
 * range the "Must be between" one. `warn` receives the hex-suffix warning.
 */
export function cvtnum(
  name: string,
  text: string,
  options: { min?: bigint; max?: bigint; warn?: (message: string) => void } = {},
): bigint {
  const min = options.min ?? 0n;
  const max = options.max ?? INT64_MAX;
  const r = strtosz(text);
  if (r.hexWithSuffix) options.warn?.(hexSuffixWarning(text));
  if (r.value === "invalid") {
    throw new QimgError(
      `Invalid ${name} specified. You may use k, M, G, T, P or E suffixes for\n` +
        "qimg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.",
    );
  }
  if (r.value === "range" || r.value > max || r.value < min) {
    throw new QimgError(`Invalid ${name} specified. Must be between ${min} and ${max}.`);
  }
  return r.value;
}

/** The hint qemu prints under a bad size option value. */
export const SIZE_OPTION_HINT =
  "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
  "and exabytes, respectively.";

/**
 * Parses the value of a size-typed option (`-o size=...`, resize's size)
 * as qemu's parse_option_size, with its messages.
 */
export function parseSizeOption(
  name: string,
  text: string,
  warn?: (message: string) => void,
): bigint {
  const r = strtosz(text);
  if (r.hexWithSuffix) warn?.(hexSuffixWarning(text));
  if (r.value === "range") {
    throw new QimgError(`Value '${text}' is out of range for parameter '${name}'`);
  }
  if (r.value === "invalid") {
    throw new QimgError(`Parameter '${name}' expects a non-negative number below 2^64`, {
      hint: SIZE_OPTION_HINT,
    });
  }
  return r.value;
}

/**
 * Parses a size string as qemu-img does and returns it in bytes.
 * Throws a QimgError with qemu-img's message when it is invalid or not
 * below 2^53 (the largest exact JavaScript number).
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
  if (v === "invalid") throw new QimgError(INVALID_SIZE_MESSAGE);
  if (v === "range" || v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new QimgError(
      `Invalid image size specified. Must be between 0 and ${Number.MAX_SAFE_INTEGER}.`,
    );
  }
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
