import { assert, assertEquals } from "./_assert.ts";
import { QimgError } from "../src/errors.ts";
import {
  cvtnum,
  parseSize,
  parseSizeExact,
  parseSizeOption,
  sizeToStr,
  strtosz,
} from "../src/size.ts";

// Values observed from `qemu-img create -f raw a.raw <size>` (qemu-img 7.2).
const ACCEPTED: [string, bigint][] = [
  ["1", 1n],
  ["0", 0n],
  ["1k", 1024n],
  ["1K", 1024n],
  ["1m", 1n << 20n],
  ["1M", 1n << 20n],
  ["1g", 1n << 30n],
  ["1t", 1n << 40n],
  ["1p", 1n << 50n],
  ["1e", 1n << 60n],
  ["7E", 7n << 60n],
  ["1.5G", 1610612736n],
  ["0.5k", 512n],
  ["1.0", 1n],
  ["1.", 1n],
  ["1.k", 1024n],
  ["0x10", 16n],
  ["0x10k", 16384n],
  [" 1M", 1n << 20n],
  ["+1", 1n],
  ["1b", 1n],
  ["1B", 1n],
  ["1.7k", 1741n], // 1740.8 rounds half up
  ["1.1k", 1126n],
  ["1.0001k", 1024n],
  ["0.0000001G", 107n],
  ["1.5e", 1729382256910270464n],
  ["1.5E", 1729382256910270464n],
  ["9223372036854775807", 9223372036854775807n],
  ["15E", 15n << 60n],
  ["0.00048828125k", 1n], // exactly half a byte rounds up
  ["0.000488281249k", 0n],
  // A fraction that rounds to 1.0 as a double counts as none (qemu's uint64 cast).
  ["0.99999999999999999999k", 0n],
  ["1.99999999999999999999k", 1024n],
  ["\t1k", 1024n],
];

const INVALID = [
  "1.5",
  "0.5",
  ".5k",
  "0x1.5k",
  "-1",
  "1x",
  "1e3",
  "",
  " ",
  "1M ",
  "1.5b",
  "1kB",
  "1KiB",
  "0x",
  "00x10",
  "1.5e3k",
];

Deno.test("strtosz() accepts what qemu_strtosz accepts, with its values", () => {
  for (const [text, value] of ACCEPTED) assertEquals(strtosz(text).value, value, text);
});

Deno.test("strtosz() rejects what qemu_strtosz rejects", () => {
  for (const text of INVALID) assertEquals(strtosz(text).value, "invalid", JSON.stringify(text));
});

Deno.test("strtosz() reports overflow past 2^64 as a range error", () => {
  for (const text of ["16E", "99999999999999999999", "0x10000000000000000", "0xfffffffffffffffk"]) {
    assertEquals(strtosz(text).value, "range", text);
  }
});

Deno.test("strtosz() flags hex numbers with a unit suffix only", () => {
  assertEquals(strtosz("0x10k").hexWithSuffix, true);
  assertEquals(strtosz("0x10").hexWithSuffix, false);
  assertEquals(strtosz("16k").hexWithSuffix, false);
});

Deno.test("parseSizeExact() keeps its bigint-or-error contract", () => {
  assertEquals(parseSizeExact("1M"), 1n << 20n);
  assertEquals(parseSizeExact("1x"), "invalid");
  assertEquals(parseSizeExact("16E"), "range");
});

function message(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof QimgError);
    return e.message + (e.hint ? "\n" + e.hint : "");
  }
  throw new Error("did not throw");
}

Deno.test("cvtnum() words errors as qemu-img's cvtnum", () => {
  assertEquals(
    message(() => cvtnum("image size", "1x")),
    "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n" +
      "qimg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.",
  );
  for (const text of ["8E", "16E", "9223372036854775808"]) {
    assertEquals(
      message(() => cvtnum("image size", text)),
      "Invalid image size specified. Must be between 0 and 9223372036854775807.",
    );
  }
  assertEquals(
    message(() => cvtnum("buffer size", "2k", { min: 1n, max: 1024n })),
    "Invalid buffer size specified. Must be between 1 and 1024.",
  );
  assertEquals(cvtnum("image size", "9223372036854775807"), 9223372036854775807n);
});

Deno.test("cvtnum() passes the hex-suffix warning to warn", () => {
  const warnings: string[] = [];
  assertEquals(cvtnum("image size", "0x10k", { warn: (m) => warnings.push(m) }), 16384n);
  assertEquals(warnings, [
    "warning: Using a multiplier suffix on hex numbers is deprecated: 0x10k",
  ]);
});

Deno.test("parseSizeOption() words errors as qemu's parse_option_size", () => {
  assertEquals(
    message(() => parseSizeOption("size", "1x")),
    "Parameter 'size' expects a non-negative number below 2^64\n" +
      "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
      "and exabytes, respectively.",
  );
  assertEquals(
    message(() => parseSizeOption("size", "16E")),
    "Value '16E' is out of range for parameter 'size'",
  );
  assertEquals(parseSizeOption("size", "15E"), 15n << 60n);
});

Deno.test("parseSize() returns safe integers and refuses the rest", () => {
  assertEquals(parseSize("1.5G"), 1610612736);
  assert.throws(() => parseSize("1x"), QimgError);
  assert.throws(() => parseSize("1E"), QimgError);
});

// `virtual size:` as qemu-img 7.2 info prints it for raw files of these lengths.
const SIZE_TO_STR: [number, string][] = [
  [0, "0 B"],
  [512, "512 B"],
  [1024, "1 KiB"],
  [1536, "1.5 KiB"],
  [10240, "10 KiB"],
  [1023488, "1e+03 KiB"],
  [1024000, "0.977 MiB"],
  [1047552, "0.999 MiB"],
  [1048064, "1 MiB"],
  [1048576, "1 MiB"],
  [1572864, "1.5 MiB"],
  [10485760, "10 MiB"],
  [16776192, "16 MiB"],
  [104857600, "100 MiB"],
  [1023410176, "976 MiB"],
  [1048576000, "0.977 GiB"],
  [1072693248, "0.999 GiB"],
  [1073741824, "1 GiB"],
  [1099511627776, "1 TiB"],
  [5000000000000, "4.55 TiB"],
  // qcow2 images with 2 MiB clusters.
  [1098412116148224, "999 TiB"],
  [1099511627776000, "0.977 PiB"],
  [5066549580791808, "4.5 PiB"],
  [1125899906842624000, "0.977 EiB"],
  [1152808914616162816, "1 EiB"],
  [1152921504606846976, "1 EiB"],
];

Deno.test("sizeToStr() prints sizes as qemu-img info does", () => {
  for (const [bytes, text] of SIZE_TO_STR) assertEquals(sizeToStr(bytes), text, String(bytes));
});
