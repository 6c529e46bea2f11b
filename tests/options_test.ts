import { assert, assertEquals } from "./_assert.ts";
import { QimgError } from "../src/errors.ts";
import {
  accumulateOptions,
  formatOptionHelp,
  formattingLine,
  isHelpOption,
  isValidOptionList,
  mergeOptionTables,
  parseOptionList,
  parseOptions,
  QCOW2_CREATE_OPTIONS,
  RAW_CREATE_OPTIONS,
  splitOptionString,
} from "../src/options.ts";
import { PROTOCOL_CREATE_OPTIONS } from "../src/protocol.ts";

const RAW_FILE = mergeOptionTables(RAW_CREATE_OPTIONS, PROTOCOL_CREATE_OPTIONS);

function message(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof QimgError);
    return e.message + (e.hint ? "\n" + e.hint : "");
  }
  throw new Error("did not throw");
}

Deno.test("splitOptionString() splits on single commas and unescapes ',,'", () => {
  assertEquals(splitOptionString("a=1,b=x,,y,c"), [["a", "1"], ["b", "x,y"], ["c", undefined]]);
  assertEquals(splitOptionString("a=,b"), [["a", ""], ["b", undefined]]);
});

Deno.test("isHelpOption() finds 'help' or '?' as a whole element only", () => {
  assert.ok(isHelpOption("help"));
  assert.ok(isHelpOption("?"));
  assert.ok(isHelpOption("size=1M,help"));
  assert.ok(isHelpOption("help,size=1M"));
  assert.ok(!isHelpOption("help=1"));
  assert.ok(!isHelpOption("size=help"));
  assert.ok(!isHelpOption("a,,help")); // one element: "a,help"
});

Deno.test("isValidOptionList() refuses empty, leading comma and odd trailing commas", () => {
  assert.ok(isValidOptionList("size=1M"));
  assert.ok(isValidOptionList("size=1M,,"));
  assert.ok(!isValidOptionList(""));
  assert.ok(!isValidOptionList(",a"));
  assert.ok(!isValidOptionList("size=1M,"));
  assert.ok(!isValidOptionList("size=1M,,,"));
});

Deno.test("accumulateOptions() joins repeated -o with a comma", () => {
  assertEquals(accumulateOptions(undefined, "a=1"), "a=1");
  assertEquals(accumulateOptions("a=1", "b=2"), "a=1,b=2");
  assertEquals(message(() => accumulateOptions("a=1", "b=2,")), "Invalid option list: b=2,");
});

Deno.test("parseOptionList() types values, later ones win, ignores id", () => {
  const p = parseOptionList("size=1M,nocow=yes,size=0x10,id=x,extent_size_hint=1.5k", RAW_FILE);
  assertEquals(p.values, { size: 16, nocow: true, extent_size_hint: 1536 });
  assertEquals(p.shown, { size: "16", nocow: "yes", extent_size_hint: "1536" });
});

Deno.test("parseOptionList() reads bare names as on and 'no' names as off", () => {
  assertEquals(message(() => parseOptionList("nocow", RAW_FILE)), "Invalid parameter 'cow'");
  assertEquals(parseOptionList("preallocation", RAW_FILE).values, { preallocation: "on" });
  assertEquals(
    message(() => parseOptionList("nosize", RAW_FILE)),
    "Parameter 'size' expects a non-negative number below 2^64\n" +
      "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
      "and exabytes, respectively.",
  );
});

Deno.test("parseOptionList() words bad values as qemu", () => {
  assertEquals(message(() => parseOptionList("bogus=1", RAW_FILE)), "Invalid parameter 'bogus'");
  assertEquals(
    message(() => parseOptionList("nocow=OFF", RAW_FILE)),
    "Parameter 'nocow' expects 'on' or 'off'",
  );
  assertEquals(
    message(() => parseOptionList("size=16E", RAW_FILE)),
    "Value '16E' is out of range for parameter 'size'",
  );
  assertEquals(
    message(() => parseOptionList("refcount_bits=x", QCOW2_CREATE_OPTIONS)),
    "Parameter 'refcount_bits' expects a number",
  );
  assertEquals(
    message(() => parseOptionList("refcount_bits=99999999999999999999", QCOW2_CREATE_OPTIONS)),
    "Value '99999999999999999999' is too large for parameter 'refcount_bits'",
  );
});

