/**
 * QEMU process supervision: launch (ready once QMP answers), liveness by pid + /proc cmdline,
 * and a bounded graceful stop (ACPI powerdown, then QMP quit, then SIGKILL).
 *
 * QEMU is spawned detached (own session, stdio to a log file, unref'd): VMs outlive the process
 * that created them, and a Ctrl-C in the creator's terminal does not reach them. While the creator
 * lives, Node reaps QEMU when it exits; afterwards init does. A zombie counts as dead.
 */
import { spawn } from "node:child_process";
import { closeSync, constants, openSync, readFileSync } from "node:fs";
import { chmod, readFile, rm, stat } from "node:fs/promises";
import { connect as netConnect } from "node:net";
import { basename, dirname, join } from "node:path";
import { Deadline, sleep } from "../common/deadline.js";
import { HostDependencyError, OperationTimeoutError, SmolVMError, VMStateError } from "../errors.js";
import { buildQemuArgv, type VmLaunchSpec } from "./qemu.js";
import { QmpClient } from "./qmp.js";
import { tailFile } from "./serial-log.js";

export interface LaunchOptions {
  /** Until QMP answers. Default 15 s (TCG on a busy host can be slow to start). */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** QEMU's own stdout/stderr. Default: qemu.log next to the pidfile. */
  logPath?: string;
  /** A cgroup's `cgroup.procs`: QEMU joins it before it opens any socket (network policy). */
  cgroupProcs?: string;
  /**
   * Run QEMU through this argv prefix, with this environment (the rootless network policy's
   * namespace launcher, network/netns.ts). The prefix must exec QEMU, so that the pid stays QEMU's.
   */
  wrap?: { argv: string[]; env: NodeJS.ProcessEnv };
  /**
   * Hand the QMP connection that proved the monitor up to the caller (LaunchedQemu.qmp), who
   * then closes it: a restore goes on on it rather than connecting and greeting again.
   */
  keepQmp?: boolean;
  /**
   * An open file descriptor QEMU inherits as its fd 3 (INCOMING_FD): a restore's device state,
   * which `migrate-incoming fd:3` then reads without a shell and `cat` in between.
   */
  incomingFd?: number;
}

/** The fd number LaunchOptions.incomingFd has in QEMU. */
export const INCOMING_FD = 3;

export interface LaunchedQemu {
  pid: number;
  argv: string[];
  logPath: string;
  /** With LaunchOptions.keepQmp: the open, negotiated QMP connection (the caller closes it). */
  qmp?: QmpClient;
}

/** Connects and greets once, to prove the monitor is up; the connection, or undefined. */
async function qmpAnswers(path: string, signal: AbortSignal): Promise<QmpClient | undefined> {
  try {
    return await QmpClient.connect(path, { timeoutMs: 2_000, signal });
  } catch (e) {
    if (signal.aborted) throw signal.reason;
    void e;
    return undefined;
  }
}

