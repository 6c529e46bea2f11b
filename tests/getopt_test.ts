import { assertEquals } from "./_assert.ts";
import { getopt, type LongOption } from "../src/getopt.ts";

const LONG: LongOption[] = [
  { name: "help", arg: "none", val: "h" },
  { name: "format", arg: "required", val: "f" },
  { name: "output", arg: "required", val: "output" },
  { name: "object", arg: "required", val: "object" },
  { name: "backing-chain", arg: "none", val: "backing-chain" },
  { name: "force-share", arg: "none", val: "U" },
  { name: "level", arg: "optional", val: "level" },
];

/** getopt over info's option string, reduced to comparable pieces. */
function parse(argv: string[], short = ":f:hU") {
  const r = getopt(argv, short, LONG, "info");
  return { options: r.options.map((o) => [o.opt, o.arg, o.raw]), operands: r.operands };
}

Deno.test("getopt() splits clustered short options and their attached argument", () => {
  assertEquals(parse(["-Ufraw", "a"]), {
    options: [["U", undefined, "-Ufraw"], ["f", "raw", "-Ufraw"]],
    operands: ["a"],
  });
  assertEquals(parse(["-Uf", "raw", "a"]).options, [["U", undefined, "-Uf"], [
    "f",
    "raw",
    "-Uf",
  ]]);
});

Deno.test("getopt() takes the next element as an argument even when it looks like an option", () => {
  assertEquals(parse(["-f", "-U", "a"]), { options: [["f", "-U", "-f"]], operands: ["a"] });
  assertEquals(parse(["--output", "--help"]).options, [["output", "--help", "--output"]]);
});

Deno.test("getopt() accepts --name=value, --name value and unique prefixes", () => {
  assertEquals(parse(["--output=json", "a"]).options, [["output", "json", "--output=json"]]);
  assertEquals(parse(["--output", "json", "a"]).options, [["output", "json", "--output"]]);
  assertEquals(parse(["--out=json"]).options, [["output", "json", "--out=json"]]);
  assertEquals(parse(["--back", "a"]).options, [["backing-chain", undefined, "--back"]]);
  assertEquals(parse(["--output="]).options, [["output", "", "--output="]]);
});

Deno.test("getopt() refuses ambiguous prefixes, unknown names and a value on a flag", () => {
  assertEquals(parse(["--o=json", "a"]).options, [["?", undefined, "--o=json"]]);
  assertEquals(parse(["--foo", "a"]).options, [["?", undefined, "--foo"]]);
  assertEquals(parse(["--help=1"]).options, [["?", undefined, "--help=1"]]);
  assertEquals(parse(["--=x"]).options, [["?", undefined, "--=x"]]);
  assertEquals(parse(["---x"]).options, [["?", undefined, "---x"]]);
});

Deno.test("getopt() prefers an exact long name over longer names it prefixes", () => {
  const long: LongOption[] = [
    { name: "add", arg: "none", val: "add" },
    { name: "address", arg: "none", val: "address" },
  ];
  assertEquals(getopt(["--add"], ":", long).options.map((o) => o.opt), ["add"]);
  assertEquals(getopt(["--ad"], ":", long).options.map((o) => o.opt), ["?"]);
});

Deno.test("getopt() treats prefixes of options with the same meaning as unambiguous", () => {
  const long: LongOption[] = [
    { name: "force-share", arg: "none", val: "U" },
    { name: "force-shared", arg: "none", val: "U" },
  ];
  assertEquals(getopt(["--force"], ":U", long).options.map((o) => o.opt), ["U"]);
});

Deno.test("getopt() handles optional arguments: only attached with '='", () => {
  assertEquals(parse(["--level", "x"]), {
    options: [["level", undefined, "--level"]],
    operands: ["x"],
  });
  assertEquals(parse(["--level=3"]).options, [["level", "3", "--level=3"]]);
  assertEquals(parse(["-r", "x"], ":r::").options, [["r", undefined, "-r"]]);
  assertEquals(parse(["-rx"], ":r::").options, [["r", "x", "-rx"]]);
});

Deno.test("getopt() permutes operands after options, and stops at '--'", () => {
  assertEquals(parse(["a", "-U", "b", "-f", "raw"]), {
    options: [["U", undefined, "-U"], ["f", "raw", "-f"]],
    operands: ["a", "b"],
  });
  assertEquals(parse(["a", "--", "-U", "--", "b"]), {
    options: [],
    operands: ["a", "-U", "--", "b"],
  });
  assertEquals(parse(["-", "-U"]), { options: [["U", undefined, "-U"]], operands: ["-"] });
});

Deno.test("getopt() with '+' stops at the first operand", () => {
  assertEquals(getopt(["-V", "info", "-h"], "+:hV").operands, ["info", "-h"]);
});

Deno.test("getopt() names the element GNU getopt's argv[optind-1] holds for an unknown option", () => {
  const raw = (argv: string[]) => parse(argv).options.at(-1)![2];
  // Last in its cluster: the cluster itself.
  assertEquals(raw(["-x", "a"]), "-x");
  assertEquals(raw(["a", "-Ux"]), "-Ux");
  // Inside a cluster: the element before it in the permuted argv, which
  // is the last operand met so far...
  assertEquals(raw(["a", "-xU"]), "a");
  assertEquals(raw(["a", "b", "-Uxq"]), "b");
  assertEquals(raw(["a", "-U", "b", "-xq"]), "b");
  assertEquals(raw(["-U", "a", "-f", "raw", "-xq"]), "a");
  // ...else the last element consumed as an option or its argument...
  assertEquals(raw(["-f", "raw", "-xq"]), "raw");
  assertEquals(raw(["-U", "-xq"]), "-U");
  // ...else argv[0], the command name.
  assertEquals(raw(["-xU", "a"]), "info");
  assertEquals(raw(["-Uxq", "a"]), "info");
  // ':' is never an option letter.
  assertEquals(raw(["-:"]), "-:");
  assertEquals(raw(["a", "-:U"]), "a");
});

Deno.test("getopt() reports a missing argument at the end with the element that needed it", () => {
  assertEquals(parse(["a", "-f"]).options, [[":", undefined, "-f"]]);
  assertEquals(parse(["a", "-Uf"]).options, [["U", undefined, "-Uf"], [":", undefined, "-Uf"]]);
  assertEquals(parse(["--output"]).options, [[":", undefined, "--output"]]);
  assertEquals(parse(["--out"]).options, [[":", undefined, "--out"]]);
});

Deno.test("getopt() stops at the first error", () => {
  assertEquals(parse(["-x", "-f"]).options, [["?", undefined, "-x"]]);
  assertEquals(parse(["-U", "--foo", "-f"]).options, [["U", undefined, "-U"], [
    "?",
    undefined,
    "--foo",
  ]]);
});
