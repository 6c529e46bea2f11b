/**
 * Format option tables and `-o key=value,...` strings, as qemu's QemuOpts:
 * `,,` escapes a comma, a bare `name` means `name=on` (`noname`: off),
 * `help`/`?` asks for the listing, values are checked against each
 * option's type. Tables are data: a format adds one, no command changes.
 */

import { QimgError } from "./errors.ts";
import { parseSizeOption } from "./size.ts";

/** The value kinds qemu's QemuOptType knows. */
export type OptionType = "string" | "bool" | "number" | "size";

/** One `-o` option of a format or protocol. */
export interface OptionDesc {
  name: string;
  type: OptionType;
  help: string;
  /** Printed in the `Formatting ...` line even when not given (qemu's def_value_str). */
  default?: string;
}

/** Parsed `-o` values by option name. */
export type OptionValues = Record<string, string | number | boolean | undefined>;

/** Splits `a=b,c=d` honouring `,,` escapes; a bare word is `[word, undefined]`. */
export function splitOptionString(text: string): [string, string | undefined][] {
  const out: [string, string | undefined][] = [];
  let i = 0;
  while (i < text.length) {
    // Keys end at '=' or ','; values end at a single ',' ("",," is a literal comma).
    let key = "";
    while (i < text.length && text[i] !== "=" && text[i] !== ",") key += text[i++];
    if (text[i] !== "=") {
      out.push([key, undefined]);
      i++;
      continue;
    }
    i++;
    const [value, next] = readValue(text, i);
    out.push([key, value]);
    i = next + 1;
  }
  return out;
}

/** Reads a value up to a single comma (`,,` is a literal comma); returns it and the comma's index. */
function readValue(text: string, i: number): [string, number] {
  let value = "";
  while (i < text.length) {
    if (text[i] === ",") {
      if (text[i + 1] !== ",") break;
      value += ",";
      i += 2;
      continue;
    }
    value += text[i++];
  }
  return [value, i];
}

/**
 * True when an option string asks for the option listing: one of its
 * comma-separated elements (with `,,` escapes) is exactly `help` or `?`,
 * as qemu's has_help_option.
 */
export function isHelpOption(text: string): boolean {
  for (let i = 0; i < text.length;) {
    const [element, next] = readValue(text, i);
    if (element === "help" || element === "?") return true;
    i = next + 1;
  }
  return false;
}

/**
 * qemu-img's check of one `-o` argument: not empty, not starting with a
 * comma, and not ending in an odd number of commas (`,,` is an escaped comma).
 */
export function isValidOptionList(text: string): boolean {
  if (text === "" || text[0] === ",") return false;
  let commas = 0;
  while (commas < text.length && text[text.length - 1 - commas] === ",") commas++;
  return commas % 2 === 0;
}

/** Appends one `-o` argument to those so far, as qemu-img accumulates repeated `-o`. */
export function accumulateOptions(sofar: string | undefined, text: string): string {
  if (!isValidOptionList(text)) throw new QimgError(`Invalid option list: ${text}`);
  return sofar === undefined ? text : `${sofar},${text}`;
}

/**
 * A format's table followed by its protocol's, as qemu_opts_append: a name
 * already present keeps the first (the format's) description.
 */
export function mergeOptionTables(...tables: OptionDesc[][]): OptionDesc[] {
  const out: OptionDesc[] = [];
  for (const t of tables) {
    for (const d of t) if (!out.some((x) => x.name === d.name)) out.push(d);
  }
  return out;
}

/** qemu's listing of options: sorted by name, `name=<type>` padded to 22 columns. */
export function formatOptionHelp(descs: OptionDesc[]): string {
  const sorted = [...descs].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  let out = "";
  for (const d of sorted) {
    const kind = d.type === "bool"
      ? "bool (on/off)"
      : d.type === "number"
      ? "num"
      : d.type === "size"
      ? "size"
      : "str";
    const left = `${d.name}=<${kind}>`;
    out += `  ${left.padEnd(22)} - ${d.help}\n`;
  }
  return out;
}

/** Options as parsed: typed values for drivers and the text `Formatting ...` prints. */
export interface ParsedOptions {
  /** Typed values by name: strings, booleans, numbers (sizes as numbers). */
  values: OptionValues;
  /** What qemu prints for each set option (numbers as signed 64-bit, like PRId64). */
  shown: Record<string, string>;
  /** Exact 64-bit values of size and number options. */
  exact: Record<string, bigint>;
  /** The text each option was given as, in the order first set. */
  given: Record<string, string>;
}

/** An empty option set. */
export function emptyOptions(): ParsedOptions {
  return { values: {}, shown: {}, exact: {}, given: {} };
}

/** Parses a bool as qemu's qapi_bool_parse: on/yes/true/y and off/no/false/n. */
function parseBool(name: string, value: string): boolean {
  if (["on", "yes", "true", "y"].includes(value)) return true;
  if (["off", "no", "false", "n"].includes(value)) return false;
  throw new QimgError(`Parameter '${name}' expects 'on' or 'off'`);
}

