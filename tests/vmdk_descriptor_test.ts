/** Unit tests of the vmdk descriptor scanner and writer (qemu's strstr/sscanf rules). */

import { assertEquals } from "./_assert.ts";
import {
  buildDescriptor,
  cString,
  descriptorValue,
  parentFileNameHint,
  parseCreateType,
  parseExtentLines,
  readCid,
  replaceCid,
} from "../src/vmdk_descriptor.ts";
import { QimgError } from "../src/errors.ts";

function message(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    if (e instanceof QimgError) return e.message;
    throw e;
  }
  return "no error";
}

Deno.test("parseCreateType() finds createType anywhere, even in a comment", () => {
  assertEquals(parseCreateType('# createType="vmfs"\nversion=1\n'), "vmfs");
  assertEquals(message(() => parseCreateType("version=1\n")), "invalid VMDK image descriptor");
  assertEquals(
    message(() => parseCreateType('createType="monolithicSparse"')),
    "Unsupported image type 'monolithicSparse'",
  );
  assertEquals(message(() => parseCreateType('createType="vmfs')), "invalid VMDK image descriptor");
});

Deno.test("descriptorValue() skips two characters after the name and limits the length", () => {
  assertEquals(descriptorValue('createType = "x"', "createType", 128), " ");
  assertEquals(
    descriptorValue(`createType="${"a".repeat(127)}"`, "createType", 128),
    "a".repeat(127),
  );
  assertEquals(descriptorValue(`createType="${"a".repeat(128)}"`, "createType", 128), undefined);
  assertEquals(descriptorValue("createType", "createType", 128), undefined);
});

Deno.test("parseExtentLines() keeps RW lines of known types and positive sizes", () => {
  const lines = parseExtentLines(
    'RW 8 FLAT "a b.raw" 2\nRDONLY 8 FLAT "r.raw" 0\nRW 0 SPARSE "z"\nRW 4 ZERO "q"\n' +
      'RW 16 SPARSE "s.vmdk"\r\nRW 5 VMFS "v"\nNOACCESS 1 FLAT "n" 0\n',
  );
  assertEquals(lines, [
    { sectors: 8, type: "FLAT", fileName: "a b.raw", flatOffset: 2 },
    { sectors: 16, type: "SPARSE", fileName: "s.vmdk", flatOffset: -1 },
    { sectors: 5, type: "VMFS", fileName: "v", flatOffset: 0 },
  ]);
});

Deno.test("parseExtentLines() lets fields run over line ends, as sscanf does", () => {
  // An access word alone on a line takes the fields of the following lines.
  const lines = parseExtentLines('RW\n8\nFLAT "f" 0\nRW 4 FLAT "g" 0\n');
  assertEquals(lines.map((l) => l.fileName), ["f", "g"]);
  // A flat offset on the next line still belongs to the extent.
  assertEquals(parseExtentLines('RW 8 FLAT "f"\n3\n')[0].flatOffset, 3);
});

Deno.test("parseExtentLines() reports qemu's invalid extent lines", () => {
  assertEquals(
    message(() => parseExtentLines('RW 8 FLAT "f"\n')),
    'Invalid extent line: RW 8 FLAT "f"',
  );
  assertEquals(
    message(() => parseExtentLines('RW 8 VMFS "f" 1\r\n')),
    'Invalid extent line: RW 8 VMFS "f" 1\r',
  );
  assertEquals(
    message(() => parseExtentLines('RW 8 FLAT "f" -2')),
    'Invalid extent line: RW 8 FLAT "f" -2',
  );
  assertEquals(
    message(() => parseExtentLines('RW 8 SPARSE "f" 0\n')),
    'Invalid extent line: RW 8 SPARSE "f" 0',
  );
});

Deno.test("readCid() reads hex after the first CID, which may be parentCID's", () => {
  assertEquals(readCid("CID=fffffffe\nparentCID=12\n", false), 0xfffffffe);
  assertEquals(readCid("CID=fffffffe\nparentCID=12\n", true), 0x12);
  assertEquals(readCid("parentCID=abc\n", false), 0xabc);
  assertEquals(readCid("CID=0x1F\n", false), 0x1f);
  assertEquals(readCid("CID=zz\n", false), undefined);
  assertEquals(readCid("version=1\n", true), undefined);
  assertEquals(readCid("CID=123456789\n", false), 0x23456789);
});

Deno.test("parentFileNameHint() is absent, a name, or a failure", () => {
  assertEquals(parentFileNameHint("CID=1\n"), undefined);
  assertEquals(parentFileNameHint('parentFileNameHint="../b.vmdk"\n'), "../b.vmdk");
  assertEquals(parentFileNameHint('parentFileNameHint="b'), null);
  assertEquals(parentFileNameHint(`parentFileNameHint="${"x".repeat(4096)}"`), null);
});

Deno.test("cString() stops at the first NUL", () => {
  assertEquals(cString("ab\0cd"), "ab");
  assertEquals(cString("abc"), "abc");
});

Deno.test("buildDescriptor() fills qemu's template", () => {
  const text = buildDescriptor({
    cid: 0xabc,
    parentCid: 0xffffffff,
    createType: "monolithicSparse",
    parentHint: 'parentFileNameHint="b.vmdk"',
    extentLines: 'RW 2048 SPARSE "a.vmdk"\n',
    hwVersion: "4",
    cylinders: 2,
    heads: 16,
    adapterType: "ide",
    toolsVersion: "2147483647",
  });
  assertEquals(
    text,
    '# Disk DescriptorFile\nversion=1\nCID=abc\nparentCID=ffffffff\ncreateType="monolithicSparse"\n' +
      'parentFileNameHint="b.vmdk"\n# Extent description\nRW 2048 SPARSE "a.vmdk"\n\n' +
      '# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = "4"\nddb.geometry.cylinders = "2"\n' +
      'ddb.geometry.heads = "16"\nddb.geometry.sectors = "63"\nddb.adapterType = "ide"\n' +
      'ddb.toolsVersion = "2147483647"\n',
  );
});

Deno.test("replaceCid() rewrites the CID and keeps everything from parentCID", () => {
  assertEquals(replaceCid("v\nCID=1234\nparentCID=5\nx", 0xbeef), "v\nCID=beef\nparentCID=5\nx");
  assertEquals(replaceCid("CID=1\n", 2), undefined);
});
