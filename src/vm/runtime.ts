/**
 * The state one SmolVM handle works on: its store, its copy of the VM record, whether the VM was
 * deleted through it, its channels and its boot report. The facade (smolvm.ts) and the modules
 * behind it (provision, boot, lifecycle, forwards, snapshots) all act on a VmRuntime, so none of
 * them needs the facade. Every read of the store or /proc here is a named method.
 */
import { join } from "node:path";
import { VMStateError } from "../errors.js";
import { ChannelSelector } from "./channel-selector.js";
import type { CrashReport } from "./crash-watch.js";
import { releasePorts } from "./ports.js";
import { isQemuAlive } from "./process.js";
import { QmpClient } from "./qmp.js";
import { type VmRecord, type VmStore, vmFiles } from "./store.js";
import { type LaunchConfig, launchConfig, type VmConfig } from "./vm-config.js";
import type { BootTimings, CommChannelChoice, VmStatus } from "./vm-types.js";

export class VmRuntime {
  record: VmRecord;
  /** Set once delete() went through this handle: nothing is read or written after it. */
  deleted = false;
  bootTimings: BootTimings | undefined;
  /** Bytes of QEMU's log already judged harmless (see CrashWatch). */
  qemuLogSeen = 0;
  /** The boot in flight through this handle (start() calls share it). */
  starting: Promise<void> | undefined;
  readonly channels: ChannelSelector;
  /**
   * A pool's standby VM (pool.ts): restored from its template but not yet made its own. It runs
   * with the template's identity until take() applies this one (and the caller's env).
   */
  pendingIdentity: { hostKey: { privateKeyPem: string | Buffer }; clientPublicKey: string } | undefined;

  constructor(
    readonly store: VmStore,
    record: VmRecord,
    readonly dataDir: string,
    /** Whether disposing the handle deletes the VM (see SmolVM.owned). */
    readonly owned: boolean,
    commChannel?: CommChannelChoice,
  ) {
    this.record = record;
    this.channels = new ChannelSelector(this, commChannel);
  }

  get id(): string {
    return this.record.id;
  }
  get name(): string {
    return this.record.name;
  }
  get config(): VmConfig {
    return this.record.config;
  }
  /** The config fields a launch needs; VM_RECORD_DAMAGED when the record lacks one. */
  get launch(): LaunchConfig {
    return launchConfig(this.record.config, `VM ${this.id}`);
  }
  get paths() {
    return vmFiles(this.record.vmDir);
  }
  get knownHostsPath(): string {
    return join(this.record.vmDir, "known_hosts");
  }

  /** Writes `patch` to the store and keeps the result (no-op once deleted). */
  update(patch: Partial<VmRecord>): void {
    if (this.deleted) return;
    this.record = this.store.update(this.id, patch);
  }

  /** Re-reads the record from the store (another process may have changed it). */
  reload(): void {
    const fresh = this.deleted ? undefined : this.store.get(this.id);
    if (fresh) this.record = fresh;
  }

  /**
   * The VM's status now: re-reads the store, and when it says running but this VM's QEMU is
   * gone (checked in /proc), records the VM as crashed and frees its ports.
   */
  refreshStatus(): VmStatus {
    if (this.deleted) return "deleted";
    this.reload();
    if (this.record.status === "running" && !this.pidAlive()) {
      releasePorts(this.store, this.id);
      this.update({ status: "crashed", pid: null });
    }
    return this.record.status;
  }

  /** True when the recorded pid is this VM's QEMU and alive. */
  pidAlive(): boolean {
    return this.record.pid !== null && isQemuAlive(this.record.pid, this.paths.marker);
  }

  /** Throws the VMStateError that says why `what` cannot run unless the VM runs. */
  requireRunning(what: string): void {
    const s = this.refreshStatus();
    if (s === "running") return;
    if (s === "deleted") throw this.deletedError();
    if (s === "crashed") throw this.crashedError();
    if (s === "paused") {
      throw new VMStateError(
        `cannot ${what}: VM ${this.id} is paused. Resume it with vm.resume() (or \`smolvm resume ${this.name}\`).`,
        { code: "VM_PAUSED", details: { id: this.id, status: s, remediation: "vm.resume()" } },
      );
    }
    throw new VMStateError(
      `cannot ${what}: VM ${this.id} is ${s}. Start it with vm.start() (or \`smolvm start ${this.name}\`).`,
      {
        details: { id: this.id, status: s },
      },
    );
  }

  /** Runs `fn` with a QMP connection to this VM. */
  async withQmp<T>(
    options: { timeoutMs?: number; signal?: AbortSignal },
    fn: (qmp: QmpClient, ms: number) => Promise<T>,
  ): Promise<T> {
    const ms = options.timeoutMs ?? 5_000;
    const qmp = await QmpClient.connect(this.paths.qmpSocket, { timeoutMs: ms, signal: options.signal });
    try {
      return await fn(qmp, ms);
    } finally {
      await qmp.close();
    }
  }

  crashedError(cause?: unknown, report?: CrashReport): VMStateError {
    const what = report
      ? `${report.cause}${report.qmpStatus ? ` (QMP status ${report.qmpStatus})` : ""}`
      : "its QEMU process exited without being asked to";
    const said = report?.qemuLogTail.trim() ? `\nQEMU said:\n${lastLines(report.qemuLogTail, 12)}` : "";
    const serial = report?.serialTail.trim()
      ? `\nSerial console tail:\n${lastLines(report.serialTail, 12)}`
      : "";
    const kvmHint = report?.kvm
      ? ' This host\'s KVM cannot run the guest: use accel "auto" (it falls back to TCG) or "tcg".'
      : "";
    return new VMStateError(
      `VM ${this.id} crashed: ${what}.${kvmHint} See vm.serialLog() or ${this.paths.serialLog} and ${this.paths.qemuLog}; vm.start() boots it again, vm.delete() removes it.${said}${serial}`,
      { code: "VM_CRASHED", cause, details: { id: this.id, crash: report } },
    );
  }

  deletedOrStateError(what: string): VMStateError {
    if (!this.store.get(this.id)) return this.deletedError();
    return new VMStateError(`cannot ${what} VM ${this.id}: it is ${this.record.status}.`, {
      details: { id: this.id, status: this.record.status },
    });
  }

  deletedError(): VMStateError {
    return new VMStateError(`VM ${this.id} was deleted: create a new one with SmolVM.create().`, {
      details: { id: this.id },
    });
  }
}

function lastLines(text: string, n: number): string {
  return text.trim().split("\n").slice(-n).join("\n");
}
