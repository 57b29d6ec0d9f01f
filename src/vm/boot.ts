/**
 * Bringing a VM's QEMU up and waiting until the VM is ready to hand out: a cold boot (QEMU
 * launched inside the VM's network policy, the channel and the guest network awaited under a
 * crash watch, milestones read into BootTimings), the KVM-to-TCG fallback when the guest dies of
 * KVM itself, and a restore from a snapshot or template (devices loaded into a new QEMU, then the
 * VM made its own; see provision.ts).
 */
import { closeSync, existsSync, openSync } from "node:fs";
import { rm } from "node:fs/promises";
import { join } from "node:path";
import { connectUnix } from "../channel/agent-transport.js";
import type { Deadline } from "../common/deadline.js";
import { SmolVMError, VMStateError } from "../errors.js";
import type { ImageManifest } from "../image/index.js";
import { type AccelVerdict, recordAccelVerdict } from "./accel.js";
import { type CrashReport, CrashWatch } from "./crash-watch.js";
import { untilCrash } from "./guard.js";
import { networkPrepared, prepareVmNetwork, startNetworkDaemon, teardownVmNetwork } from "./network/host.js";
import { INCOMING_FD, isQemuAlive, type LaunchedQemu, launchQemu } from "./process.js";
import { becomeItself, launchBase, type NewIdentity, overlayFor, vmInitrd } from "./provision.js";
import { buildQemuArgv, DEVICE_MODEL, type VmLaunchSpec } from "./qemu.js";
import type { VmRuntime } from "./runtime.js";
import { rotatedPath, serialMilestones, tailFile, waitForMilestone } from "./serial-log.js";
import { restoreFrom, type SnapshotMeta, snapshotFiles } from "./snapshot.js";
import type { SmolVMProgress } from "./vm-types.js";

/** Says through onProgress which accelerator a create uses and why. */
export function reportAccel(
  onProgress: ((p: SmolVMProgress) => void) | undefined,
  v: Pick<AccelVerdict, "accel" | "reason">,
  t0: number,
): void {
  onProgress?.({
    kind: "accel",
    accel: v.accel,
    reason: v.reason,
    step: `accelerator ${v.accel.toUpperCase()}: ${v.reason}`,
    elapsedMs: Math.round(performance.now() - t0),
    done: true,
  });
}

/**
 * Boots; when the accelerator was auto-chosen as KVM and the guest dies of KVM itself, records
 * TCG as this host's verdict, says so through onProgress, and boots once more under TCG.
 */
export async function bootOrFallBack(
  rt: VmRuntime,
  image: ImageManifest,
  deadline: Deadline,
  accel: AccelVerdict,
  opts: { accel?: string; onProgress?: (p: SmolVMProgress) => void },
  t0: number,
): Promise<void> {
  try {
    await boot(rt, image, deadline);
  } catch (e) {
    const auto = (opts.accel ?? "auto") === "auto" && !process.env.SMOLVM_ACCEL;
    const crash = e instanceof VMStateError ? crashReportOf(e) : undefined;
    if (!auto || accel.accel !== "kvm" || !crash?.kvm) throw e;
    const verdict = {
      accel: "tcg" as const,
      reason: `a guest crashed under KVM (${crash.cause}): using TCG`,
    };
    await recordAccelVerdict(verdict, { dataDir: rt.dataDir, image }).catch(() => {});
    reportAccel(opts.onProgress, verdict, t0);
    rt.update({ config: { ...rt.config, accel: "tcg", accelReason: verdict.reason } });
    await boot(rt, image, deadline);
  }
}

/** The CrashReport a VM_CRASHED error carries in its details (see VmRuntime.crashedError). */
function crashReportOf(e: VMStateError): CrashReport | undefined {
  const c = e.details?.crash;
  return typeof c === "object" && c !== null && "kvm" in c && "cause" in c ? (c as CrashReport) : undefined;
}

