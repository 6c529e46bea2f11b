/** `qimg info`: what an image is, human or JSON, optionally for its whole backing chain. */

import type { Io } from "./command.ts";
import { optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { QimgError, usageError } from "./errors.ts";
import type { Image, ImageInfo } from "./image.ts";
import { dumpHuman, type JsonValue, toJsonPretty } from "./output.ts";
import { sizeToStr } from "./size.ts";
import { openForCommand, parseOutputFormat, processObject } from "./cmd_util.ts";
import { renderSnapshotList, snapshotsFromJson, snapshotsToJson } from "./qcow2_snapshot.ts";

const LONG = [
  { name: "help", arg: "none", val: "h" },
  { name: "format", arg: "required", val: "f" },
  { name: "output", arg: "required", val: "output" },
  { name: "backing-chain", arg: "none", val: "backing-chain" },
  { name: "object", arg: "required", val: "object" },
  { name: "image-opts", arg: "none", val: "image-opts" },
  { name: "force-share", arg: "none", val: "U" },
] as const;

/** Runs `info`. */
export async function run(args: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(args, ":f:hU", [...LONG], "info");
  let format: string | undefined;
  let output = "human";
  let chain = false;
  let imageOpts = false;
  let forceShare = false;
  for (const o of options) {
    switch (o.opt) {
      case "f":
        format = o.arg;
        break;
      case "output":
        output = o.arg!;
        break;
      case "backing-chain":
        chain = true;
        break;
      case "h":
        return (await import("./cmd_util.ts")).printHelp(io);
      case "U":
        forceShare = true;
        break;
      case "object":
        if (processObject(o.arg!, io)) return 0;
        break;
      case "image-opts":
        imageOpts = true;
        break;
      default:
        throw optionError(o);
    }
  }
  if (operands.length !== 1) throw usageError("Expecting one image file name");
  const human = parseOutputFormat(output) === "human";
  // As qemu-img: each layer opened on its own (no backing), by the full
  // backing name the layer above reports; a name seen twice is a loop.
  const infos: ImageInfo[] = [];
  const seen = new Set<string>();
  let name: string | undefined = operands[0];
  let fmt = format;
  let opts = imageOpts;
  while (name !== undefined) {
    if (seen.has(name)) throw new QimgError(`Backing file '${name}' creates an infinite loop.`);
    seen.add(name);
    const image: Image = await openForCommand(name, io, {
      format: fmt,
      imageOpts: opts,
      forceShare,
      noIo: true, // as qemu-img info: metadata only (encrypted images, missing data files)
      backing: false,
    });
    let info: ImageInfo;
    try {
      info = await imageInfo(image, 0);
    } finally {
      await image.close();
    }
    infos.push(info);
    if (!chain) break;
    name = info["full-backing-filename"] as string | undefined;
    fmt = info["backing-filename-format"] as string | undefined;
    opts = false;
  }
  if (human) io.stdout(infos.map(renderInfoHuman).join("\n"));
  else io.stdout(toJsonPretty(chain ? infos : infos[0]) + "\n");
  return 0;
}

/** Builds the object `info --output=json` prints for layer `depth` of an image. */
export async function imageInfo(image: Image, depth = 0): Promise<ImageInfo> {
  const layer = image.chain[depth];
  const fi = await layer.image.info();
  const info: ImageInfo = {
    "virtual-size": layer.image.size,
    filename: layer.filename,
    "cluster-size": fi.clusterSize,
    format: layer.driver.name,
    "actual-size": await layer.image.file.allocated(),
    encrypted: fi.encrypted ? true : undefined,
  };
  const backing = layer.image.backing;
  if (backing) {
    info["backing-filename"] = backing.name;
    info["full-backing-filename"] = layer.image.file.resolve(backing.name);
    if (backing.format) info["backing-filename-format"] = backing.format;
  }
  const snapshots = await layer.image.snapshots?.();
  if (snapshots?.length) info.snapshots = snapshotsToJson(snapshots);
  if (fi.formatSpecific) info["format-specific"] = fi.formatSpecific as unknown as JsonValue;
  info["dirty-flag"] = fi.dirty ?? false;
  return info;
}

/** qemu-img's human rendering of one image's info. */
export function renderInfoHuman(info: ImageInfo): string {
  const size = info["virtual-size"] as number;
  let out = `image: ${info.filename}\n`;
  out += `file format: ${info.format}\n`;
  out += `virtual size: ${sizeToStr(size)} (${BigInt(size)} bytes)\n`; // exact above 2^53
  out += `disk size: ${sizeToStr(info["actual-size"] as number)}\n`;
  if (info.encrypted) out += "encrypted: yes\n";
  if (info["cluster-size"] !== undefined) out += `cluster_size: ${info["cluster-size"]}\n`;
  if (info["dirty-flag"]) out += "cleanly shut down: no\n";
  if (info["backing-filename"] !== undefined) {
    out += `backing file: ${info["backing-filename"]}`;
    if (info["full-backing-filename"] !== info["backing-filename"]) {
      out += ` (actual path: ${info["full-backing-filename"]})`;
    }
    out += "\n";
  }
  if (info["backing-filename-format"] !== undefined) {
    out += `backing file format: ${info["backing-filename-format"]}\n`;
  }
  if (info.snapshots) out += renderSnapshotList(snapshotsFromJson(info.snapshots));
  const spec = info["format-specific"] as { data: JsonValue } | undefined;
  if (spec) out += "Format specific information:\n" + dumpHuman(spec.data, 1);
  return out;
}