/** Parses a number option as qemu's parse_option_number (strtoull, base 0). */
function parseNumber(name: string, text: string): bigint {
  const m = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(text);
  if (!m) throw new QimgError(`Parameter '${name}' expects a number`);
  const digits = m[2];
  const v = /^0[0-7]+$/.test(digits) ? BigInt("0o" + digits.slice(1)) : BigInt(digits);
  if (v >= 1n << 64n) throw new QimgError(`Value '${text}' is too large for parameter '${name}'`);
  // strtoull negates a leading minus in unsigned arithmetic.
  return m[1] === "-" ? BigInt.asUintN(64, -v) : v;
}

/**
 * Sets one option on `parsed`, checking the value against its
 * description as qemu's qemu_opt_set. Unknown names throw qemu's
 * "Invalid parameter". `warn` receives the hex-suffix size warning.
 */
export function setOption(
  parsed: ParsedOptions,
  descs: OptionDesc[],
  name: string,
  value: string,
  warn?: (message: string) => void,
): void {
  const d = descs.find((x) => x.name === name);
  if (!d) throw new QimgError(`Invalid parameter '${name}'`);
  parsed.given[name] = value;
  switch (d.type) {
    case "bool":
      parsed.values[name] = parseBool(name, value);
      parsed.shown[name] = value;
      break;
    case "size":
    case "number": {
      const v = d.type === "size" ? parseSizeOption(name, value, warn) : parseNumber(name, value);
      parsed.values[name] = Number(v);
      parsed.exact[name] = v;
      parsed.shown[name] = BigInt.asIntN(64, v).toString();
      break;
    }
    default:
      parsed.values[name] = value;
      parsed.shown[name] = value;
  }
}

/** Sets a size or number option from a value the caller already has (qemu_opt_set_number). */
export function setNumberOption(parsed: ParsedOptions, name: string, value: bigint): void {
  parsed.given[name] = BigInt.asIntN(64, value).toString();
  parsed.values[name] = Number(value);
  parsed.exact[name] = value;
  parsed.shown[name] = BigInt.asIntN(64, value).toString();
}

/**
 * Parses `-o` text into `parsed` as qemu's qemu_opts_do_parse: elements
 * in order (a later one wins), `id=...` ignored, a bare `name` meaning
 * `name=on` and `noname` meaning `name=off`. Errors carry qemu's wording,
 * without the file name qemu-img puts before them.
 */
export function parseOptionList(
  text: string,
  descs: OptionDesc[],
  parsed: ParsedOptions = emptyOptions(),
  warn?: (message: string) => void,
): ParsedOptions {
  for (let [key, value] of splitOptionString(text)) {
    if (value === undefined) {
      if (key.startsWith("no")) {
        key = key.slice(2);
        value = "off";
      } else {
        value = "on";
      }
    }
    if (key === "id") continue;
    setOption(parsed, descs, key, value, warn);
  }
  return parsed;
}

/**
 * Parses `-o` text against an option table and returns the typed values.
 * `prefix` (the target file name) goes before messages as qemu-img prints them.
 */
export function parseOptions(text: string, descs: OptionDesc[], prefix?: string): OptionValues {
  try {
    return parseOptionList(text, descs).values;
  } catch (e) {
    if (prefix === undefined || !(e instanceof QimgError)) throw e;
    throw new QimgError(`${prefix}: ${e.message}`, { exitCode: e.exitCode, hint: e.hint });
  }
}

/**
 * The line qemu-img create prints before creating: every option of the
 * table in table order that is set or has a default, strings with commas
 * doubled, sizes and numbers as signed 64-bit decimals.
 */
export function formattingLine(
  filename: string,
  format: string,
  descs: OptionDesc[],
  parsed: ParsedOptions,
): string {
  const items: string[] = [];
  for (const d of descs) {
    const value = parsed.shown[d.name] ?? d.default;
    if (value === undefined) continue;
    items.push(`${d.name}=${d.type === "string" ? value.replaceAll(",", ",,") : value}`);
  }
  return `Formatting '${filename}', fmt=${format} ${items.join(" ")}\n`;
}

/** `size`, as every creatable format lists it first. */
export const SIZE_OPTION: OptionDesc = { name: "size", type: "size", help: "Virtual disk size" };

/** The raw format's own create options (the file protocol adds the rest). */
export const RAW_CREATE_OPTIONS: OptionDesc[] = [SIZE_OPTION];

/**
 * qcow2's create options in qemu 7.2's table order (the order of the
 * `Formatting` line), with the defaults that line shows.
 */