Deno.test("parseOptions() puts the file name before messages", () => {
  assertEquals(
    message(() => parseOptions("bogus=1", RAW_FILE, "a.raw")),
    "a.raw: Invalid parameter 'bogus'",
  );
  assertEquals(parseOptions("size=1k", RAW_FILE), { size: 1024 });
});

Deno.test("formattingLine() prints table order, defaults, escaped commas, signed numbers", () => {
  // Observed from qemu-img 7.2 create.
  assertEquals(
    formattingLine(
      "b.raw",
      "raw",
      RAW_FILE,
      parseOptionList("extent_size_hint=1M,preallocation=off,nocow=on,size=2M", RAW_FILE),
    ),
    "Formatting 'b.raw', fmt=raw size=2097152 nocow=on preallocation=off extent_size_hint=1048576\n",
  );
  assertEquals(
    formattingLine("x", "raw", RAW_FILE, parseOptionList("size=1M,preallocation=a,,b", RAW_FILE)),
    "Formatting 'x', fmt=raw size=1048576 preallocation=a,,b\n",
  );
  assertEquals(
    formattingLine("f.raw", "raw", RAW_FILE, parseOptionList("size=9223372036854775808", RAW_FILE)),
    "Formatting 'f.raw', fmt=raw size=-9223372036854775808\n",
  );
  const qcow2 = parseOptionList(
    "size=1M,refcount_bits=0x10,encrypt.iter-time=010",
    QCOW2_CREATE_OPTIONS,
  );
  assertEquals(
    formattingLine("q2.qcow2", "qcow2", QCOW2_CREATE_OPTIONS, qcow2),
    "Formatting 'q2.qcow2', fmt=qcow2 encrypt.iter-time=8 cluster_size=65536 extended_l2=off " +
      "compression_type=zlib size=1048576 lazy_refcounts=off refcount_bits=16\n",
  );
});

Deno.test("formatOptionHelp() lists sorted, padded options as qemu-img -o help", () => {
  assertEquals(
    formatOptionHelp(RAW_FILE),
    "  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable\n" +
      "  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)\n" +
      "  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)\n" +
      "  size=<size>            - Virtual disk size\n",
  );
});

Deno.test("mergeOptionTables() keeps the format's description of a shared name", () => {
  const merged = mergeOptionTables(QCOW2_CREATE_OPTIONS, PROTOCOL_CREATE_OPTIONS);
  assertEquals(
    merged.find((d) => d.name === "preallocation")?.help,
    "Preallocation mode (allowed values: off, metadata, falloc, full)",
  );
  assertEquals(merged.slice(-2).map((d) => d.name), ["nocow", "extent_size_hint"]);
});

Deno.test("formattingLine() orders every qcow2 and file option as qemu-img 7.2", () => {
  const descs = mergeOptionTables(QCOW2_CREATE_OPTIONS, PROTOCOL_CREATE_OPTIONS);
  const text = "backing_file=a,backing_fmt=raw,cluster_size=64k,compat=1.1,compression_type=zlib," +
    "data_file=x,data_file_raw=on,encrypt.cipher-alg=aes-256,encrypt.cipher-mode=xts," +
    "encrypt.format=luks,encrypt.hash-alg=sha256,encrypt.iter-time=10,encrypt.ivgen-alg=plain64," +
    "encrypt.ivgen-hash-alg=sha256,encrypt.key-secret=s,encryption=off,extended_l2=off," +
    "extent_size_hint=1M,lazy_refcounts=off,nocow=off,preallocation=off,refcount_bits=16,size=1M";
  // Printed by `qemu-img create -f qcow2 -u -o <text> q.qcow2`.
  assertEquals(
    formattingLine("q.qcow2", "qcow2", descs, parseOptionList(text, descs)),
    "Formatting 'q.qcow2', fmt=qcow2 encryption=off encrypt.format=luks encrypt.key-secret=s " +
      "encrypt.cipher-alg=aes-256 encrypt.cipher-mode=xts encrypt.ivgen-alg=plain64 " +
      "encrypt.ivgen-hash-alg=sha256 encrypt.hash-alg=sha256 encrypt.iter-time=10 " +
      "cluster_size=65536 extended_l2=off preallocation=off compression_type=zlib size=1048576 " +
      "compat=1.1 backing_file=a backing_fmt=raw data_file=x data_file_raw=on " +
      "lazy_refcounts=off refcount_bits=16 nocow=off extent_size_hint=1048576\n",
  );
});
