/** Small pieces several commands share. */

import type { Io } from "./command.ts";
import { QimgError, usageError } from "./errors.ts";
import { notSupportedYet } from "./command.ts";
import { FORMATS } from "./formats.ts";
import { type Image, openImageChain } from "./image.ts";
import { splitOptionString } from "./options.ts";

/** Parses `--output`: qemu-img accepts `human` and `json` only. */
export function parseOutputFormat(value: string): "human" | "json" {
  if (value === "human" || value === "json") return value;
  throw new QimgError("--output must be used with human or json as argument.");
}

/** `-h` on a command prints the full help and exits 0, as qemu-img does. */
export async function printHelp(io: Io): Promise<number> {
  const { helpText } = await import("./help.ts");
  io.stdout(helpText(FORMATS.map((f) => f.name).sort()));
  return 0;
}

/** The cache modes qemu's bdrv_parse_cache_mode accepts (`-t`, `-T`). */
const CACHE_MODES = ["none", "off", "directsync", "writeback", "unsafe", "writethrough"];

/** Whether `mode` is a cache mode qemu-img accepts. */
export function isCacheMode(mode: string): boolean {
  return CACHE_MODES.includes(mode);
}

/** Checks `-t` (or `-T` with `what` = "source cache") as qemu-img does. */
export function checkCacheMode(mode: string, what = "cache"): void {
  if (!isCacheMode(mode)) throw new QimgError(`Invalid ${what} option: ${mode}`);
}

/** `-o` accumulation lives with the option tables; re-exported for the commands. */
export { accumulateOptions } from "./options.ts";

/** The object types `--object help` lists in qemu-img 7.2. */
const OBJECT_TYPES = [
  "authz-list",
  "authz-list-file",
  "authz-simple",
  "main-loop",
  "pr-manager-helper",
  "secret",
  "secret_keyring",
  "thread-context",
  "throttle-group",
  "tls-cipher-suites",
  "tls-creds-anon",
  "tls-creds-psk",
  "tls-creds-x509",
];

/** A secret's properties, as `--object secret,help` lists them. */
const SECRET_OPTIONS = ["data", "file", "format", "iv", "keyid"];

/** Secret ids defined so far by `--object secret,...` (for `keyid=`). */
const secretIds = new Set<string>();

/**
 * `--object`: checks the definition as far as qemu-img's messages go
 * (type, id, a secret's properties). Returns true when qemu-img would have
 * printed a listing and exited 0 (`--object help`, `--object secret,help`).
 */
export function processObject(spec: string, io: Io): boolean {
  const values = new Map<string, string>();
  let help = false;
  splitOptionString(spec).forEach(([k, v], i) => {
    if (v === undefined && (k === "help" || k === "?")) help = true;
    else if (v === undefined && i === 0 && k !== "") values.set("qom-type", k);
    else if (v !== undefined) values.set(k, v);
    else if (k !== "") values.set(k, "on");
  });
  const type = values.get("qom-type");
  if (help && type === undefined) {
    io.stdout("List of user creatable objects:\n" + OBJECT_TYPES.map((t) => `  ${t}\n`).join(""));
    return true;
  }
  if (type === undefined) throw new QimgError("Parameter 'qom-type' is missing");
  if (!OBJECT_TYPES.includes(type)) {
    throw new QimgError(`Parameter 'qom-type' does not accept value '${type}'`);
  }
  if (type !== "secret") {
    if (help) throw notSupportedYet(`--object ${type},help`);
    if (!values.has("id")) throw new QimgError("Parameter 'id' is missing");
    return false;
  }
  if (help) {
    io.stdout(
      "secret options:\n" +
        SECRET_OPTIONS.map((o) => `  ${o}=<${o === "format" ? "QCryptoSecretFormat" : "string"}>\n`)
          .join(""),
    );
    return true;
  }
  const id = values.get("id");
  if (id === undefined) throw new QimgError("Parameter 'id' is missing");
  const format = values.get("format");
  if (format !== undefined && format !== "raw" && format !== "base64") {
    throw new QimgError(`Parameter 'format' does not accept value '${format}'`);
  }
  for (const key of values.keys()) {
    if (key !== "qom-type" && key !== "id" && key !== "loaded" && !SECRET_OPTIONS.includes(key)) {
      throw new QimgError(`Parameter '${key}' is unexpected`);
    }
  }
  if (!/^[A-Za-z][A-Za-z0-9._-]*$/.test(id)) {
    throw new QimgError(
      "Parameter 'id' expects an identifier\n" +
        "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
    );
  }
  if (values.has("loaded")) throw new QimgError("Property 'secret.loaded' is not writable");
  if (values.has("data") && values.has("file")) {
    throw new QimgError("'file' and 'data' are mutually exclusive");
  }
  if (!values.has("data") && !values.has("file")) {
    throw new QimgError("Either 'file' or 'data' must be provided");
  }
  const keyid = values.get("keyid");
  if (keyid !== undefined) {
    if (!secretIds.has(keyid)) throw new QimgError(`No secret with id '${keyid}'`);
    throw notSupportedYet("--object secret,keyid"); // decrypting a secret with another
  }
  secretIds.add(id);
  return false;
}

