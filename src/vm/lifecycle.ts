/**
 * A VM's life after it is made: start (one boot at a time, across handles and processes), stop,
 * delete, pause, resume and its TTL. Each acts on a VmRuntime and keeps the store in step.
 */
import { rm } from "node:fs/promises";
import { Deadline, sleep } from "../common/deadline.js";
import { ensureImage, type ImageName } from "../image/index.js";
import { boot } from "./boot.js";
import { teardownVmNetwork } from "./network/host.js";
import { releasePorts } from "./ports.js";
import { DEFAULT_CREATE_TIMEOUT_MS } from "./provision.js";
import { claimStart, qemuPidsWith, stopVmProcesses } from "./prune.js";
import type { VmRuntime } from "./runtime.js";
import { ensureReaper, validateTtl } from "./ttl.js";
import { dropEphemeralSnapshot } from "./vm-snapshots.js";
import type { BoundedOptions } from "./vm-types.js";

/** Boots a stopped VM again with the same identity. */
export async function startVm(rt: VmRuntime, options: BoundedOptions = {}): Promise<void> {
  if (rt.refreshStatus() === "running") return;
  if (rt.deleted) throw rt.deletedError();
  const deadline = new Deadline(
    options.timeoutMs ?? DEFAULT_CREATE_TIMEOUT_MS,
    options.signal,
    `starting VM ${rt.id}`,
  );
  try {
    // One boot at a time, across handles and processes: the others wait for it to run.
    rt.starting ??= startOnce(rt, deadline).finally(() => {
      rt.starting = undefined;
    });
    await deadline.race(rt.starting);
  } finally {
    deadline.dispose();
  }
}

async function startOnce(rt: VmRuntime, deadline: Deadline): Promise<void> {
  if (!claimStart(rt.store, rt.id)) {
    while (rt.refreshStatus() !== "running") {
      if (rt.record.status !== "creating") throw rt.deletedOrStateError("start");
      await sleep(100, deadline.signal);
    }
    return;
  }
  try {
    deadline.phase = "building the image";
    // An unknown name (a newer smolvm's image) is refused by ensureImage with the known ones.
    const image = await ensureImage(rt.record.image as ImageName, {
      dataDir: rt.dataDir,
      signal: deadline.signal,
    });
    await boot(rt, image, deadline);
  } catch (e) {
    if (rt.store.get(rt.id)?.status === "creating") rt.update({ status: "stopped", pid: null });
    throw e;
  }
}

/** Powers the VM off (ACPI, then quit, then SIGKILL, bounded) and frees its ports. */
export async function stopVm(rt: VmRuntime, options: BoundedOptions = {}): Promise<void> {
  await rt.channels.close();
  // The pid in the store, not this handle's copy (another process may have restarted the VM).
  await stopVmProcesses(rt.store, rt.record, options);
  await rm(rt.paths.ramFile, { force: true });
  await teardownVmNetwork(rt.record.vmDir, rt.id);
  releasePorts(rt.store, rt.id);
  rt.update({ status: "stopped", pid: null, sshPort: null, ports: [] });
}

/** Stops the VM and removes every trace of it (record, directory, port leases); closes the store. */
export async function deleteVm(rt: VmRuntime, options: BoundedOptions = {}): Promise<void> {
  if (rt.deleted) return;
  await stopVm(rt, options).catch(() => {});
  // Never remove the directory under a live QEMU.
  if (qemuPidsWith(rt.paths.marker).length) await stopVmProcesses(rt.store, rt.record, options);
  await rm(rt.record.vmDir, { recursive: true, force: true });
  rt.store.delete(rt.id);
  rt.deleted = true;
  await dropEphemeralSnapshot(rt).catch(() => {});
  rt.store.close();
}

/** Freezes the guest until resumeVm(). */
export async function pauseVm(rt: VmRuntime, options: BoundedOptions = {}): Promise<void> {
  if (rt.refreshStatus() === "paused") return;
  rt.requireRunning("pause");
  await rt.withQmp(options, (qmp, ms) => qmp.stop({ timeoutMs: ms }));
  rt.update({ status: "paused" });
}

/** Continues a paused guest. */
export async function resumeVm(rt: VmRuntime, options: BoundedOptions = {}): Promise<void> {
  const s = rt.refreshStatus();
  if (s === "running") return;
  if (s !== "paused") rt.requireRunning("resume");
  await rt.withQmp(options, (qmp, ms) => qmp.cont({ timeoutMs: ms }));
  rt.update({ status: "running" });
}

/** Sets the VM's lifetime to `ms` from now (null clears it) and makes sure a reaper runs. */
export async function setTtl(rt: VmRuntime, ms: number | null): Promise<void> {
  validateTtl(ms, "ms");
  if (rt.deleted) throw rt.deletedError();
  rt.update({ expiresAt: ms === null ? null : Date.now() + ms });
  if (ms !== null) ensureReaper(rt.dataDir);
}

/** Disposes a handle: an owned VM is deleted, a borrowed one only closed. */
export async function disposeVm(rt: VmRuntime): Promise<void> {
  if (rt.owned) await deleteVm(rt);
  else {
    await rt.channels.close();
    rt.store.close();
  }
}
