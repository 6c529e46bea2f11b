/** `qimg snapshot`: list, create, apply or delete internal snapshots. */

import type { Io } from "./command.ts";
import { notSupportedYet, optionError } from "./command.ts";
import { getopt } from "./getopt.ts";
import { renderSnapshotList } from "./qcow2_snapshot.ts";
import { QimgError, usageError } from "./errors.ts";
import {
  bitmapNames,
  expectOneImage,
  openForCommand,
  printHelp,
  processObject,
} from "./cmd_util.ts";

const LONG = [
  { name: "help", arg: "none", val: "h" },
  { name: "object", arg: "required", val: "object" },
  { name: "image-opts", arg: "none", val: "image-opts" },
  { name: "force-share", arg: "none", val: "U" },
] as const;

type Action = "list" | "apply" | "create" | "delete";

const ACTIONS: Record<string, Action> = { l: "list", a: "apply", c: "create", d: "delete" };

/** Formats whose qemu driver has internal snapshots; qimg's drivers do not have them yet. */
const SNAPSHOT_FORMATS = new Set(["qcow2"]);

/** Runs `snapshot`. */
export async function run(args: string[], io: Io): Promise<number> {
  const { options, operands } = getopt(args, ":la:c:d:hqU", [...LONG], "snapshot");
  let action: Action | undefined;
  let name = "";
  let imageOpts = false;
  let forceShare = false;
  for (const o of options) {
    switch (o.opt) {
      case "l":
      case "a":
      case "c":
      case "d":
        if (action) throw usageError("Cannot mix '-l', '-a', '-c', '-d'");
        action = ACTIONS[o.opt];
        name = o.arg ?? "";
        break;
      case "h":
        return printHelp(io);
      case "q":
        break; // nothing qimg prints here is quiet-able
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
  if (operands.length !== 1) throw expectOneImage();
  const filename = operands[0];
  // Without an action qemu-img opens the image for writing and does nothing.
  const warnings: string[] = [];
  const tap: Io = { ...io, stderr: (text) => (warnings.push(text), io.stderr(text)) };
  const image = await openForCommand(filename, tap, {
    imageOpts,
    write: action !== "list",
    forceShare,
  });
  try {
    if (action === "list") {
      // qemu prints nothing for drivers without snapshots, or with none.
      const top = image.chain[0].image;
      if (top.snapshots) io.stdout(renderSnapshotList(await top.snapshots()));
      return 0;
    }
    if (action === undefined) return 0;
    const top = image.chain[0].image;
    if (SNAPSHOT_FORMATS.has(image.format) || top.snapshots) {
      // Looking a snapshot up needs no writing: a missing one fails as in qemu.
      const list = top.snapshots ? await top.snapshots() : [];
      if (action === "delete" && !list.some((s) => s.name === name)) {
        // qemu-img looks the snapshot to delete up by name only.
        throw new QimgError(`Could not delete snapshot '${name}': snapshot not found`);
      }
      if (action === "apply" && (await bitmapNames(image)).length > 0) {
        throw new QimgError(`Could not apply snapshot '${name}': Device has active dirty bitmaps`);
      }
      if (
        action === "apply" && !top.applySnapshot &&
        !list.some((s) => s.id === name || s.name === name)
      ) {
        throw new QimgError(
          `Could not apply snapshot '${name}': Failed to load snapshot: No such file or directory`,
        );
      }
      const op = action === "create"
        ? top.createSnapshot
        : action === "apply"
        ? top.applySnapshot
        : top.deleteSnapshot;
      if (!op) throw notSupportedYet("snapshot");
      try {
        await op.call(top, name);
      } catch (e) {
        if (e instanceof QimgError && !e.message.includes("not supported yet")) {
          throw new QimgError(`Could not ${action} snapshot '${name}': ${e.message}`);
        }
        throw e;
      }
      return 0;
    }
    // Every other driver has no snapshots: qemu's generic answers.
    switch (action) {
      case "create":
        throw new QimgError(`Could not create snapshot '${name}': -95 (Operation not supported)`);
      case "apply":
        // qemu reopens the probed raw image while trying, and warns again.
        for (const w of warnings) io.stderr(w);
        throw new QimgError(
          `Could not apply snapshot '${name}': Block driver does not support snapshots`,
        );
      case "delete":
        throw new QimgError(`Could not delete snapshot '${name}': snapshot not found`);
    }
  } finally {
    await image.close();
  }
  return 0;
}
