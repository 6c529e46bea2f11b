/**
 * Project rules that keep qimg portable and publishable, and the static
 * checks (fmt, lint, type check, doc lint, publish dry run) counted as tests.
 */

import { parseSummary } from "./run.ts";
import { assert, assertEquals, assertTrue } from "./_assert.ts";
import { runProgram } from "./_util.ts";

const ROOT = new URL("..", import.meta.url).pathname;

/** Source text with comments, strings and template literal text blanked out. */
export function codeOnly(src: string): string {
  let out = "";
  for (let i = 0; i < src.length;) {
    const c = src[i];
    const next = src[i + 1];
    if (c === "/" && next === "/") {
      while (i < src.length && src[i] !== "\n") i++;
    } else if (c === "/" && next === "*") {
      const end = src.indexOf("*/", i + 2);
      const stop = end < 0 ? src.length : end + 2;
      out += src.slice(i, stop).replace(/[^\n]/g, " ");
      i = stop;
    } else if (c === '"' || c === "'" || c === "`") {
      out += c;
      i++;
      while (i < src.length && src[i] !== c) {
        if (src[i] === "\\") i++;
        else if (c === "`" && src[i] === "$" && src[i + 1] === "{") {
          // Keep interpolated code: it can use Deno too.
          let depth = 0;
          for (; i < src.length; i++) {
            out += src[i];
            if (src[i] === "{") depth++;
            else if (src[i] === "}" && --depth === 0) break;
          }
        } else out += src[i] === "\n" ? "\n" : " ";
        i++;
      }
      out += c;
      i++;
    } else {
      out += c;
      i++;
    }
  }
  return out;
}

Deno.test("codeOnly() blanks comments and strings but keeps code", () => {
  const src = 'const a = "Deno.x"; // Deno.y\n/* Deno.z */ Deno.exit(`${Deno.pid} Deno.q`);';
  const code = codeOnly(src);
  assertEquals(code.match(/\bDeno\./g)?.length, 2);
  assertTrue(code.includes("Deno.exit("));
  assertTrue(code.includes("${Deno.pid}"));
});

Deno.test("src/ uses Deno.* only in file.ts (the Node build depends on it)", async () => {
  const offenders: string[] = [];
  for await (const entry of Deno.readDir(`${ROOT}src`)) {
    if (!entry.isFile || !entry.name.endsWith(".ts") || entry.name === "file.ts") continue;
    const lines = codeOnly(await Deno.readTextFile(`${ROOT}src/${entry.name}`)).split("\n");
    lines.forEach((line, i) => {
      if (/\bDeno\s*\./.test(line)) offenders.push(`src/${entry.name}:${i + 1}: ${line.trim()}`);
    });
  }
  assertEquals(offenders, []);
});

Deno.test("every export of mod.ts has JSDoc with an @example", async () => {
  const r = await runProgram(Deno.execPath(), ["doc", "--json", `${ROOT}mod.ts`]);
  assertEquals(r.code, 0, r.stderr);
  type Decl = { kind: string; jsDoc?: { doc?: string; tags?: { kind: string }[] } };
  const doc = JSON.parse(r.stdout) as {
    nodes: Record<string, { symbols: { name: string; declarations: Decl[] }[] }>;
  };
  const mod = Object.entries(doc.nodes).find(([url]) => url.endsWith("/mod.ts"))![1];
  const names = mod.symbols.map((s) => s.name);
  for (const required of ["openImage", "Image", "QimgError", "parseSize", "Extent"]) {
    assertTrue(names.includes(required), `mod.ts must export ${required}`);
  }
  const missing = mod.symbols
    .filter((s) =>
      !s.declarations.some((d) => d.jsDoc?.doc && d.jsDoc.tags?.some((t) => t.kind === "example"))
    )
    .map((s) => s.name);
  assertEquals(missing, [], "exports without a description and an @example");
});

Deno.test("deno.json names the package and has the documented tasks", async () => {
  const config = JSON.parse(await Deno.readTextFile(`${ROOT}deno.json`));
  assertEquals(config.name, "@qimg/qimg");
  assertEquals(config.exports, { ".": "./mod.ts", "./cli": "./cli.ts" });
  for (const task of ["qimg", "test", "check", "bench", "compile"]) {
    assertEquals(typeof config.tasks[task], "string", `task ${task}`);
  }
  assert.match(config.tasks.test, /tests\/run\.ts/);
  assert.match(config.tasks.bench, /bench\/bench\.ts/);
  assert.match(config.tasks.compile, /deno compile .*--output qimg cli\.ts/);
});

Deno.test("parseSummary() reads deno test's summary line, steps and ignored included", () => {
  assertEquals(parseSummary("ok | 12 passed (3 steps) | 0 failed | 2 ignored (1s)\n"), {
    passed: 12,
    failed: 0,
  });
  assertEquals(parseSummary("x\nFAILED | 1 passed | 2 failed (1 step) (84ms)\n\nerror: x"), {
    passed: 1,
    failed: 2,
  });
  assertEquals(parseSummary("ok | 5 passed | 0 failed | 1 ignored | 3 filtered out (2ms)"), {
    passed: 5,
    failed: 0,
  });
  // A test that prints a summary-like line mid-run does not count: the last one does.
  assertEquals(parseSummary("ok | 9 passed | 9 failed\nok | 1 passed | 0 failed (1ms)"), {
    passed: 1,
    failed: 0,
  });
  assertEquals(parseSummary("error: Module not found"), null);
});

/** Runs a deno subcommand on the whole project and asserts it succeeds. */
async function assertDenoOk(args: string[]): Promise<void> {
  const r = await new Deno.Command(Deno.execPath(), {
    args,
    cwd: ROOT,
    env: { NO_COLOR: "1" },
    stdin: "null",
  }).output();
  const out = new TextDecoder().decode(r.stdout) + new TextDecoder().decode(r.stderr);
  assertEquals(r.code, 0, `deno ${args.join(" ")} failed:\n${out.slice(-4000)}`);
}

Deno.test("deno fmt --check passes", () => assertDenoOk(["fmt", "--check"]));
Deno.test("deno lint passes", () => assertDenoOk(["lint"]));
Deno.test("deno check passes on the library, the CLI, its doc examples, tests and bench", () =>
  assertDenoOk(["check", "--doc", "mod.ts", "cli.ts", "tests/", "bench/"]));
Deno.test("the README's library example runs", () =>
  assertDenoOk(["test", "--no-prompt", "-A", "--doc", "README.md"]));
Deno.test("deno doc --lint mod.ts passes", () => assertDenoOk(["doc", "--lint", "mod.ts"]));
Deno.test("deno publish --dry-run passes", () =>
  assertDenoOk(["publish", "--dry-run", "--allow-dirty"]));
