/**
 * Noticing a dead guest at once instead of at a timeout. QEMU does not always exit when the
 * guest dies: under KVM an emulation failure leaves it alive in QMP status `internal-error`,
 * and a call waiting on the agent or SSH would sit there until its deadline. A CrashWatch
 * checks cheaply on every tick (is the process alive, did QEMU's own log grow) and asks QMP for
 * the run state only when the log says something happened.
 */
import { stat } from "node:fs/promises";
import { sleep } from "../common/deadline.js";
import { KVM_FAILURE_TEXT } from "./accel-probe.js";
import { isQemuAlive } from "./process.js";
import { QmpClient } from "./qmp.js";
import { serialMilestones, tailFile } from "./serial-log.js";
import type { vmFiles } from "./store.js";

/** QMP run states in which the guest will never run again on its own. */
const DEAD_STATES = new Set(["internal-error", "guest-panicked", "shutdown", "io-error"]);
/** A KVM guest that has not reached /init by now is stuck (real KVM gets there in well under 1 s). */
export const KVM_INIT_STALL_MS = 15_000;

export interface CrashReport {
  /** In words: "KVM emulation failure", "its QEMU process exited", ... */
  cause: string;
  /** QMP's run state when it could be asked. */
  qmpStatus?: string;
  /** True when the cause is KVM itself: TCG would run this guest. */
  kvm: boolean;
  qemuLogTail: string;
  serialTail: string;
}

export interface WatchTarget {
  pid: number;
  files: ReturnType<typeof vmFiles>;
  accel: "kvm" | "tcg";
}

export class CrashWatch {
  private readonly startedAt = performance.now();

  /**
   * `booting`: also treat a KVM guest that never reaches /init as stuck. `logSize`: how much of
   * QEMU's log was already seen (and judged harmless) by an earlier watch of this VM.
   */
  constructor(
    private readonly target: WatchTarget,
    private readonly booting = false,
    public logSize = 0,
  ) {}

  /** One check: a report when the guest is dead, else undefined. */
  async check(): Promise<CrashReport | undefined> {
    const { pid, files } = this.target;
    if (!isQemuAlive(pid, files.marker)) {
      const log = await tailFile(files.qemuLog, 4096);
      const kvm = this.target.accel === "kvm" && KVM_FAILURE_TEXT.test(log);
      return this.report(kvm ? "KVM emulation failure" : "its QEMU process exited", kvm, undefined, log);
    }
    const size = await stat(files.qemuLog).then(
      (s) => s.size,
      () => 0,
    );
    if (size < this.logSize) this.logSize = 0; // rotated: what follows is new
    if (size > this.logSize) {
      this.logSize = size;
      const log = await tailFile(files.qemuLog, 4096);
      const status = await queryRunState(files.qmpSocket);
      const kvmText = this.target.accel === "kvm" && KVM_FAILURE_TEXT.test(log);
      if (status !== undefined && DEAD_STATES.has(status)) {
        return this.report(
          kvmText ? "KVM emulation failure" : `QEMU stopped the guest`,
          kvmText,
          status,
          log,
        );
      }
      // KVM's own words and a guest that is not running (or a monitor too busy to say): dead.
      if (kvmText && status !== "running") return this.report("KVM emulation failure", true, status, log);
    }
    if (
      this.booting &&
      this.target.accel === "kvm" &&
      performance.now() - this.startedAt > KVM_INIT_STALL_MS
    ) {
      const serial = await tailFile(files.serialLog, 65536);
      if (serialMilestones(serial)["init-start"] === undefined) {
        return this.report(
          `KVM made no progress: the guest kernel did not reach /init within ${KVM_INIT_STALL_MS / 1000} s`,
          true,
          await queryRunState(files.qmpSocket),
        );
      }
    }
    return undefined;
  }

  /**
   * Resolves with a report once the guest is dead; never while it lives. Stops when `signal`
   * fires (the watched call finished).
   */
  async until(signal: AbortSignal, intervalMs: number): Promise<CrashReport> {
    for (;;) {
      await sleep(intervalMs, signal);
      const r = await this.check();
      if (r) return r;
    }
  }

  private async report(cause: string, kvm: boolean, qmpStatus?: string, log?: string): Promise<CrashReport> {
    const [qemuLogTail, serialTail] = await Promise.all([
      log ?? tailFile(this.target.files.qemuLog, 4096),
      tailFile(this.target.files.serialLog, 2048),
    ]);
    return { cause, kvm, qmpStatus, qemuLogTail, serialTail };
  }
}

/** QMP's run state, or undefined when the monitor does not answer within a second. */
async function queryRunState(socket: string): Promise<string | undefined> {
  try {
    const qmp = await QmpClient.connect(socket, { timeoutMs: 1_000 });
    try {
      return (await qmp.queryStatus({ timeoutMs: 1_000 })).status;
    } finally {
      await qmp.close();
    }
  } catch {
    return undefined;
  }
}
