/**
 * The VM side of snapshots (snapshot.ts does the capture and restore mechanics): capturing a
 * handle's VM into a snapshot or its image's template, listing and deleting snapshots, and the
 * bookkeeping that ties restored VMs to the snapshot whose files they still use (a fork's
 * snapshot goes with its last clone; a snapshot in use cannot be deleted).
 */
import { existsSync, readFileSync } from "node:fs";
import { mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { Deadline } from "../common/deadline.js";
import { VMStateError } from "../errors.js";
import type { VmRuntime } from "./runtime.js";
import {
  type CaptureSource,
  captureInto,
  findSnapshot,
  listSnapshotMetas,
  newSnapshotId,
  publicInfo,
  type SnapshotInfo,
  type SnapshotMeta,
  snapshotFiles,
  snapshotsDir,
} from "./snapshot.js";
import { VmStore } from "./store.js";

/** Captures the running VM into a new snapshot under `<dataDir>/snapshots/<id>/`. */
export async function captureSnapshot(
  rt: VmRuntime,
  options: { name?: string; timeoutMs?: number; signal?: AbortSignal },
  ephemeral: boolean,
): Promise<SnapshotMeta> {
  rt.requireRunning("snapshot");
  const deadline = new Deadline(options.timeoutMs ?? 60_000, options.signal, `snapshotting VM ${rt.id}`);
  try {
    const id = newSnapshotId();
    const dir = join(snapshotsDir(rt.dataDir), id);
    await mkdir(snapshotsDir(rt.dataDir), { recursive: true, mode: 0o700 });
    return await captureTo(rt, dir, { id, name: options.name ?? id, ephemeral }, deadline);
  } finally {
    deadline.dispose();
  }
}

/** Captures the VM into `dir` (see snapshot.ts). */
async function captureTo(
  rt: VmRuntime,
  dir: string,
  naming: { id: string; name: string; ephemeral: boolean },
  deadline: Deadline,
): Promise<SnapshotMeta> {
  const cfg = rt.launch;
  const from = cfg.restoredFrom;
  const vmDir = rt.record.vmDir;
  // An open agent session stays open: the copy's virtio-serial port then says "host
  // connected", and a restore that connects before loading the devices finds the agent
  // reading, with no hang-up to back off from.
  const src: CaptureSource = {
    qmpSocket: rt.paths.qmpSocket,
    ramFile: cfg.ramInFile === false ? undefined : rt.paths.ramFile,
    privateRam:
      cfg.ramInFile === false && from && rt.record.pid
        ? { pid: rt.record.pid, file: snapshotFiles(from.dir).memory, sizeBytes: cfg.memoryMib * 1024 * 1024 }
        : undefined,
    disk: existsSync(join(vmDir, "rootfs.qcow2")) ? join(vmDir, "rootfs.qcow2") : undefined,
    initrd: from ? snapshotFiles(from.dir).initrd : join(vmDir, "initrd.img"),
    agentSecret: readFileSync(rt.paths.agentSecret),
  };
  const { hostPublicKey: _h, clientKeyPath: _c, restoredFrom: _r, ...config } = cfg;
  return captureInto(
    dir,
    src,
    {
      id: naming.id,
      name: naming.name,
      vmId: rt.id,
      image: rt.record.image,
      createdAt: new Date().toISOString(),
      memoryMib: cfg.memoryMib,
      vcpus: cfg.vcpus,
      config,
      ephemeral: naming.ephemeral || undefined,
    },
    deadline,
  );
}

/**
 * Captures a freshly booted VM as its image's template. A failed capture costs the template,
 * never the create: the next create boots cold and tries again.
 */
export async function leaveTemplate(rt: VmRuntime, dir: string, deadline: Deadline): Promise<void> {
  deadline.phase = "capturing the template";
  const t0 = performance.now();
  try {
    await captureTo(rt, dir, { id: newSnapshotId(), name: "template", ephemeral: false }, deadline);
    if (rt.bootTimings) rt.bootTimings.templateCaptureMs = Math.round(performance.now() - t0);
  } catch (e) {
    if (deadline.expired) throw e;
  }
}

/** A fork's snapshot goes with its last clone (called once the VM's record is gone). */
export async function dropEphemeralSnapshot(rt: VmRuntime): Promise<void> {
  const from = rt.config.restoredFrom;
  if (!from?.ephemeral) return;
  const others = rt.store.list().some((r) => r.config.restoredFrom?.id === from.id);
  if (!others) await rm(from.dir, { recursive: true, force: true });
}

/** Every user snapshot in the data dir, oldest first. */
export async function listSnapshots(base: string): Promise<SnapshotInfo[]> {
  return (await listSnapshotMetas(base)).filter((m) => !m.ephemeral).map(publicInfo);
}

/** Removes a snapshot; refused while a VM restored from it still needs its files. */
export async function deleteSnapshot(base: string, idOrName: string): Promise<void> {
  const { dir, meta } = await findSnapshot(base, idOrName);
  const users = snapshotUsers(base, meta.id);
  if (users.length > 0) {
    throw new VMStateError(
      `snapshot ${meta.id} is still used by ${users.join(", ")}: delete those VMs first (vm.delete() or \`smolvm rm\`).`,
      { code: "SNAPSHOT_IN_USE", details: { snapshot: meta.id, vms: users } },
    );
  }
  await rm(dir, { recursive: true, force: true });
}

/** VMs whose files still depend on a snapshot (running ones map its memory; debian ones its disk). */
function snapshotUsers(base: string, snapshotId: string): string[] {
  const store = VmStore.open(base);
  try {
    store.reconcile();
    return store
      .list()
      .filter((r) => {
        if (r.config.restoredFrom?.id !== snapshotId) return false;
        return r.status === "running" || r.status === "paused" || r.image !== "tiny";
      })
      .map((r) => r.name);
  } finally {
    store.close();
  }
}
