// Start-up: what a command evaluates before it can answer. Each module costs
// start-up time in proportion to its size, so read-only commands must not
// statically pull in other formats' drivers, the qcow2 write side or node:
// built-ins (node:zlib alone costs about 18 ms of start-up).
import { assertEquals, assertTrue } from "./_assert.ts";

const ROOT = new URL("../", import.meta.url);

interface GraphModule {
  specifier: string;
  dependencies?: { specifier: string; isDynamic?: boolean; code?: { specifier?: string } }[];
}

/** The modules `entry` evaluates before any dynamic import(): its static import closure. */
async function staticClosure(entry: string): Promise<string[]> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["info", "--json", entry],
    cwd: ROOT.pathname,
    stdout: "piped",
    stderr: "null",
  }).output();
  assertTrue(out.success, `deno info ${entry} failed`);
  const graph = JSON.parse(new TextDecoder().decode(out.stdout));
  const modules = new Map<string, GraphModule>(
    graph.modules.map((m: GraphModule) => [m.specifier, m]),
  );
  const seen = new Set<string>();
  const stack = [...graph.roots];
  while (stack.length) {
    const s = stack.pop()!;
    if (seen.has(s)) continue;
    seen.add(s);
    for (const d of modules.get(s)?.dependencies ?? []) {
      if (!d.isDynamic && d.code?.specifier) stack.push(d.code.specifier);
    }
  }
  return [...seen].map((s) => s.startsWith(ROOT.href) ? s.slice(ROOT.href.length) : s).sort();
}

/** Modules no read-only command needs before it knows the format it opens. */
const HEAVY = [
  /^src\/(raw|vdi|vpc|vhdx|vhdx_log|vmdk|vmdk_descriptor)\.ts$/,
  /^src\/qcow2_(write|create|amend|snapshot_write|repair|resize)\.ts$/,
  /^src\/(convert|compress_pool|compress_worker|codec|zlib_loader|help|trace)\.ts$/,
  /^(node|npm):/,
];

for (const command of ["info", "map", "check", "snapshot"]) {
  Deno.test(`cmd_${command}.ts loads no driver, no write side and no node: module statically`, async () => {
    const modules = await staticClosure(`cli.ts`).then(async (cli) => [
      ...cli,
      ...await staticClosure(`src/cmd_${command}.ts`),
    ]);
    assertEquals(modules.filter((m) => HEAVY.some((re) => re.test(m))), []);
  });
}

Deno.test("qcow2.ts loads its write side, check, create and amend only on first use", async () => {
  const modules = await staticClosure("src/qcow2.ts");
  assertEquals(modules.filter((m) => HEAVY.some((re) => re.test(m)) || /refcount/.test(m)), []);
});

Deno.test("cmd_rebase.ts and the backing change of rebase -u load no write side, amend or driver statically", async () => {
  const modules = [
    ...await staticClosure("cli.ts"),
    ...await staticClosure("src/cmd_rebase.ts"),
    ...await staticClosure("src/qcow2_header_write.ts"),
  ];
  assertEquals(modules.filter((m) => HEAVY.some((re) => re.test(m))), []);
});

Deno.test("qcow2_snapshot_write.ts (snapshot -c/-d/-a) loads no writer, compression, amend, check or other driver statically", async () => {
  const modules = await staticClosure("src/qcow2_snapshot_write.ts");
  const unwanted = [
    /^src\/(raw|vdi|vpc|vhdx|vhdx_log|vmdk|vmdk_descriptor)\.ts$/,
    /^src\/qcow2_(write|create|amend|repair|resize|refcount|refcount_rebuild|bitmap)\.ts$/,
    /^src\/(convert|codec|zlib_loader|compress_pool|compress_worker|help|trace)\.ts$/,
    /^(node|npm):/,
  ];
  assertEquals(modules.filter((m) => unwanted.some((re) => re.test(m))), []);
});

Deno.test("cmd_convert.ts loads no driver, no qcow2 write side and no compression statically (the formats of a convert load on use)", async () => {
  const modules = [...await staticClosure("cli.ts"), ...await staticClosure("src/cmd_convert.ts")];
  const unwanted = [
    /^src\/(raw|vdi|vpc|vhdx|vhdx_log|vmdk|vmdk_descriptor|qcow2|format_drivers)\.ts$/,
    /^src\/qcow2_(write|create|amend|snapshot_write|repair|resize|refcount)\.ts$/,
    /^src\/(compress_pool|compress_worker|codec|zlib_loader|help|trace)\.ts$/,
    /^(node|npm):/,
  ];
  assertEquals(modules.filter((m) => unwanted.some((re) => re.test(m))), []);
});