/** How a command opens its image. */
export interface CommandOpenOptions {
  /** `-f`, when given. */
  format?: string;
  /** `--image-opts`: the file name is an option string. */
  imageOpts?: boolean;
  /** Open for writing. */
  write?: boolean;
  /** Open the backing chain (default true). */
  backing?: boolean;
  /** `-U` */
  forceShare?: boolean;
  /** Other writers are refused even on raw images (convert's source). */
  stable?: boolean;
  /** Opening for `check` (qemu's BDRV_O_CHECK). */
  check?: boolean;
  /** Metadata only, as `info` (qemu's BDRV_O_NO_IO). */
  noIo?: boolean;
  /** Backing errors nest under the top image's name (default); `info --backing-chain` names the layer. */
  nestBackingErrors?: boolean;
}

/** Block-layer options every image accepts, which qimg has no use for. */
const GENERIC_IMAGE_OPTS = new Set([
  "read-only",
  "auto-read-only",
  "force-share",
  "node-name",
  "discard",
  "detect-zeroes",
  "cache.direct",
  "cache.no-flush",
  "file.locking",
  "file.aio",
]);

/** An `--image-opts` string reduced to what qimg can open: a format and a file name. */
function parseImageOpts(spec: string): { format?: string; filename: string } {
  const values = new Map<string, string>();
  splitOptionString(spec).forEach(([k, v], i) => {
    if (v === undefined && i === 0) values.set("file", k);
    else values.set(k, v ?? "on");
  });
  const fail = (why: string) => new QimgError(`Could not open '${spec}': ${why}`);
  const filename = values.get("file.filename");
  const file = values.get("file");
  const driver = values.get("driver");
  if (file !== undefined && filename === undefined) {
    throw fail(`Cannot find device='${file}' nor node-name='${file}'`);
  }
  if (driver === undefined && filename === undefined) {
    throw fail("Must specify either driver or file");
  }
  if (filename === undefined) throw fail('A block device must be specified for "file"');
  const known = (k: string) =>
    k === "driver" || k === "file.filename" || k === "file.driver" || GENERIC_IMAGE_OPTS.has(k);
  const protocol = values.get("file.driver") ?? "file";
  if (driver === "file" || protocol !== "file" || [...values.keys()].some((k) => !known(k))) {
    throw notSupportedYet("--image-opts");
  }
  return { format: driver, filename };
}

/**
 * Opens a command's image as qemu-img's img_open does: `--image-opts` and
 * `-f` exclude each other, `-U` needs a read-only open, and probing raw
 * for a writable open prints qemu's warning on stderr.
 */
export async function openForCommand(
  filename: string,
  io: Io,
  options: CommandOpenOptions,
): Promise<Image> {
  let format = options.format;
  const name = filename;
  if (options.imageOpts) {
    if (format !== undefined) {
      throw new QimgError("--image-opts and --format are mutually exclusive");
    }
    ({ format, filename } = parseImageOpts(filename));
  }
  if (options.forceShare && options.write) {
    throw new QimgError(
      `Could not open '${name}': force-share=on can only be used with read-only images`,
    );
  }
  try {
    return await openImageChain(filename, {
      format,
      write: options.write,
      backing: options.backing,
      check: options.check,
      noIo: options.noIo,
      warn: (message, end = "\n") => io.stderr(message + end),
      openFile: (p, w) => io.openFile(p, { write: w }),
      nestBackingErrors: options.nestBackingErrors ?? true,
      forceShare: options.forceShare,
      stable: options.stable,
    });
  } catch (e) {
    // qemu names the image as given: with --image-opts, the option string.
    if (name === filename || !(e instanceof QimgError)) throw e;
    throw new QimgError(`Could not open '${name}': ${innerOpenMessage(e, filename)}`, {
      exitCode: e.exitCode,
    });
  }
}

/** Strips the `Could not open '<path>': ` qimg's image opener puts before a driver's message. */
export function innerOpenMessage(err: QimgError, path: string): string {
  const prefix = `Could not open '${path}': `;
  return err.message.startsWith(prefix) ? err.message.slice(prefix.length) : err.message;
}

/** qemu-img's "Expecting one image file name" usage error. */
export function expectOneImage(): QimgError {
  return usageError("Expecting one image file name");
}

/** The names of an image's persistent dirty bitmaps, from its format's `info` data. */
export async function bitmapNames(image: Image): Promise<string[]> {
  const data = (await image.formatInfo()).formatSpecific?.data ?? {};
  const list = Array.isArray(data.bitmaps) ? data.bitmaps : [];
  return list.map((b) => String((b as { name?: unknown }).name));
}
