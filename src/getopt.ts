/**
 * GNU getopt_long as qemu-img uses it: permutation of non-options to the
 * end (unless the option string starts with `+`), `--` ending options,
 * clustered short options (`-qfraw`), `--name=value` and `--name value`,
 * unique prefixes of long names. Errors are returned, not printed: qemu-img
 * prints its own messages (its option strings start with `:`).
 */

/** A long option: name, whether it takes an argument, and the value getopt returns. */
export interface LongOption {
  name: string;
  /** Whether the option takes an argument: "none", "required" or "optional". */
  arg: "none" | "required" | "optional";
  /** What getopt returns for it: a short letter or a long-only key. */
  val: string;
}

/** One parsed option. `opt` is `?` for an unknown option and `:` for a missing argument. */
export interface ParsedOption {
  opt: string;
  arg?: string;
  /** The argv element that held the option, as qemu-img prints it in messages. */
  raw: string;
  /** For a short-option error, the offending letter (glibc's own messages name it). */
  char?: string;
}

/** Options in order, then the non-option arguments. */
export interface GetoptResult {
  options: ParsedOption[];
  operands: string[];
}

/**
 * Parses `argv` against a getopt short-option string and long options.
 * Stops at the first error (as qemu-img exits on it), which is the last
 * element of `options`.
 */
export function getopt(
  argv: string[],
  shortOpts: string,
  longOpts: LongOption[] = [],
  argv0 = "",
): GetoptResult {
  const inOrder = shortOpts.startsWith("+");
  const spec = shortOpts.replace(/^[+:]+/, "");
  const options: ParsedOption[] = [];
  const operands: string[] = [];
  let i = 0;
  // GNU getopt permutes argv as it goes; qemu-img names argv[optind - 1] in
  // its messages, which for an error inside a cluster is the element before
  // the current one in the permuted order: the last skipped operand, else
  // the last element consumed as an option, else the command name.
  let lastConsumed = argv0;
  const before = () => operands.length > 0 ? operands[operands.length - 1] : lastConsumed;
  while (i < argv.length) {
    const a = argv[i];
    if (a === "--") {
      operands.push(...argv.slice(i + 1));
      break;
    }
    if (a.length < 2 || a[0] !== "-") {
      if (inOrder) {
        operands.push(...argv.slice(i));
        break;
      }
      operands.push(a);
      i++;
      continue;
    }
    if (a.startsWith("--")) {
      const eq = a.indexOf("=");
      const name = a.slice(2, eq < 0 ? undefined : eq);
      const exact = longOpts.find((o) => o.name === name);
      const matches = exact ? [exact] : longOpts.filter((o) => o.name.startsWith(name));
      const distinct = new Set(matches.map((o) => `${o.val}/${o.arg}`));
      if (matches.length === 0 || distinct.size > 1) {
        options.push({ opt: "?", raw: a });
        return { options, operands };
      }
      const lo = matches[0];
      i++;
      if (lo.arg === "none") {
        if (eq >= 0) {
          options.push({ opt: "?", raw: a });
          return { options, operands };
        }
        options.push({ opt: lo.val, raw: a });
      } else if (eq >= 0) {
        options.push({ opt: lo.val, arg: a.slice(eq + 1), raw: a });
      } else if (lo.arg === "optional") {
        options.push({ opt: lo.val, raw: a });
      } else if (i < argv.length) {
        options.push({ opt: lo.val, arg: argv[i], raw: a });
        i++;
      } else {
        options.push({ opt: ":", raw: a });
        return { options, operands };
      }
      lastConsumed = argv[i - 1];
      continue;
    }
    // A cluster of short options.
    i++;
    for (let j = 1; j < a.length; j++) {
      const c = a[j];
      const at = c === ":" ? -1 : spec.indexOf(c);
      if (at < 0) {
        options.push({ opt: "?", raw: j + 1 < a.length ? before() : a, char: c });
        return { options, operands };
      }
      const takesArg = spec[at + 1] === ":";
      if (!takesArg) {
        options.push({ opt: c, raw: a });
        continue;
      }
      const optional = spec[at + 2] === ":";
      if (j + 1 < a.length) {
        options.push({ opt: c, arg: a.slice(j + 1), raw: a });
      } else if (optional) {
        options.push({ opt: c, raw: a });
      } else if (i < argv.length) {
        options.push({ opt: c, arg: argv[i], raw: a });
        i++;
      } else {
        options.push({ opt: ":", raw: a, char: c });
        return { options, operands };
      }
      break;
    }
    lastConsumed = argv[i - 1];
  }
  return { options, operands };
}