/** A cold boot from the image, until the planned channel answers and the guest network is up. */
export async function boot(rt: VmRuntime, image: ImageManifest, deadline: Deadline): Promise<void> {
  // A cold boot has no device state to match: it gets this version's devices.
  if (rt.config.deviceModel !== DEVICE_MODEL)
    rt.update({ config: { ...rt.config, deviceModel: DEVICE_MODEL } });
  const cfg = rt.launch;
  deadline.phase = "starting QEMU";
  const accel = cfg.accel;
  const spec: VmLaunchSpec = {
    ...(await launchBase(rt, cfg.hostPublicKey)),
    kernelPath: image.kernelPath,
    initrdPath: await vmInitrd(rt, image.initrdPath),
    kernelAppend: image.kernelCmdline,
    agentSocketPath: image.capabilities.agent ? rt.paths.agentSocket : undefined,
    // RAM in a shared tmpfs file, so snapshot() can copy it while the vCPUs are stopped.
    memoryFile: { path: rt.paths.ramFile, share: true },
  };
  const { rootfsPath } = image;
  if (rootfsPath) spec.rootfsPath = await overlayFor(rt, { ...image, rootfsPath });
  buildQemuArgv(spec); // validates before anything is spawned
  await rm(spec.serialLogPath, { force: true });
  await rm(rotatedPath(spec.serialLogPath), { force: true });
  const t0 = performance.now();
  const { launched, networkReady } = await launchWithPolicy(rt, spec, deadline);
  const qemuStartMs = performance.now() - t0;
  rt.update({
    status: "running",
    pid: launched.pid,
    sshPort: spec.sshHostPort,
    ports: [],
    // Its RAM is in the per-VM file again, and sshd has the VM's own key from the start.
    config: { ...rt.config, ramInFile: true, lastBoot: "cold" },
  });
  await rt.channels.close();
  const kind = rt.channels.planned();
  const watch = new CrashWatch({ pid: launched.pid, files: rt.paths, accel }, true);
  rt.qemuLogSeen = 0;
  try {
    await untilCrash(rt, watch, 250, () =>
      // The policy daemon's failure ends the wait at once, with its own error.
      Promise.all([
        (async () => {
          if (kind === "ssh") {
            deadline.phase = "waiting for SSH";
            await rt.channels.ssh().waitForSsh({ timeoutMs: deadline.remaining(), signal: deadline.signal });
          } else await rt.channels.waitForAgent(kind === "auto", deadline);
          deadline.phase = "waiting for the guest network";
          await waitForMilestone(rt.paths.serialLog, "network-up", deadline);
        })(),
        deadline.race(networkReady),
      ]),
    );
    rt.qemuLogSeen = watch.logSize;
  } catch (e) {
    // The caller's own deadline or signal first, naming the phase that was running: ending the
    // boot kills QEMU (the policy daemon's start is aborted too), which must not read as a crash.
    if (deadline.expired) throw deadline.reason;
    if (e instanceof VMStateError && e.code === "VM_CRASHED") throw e;
    // The policy daemon failed and took QEMU down with it: its own error says why.
    if (e instanceof SmolVMError && e.code === "NETWORK_DAEMON_FAILED") throw e;
    const log = await tailFile(spec.serialLogPath, 1500);
    if (!isQemuAlive(launched.pid, rt.paths.marker)) {
      rt.update({ status: "crashed", pid: null });
      throw new VMStateError(`VM ${rt.id} stopped during boot. Serial console tail:\n${log}`, {
        code: "VM_CRASHED",
        cause: e,
      });
    }
    if (e instanceof SmolVMError) {
      throw new VMStateError(
        `VM ${rt.id} did not answer on ${kind === "ssh" ? "SSH" : "its agent"} while booting (${e.message}). Serial console tail:\n${log}`,
        { cause: e, code: e.code },
      );
    }
    throw e;
  }
  deadline.phase = undefined;
  const bootToChannelMs = Math.round(performance.now() - t0);
  const ms = serialMilestones(await tailFile(rt.paths.serialLog, 65536));
  const ready = rt.channels.onAgent ? "agent" : "ssh";
  rt.bootTimings = {
    source: "cold",
    channel: ready,
    qemuStartMs: Math.round(qemuStartMs),
    kernelMs: ms["init-start"],
    agentMs: ms["agent-started"],
    networkMs: ms["network-up"],
    initToSshdMs:
      ms["sshd-started"] !== undefined && ms["init-start"] !== undefined
        ? ms["sshd-started"] - ms["init-start"]
        : undefined,
    bootToChannelMs,
    bootToSshMs: ready === "ssh" ? bootToChannelMs : undefined,
    totalMs: bootToChannelMs,
    milestones: ms,
    accel,
    accelReason: cfg.accelReason,
  };
}

