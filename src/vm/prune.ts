/**
 * Nothing is orphaned: which process owns a VM's QEMU, and `prune` for what nobody owns.
 *
 * A VM's QEMU carries its directory in its command line (the store's `marker`), so QEMU
 * processes of a data dir can be found from /proc whatever the store says: a creator killed
 * before it recorded the pid, a stale pid in a long-lived handle, a record deleted under a live
 * QEMU. A record being created or started names its creator (`config.creatorPid`); once that
 * process is gone, the record is abandoned.
 */
import { readdirSync, readFileSync, statSync } from "node:fs";
import { rm } from "node:fs/promises";
import { basename, join } from "node:path";
import { pidAlive } from "../common/pid.js";
import { VMStateError } from "../errors.js";
import { releasePorts } from "./ports.js";
import { isQemuAlive, stopQemu } from "./process.js";
import { type VmRecord, type VmStore, vmFiles } from "./store.js";

/** An orphaned directory this young may belong to a create that has not inserted its record yet. */
const ORPHAN_DIR_GRACE_MS = 60_000;

export interface PruneResult {
  /** Ids of stopped, crashed or abandoned VMs whose record and directory were removed. */
  removedVms: string[];
  /** VM directories no record owned, removed. */
  removedDirs: string[];
  /** QEMU processes of this data dir that no record owned, killed. */
  killedPids: number[];
}

/** Live QEMU processes whose command line mentions `marker` (a VM dir, or a data dir's vms/). */
export function qemuPidsWith(marker: string): number[] {
  const out: number[] = [];
  let entries: string[];
  try {
    entries = readdirSync("/proc");
  } catch {
    return out;
  }
  for (const e of entries) {
    if (!/^\d+$/.test(e)) continue;
    const pid = Number(e);
    if (pid !== process.pid && isQemuAlive(pid, marker)) out.push(pid);
  }
  return out;
}

/** The VM directory a QEMU of `vmsDir` runs from (from its command line), if any. */
function vmDirOf(pid: number, vmsDir: string): string | undefined {
  try {
    const args = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
    for (const a of args) {
      const i = a.indexOf(`${vmsDir}/`);
      if (i < 0) continue;
      const rest = a.slice(i + vmsDir.length + 1);
      const id = rest.split("/")[0];
      if (id) return join(vmsDir, id);
    }
  } catch {
    // gone meanwhile
  }
  return undefined;
}

/** The process creating or starting this VM, while it lives. */
export function creatorAlive(record: VmRecord): boolean {
  const pid = record.config.creatorPid;
  return typeof pid === "number" && pidAlive(pid);
}

/**
 * Stops every QEMU of this VM: the pid the store has now (not a handle's stale copy) and any
 * other process carrying the VM's directory. Resolves once none is left, or throws.
 */
export async function stopVmProcesses(
  store: VmStore,
  record: VmRecord,
  options: { timeoutMs?: number; signal?: AbortSignal } = {},
): Promise<void> {
  const files = vmFiles(record.vmDir);
  const fresh = store.get(record.id);
  const pids = new Set<number>(qemuPidsWith(files.marker));
  for (const p of [fresh?.pid, record.pid]) if (p && isQemuAlive(p, files.marker)) pids.add(p);
  for (const pid of pids) {
    await stopQemu(
      { pid, qmpSocketPath: files.qmpSocket, marker: files.marker },
      { timeoutMs: options.timeoutMs ?? 20_000, signal: options.signal, force: true },
    );
  }
  const left = qemuPidsWith(files.marker);
  if (left.length) {
    throw new VMStateError(
      `VM ${record.id} still has QEMU running (pid ${left.join(", ")}) after stop: its directory was kept; kill it and run \`smolvm prune\`.`,
      { code: "VM_STOP_FAILED", details: { id: record.id, pids: left } },
    );
  }
}

/**
 * Claims the right to boot a stopped VM, atomically across processes. False when another
 * process is starting it now, or it already runs.
 */
export function claimStart(store: VmStore, id: string): boolean {
  return store.transaction(() => {
    const r = store.require(id);
    const files = vmFiles(r.vmDir);
    // Running or paused: its QEMU lives, there is nothing to boot.
    if (r.pid !== null && isQemuAlive(r.pid, files.marker)) return false;
    if (r.status === "creating" && creatorAlive(r)) return false;
    store.update(id, { status: "creating", config: { ...r.config, creatorPid: process.pid } });
    return true;
  });
}

/**
 * Removes stopped and crashed VMs, VMs whose creator died before they ran, and directories no
 * record owns; kills QEMU processes of this data dir that no record owns. Running VMs and VMs
 * being created by a live process are left alone.
 */
export async function pruneDataDir(store: VmStore, dataDir: string): Promise<PruneResult> {
  const result: PruneResult = { removedVms: [], removedDirs: [], killedPids: [] };
  const vmsDir = join(dataDir, "vms");
  store.reconcile();
  for (const r of store.list()) {
    const abandoned = r.status === "creating" && !creatorAlive(r);
    if (r.status !== "stopped" && r.status !== "crashed" && !abandoned) continue;
    try {
      await stopVmProcesses(store, r, { timeoutMs: 10_000 });
    } catch {
      continue; // still running: keep its directory and record
    }
    await rm(r.vmDir, { recursive: true, force: true });
    releasePorts(store, r.id);
    store.delete(r.id);
    result.removedVms.push(r.id);
  }

  const owned = new Map(store.list().map((r) => [r.vmDir, r]));
  for (const pid of qemuPidsWith(`${vmsDir}/`)) {
    const dir = vmDirOf(pid, vmsDir);
    const r = dir ? owned.get(dir) : undefined;
    if (r && (r.pid === pid || (r.status === "creating" && creatorAlive(r)))) continue;
    try {
      process.kill(pid, "SIGKILL");
      result.killedPids.push(pid);
    } catch {
      // exited meanwhile
    }
  }
  for (let i = 0; i < 100 && result.killedPids.some((p) => pidAlive(p) && isQemuAlive(p, vmsDir)); i++) {
    await new Promise((r) => setTimeout(r, 20));
  }

  let dirs: string[] = [];
  try {
    dirs = readdirSync(vmsDir);
  } catch {
    // no VM was ever created here
  }
  for (const name of dirs) {
    const dir = join(vmsDir, name);
    if (owned.has(dir)) continue;
    try {
      if (Date.now() - statSync(dir).mtimeMs < ORPHAN_DIR_GRACE_MS) continue;
    } catch {
      continue;
    }
    if (qemuPidsWith(`${dir}/`).length) continue; // killed above; it has not exited yet
    await rm(dir, { recursive: true, force: true });
    result.removedDirs.push(basename(dir));
  }
  return result;
}