export const QCOW2_CREATE_OPTIONS: OptionDesc[] = [
  {
    name: "encryption",
    type: "bool",
    help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
  },
  {
    name: "encrypt.format",
    type: "string",
    help: "Encrypt the image, format choices: 'aes', 'luks'",
  },
  {
    name: "encrypt.key-secret",
    type: "string",
    help: "ID of secret providing qcow AES key or LUKS passphrase",
  },
  { name: "encrypt.cipher-alg", type: "string", help: "Name of encryption cipher algorithm" },
  { name: "encrypt.cipher-mode", type: "string", help: "Name of encryption cipher mode" },
  { name: "encrypt.ivgen-alg", type: "string", help: "Name of IV generator algorithm" },
  { name: "encrypt.ivgen-hash-alg", type: "string", help: "Name of IV generator hash algorithm" },
  { name: "encrypt.hash-alg", type: "string", help: "Name of encryption hash algorithm" },
  { name: "encrypt.iter-time", type: "number", help: "Time to spend in PBKDF in milliseconds" },
  { name: "cluster_size", type: "size", help: "qcow2 cluster size", default: "65536" },
  { name: "extended_l2", type: "bool", help: "Extended L2 tables", default: "off" },
  {
    name: "preallocation",
    type: "string",
    help: "Preallocation mode (allowed values: off, metadata, falloc, full)",
  },
  {
    name: "compression_type",
    type: "string",
    help: "Compression method used for image cluster compression",
    default: "zlib",
  },
  SIZE_OPTION,
  { name: "compat", type: "string", help: "Compatibility level (v2 [0.10] or v3 [1.1])" },
  { name: "backing_file", type: "string", help: "File name of a base image" },
  { name: "backing_fmt", type: "string", help: "Image format of the base image" },
  { name: "data_file", type: "string", help: "File name of an external data file" },
  {
    name: "data_file_raw",
    type: "bool",
    help: "The external data file must stay valid as a raw image",
  },
  { name: "lazy_refcounts", type: "bool", help: "Postpone refcount updates", default: "off" },
  {
    name: "refcount_bits",
    type: "number",
    help: "Width of a reference count entry in bits",
    default: "16",
  },
];

/**
 * Create option tables of formats whose driver may not carry one yet
 * (a driver's own `createOptions` wins). qcow2's is here so `-o help`
 * matches qemu before qcow2 creation exists.
 */
export const CREATE_OPTION_TABLES: Record<string, OptionDesc[]> = {
  raw: RAW_CREATE_OPTIONS,
  qcow2: QCOW2_CREATE_OPTIONS,
  // Formats qimg cannot create: their tables answer `-o help` and bad `-o` as qemu does.
  qcow: [
    { name: "backing_file", type: "string", help: "File name of a base image" },
    { name: "backing_fmt", type: "string", help: "Format of the backing image" },
    { name: "encrypt.format", type: "string", help: "Encrypt the image, format choices: 'aes'" },
    {
      name: "encrypt.key-secret",
      type: "string",
      help: "ID of the secret that provides the AES encryption key",
    },
    {
      name: "encryption",
      type: "bool",
      help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    },
    SIZE_OPTION,
  ],
  qed: [
    { name: "backing_file", type: "string", help: "File name of a base image" },
    { name: "backing_fmt", type: "string", help: "Image format of the base image" },
    { name: "cluster_size", type: "size", help: "Cluster size (in bytes)", default: "65536" },
    SIZE_OPTION,
    { name: "table_size", type: "size", help: "L1/L2 table size (in clusters)" },
  ],
  luks: [
    { name: "cipher-alg", type: "string", help: "Name of encryption cipher algorithm" },
    { name: "cipher-mode", type: "string", help: "Name of encryption cipher mode" },
    { name: "hash-alg", type: "string", help: "Name of encryption hash algorithm" },
    { name: "iter-time", type: "number", help: "Time to spend in PBKDF in milliseconds" },
    { name: "ivgen-alg", type: "string", help: "Name of IV generator algorithm" },
    { name: "ivgen-hash-alg", type: "string", help: "Name of IV generator hash algorithm" },
    {
      name: "key-secret",
      type: "string",
      help: "ID of the secret that provides the keyslot passphrase",
    },
    SIZE_OPTION,
  ],
  parallels: [
    {
      name: "cluster_size",
      type: "size",
      help: "Parallels image cluster size",
      default: "1048576",
    },
    SIZE_OPTION,
  ],
};

/** Every format name Debian's qemu-img 7.2 knows (its `Supported formats`). */
const QEMU_FORMATS = new Set(
  ("blkdebug blklogwrites blkverify bochs cloop compress copy-before-write copy-on-read dmg " +
    "file ftp ftps gluster host_cdrom host_device http https iscsi iser luks nbd nfs null-aio " +
    "null-co nvme parallels preallocate qcow qcow2 qed quorum raw rbd replication " +
    "snapshot-access ssh throttle vdi vhdx vmdk vpc vvfat").split(" "),
);

/** The formats qemu-img 7.2 can create (the others say "does not support image creation"). */
const QEMU_CREATABLE = new Set(
  ("file gluster host_cdrom host_device iscsi iser luks nbd nfs nvme parallels qcow qcow2 qed " +
    "raw rbd ssh vdi vhdx vmdk vpc").split(" "),
);

/** Whether Debian's qemu-img 7.2 knows the format `name`. */
export function isQemuFormat(name: string): boolean {
  return QEMU_FORMATS.has(name);
}

/** Whether Debian's qemu-img 7.2 can create images of the format `name`. */
export function isQemuCreatable(name: string): boolean {
  return QEMU_CREATABLE.has(name);
}