/** A restore into `rt` (a new record) from the snapshot or template in `dir`. */
export async function bootFromSnapshot(
  rt: VmRuntime,
  dir: string,
  meta: SnapshotMeta,
  deadline: Deadline,
  id: NewIdentity & {
    hostKey: { publicKey: string };
    t0: number;
    source: "snapshot" | "template";
    /** A pool's standby: restored, its identity kept for later (VmRuntime.pendingIdentity). */
    deferIdentity?: boolean;
  },
): Promise<void> {
  const cfg = rt.launch;
  const f = snapshotFiles(dir);
  const kernelPath = cfg.kernelPath;
  if (!existsSync(kernelPath)) {
    throw new VMStateError(
      `snapshot ${meta.id} needs the kernel ${kernelPath}, which is gone (its image was removed): take the snapshot again.`,
      { code: "SNAPSHOT_DAMAGED" },
    );
  }
  deadline.phase = "starting QEMU";
  const accel = cfg.accel;
  const ramInState = existsSync(f.memory) === false;
  const spec: VmLaunchSpec = {
    ...(await launchBase(rt, id.hostKey.publicKey)),
    kernelPath,
    initrdPath: f.initrd,
    kernelAppend: cfg.kernelCmdline,
    agentSocketPath: rt.paths.agentSocket,
    // Clones map the snapshot's RAM privately: its pages are shared until a clone writes one.
    memoryFile: ramInState ? { path: rt.paths.ramFile, share: true } : { path: f.memory, share: false },
    incomingDefer: true,
    // Loaded state never starts the guest by itself (a device-only state says "running"): it
    // runs on our `cont`, once its closed nftables table is in.
    startPaused: true,
    devicesOnlyState: meta.stateFormat === "devices",
  };
  const sshPort = spec.sshHostPort;
  rt.update({ config: { ...rt.config, ramInFile: ramInState, lastBoot: "restore" } });
  if (existsSync(f.disk)) {
    const overlay = join(rt.record.vmDir, "rootfs.qcow2");
    const { exec } = await import("../image/exec.js");
    await exec("qemu-img", ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", f.disk, overlay]);
    spec.rootfsPath = overlay;
  }
  const t0 = performance.now();
  // QEMU reads the device state from an inherited descriptor (no shell and cat to spawn).
  const stateFd = openSync(f.state, "r");
  let launch: Awaited<ReturnType<typeof launchWithPolicy>>;
  try {
    launch = await launchWithPolicy(rt, spec, deadline, stateFd);
  } finally {
    closeSync(stateFd);
  }
  const { launched, networkReady, closed } = launch;
  const qmp = launched.qmp!;
  const qemuStartMs = performance.now() - t0;
  rt.update({ status: "running", pid: launched.pid, sshPort, ports: [] });
  const watch = new CrashWatch({ pid: launched.pid, files: rt.paths, accel }, false);
  await untilCrash(rt, watch, 250, () =>
    // The policy daemon's failure ends the restore at once, with its own error. On any failure
    // the daemon's start is let finish first (it is bounded by the deadline), so the teardown
    // that follows finds it rather than racing it.
    Promise.all([
      (async () => {
        deadline.phase = "loading the snapshot";
        // Connected before the devices load: the port's "host connected" state then matches
        // the snapshot's, so the guest agent sees no hang-up and answers the HELLO at once.
        try {
          rt.channels.pendingAgentSocket = await connectUnix(rt.paths.agentSocket, deadline.signal);
        } catch (e) {
          await qmp.close();
          throw e;
        }
        await restoreFrom(qmp, `fd:${INCOMING_FD}`, !ramInState, deadline, closed);
        if (id.deferIdentity) {
          rt.pendingIdentity = { hostKey: id.hostKey, clientPublicKey: id.clientPublicKey };
          return;
        }
        deadline.phase = "giving the VM its own identity";
        await becomeItself(rt, deadline, id);
      })(),
      deadline.race(networkReady),
    ]),
  ).catch(async (e) => {
    await networkReady.catch(() => {});
    // The caller's deadline or signal wins over the crash its end may cause (see boot()).
    throw deadline.expired ? deadline.reason : e;
  });
  rt.qemuLogSeen = watch.logSize;
  deadline.phase = undefined;
  const total = Math.round(performance.now() - id.t0);
  rt.bootTimings = {
    source: id.source,
    channel: rt.channels.onAgent ? "agent" : "ssh",
    qemuStartMs: Math.round(qemuStartMs),
    bootToChannelMs: Math.round(performance.now() - t0),
    totalMs: total,
    accel,
    accelReason: cfg.accelReason,
  };
}

/**
 * Starts QEMU inside the VM's network policy: its cgroup and a closed nftables table first, the
 * policy daemon once QEMU answers (network/host.ts). `networkReady` settles once the daemon serves
 * (QEMU is killed when it cannot: a guest never runs without its policy), so a caller overlaps
 * that start with the guest's own and awaits it before handing the VM out.
 */
async function launchWithPolicy(
  rt: VmRuntime,
  spec: VmLaunchSpec,
  deadline: Deadline,
  incomingFd?: number,
): Promise<{ launched: LaunchedQemu; networkReady: Promise<void>; closed: Promise<void> }> {
  const dir = rt.record.vmDir;
  // A daemon left from a QEMU that just died would otherwise outlive it into this boot.
  if (networkPrepared(dir)) await teardownVmNetwork(dir, rt.id);
  rt.reload();
  // A restore's guest stays stopped until the caller's `cont`: its QEMU starts while the closed
  // table loads, and the caller awaits `closed` before letting the guest run.
  const restore = spec.incomingDefer === true;
  const net = await prepareVmNetwork(dir, rt.id, rt.config.network ?? "public", { deferRules: restore });
  // The daemon replaces the closed table with its own: it starts once that table is in. A
  // restore's starts beside QEMU's (its guest waits for the daemon anyway); a cold boot's once
  // QEMU answers, as the two starts compete for the CPU and QEMU's is on the path.
  const startDaemon = () =>
    startNetworkDaemon(dir, rt.id, {
      timeoutMs: deadline.remaining(30_000),
      signal: deadline.signal,
    });
  const early = restore ? net.closed.then(startDaemon) : undefined;
  early?.catch(() => {});
  let launched: LaunchedQemu;
  try {
    launched = await launchQemu(spec, {
      timeoutMs: deadline.remaining(30_000),
      signal: deadline.signal,
      keepQmp: restore,
      incomingFd,
      ...net.launch,
    });
  } catch (e) {
    await early?.catch(() => {});
    await teardownVmNetwork(dir, rt.id);
    // The caller's deadline or signal, in the caller's words (not launchQemu's own).
    throw deadline.expired ? deadline.reason : e;
  }
  const daemon = early ?? startDaemon();
  const networkReady = daemon.then(
    () => undefined,
    (e) => {
      try {
        process.kill(launched.pid, "SIGKILL");
      } catch {
        /* already gone */
      }
      throw e;
    },
  );
  networkReady.catch(() => {});
  return { launched, networkReady, closed: net.closed };
}