function socketAccepts(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = netConnect({ path });
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

/**
 * Starts QEMU for `spec` and resolves once its QMP socket answers. On early exit the error carries
 * the tail of QEMU's log and serial console; with accel "kvm" that is VMStateError VM_CRASHED (KVM cannot run the guest).
 */
export async function launchQemu(spec: VmLaunchSpec, options: LaunchOptions = {}): Promise<LaunchedQemu> {
  const argv = buildQemuArgv(spec);
  const logPath = options.logPath ?? join(dirname(spec.pidfilePath), "qemu.log");
  const deadline = new Deadline(
    options.timeoutMs ?? 15_000,
    options.signal,
    `starting QEMU for VM ${spec.name}`,
  );
  // Stale files from a previous run would make readiness checks lie.
  await Promise.all(
    [spec.qmpSocketPath, spec.pidfilePath, spec.agentSocketPath].map((p) => p && rm(p, { force: true })),
  );
  // Append mode: the log can then be rotated by truncation while QEMU keeps writing (see
  // rotateSerialLog), so what QEMU prints stays bounded however long the VM lives.
  const logFd = openSync(
    logPath,
    constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | constants.O_APPEND,
    0o600,
  );
  let exited: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  let spawnError: Error | undefined;
  let child: ReturnType<typeof spawn>;
  try {
    // umask 077: the QMP and agent sockets, serial log and pidfile are created private.
    const joinCgroup = options.cgroupProcs ? 'echo $$ > "$SMOLVM_CGROUP_PROCS" && ' : "";
    const env = options.wrap?.env ?? process.env;
    child = spawn(
      "/bin/sh",
      ["-c", `${joinCgroup}umask 077 && exec "$@"`, "sh", ...(options.wrap?.argv ?? []), ...argv],
      {
        detached: true,
        stdio: ["ignore", logFd, logFd, ...(options.incomingFd !== undefined ? [options.incomingFd] : [])],
        env: options.cgroupProcs ? { ...env, SMOLVM_CGROUP_PROCS: options.cgroupProcs } : env,
      },
    );
  } finally {
    closeSync(logFd);
  }
  child.once("exit", (code, sig) => {
    exited = { code, signal: sig };
  });
  child.once("error", (e) => {
    spawnError = e;
  });
  child.unref();

  const fail = async (why: string): Promise<never> => {
    const [log, serial] = await Promise.all([tailFile(logPath), tailFile(spec.serialLogPath)]);
    const details = {
      vm: spec.name,
      exit: exited,
      qemuLogTail: log,
      serialTail: serial,
      logPath,
      serialLogPath: spec.serialLogPath,
    };
    const hint = log.trim() ? ` QEMU said: ${log.trim().split("\n").slice(-3).join(" | ")}` : "";
    if (spec.accel === "kvm") {
      // The guest died of KVM itself: the same VM_CRASHED a later crash gives, marked as KVM's
      // so that auto mode retries under TCG.
      const crash = { cause: `QEMU with KVM ${why}`, kvm: true, qemuLogTail: log, serialTail: serial };
      throw new VMStateError(
        `VM ${spec.name} crashed: QEMU with KVM ${why}: this host's KVM cannot run the guest.${hint} Use accel "auto" (it falls back to TCG) or "tcg" (SMOLVM_ACCEL=tcg).`,
        { code: "VM_CRASHED", details: { ...details, crash } },
      );
    }
    throw new SmolVMError(
      `QEMU ${why} for VM ${spec.name}.${hint} See ${logPath} and ${spec.serialLogPath}.`,
      {
        code: "QEMU_START_FAILED",
        details,
      },
    );
  };

  try {
    for (;;) {
      if (spawnError) {
        throw new HostDependencyError(
          `Cannot run ${spec.qemuPath} (${(spawnError as NodeJS.ErrnoException).code ?? spawnError.message}): install qemu-system-x86.`,
          { code: "QEMU_MISSING", cause: spawnError },
        );
      }
      if (exited) await fail(`exited during start (${exited.signal ?? `code ${exited.code}`})`);
      if (await socketAccepts(spec.qmpSocketPath)) break;
      if (deadline.expired) break;
      await sleep(5, deadline.signal).catch(() => {});
    }
    if (deadline.expired) {
      killQuietly(child.pid);
      await waitForExit(() => exited !== undefined, 2_000);
      if (options.signal?.aborted) throw deadline.reason;
      const log = await tailFile(logPath);
      throw new OperationTimeoutError(
        `QEMU for VM ${spec.name} did not open its monitor within ${options.timeoutMs ?? 15_000} ms; it was killed. Raise timeoutMs on a slow host.`,
        { details: { vm: spec.name, qemuLogTail: log } },
      );
    }
    const qmp = await qmpAnswers(spec.qmpSocketPath, deadline.signal);
    if (!qmp) {
      if (exited) await fail(`exited during start (${exited.signal ?? `code ${exited.code}`})`);
      killQuietly(child.pid);
      return await fail("opened its monitor but QMP did not answer");
    }
    try {
      if (spec.agentSocketPath) await chmod(spec.agentSocketPath, 0o600);
      // The vCPUs start after the monitor: with a broken KVM QEMU dies right here, not later.
      if (spec.accel === "kvm") {
        await sleep(200, deadline.signal);
        if (exited) await fail(`exited right after start (${exited.signal ?? `code ${exited.code}`})`);
      }
    } catch (e) {
      await qmp.close();
      throw e;
    }
    if (!options.keepQmp) await qmp.close();
    return { pid: child.pid!, argv, logPath, ...(options.keepQmp ? { qmp } : {}) };
  } catch (e) {
    if (!exited && child.pid) {
      killQuietly(child.pid);
      await waitForExit(() => exited !== undefined, 2_000);
    }
    throw e;
  } finally {
    deadline.dispose();
  }
}

function killQuietly(pid: number | undefined, sig: NodeJS.Signals = "SIGKILL"): void {
  if (!pid) return;
  try {
    process.kill(pid, sig);
  } catch {
    // already gone
  }
}

async function waitForExit(done: () => boolean, ms: number): Promise<boolean> {
  const until = performance.now() + ms;
  while (!done()) {
    if (performance.now() > until) return false;
    await sleep(20);
  }
  return true;
}

/**
 * True when `pid` is a live (non-zombie) QEMU whose command line contains `marker` (e.g. the VM's
 * QMP socket path), so a recycled pid is never mistaken for our VM.
 */
export function isQemuAlive(pid: number, marker: string): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    const st = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Field 3, after the parenthesised comm (which may itself contain spaces or parens).
    const state = st.slice(st.lastIndexOf(")") + 2, st.lastIndexOf(")") + 3);
    if (state === "Z" || state === "X") return false;
    const args = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
    if (!basename(args[0] ?? "").startsWith("qemu-system")) return false;
    return args.some((a) => a.includes(marker));
  } catch {
    return false;
  }
}

