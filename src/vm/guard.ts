/**
 * Waits and calls that watch the guest while they run: a guest that dies (QEMU gone, or alive
 * in a dead run state such as KVM's internal-error) ends them with VM_CRASHED at once, not at
 * their deadline, and the VM is recorded as crashed. Boots use untilCrash; every call on the
 * guest (run, files, env ...) goes through explain.
 */
import { rm } from "node:fs/promises";
import { ConnectionLostError, SSHConnectionError } from "../errors.js";
import { type CrashReport, CrashWatch } from "./crash-watch.js";
import { releasePorts } from "./ports.js";
import { stopQemu } from "./process.js";
import type { VmRuntime } from "./runtime.js";

/** How often a call in flight checks that the guest is still alive. */
const CALL_WATCH_INTERVAL_MS = 500;

/**
 * Runs `fn` while watching the guest: if it dies, QEMU is killed, the VM marked crashed, and
 * `fn`'s wait ends with VM_CRASHED at once instead of at its deadline.
 */
export async function untilCrash<T>(
  rt: VmRuntime,
  watch: CrashWatch,
  intervalMs: number,
  fn: () => Promise<T>,
): Promise<T> {
  const done = new AbortController();
  const work = fn();
  const crashed = watch.until(done.signal, intervalMs).then(
    (report) => report,
    () => undefined,
  );
  try {
    const first = await Promise.race([work.then(() => undefined), crashed]);
    if (first) {
      work.catch(() => {});
      await onCrash(rt, first);
    }
    return await work;
  } finally {
    done.abort();
  }
}

async function onCrash(rt: VmRuntime, report: CrashReport): Promise<never> {
  const pid = rt.record.pid;
  if (pid) {
    await stopQemu(
      { pid, qmpSocketPath: rt.paths.qmpSocket, marker: rt.paths.marker },
      { timeoutMs: 5_000, force: true },
    ).catch(() => {});
  }
  await rt.channels.close();
  await rm(rt.paths.ramFile, { force: true });
  releasePorts(rt.store, rt.id);
  rt.update({ status: "crashed", pid: null, sshPort: null, ports: [] });
  throw rt.crashedError(undefined, report);
}

/**
 * Runs a call on the guest while watching it: a guest that dies meanwhile ends the call with
 * VM_CRASHED within about a second, and a transport failure on a dead VM says so.
 */
export async function explain<T>(rt: VmRuntime, fn: () => Promise<T>): Promise<T> {
  try {
    const pid = rt.record.pid;
    if (!pid) return await fn();
    const accel = rt.config.accel === "kvm" ? "kvm" : "tcg";
    const watch = new CrashWatch({ pid, files: rt.paths, accel }, false, rt.qemuLogSeen);
    try {
      return await untilCrash(rt, watch, CALL_WATCH_INTERVAL_MS, fn);
    } finally {
      rt.qemuLogSeen = watch.logSize;
    }
  } catch (e) {
    if ((e instanceof SSHConnectionError || e instanceof ConnectionLostError) && !rt.pidAlive()) {
      rt.update({ status: "crashed" });
      throw rt.crashedError(e);
    }
    throw e;
  }
}
