/**
 * `deno task build`: the Node build. Bundles node_cli.ts (and everything
 * it imports, npm:pako included) into one self-contained ESM file,
 * dist/qimg.mjs, that runs on Node >= 20 with no dependencies, and writes
 * dist/package.json with a `qimg` bin so that `npm pack` in dist/ gives an
 * installable package. Node matters because Deno cannot start under the
 * `prlimit --as=1GiB` that OpenStack and libguestfs put on qemu-img.
 * It also bundles the library (mod.ts) for browsers, dist/qimg_browser.mjs,
 * which tests/browser/index.html imports.
 *
 * @example Usage
 * ```sh
 * deno task build && node dist/qimg.mjs info disk.qcow2
 * ```
 * @module
 */

const ROOT = new URL("..", import.meta.url).pathname;
const DIST = `${ROOT}dist/`;
/** The bundle's file name inside dist/. */
export const BUNDLE = "qimg.mjs";
/** The browser bundle of the library (mod.ts) inside dist/. */
export const BROWSER_BUNDLE = "qimg_browser.mjs";

/** What the npm package says about itself: the bin, Node's minimum version, no dependencies. */
export function packageJson(version: string): Record<string, unknown> {
  return {
    name: "@qimg/qimg",
    version,
    description: "qemu-img 7.2 rebuilt in TypeScript: the qimg command line for Node",
    license: "MIT",
    type: "module",
    bin: { qimg: `./${BUNDLE}` },
    files: [BUNDLE, "README.md", "LICENSE"],
    // node:fs positional I/O, ESM top-level await and Symbol.asyncDispose: Node 20.
    engines: { node: ">=20" },
  };
}

/** Where build() writes. */
export interface BuildOptions {
  /** Output directory (default: dist/ in the project); tests build into a temp dir. */
  outDir?: string;
}

/** Runs `deno bundle` for `platform`; throws with its output when it fails. */
async function bundle(platform: "deno" | "browser", entry: string, out: string): Promise<void> {
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["bundle", "--quiet", "--platform", platform, "--output", out, `${ROOT}${entry}`],
    cwd: ROOT,
    env: { NO_COLOR: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!r.success) {
    const text = new TextDecoder().decode(r.stderr) + new TextDecoder().decode(r.stdout);
    throw new Error(`deno bundle failed (exit ${r.code}):\n${text}`);
  }
}

/**
 * Bundles the library (mod.ts, pako included) into one ES module for
 * browsers; returns its path. Its one import left, node:zlib, is dynamic and
 * optional: a browser inflates with pako (src/zlib_loader.ts).
 */
export async function buildBrowser(options: BuildOptions = {}): Promise<string> {
  const dist = options.outDir ? options.outDir.replace(/\/?$/, "/") : DIST;
  await Deno.mkdir(dist, { recursive: true });
  const out = `${dist}${BROWSER_BUNDLE}`;
  await bundle("browser", "mod.ts", out);
  return out;
}

/**
 * Builds the bundle and package.json; returns the bundle's path. Throws with
 * deno bundle's output when it fails.
 */
export async function build(options: BuildOptions = {}): Promise<string> {
  const dist = options.outDir ? options.outDir.replace(/\/?$/, "/") : DIST;
  await Deno.mkdir(dist, { recursive: true });
  const out = `${dist}${BUNDLE}`;
  // --platform deno keeps node: imports as imports (Node has them all) and
  // bundles npm packages; the command table's dynamic imports are inlined.
  await bundle("deno", "node_cli.ts", out);
  let code = await Deno.readTextFile(out);
  // npm's bin link runs the file itself: it needs the shebang (esbuild keeps
  // node_cli.ts's, but a bundler that drops it must not break the package).
  if (!code.startsWith("#!")) code = "#!/usr/bin/env node\n" + code;
  await Deno.writeTextFile(out, code, { mode: 0o755 });
  await Deno.chmod(out, 0o755);

  const config = JSON.parse(await Deno.readTextFile(`${ROOT}deno.json`));
  await Deno.writeTextFile(
    `${dist}package.json`,
    JSON.stringify(packageJson(config.version), null, 2) + "\n",
  );
  for (const f of ["README.md", "LICENSE"]) await Deno.copyFile(`${ROOT}${f}`, `${dist}${f}`);
  return out;
}

if (import.meta.main) {
  try {
    const out = await build();
    const browser = await buildBrowser();
    console.log(
      `built ${out.slice(ROOT.length)}, dist/package.json and ${browser.slice(ROOT.length)}`,
    );
  } catch (e) {
    console.error(e instanceof Error ? e.message : String(e));
    Deno.exit(1);
  }
}
