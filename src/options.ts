/**
 * Format option tables and `-o key=value,...` strings, as qemu's QemuOpts:
 * `,,` escapes a comma, `help`/`?` asks for the listing, values are checked
 * against each option's type.
 */

import { QimgError } from "./errors.ts";
import { parseSizeExact } from "./size.ts";

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
    let value = "";
    while (i < text.length) {
      if (text[i] === ",") {
        if (text[i + 1] === ",") {
          value += ",";
          i += 2;
          continue;
        }
        break;
      }
      value += text[i++];
    }
    out.push([key, value]);
    i++;
  }
  return out;
}

/** True when an option string asks for the option listing (`help` or `?`). */
export function isHelpOption(text: string): boolean {
  return splitOptionString(text).some(([k, v]) => v === undefined && (k === "help" || k === "?"));
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

/** Parses a bool as qemu does: on/off, yes/no, true/false. */
function parseBool(name: string, value: string): boolean {
  if (value === "on" || value === "yes" || value === "true") return true;
  if (value === "off" || value === "no" || value === "false") return false;
  throw new QimgError(`Parameter '${name}' expects 'on' or 'off'`);
}

/**
 * Parses `-o` text against an option table. `prefix` is qemu's message
 * prefix (the target file name). Unknown names and bad values throw
 * with qemu's wording.
 */
export function parseOptions(text: string, descs: OptionDesc[], prefix: string): OptionValues {
  const values: OptionValues = {};
  for (const [key, raw] of splitOptionString(text)) {
    const d = descs.find((x) => x.name === key);
    if (!d) throw new QimgError(`${prefix}: Invalid parameter '${key}'`);
    const value = raw ?? "on";
    switch (d.type) {
      case "bool":
        values[key] = parseBool(key, value);
        break;
      case "size": {
        const v = parseSizeExact(value);
        if (typeof v !== "bigint") {
          throw new QimgError(
            `Parameter '${key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.`,
          );
        }
        values[key] = Number(v);
        break;
      }
      case "number": {
        if (!/^[0-9]+$/.test(value)) throw new QimgError(`Parameter '${key}' expects a number`);
        values[key] = Number(value);
        break;
      }
      default:
        values[key] = value;
    }
  }
  return values;
}