export interface StopTarget {
  pid: number;
  qmpSocketPath: string;
  /** Defaults to qmpSocketPath. */
  marker?: string;
}

export interface StopOptions {
  /** Overall bound. Default 20 s. */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** How long the guest gets to power off after the ACPI button. Default min(10 s, timeoutMs / 2). */
  powerdownMs?: number;
  /** Skip the ACPI powerdown (e.g. the guest is paused or disposable). */
  force?: boolean;
}

export type StopMethod = "not-running" | "powerdown" | "quit" | "kill";

/** Stops QEMU: powerdown -> wait -> quit -> SIGKILL, each bounded. Removes the QMP socket afterwards. */
export async function stopQemu(
  target: StopTarget,
  options: StopOptions = {},
): Promise<{ method: StopMethod }> {
  const marker = target.marker ?? target.qmpSocketPath;
  const total = options.timeoutMs ?? 20_000;
  const deadline = new Deadline(total, options.signal, `stopping QEMU pid ${target.pid}`);
  const alive = () => isQemuAlive(target.pid, marker);
  const gone = (ms: number) =>
    waitForExit(() => !alive() || deadline.expired, Math.min(ms, deadline.remainingMs));
  let method: StopMethod = "not-running";
  try {
    if (!alive()) return { method };
    let qmp: QmpClient | undefined;
    try {
      qmp = await QmpClient.connect(target.qmpSocketPath, {
        timeoutMs: deadline.remaining(2_000),
        signal: deadline.signal,
      });
    } catch {
      qmp = undefined; // monitor wedged or gone: go straight to signals
    }
    try {
      if (qmp && !options.force) {
        const status = await qmp.queryStatus({ timeoutMs: 2_000 }).catch(() => undefined);
        // A paused guest cannot react to the power button.
        if (status?.running) {
          await qmp.systemPowerdown({ timeoutMs: 2_000 }).catch(() => {});
          method = "powerdown";
          if (await gone(options.powerdownMs ?? Math.min(10_000, total / 2))) {
            if (!alive()) return { method };
          }
        }
      }
      if (qmp && !qmp.isClosed) {
        method = "quit";
        await qmp.quit({ timeoutMs: 2_000 }).catch(() => {});
        if ((await gone(3_000)) && !alive()) return { method };
      }
    } finally {
      await qmp?.close();
    }
    method = "kill";
    killQuietly(target.pid, "SIGKILL");
    await waitForExit(() => !alive(), 5_000);
    if (alive()) {
      throw new VMStateError(`QEMU pid ${target.pid} survived SIGKILL; check the host (D state?).`, {
        code: "QEMU_UNKILLABLE",
        details: { pid: target.pid },
      });
    }
    return { method };
  } finally {
    deadline.dispose();
    await rm(target.qmpSocketPath, { force: true }).catch(() => {});
  }
}

/** Reads a QEMU pidfile; undefined when missing or malformed. */
export async function readPidfile(path: string): Promise<number | undefined> {
  try {
    const s = await stat(path);
    if (!s.isFile() || s.size > 32) return undefined;
    const n = Number.parseInt((await readFile(path, "utf8")).trim(), 10);
    return Number.isInteger(n) && n > 0 ? n : undefined;
  } catch {
    return undefined;
  }
}
