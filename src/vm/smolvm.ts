/**
 * SmolVM: a disposable microVM with a command channel. Creation composes the image, a per-VM
 * identity (host key pinned by us, client key authorized, agent secret), QEMU and a channel;
 * everything else delegates to the channel (run, files, env) or to QMP (forwards, stop).
 * State lives in the store, so `fromId` works from any process.
 */
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { mkdir, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { Duplex } from "node:stream";
import { AgentChannel } from "../channel/agent-channel.js";
import { setIdentity } from "../channel/agent-identity.js";
import { connectUnix } from "../channel/agent-transport.js";
import { renderEnvFile } from "../channel/env-file.js";
import { SshChannel } from "../channel/ssh-channel.js";
import type { CommandStream, CommChannel } from "../channel/types.js";
import {
  type CommandResult,
  quoteSh,
  type RunOptions,
  type RunOptionsBuffer,
  type RunOptionsUtf8,
  validateEnv,
} from "../command.js";
import { Deadline, sleep } from "../common/deadline.js";
import { dataDir as defaultDataDir } from "../common/paths.js";
import {
  AuthenticationError,
  CommandExecutionUnavailableError,
  ConnectionLostError,
  SmolVMError,
  SSHConnectionError,
  ValidationError,
  VMNotFoundError,
  VMStateError,
} from "../errors.js";
import {
  buildVmConfigCpio,
  composeInitrd,
  ensureClientKey,
  ensureImage,
  generateHostKey,
  type ImageBuildProgress,
  type ImageManifest,
  type ImageName,
  knownHostsLine,
} from "../image/index.js";
import { SSHClient } from "../ssh/client.js";
import {
  type AccelVerdict,
  detectAccelerator,
  findQemu,
  hostTscKhz,
  qemuVersion,
  recordAccelVerdict,
} from "./accel.js";
import { acquireAgentLock } from "./agent-lock.js";
import { type CrashReport, CrashWatch } from "./crash-watch.js";
import { type DoctorOptions, type DoctorReport, doctor } from "./doctor.js";
import { type ChannelAccess, VmFiles } from "./files.js";
import {
  prepareVmNetwork,
  readNetworkLog,
  sendPolicy,
  startNetworkDaemon,
  teardownVmNetwork,
} from "./network/host.js";
import { type NetworkLogEntry, type NetworkPolicy, normalizePolicy } from "./network/policy.js";
import { leasePort, releasePorts } from "./ports.js";
import { isQemuAlive, type LaunchedQemu, launchQemu, stopQemu } from "./process.js";
import { VmProcesses } from "./processes.js";
import { claimStart, type PruneResult, pruneDataDir, qemuPidsWith, stopVmProcesses } from "./prune.js";
import { VmPty } from "./pty.js";
import { buildQemuArgv, type VmLaunchSpec } from "./qemu.js";
import { QmpClient } from "./qmp.js";
import { readSerialLog, rotatedPath, rotateSerialLog, serialMilestones, tailFile } from "./serial-log.js";
import {
  type CaptureSource,
  captureInto,
  findSnapshot,
  listSnapshotMetas,
  newSnapshotId,
  publicInfo,
  restoreFrom,
  type SnapshotInfo,
  type SnapshotMeta,
  snapshotFiles,
  snapshotsDir,
  validateSnapshotName,
} from "./snapshot.js";
import { type VmStatus as StoredStatus, type VmRecord, VmStore, vmFiles } from "./store.js";
import { awaitTemplate, loadTemplate, templateDir, templateKey, tryTemplateLock } from "./template.js";
import { ensureReaper, validateLabels, validateTtl } from "./ttl.js";

export type CommChannelChoice = "ssh" | "agent" | "vsock" | "auto";
export type VmStatus = StoredStatus | "deleted";
export type { VmRecord };

export interface SmolVMCreateOptions {
  /** Default "tiny". */
  image?: ImageName;
  /** Default 512. */
  memoryMib?: number;
  /** Default 1. */
  vcpus?: number;
  name?: string;
  /** Env vars present from the first command on (persisted in the guest env file). */
  env?: Record<string, string>;
  commChannel?: CommChannelChoice;
  /** Default "auto" (KVM when it really runs guests, else TCG); SMOLVM_ACCEL overrides auto. */
  accel?: "kvm" | "tcg" | "auto";
  /** Default: SMOLVM_DATA_DIR, $XDG_STATE_HOME/smolvm or ~/.local/state/smolvm. */
  dataDir?: string;
  /** Bound on the whole create (image build excluded when cached). Default 180 000. */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Image build steps, and the accelerator verdict when it was probed or changed. */
  onProgress?: (p: SmolVMProgress) => void;
  /** Delete the VM this long after create() returns, even if no process of ours runs then. */
  ttlMs?: number;
  /** Labels kept with the VM; SmolVM.list({ labels }) filters by them. */
  labels?: Record<string, string>;
  /** Writable space, MiB: the debian image's copy-on-write disk; tiny's RAM filesystems (/ and /tmp) are capped at it. */
  diskMib?: number;
  /**
   * Default true: restore this image's template (a VM captured once fully booted) instead of a
   * cold boot; the first create for an image, size, accelerator and QEMU boots cold and leaves
   * the template. Every restored VM gets its own identity before its first command.
   */
  template?: boolean;
  /**
   * What the guest may reach (default "public": the internet, never the host, private ranges or
   * link-local). "none": nothing. { allow, deny }: hostnames (`*.` wildcards) and CIDRs.
   */
  network?: NetworkPolicy;
}

/** Options of SmolVM.fromSnapshot(). */
export interface FromSnapshotOptions {
  name?: string;
  commChannel?: CommChannelChoice;
  /** Env vars for login shells (replaces the snapshot's managed env file). */
  env?: Record<string, string>;
  labels?: Record<string, string>;
  ttlMs?: number;
  /** Default 60 000. */
  timeoutMs?: number;
  signal?: AbortSignal;
  dataDir?: string;
  /** Default: the policy the snapshot's VM had (see SmolVMCreateOptions.network). */
  network?: NetworkPolicy;
}

export interface ListOptions {
  dataDir?: string;
  /** Only VMs carrying all of these labels (same values). */
  labels?: Record<string, string>;
  /** Only VMs in this status (or any of these). */
  status?: VmStatus | VmStatus[];
}

/** The accelerator chosen for a create: reported when it was probed, or changed after a crash. */
export interface AccelProgress {
  kind: "accel";
  accel: "kvm" | "tcg";
  reason: string;
  /** One line for a progress display. */
  step: string;
  elapsedMs: number;
  done: boolean;
}

/** What `onProgress` receives: image build steps (`kind` "image") and accelerator notices. */
export type SmolVMProgress = ImageBuildProgress | AccelProgress;

export interface FromIdOptions {
  dataDir?: string;
  commChannel?: CommChannelChoice;
}

export interface BootTimings {
  /** How the VM came up: booted cold, restored from its image's template, or from a snapshot. */
  source: "cold" | "template" | "snapshot";
  /** The channel create() waited for: the agent (network-free) or SSH. */
  channel: "agent" | "ssh";
  /** QEMU spawned until its monitor answered. */
  qemuStartMs: number;
  /** Guest kernel start until /init ran (from the serial milestones). */
  kernelMs?: number;
  /** Guest kernel start until the agent was started (guest clock). */
  agentMs?: number;
  /** Guest kernel start until lo and eth0 were up with address, route and resolver (guest clock). */
  networkMs?: number;
  /** Every milestone the guest's init logged: name -> ms since the guest kernel started. */
  milestones?: Record<string, number>;
  /** The accelerator the VM runs under, and why it was chosen. */
  accel?: "kvm" | "tcg";
  accelReason?: string;
  /** /init start until sshd listened. */
  initToSshdMs?: number;
  /** Host side: QEMU spawn until the channel answered (the agent's handshake or SSH's). */
  bootToChannelMs: number;
  /** Host side: QEMU spawn until the SSH handshake completed (only when create() waited for SSH). */
  bootToSshMs?: number;
  /** create() called until it returned. */
  totalMs: number;
  /** The first create of a template: how long capturing it took (the guest was paused for part of it). */
  templateCaptureMs?: number;
}

export interface SshCommands {
  ssh: string;
  scpToGuest: string;
  scpFromGuest: string;
}

const DEFAULT_CREATE_TIMEOUT_MS = 180_000;
/** auto: how long boot waits for the agent before settling for SSH. */
const AUTO_AGENT_WAIT_MS = 60_000;
/** auto on re-attach: how long the agent gets to answer before SSH is used. */
const AUTO_AGENT_PROBE_MS = 2_000;
/**
 * A restored VM's sshd still holds the snapshot's host key: once the init's sshd is up, replace
 * it with one that loads the VM's own key (written just before), and log a milestone on the
 * console. The agent starts it in the background at the lowest priority (sshd itself is set
 * back to normal), so the first commands do not wait for it. Under load the old sshd may be slow
 * to go and free port 22: it is killed outright after 5 s, and the new one retried until it binds.
 */
const REKEY_SSHD = `i=0; while [ $i -lt 1200 ] && ! grep -q ' sshd-started' /run/smolvm/milestones 2>/dev/null; do sleep 0.05; i=$((i + 1)); done
p=$(pidof sshd || true)
if [ -n "$p" ]; then
  kill $p
  i=0; while [ $i -lt 250 ] && pidof sshd >/dev/null; do sleep 0.02; i=$((i + 1)); done
  kill -9 $p 2>/dev/null
fi
i=0; until /usr/sbin/sshd -E /var/log/sshd.log || [ $i -ge 100 ]; do sleep 0.1; i=$((i + 1)); done
renice 0 -p "$(cat /run/sshd.pid)"
read up _ < /proc/uptime; echo "smolvm: \${up%.*}\${up#*.}0 sshd-rekeyed" > /dev/console`;

/** How often a call in flight checks that the guest is still alive. */
const CALL_WATCH_INTERVAL_MS = 500;
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

export class SmolVM implements AsyncDisposable {
  private record: VmRecord;
  private deleted = false;
  private readonly dataDir: string;
  private chan: CommChannel | undefined;
  private sshClient: SSHClient | undefined;
  private agentChan: AgentChannel | undefined;
  /** Set for VMs this object created: disposing them deletes the VM. */
  private readonly owned: boolean;
  private readonly commChannel: CommChannelChoice;
  /** An agent socket opened ahead of the channel (restores). */
  private pendingAgentSocket: Duplex | undefined;
  /** Bytes of QEMU's log already judged harmless (see CrashWatch). */
  private qemuLogSeen = 0;
  bootTimings: BootTimings | undefined;

  private constructor(
    private readonly store: VmStore,
    record: VmRecord,
    opts: { owned: boolean; commChannel?: CommChannelChoice; dataDir: string },
  ) {
    this.record = record;
    this.dataDir = opts.dataDir;
    this.owned = opts.owned;
    this.commChannel = opts.commChannel ?? (record.channel as CommChannelChoice | undefined) ?? "auto";
  }

  // ------------------------------------------------------------ lifecycle

  static async create(options: SmolVMCreateOptions = {}): Promise<SmolVM> {
    const t0 = performance.now();
    const opts = validateCreateOptions(options);
    const deadline = new Deadline(opts.timeoutMs, opts.signal, "creating the VM");
    const base = opts.dataDir ?? defaultDataDir();
    const store = VmStore.open(base);
    try {
      deadline.phase = "building the image and keys";
      const [image, clientKey, hostKey] = await deadline.race(
        Promise.all([
          ensureImage(opts.image, { dataDir: base, signal: deadline.signal, onProgress: opts.onProgress }),
          ensureClientKey(base, { signal: deadline.signal }),
          generateHostKey({ signal: deadline.signal }),
        ]),
      );
      deadline.phase = "choosing the accelerator";
      const accel = await deadline.race(
        detectAccelerator({ force: opts.accel, dataDir: base, image, signal: deadline.signal }),
      );
      if (accel.probeMs > 0 && !accel.cached) reportAccel(opts.onProgress, accel, t0);
      if (isAgentChoice(opts.commChannel) && !image.capabilities.agent) {
        throw noAgentError(`image ${image.name}`, opts.commChannel);
      }
      // Templates need the agent: it is what gives a restored VM its own identity.
      let template: { dir: string; release: () => void } | undefined;
      if (opts.template && image.capabilities.agent) {
        const key = templateKey({
          imageFingerprint: image.fingerprint,
          memoryMib: opts.memoryMib,
          vcpus: opts.vcpus,
          accel: accel.accel,
          qemuVersion: await qemuVersion(findQemu()),
          diskMib: opts.diskMib,
        });
        const dir = templateDir(base, key);
        await mkdir(join(dir, ".."), { recursive: true, mode: 0o700 });
        deadline.phase = "looking for the template";
        let meta = await loadTemplate(dir, image.fingerprint);
        if (!meta) {
          const release = tryTemplateLock(dir);
          if (release) template = { dir, release };
          else meta = await awaitTemplate(dir, image.fingerprint, deadline);
        }
        if (meta) {
          store.close();
          const vm = await SmolVM.restore(base, dir, meta, opts, "template", deadline);
          vm.bootTimings = { ...vm.bootTimings!, totalMs: Math.round(performance.now() - t0) };
          return vm;
        }
      }
      const id = `vm-${randomBytes(6).toString("hex")}`;
      const name = opts.name ?? id;
      const vmDir = join(base, "vms", id);
      await mkdir(vmDir, { recursive: true, mode: 0o700 });
      const record = store.insert({
        id,
        name,
        status: "creating",
        image: image.name,
        vmDir,
        channel: opts.commChannel === "auto" ? null : opts.commChannel,
        hostKeyFingerprint: hostKey.fingerprint,
        labels: opts.labels,
        config: {
          ...(opts.diskMib !== undefined ? { diskMib: opts.diskMib } : {}),
          memoryMib: opts.memoryMib,
          vcpus: opts.vcpus,
          accel: accel.accel,
          accelReason: accel.reason,
          imageFingerprint: image.fingerprint,
          kernelPath: image.kernelPath,
          kernelCmdline: image.kernelCmdline,
          initrdPath: image.initrdPath,
          capabilities: image.capabilities,
          hostPublicKey: hostKey.publicKey,
          clientKeyPath: clientKey.privateKeyPath,
          creatorPid: process.pid,
          network: opts.network,
        },
      });
      const vm = new SmolVM(store, record, { owned: true, commChannel: opts.commChannel, dataDir: base });
      try {
        const agentSecret = randomBytes(32);
        const cpio = vmConfigCpio({
          hostKeyPem: hostKey.privateKeyPem,
          clientPublicKey: clientKey.publicKey,
          agentSecret,
          env: opts.env,
          hostname: safeHostname(name),
          diskMib: opts.diskMib,
        });
        await composeInitrd(image.initrdPath, cpio, join(vmDir, "initrd.img"));
        await writeFile(vmFiles(vmDir).agentSecret, agentSecret, { mode: 0o600 });
        try {
          await vm.bootOrFallBack(image, deadline, accel, opts, t0);
          // A template is keyed by the accelerator it runs under: none when the boot fell back.
          if (template && vm.record.config.accel === accel.accel)
            await vm.leaveTemplate(template.dir, deadline);
        } finally {
          template?.release();
        }
        if (opts.ttlMs !== undefined) await vm.setTtl(opts.ttlMs);
        vm.bootTimings = { ...vm.bootTimings!, totalMs: Math.round(performance.now() - t0) };
        return vm;
      } catch (e) {
        await vm.delete().catch(() => {});
        throw e;
      }
    } catch (e) {
      store.close();
      throw e;
    } finally {
      deadline.dispose();
    }
  }

  /** Re-attaches to a VM created by any process (by id or name). */
  static async fromId(idOrName: string, options: FromIdOptions = {}): Promise<SmolVM> {
    const base = options.dataDir ?? defaultDataDir();
    const store = VmStore.open(base);
    store.reconcile();
    const record = store.get(idOrName);
    if (!record) {
      store.close();
      throw new VMNotFoundError(
        `no VM named or with id ${JSON.stringify(idOrName)}: see SmolVM.list() or \`smolvm list\`.`,
        {
          details: { id: idOrName },
        },
      );
    }
    return new SmolVM(store, record, { owned: false, commChannel: options.commChannel, dataDir: base });
  }

  /**
   * Checks this host: QEMU, the accelerator verdict and why, devices, build tools, the data dir,
   * images and running VMs (the same report as `smolvm doctor --json`).
   */
  static doctor(options: DoctorOptions = {}): Promise<DoctorReport> {
    return doctor(options);
  }

  /**
   * Removes stopped and crashed VMs, VMs whose creating process died before they ran, and VM
   * directories no record owns; kills QEMU processes of this data dir that no record owns.
   * Running VMs are left alone.
   */
  static async prune(options: { dataDir?: string } = {}): Promise<PruneResult> {
    const base = options.dataDir ?? defaultDataDir();
    const store = VmStore.open(base);
    try {
      return await pruneDataDir(store, base);
    } finally {
      store.close();
    }
  }

  static async list(options: ListOptions = {}): Promise<VmRecord[]> {
    if (options.labels) validateLabels(options.labels);
    const statuses = options.status === undefined ? undefined : [options.status].flat();
    const store = VmStore.open(options.dataDir ?? defaultDataDir());
    try {
      store.reconcile();
      return store
        .list()
        .filter((v) => !statuses || statuses.includes(v.status))
        .filter((v) => Object.entries(options.labels ?? {}).every(([k, val]) => v.labels[k] === val));
    } finally {
      store.close();
    }
  }

  get id(): string {
    return this.record.id;
  }
  get name(): string {
    return this.record.name;
  }
  get sshPort(): number | null {
    return this.record.sshPort;
  }
  /** Labels given at create(). */
  get labels(): Record<string, string> {
    return { ...this.record.labels };
  }

  /** When the VM will be deleted (its TTL), or null. */
  get expiresAt(): Date | null {
    const fresh = this.deleted ? undefined : this.store.get(this.id);
    if (fresh) this.record = fresh;
    return this.record.expiresAt === null ? null : new Date(this.record.expiresAt);
  }

  /**
   * Sets the VM's lifetime to `ms` from now (null clears it). A detached reaper deletes the VM
   * once it expires, whichever process created it and whether or not that process still runs.
   */
  async setTtl(ms: number | null): Promise<void> {
    validateTtl(ms, "ms");
    if (this.deleted) throw this.deletedError();
    this.update({ expiresAt: ms === null ? null : Date.now() + ms });
    if (ms !== null) ensureReaper(this.dataDir);
  }

  /** Files in the guest: read/write/list/stat/exists/mkdir/remove/rename/watch (agent or SFTP). */
  get files(): VmFiles {
    this.filesApi ??= new VmFiles(this.channelAccess());
    return this.filesApi;
  }

  /** Background processes that outlive this object and this host process (agent only). */
  get processes(): VmProcesses {
    this.processesApi ??= new VmProcesses(this.channelAccess());
    return this.processesApi;
  }

  /** Interactive terminals on a guest PTY (agent only). */
  get pty(): VmPty {
    this.ptyApi ??= new VmPty(this.channelAccess());
    return this.ptyApi;
  }

  private filesApi: VmFiles | undefined;
  private processesApi: VmProcesses | undefined;
  private ptyApi: VmPty | undefined;

  private channelAccess(): ChannelAccess {
    return { channel: () => this.channel(), explain: (fn) => this.explain(fn), name: this.name };
  }

  /** "running", "stopped", "crashed" (QEMU died without being asked to), "creating", "deleted". */
  get status(): VmStatus {
    if (this.deleted) return "deleted";
    this.refreshLiveness();
    return this.record.status;
  }

  /** Boots a stopped VM again with the same identity (tiny's RAM filesystem starts fresh). */
  async start(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    if (this.status === "running") return;
    if (this.deleted) throw this.deletedError();
    const deadline = new Deadline(
      options.timeoutMs ?? DEFAULT_CREATE_TIMEOUT_MS,
      options.signal,
      `starting VM ${this.id}`,
    );
    try {
      // One boot at a time, across handles and processes: the others wait for it to run.
      this.starting ??= this.startOnce(deadline).finally(() => {
        this.starting = undefined;
      });
      await deadline.race(this.starting);
    } finally {
      deadline.dispose();
    }
  }

  private starting: Promise<void> | undefined;

  private async startOnce(deadline: Deadline): Promise<void> {
    if (!claimStart(this.store, this.id)) {
      while (this.status !== "running") {
        if (this.record.status !== "creating") throw this.deletedOrStateError("start");
        await sleep(100, deadline.signal);
      }
      return;
    }
    try {
      deadline.phase = "building the image";
      const image = await ensureImage(this.record.image as ImageName, {
        dataDir: this.dataDir,
        signal: deadline.signal,
      });
      await this.boot(image, deadline);
    } catch (e) {
      if (this.store.get(this.id)?.status === "creating") this.update({ status: "stopped", pid: null });
      throw e;
    }
  }

  /** Powers the VM off (ACPI, then quit, then SIGKILL, bounded) and frees its ports. */
  async stop(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    await this.closeChannel();
    // The pid in the store, not this handle's copy (another process may have restarted the VM).
    await stopVmProcesses(this.store, this.record, options);
    await rm(this.vmPaths.ramFile, { force: true });
    await teardownVmNetwork(this.record.vmDir, this.id);
    releasePorts(this.store, this.id);
    this.update({ status: "stopped", pid: null, sshPort: null, ports: [] });
  }

  /** Stops the VM and removes every trace of it (record, directory, port leases). */
  async delete(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    if (this.deleted) return;
    await this.stop(options).catch(() => {});
    // Never remove the directory under a live QEMU.
    if (qemuPidsWith(this.vmPaths.marker).length) await stopVmProcesses(this.store, this.record, options);
    await rm(this.record.vmDir, { recursive: true, force: true });
    this.store.delete(this.id);
    this.deleted = true;
    await this.dropEphemeralSnapshot().catch(() => {});
    this.store.close();
  }

  // ------------------------------------------------------------ pause, snapshots, fork

  /** Freezes the guest: no guest code runs (its clock does not advance its processes) until resume(). */
  async pause(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    if (this.status === "paused") return;
    this.requireRunning("pause");
    await this.withQmp(options, (qmp, ms) => qmp.stop({ timeoutMs: ms }));
    this.update({ status: "paused" });
  }

  /** Continues a paused guest. */
  async resume(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    if (this.status === "running") return;
    if (this.status !== "paused") this.requireRunning("resume");
    await this.withQmp(options, (qmp, ms) => qmp.cont({ timeoutMs: ms }));
    this.update({ status: "running" });
  }

  /**
   * Captures the running VM (memory, devices, running processes, and debian's disk) under
   * `<dataDir>/snapshots/<id>/`. The guest is paused for the capture (a few hundred ms at most
   * for tiny) and continues unaffected. Restore with SmolVM.fromSnapshot(id or name).
   */
  async snapshot(
    options: { name?: string; timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<SnapshotInfo> {
    if (options.name !== undefined) validateSnapshotName(options.name);
    return publicInfo(await this.captureSnapshot(options, false));
  }

  /**
   * `count` new VMs, each a copy of this one as it is now (files, processes, memory) with its
   * own identity; this VM keeps running. The snapshot behind them is removed with the last one.
   */
  async fork(options: { count?: number; timeoutMs?: number; signal?: AbortSignal } = {}): Promise<SmolVM[]> {
    const count = options.count ?? 1;
    if (!Number.isInteger(count) || count < 1 || count > 64) {
      throw new ValidationError(`fork count must be an integer from 1 to 64, got ${String(options.count)}.`);
    }
    const deadline = new Deadline(options.timeoutMs ?? 120_000, options.signal, `forking VM ${this.id}`);
    try {
      const meta = await this.captureSnapshot(
        { signal: deadline.signal, timeoutMs: deadline.remaining() },
        true,
      );
      const dir = join(snapshotsDir(this.dataDir), meta.id);
      const made = await Promise.allSettled(
        Array.from({ length: count }, () =>
          SmolVM.restore(
            this.dataDir,
            dir,
            meta,
            { commChannel: this.commChannel, network: this.network },
            "snapshot",
            deadline,
          ),
        ),
      );
      const ok = made.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
      const failed = made.find((r): r is PromiseRejectedResult => r.status === "rejected");
      if (failed) {
        await Promise.all(ok.map((vm) => vm.delete().catch(() => {})));
        throw failed.reason;
      }
      return ok;
    } finally {
      deadline.dispose();
    }
  }

  /** Every snapshot in the data dir, oldest first. */
  static async listSnapshots(options: { dataDir?: string } = {}): Promise<SnapshotInfo[]> {
    return (await listSnapshotMetas(options.dataDir ?? defaultDataDir()))
      .filter((m) => !m.ephemeral)
      .map(publicInfo);
  }

  /** Removes a snapshot; refused while a VM restored from it still needs its files. */
  static async deleteSnapshot(idOrName: string, options: { dataDir?: string } = {}): Promise<void> {
    const base = options.dataDir ?? defaultDataDir();
    const { dir, meta } = await findSnapshot(base, idOrName);
    const users = SmolVM.snapshotUsers(base, meta.id);
    if (users.length > 0) {
      throw new VMStateError(
        `snapshot ${meta.id} is still used by ${users.join(", ")}: delete those VMs first (vm.delete() or \`smolvm rm\`).`,
        { code: "SNAPSHOT_IN_USE", details: { snapshot: meta.id, vms: users } },
      );
    }
    await rm(dir, { recursive: true, force: true });
  }

  /**
   * A new VM from a snapshot (by id or name): the snapshot's memory, processes and disk, with its
   * own identity (agent secret, SSH host key, hostname, RNG, clock, env) before it is returned.
   */
  static async fromSnapshot(idOrName: string, options: FromSnapshotOptions = {}): Promise<SmolVM> {
    const base = options.dataDir ?? defaultDataDir();
    if (options.name !== undefined && !NAME_RE.test(options.name)) {
      throw new ValidationError(
        `VM name ${JSON.stringify(options.name)} is invalid: use 1-63 letters, digits, '.', '_' or '-'.`,
      );
    }
    if (options.env) validateEnv(options.env);
    const deadline = new Deadline(
      options.timeoutMs ?? 60_000,
      options.signal,
      `restoring snapshot ${idOrName}`,
    );
    try {
      const { dir, meta } = await findSnapshot(base, idOrName);
      return await SmolVM.restore(base, dir, meta, options, "snapshot", deadline);
    } finally {
      deadline.dispose();
    }
  }

  /** VMs whose files still depend on a snapshot (running ones map its memory; debian ones its disk). */
  private static snapshotUsers(base: string, snapshotId: string): string[] {
    const store = VmStore.open(base);
    try {
      store.reconcile();
      return store
        .list()
        .filter((r) => {
          const from = r.config.restoredFrom as { id?: string } | undefined;
          if (from?.id !== snapshotId) return false;
          return r.status === "running" || r.status === "paused" || r.image !== "tiny";
        })
        .map((r) => r.name);
    } finally {
      store.close();
    }
  }

  private async captureSnapshot(
    options: { name?: string; timeoutMs?: number; signal?: AbortSignal },
    ephemeral: boolean,
  ): Promise<SnapshotMeta> {
    this.requireRunning("snapshot");
    const deadline = new Deadline(options.timeoutMs ?? 60_000, options.signal, `snapshotting VM ${this.id}`);
    try {
      const id = newSnapshotId();
      const dir = join(snapshotsDir(this.dataDir), id);
      await mkdir(snapshotsDir(this.dataDir), { recursive: true, mode: 0o700 });
      return await this.captureTo(dir, { id, name: options.name ?? id, ephemeral }, deadline);
    } finally {
      deadline.dispose();
    }
  }

  /** Captures this VM into `dir` (see snapshot.ts). */
  private async captureTo(
    dir: string,
    naming: { id: string; name: string; ephemeral: boolean },
    deadline: Deadline,
  ): Promise<SnapshotMeta> {
    const cfg = this.record.config;
    const from = cfg.restoredFrom as { dir: string } | undefined;
    // An open agent session stays open: the copy's virtio-serial port then says "host
    // connected", and a restore that connects before loading the devices finds the agent
    // reading, with no hang-up to back off from.
    const src: CaptureSource = {
      qmpSocket: this.vmPaths.qmpSocket,
      ramFile: cfg.ramInFile === false ? undefined : this.vmPaths.ramFile,
      disk: existsSync(join(this.record.vmDir, "rootfs.qcow2"))
        ? join(this.record.vmDir, "rootfs.qcow2")
        : undefined,
      initrd: from ? snapshotFiles(from.dir).initrd : join(this.record.vmDir, "initrd.img"),
      agentSecret: readFileSync(this.vmPaths.agentSecret),
    };
    const { hostPublicKey: _h, clientKeyPath: _c, restoredFrom: _r, ...config } = cfg;
    return captureInto(
      dir,
      src,
      {
        id: naming.id,
        name: naming.name,
        vmId: this.id,
        image: this.record.image,
        createdAt: new Date().toISOString(),
        memoryMib: cfg.memoryMib as number,
        vcpus: cfg.vcpus as number,
        config,
        ephemeral: naming.ephemeral || undefined,
      },
      deadline,
    );
  }

  /**
   * Captures this freshly booted VM as its image's template. A failed capture costs the template,
   * never the create: the next create boots cold and tries again.
   */
  private async leaveTemplate(dir: string, deadline: Deadline): Promise<void> {
    deadline.phase = "capturing the template";
    const t0 = performance.now();
    try {
      await this.captureTo(dir, { id: newSnapshotId(), name: "template", ephemeral: false }, deadline);
      if (this.bootTimings) this.bootTimings.templateCaptureMs = Math.round(performance.now() - t0);
    } catch (e) {
      if (deadline.expired) throw e;
    }
  }

  /** A fork's snapshot goes with its last clone. */
  private async dropEphemeralSnapshot(): Promise<void> {
    const from = this.record.config.restoredFrom as
      | { id: string; dir: string; ephemeral?: boolean }
      | undefined;
    if (!from?.ephemeral) return;
    const others = this.store
      .list()
      .some((r) => (r.config.restoredFrom as { id?: string } | undefined)?.id === from.id);
    if (!others) await rm(from.dir, { recursive: true, force: true });
  }

  /**
   * Creates a VM record and boots it from a snapshot or template directory, then makes it its
   * own. On any failure the half-made VM is deleted.
   */
  private static async restore(
    base: string,
    dir: string,
    meta: SnapshotMeta,
    o: FromSnapshotOptions & { labels?: Record<string, string>; ttlMs?: number },
    source: "snapshot" | "template",
    deadline: Deadline,
  ): Promise<SmolVM> {
    const t0 = performance.now();
    const store = VmStore.open(base);
    let vm: SmolVM | undefined;
    try {
      deadline.phase = "restoring the VM";
      const [clientKey, hostKey] = await deadline.race(
        Promise.all([
          ensureClientKey(base, { signal: deadline.signal }),
          generateHostKey({ signal: deadline.signal }),
        ]),
      );
      const id = `vm-${randomBytes(6).toString("hex")}`;
      const name = o.name ?? id;
      const vmDir = join(base, "vms", id);
      await mkdir(vmDir, { recursive: true, mode: 0o700 });
      const commChannel = o.commChannel ?? "auto";
      const record = store.insert({
        id,
        name,
        status: "creating",
        image: meta.image,
        vmDir,
        channel: commChannel === "auto" ? null : commChannel,
        hostKeyFingerprint: hostKey.fingerprint,
        labels: o.labels,
        config: {
          ...meta.config,
          hostPublicKey: hostKey.publicKey,
          clientKeyPath: clientKey.privateKeyPath,
          restoredFrom: { kind: source, id: meta.id, dir, ephemeral: meta.ephemeral || undefined },
          // A template serves every policy: create() always names one. A snapshot or fork keeps
          // its VM's, unless the caller names another.
          network: normalizePolicy(o.network ?? meta.config.network),
        },
      });
      vm = new SmolVM(store, record, { owned: true, commChannel, dataDir: base });
      await writeFile(vm.vmPaths.agentSecret, readFileSync(snapshotFiles(dir).agentSecret), { mode: 0o600 });
      await vm.bootFromSnapshot(dir, meta, deadline, {
        hostKey,
        clientPublicKey: clientKey.publicKey,
        env: o.env ?? {},
        t0,
        source,
      });
      if (o.ttlMs !== undefined) await vm.setTtl(o.ttlMs);
      return vm;
    } catch (e) {
      if (vm) await vm.delete().catch(() => {});
      else store.close();
      throw e;
    }
  }

  private async bootFromSnapshot(
    dir: string,
    meta: SnapshotMeta,
    deadline: Deadline,
    id: {
      hostKey: { privateKeyPem: string | Buffer; publicKey: string };
      clientPublicKey: string;
      env: Record<string, string>;
      t0: number;
      source: "snapshot" | "template";
    },
  ): Promise<void> {
    const cfg = this.record.config;
    const f = snapshotFiles(dir);
    const kernelPath = cfg.kernelPath as string;
    if (!existsSync(kernelPath)) {
      throw new VMStateError(
        `snapshot ${meta.id} needs the kernel ${kernelPath}, which is gone (its image was removed): take the snapshot again.`,
        { code: "SNAPSHOT_DAMAGED" },
      );
    }
    deadline.phase = "starting QEMU";
    const accel = cfg.accel as "kvm" | "tcg";
    const ramInState = existsSync(f.memory) === false;
    const spec: VmLaunchSpec = {
      ...(await this.launchBase(id.hostKey.publicKey)),
      kernelPath,
      initrdPath: f.initrd,
      kernelAppend: cfg.kernelCmdline as string,
      agentSocketPath: this.vmPaths.agentSocket,
      // Clones map the snapshot's RAM privately: its pages are shared until a clone writes one.
      memoryFile: ramInState ? { path: this.vmPaths.ramFile, share: true } : { path: f.memory, share: false },
      incomingDefer: true,
    };
    const sshPort = spec.sshHostPort;
    this.update({ config: { ...cfg, ramInFile: ramInState } });
    if (existsSync(f.disk)) {
      const overlay = join(this.record.vmDir, "rootfs.qcow2");
      const { exec } = await import("../image/exec.js");
      await exec("qemu-img", ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", f.disk, overlay]);
      spec.rootfsPath = overlay;
    }
    const t0 = performance.now();
    const { launched, networkReady } = await this.launchWithPolicy(spec, deadline);
    const qemuStartMs = performance.now() - t0;
    this.update({ status: "running", pid: launched.pid, sshPort, ports: [] });
    const watch = new CrashWatch({ pid: launched.pid, files: this.vmPaths, accel }, false);
    await this.untilCrash(watch, 250, () =>
      // The policy daemon's failure ends the restore at once, with its own error.
      Promise.all([
        (async () => {
          deadline.phase = "loading the snapshot";
          // Connected before the devices load: the port's "host connected" state then matches
          // the snapshot's, so the guest agent sees no hang-up and answers the HELLO at once.
          this.pendingAgentSocket = await connectUnix(this.vmPaths.agentSocket, deadline.signal);
          await restoreFrom(this.vmPaths.qmpSocket, f.state, !ramInState, deadline);
          deadline.phase = "giving the VM its own identity";
          await this.becomeItself(deadline, id);
        })(),
        deadline.race(networkReady),
      ]),
    );
    this.qemuLogSeen = watch.logSize;
    deadline.phase = undefined;
    const total = Math.round(performance.now() - id.t0);
    this.bootTimings = {
      source: id.source,
      channel: this.chan === this.agentChan ? "agent" : "ssh",
      qemuStartMs: Math.round(qemuStartMs),
      bootToChannelMs: Math.round(performance.now() - t0),
      totalMs: total,
      accel,
      accelReason: cfg.accelReason as string | undefined,
    };
  }

  /**
   * Every restored VM wakes with the snapshot's memory: before its first command it gets a new
   * agent secret (over the session the old one opened), host entropy and an immediate RNG
   * reseed, the host's clock, its hostname, its env file and a new SSH host key (sshd restarts
   * with it in the background; SSH users wait for that).
   */
  private async becomeItself(
    deadline: Deadline,
    id: { hostKey: { privateKeyPem: string | Buffer }; clientPublicKey: string; env: Record<string, string> },
  ): Promise<void> {
    const agent = this.agent();
    const secret = randomBytes(32);
    const hostname = safeHostname(this.name);
    // The VM's own initramfs, for when start() boots it cold after a stop().
    const cfg = this.record.config;
    const initrd = (async () => {
      if (typeof cfg.initrdPath !== "string") return;
      await composeInitrd(
        cfg.initrdPath,
        vmConfigCpio({
          hostKeyPem: id.hostKey.privateKeyPem,
          clientPublicKey: id.clientPublicKey,
          agentSecret: secret,
          env: id.env,
          hostname,
          diskMib: cfg.diskMib as number | undefined,
        }),
        join(this.record.vmDir, "initrd.img"),
      );
    })();
    initrd.catch(() => {});
    await agent.waitReady({ timeoutMs: deadline.remaining(), signal: deadline.signal });
    await setIdentity(
      agent,
      {
        secret,
        entropy: randomBytes(64),
        timeNs: BigInt(Date.now()) * 1_000_000n,
        hostname,
        files: [
          { path: "/etc/ssh/ssh_host_ed25519_key", mode: 0o600, data: id.hostKey.privateKeyPem },
          { path: "/root/.ssh/authorized_keys", mode: 0o600, data: `${id.clientPublicKey}\n` },
          { path: "/etc/profile.d/smolvm_env.sh", mode: 0o600, data: renderEnvFile(id.env) },
          { path: "/etc/hostname", mode: 0o644, data: `${hostname}\n` },
          { path: "/etc/hosts", mode: 0o644, data: `127.0.0.1 localhost\n127.0.1.1 ${hostname}\n` },
        ],
        run: REKEY_SSHD,
      },
      deadline,
    );
    agent.rekey(secret);
    await writeFile(this.vmPaths.agentSecret, secret, { mode: 0o600 });
    await initrd;
    this.chan = agent;
    if (this.plannedChannel() === "ssh") {
      deadline.phase = "waiting for sshd with the new host key";
      await this.waitForMilestone("sshd-rekeyed", deadline);
      this.chan = undefined;
    }
  }

  /**
   * What every launch of this VM shares: its name, size, accelerator, files, and a freshly leased
   * SSH port whose known_hosts line pins `hostPublicKey`.
   */
  private async launchBase(
    hostPublicKey: string,
  ): Promise<Omit<VmLaunchSpec, "kernelPath" | "initrdPath" | "kernelAppend">> {
    const cfg = this.record.config;
    const accel = cfg.accel as "kvm" | "tcg";
    const sshPort = await leasePort(this.store, this.id, "ssh");
    await writeFile(this.knownHostsPath, knownHostsLine("127.0.0.1", sshPort, hostPublicKey), {
      mode: 0o600,
    });
    return {
      name: this.id,
      qemuPath: findQemu(),
      accel,
      memoryMib: cfg.memoryMib as number,
      vcpus: cfg.vcpus as number,
      tscKhz: accel === "tcg" ? hostTscKhz() : undefined,
      qmpSocketPath: this.vmPaths.qmpSocket,
      serialLogPath: this.vmPaths.serialLog,
      pidfilePath: this.vmPaths.pidfile,
      sshHostPort: sshPort,
    };
  }

  /** Runs `fn` with a QMP connection to this VM. */
  private async withQmp<T>(
    options: { timeoutMs?: number; signal?: AbortSignal },
    fn: (qmp: QmpClient, ms: number) => Promise<T>,
  ): Promise<T> {
    const ms = options.timeoutMs ?? 5_000;
    const qmp = await QmpClient.connect(this.vmPaths.qmpSocket, { timeoutMs: ms, signal: options.signal });
    try {
      return await fn(qmp, ms);
    } finally {
      await qmp.close();
    }
  }

  /** Closes this object's connections; the VM keeps running (see delete()). */
  async close(): Promise<void> {
    await this.closeChannel();
  }

  /** VMs from create() are deleted on dispose; re-attached ones (fromId) are only closed. */
  async [Symbol.asyncDispose](): Promise<void> {
    if (this.owned) await this.delete();
    else {
      await this.close();
      this.store.close();
    }
  }

  // ------------------------------------------------------------ commands, files, env

  run(command: string, options?: RunOptionsUtf8): Promise<CommandResult<string>>;
  run(command: string, options: RunOptionsBuffer): Promise<CommandResult<Buffer>>;
  run(command: string, options?: RunOptions): Promise<CommandResult<string> | CommandResult<Buffer>>;
  async run(
    command: string,
    options: RunOptions = {},
  ): Promise<CommandResult<string> | CommandResult<Buffer>> {
    const ch = await this.channel();
    return this.explain(() => ch.run(command, options));
  }

  /** Streams a command's output: `for await (const ev of vm.stream("..."))`. */
  stream(command: string, options: Parameters<CommChannel["stream"]>[1] = {}): CommandStream {
    const pending = this.channel().then((ch) => ch.stream(command, options));
    pending.catch(() => {});
    return {
      async *[Symbol.asyncIterator]() {
        yield* await pending;
      },
      cancel: async () => (await pending.catch(() => undefined))?.cancel(),
    };
  }

  async uploadFile(
    localPath: string,
    guestPath: string,
    options: { mode?: number; timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<void> {
    const ch = await this.channel();
    await this.explain(() => ch.putFile(localPath, guestPath, options));
  }

  /**
   * Copies a guest file to `localPath`: through a new 0600 temp file renamed into place (a
   * symlink at `localPath` is replaced, not followed; nothing partial is left on failure).
   * `maxBytes` refuses a larger file with FILE_TOO_LARGE.
   */
  async downloadFile(
    guestPath: string,
    localPath: string,
    options: { timeoutMs?: number; signal?: AbortSignal; maxBytes?: number } = {},
  ): Promise<void> {
    const ch = await this.channel();
    await this.explain(() => ch.getFile(guestPath, localPath, options));
  }

  async setEnvVars(
    vars: Record<string, string>,
    options: { timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<void> {
    validateEnv(vars);
    const ch = await this.channel();
    await this.explain(() => ch.setEnv(vars, options));
  }

  async unsetEnvVars(
    names: string[],
    options: { timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<void> {
    const ch = await this.channel();
    await this.explain(() => ch.unsetEnv(names, options));
  }

  async listEnvVars(
    options: { timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<Record<string, string>> {
    const ch = await this.channel();
    return this.explain(() => ch.listEnv(options));
  }

  // ------------------------------------------------------------ networking

  /**
   * Forwards host 127.0.0.1:hostPort to the guest's guestPort (QEMU user-network forward, added
   * over QMP: it lives as long as the VM, whichever process asked). The guest service must listen
   * on 0.0.0.0 or 10.0.2.15, not only on the guest's 127.0.0.1.
   */
  async exposeLocal(
    guestPort: number,
    hostPort?: number,
    options: { timeoutMs?: number } = {},
  ): Promise<number> {
    checkPort("guestPort", guestPort);
    if (hostPort !== undefined) checkPort("hostPort", hostPort);
    this.requireRunning("expose a port");
    let port: number;
    if (hostPort === undefined) port = await leasePort(this.store, this.id, `expose:${guestPort}`);
    else if (this.store.tryLeasePort(hostPort, this.id, `expose:${guestPort}`)) port = hostPort;
    else
      throw new ValidationError(
        `host port ${hostPort} is already leased by a smolvm VM: pick another or omit it.`,
      );
    let qmp: QmpClient | undefined;
    try {
      qmp = await QmpClient.connect(this.vmPaths.qmpSocket, { timeoutMs: options.timeoutMs ?? 5_000 });
      await qmp.hostfwdAdd(port, guestPort);
    } catch (e) {
      releasePorts(this.store, this.id, port);
      throw e;
    } finally {
      await qmp?.close();
    }
    // Read-modify-write in one transaction: concurrent exposes (any process) all land.
    this.record = this.store.transaction(() => {
      const ports = this.store.require(this.id).ports.filter((p) => p.hostPort !== port);
      return this.store.update(this.id, { ports: [...ports, { hostPort: port, guestPort }] });
    });
    return port;
  }

  async unexposeLocal(hostPort: number, options: { timeoutMs?: number } = {}): Promise<void> {
    checkPort("hostPort", hostPort);
    if (!this.record.ports.some((p) => p.hostPort === hostPort)) {
      throw new ValidationError(`host port ${hostPort} is not exposed by VM ${this.id}.`);
    }
    if (this.status === "running") {
      const qmp = await QmpClient.connect(this.vmPaths.qmpSocket, { timeoutMs: options.timeoutMs ?? 5_000 });
      try {
        await qmp.hostfwdRemove(hostPort);
      } finally {
        await qmp.close();
      }
    }
    releasePorts(this.store, this.id, hostPort);
    this.record = this.store.transaction(() =>
      this.store.update(this.id, {
        ports: this.store.require(this.id).ports.filter((p) => p.hostPort !== hostPort),
      }),
    );
  }

  /** The network policy in force (see SmolVMCreateOptions.network). */
  get network(): NetworkPolicy {
    const fresh = this.deleted ? undefined : this.store.get(this.id);
    if (fresh) this.record = fresh;
    return (this.record.config.network as NetworkPolicy | undefined) ?? "public";
  }

  /**
   * Changes the network policy of a running VM live (no reboot): new connections and DNS
   * questions are decided under it at once. On a stopped VM it applies from the next start.
   */
  async setNetwork(
    policy: NetworkPolicy,
    options: { timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<void> {
    const p = normalizePolicy(policy);
    if (this.deleted) throw this.deletedError();
    if (this.status === "running") {
      await sendPolicy(this.record.vmDir, this.id, p, {
        timeoutMs: options.timeoutMs ?? 5_000,
        signal: options.signal,
      });
    }
    this.update({ config: { ...this.record.config, network: p } });
  }

  /** The most recent network decisions (DNS and TCP), oldest first. Default limit 100. */
  async networkLog(options: { limit?: number } = {}): Promise<NetworkLogEntry[]> {
    const limit = options.limit ?? 100;
    if (!Number.isInteger(limit) || limit < 1)
      throw new ValidationError(`limit must be a positive integer, got ${String(limit)}.`);
    return readNetworkLog(this.record.vmDir, limit);
  }

  /** The address the host reaches the guest's forwarded ports on (user-mode networking). */
  getIp(): string {
    return "127.0.0.1";
  }

  /** Ready-to-paste commands for OpenSSH tools, with the VM's host key pinned. */
  sshCommands(options: { user?: string; keyPath?: string } = {}): SshCommands {
    const user = options.user ?? "root";
    const key = options.keyPath ?? (this.record.config.clientKeyPath as string);
    const port = this.record.sshPort ?? 22;
    const common = `-i ${quoteSh(key)} -o UserKnownHostsFile=${quoteSh(this.knownHostsPath)} -o StrictHostKeyChecking=yes`;
    return {
      ssh: `ssh ${common} -p ${port} ${user}@127.0.0.1`,
      scpToGuest: `scp ${common} -P ${port} <local> ${user}@127.0.0.1:<remote>`,
      scpFromGuest: `scp ${common} -P ${port} ${user}@127.0.0.1:<remote> <local>`,
    };
  }

  /** True when the image has a command channel (SSH or the agent). */
  canRunCommands(): boolean {
    const caps = this.record.config.capabilities as { ssh: boolean; agent: boolean } | undefined;
    return Boolean(caps?.ssh || caps?.agent);
  }

  async waitForSsh(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    this.requireRunning("wait for SSH");
    if (this.record.config.restoredFrom) {
      // A restored VM's sshd restarts with the VM's own host key shortly after it is up.
      const deadline = new Deadline(options.timeoutMs ?? 60_000, options.signal, "waiting for SSH");
      try {
        deadline.phase = "waiting for sshd with the VM's own host key";
        await this.waitForMilestone("sshd-rekeyed", deadline);
      } finally {
        deadline.dispose();
      }
    }
    await this.explain(() =>
      this.ssh().waitForSsh({ timeoutMs: options.timeoutMs ?? 60_000, signal: options.signal }),
    );
  }

  /**
   * The newest ~1 MiB of the serial console (boot milestones, kernel messages), for diagnosis.
   * Guest-controlled text: strip control sequences before showing it on a terminal.
   */
  async serialLog(): Promise<string> {
    return readSerialLog(this.vmPaths.serialLog);
  }

  // ------------------------------------------------------------ internals

  private get vmPaths() {
    return vmFiles(this.record.vmDir);
  }
  private get knownHostsPath(): string {
    return join(this.record.vmDir, "known_hosts");
  }

  /**
   * Boots; when the accelerator was auto-chosen as KVM and the guest dies of KVM itself, records
   * TCG as this host's verdict, says so through onProgress, and boots once more under TCG.
   */
  private async bootOrFallBack(
    image: ImageManifest,
    deadline: Deadline,
    accel: AccelVerdict,
    opts: { accel?: string; onProgress?: (p: SmolVMProgress) => void },
    t0: number,
  ): Promise<void> {
    try {
      await this.boot(image, deadline);
    } catch (e) {
      const auto = (opts.accel ?? "auto") === "auto" && !process.env.SMOLVM_ACCEL;
      const crash = e instanceof VMStateError ? (e.details?.crash as CrashReport | undefined) : undefined;
      if (!auto || accel.accel !== "kvm" || !crash?.kvm) throw e;
      const verdict = {
        accel: "tcg" as const,
        reason: `a guest crashed under KVM (${crash.cause}): using TCG`,
      };
      await recordAccelVerdict(verdict, { dataDir: this.dataDir, image }).catch(() => {});
      reportAccel(opts.onProgress, verdict, t0);
      this.update({ config: { ...this.record.config, accel: "tcg", accelReason: verdict.reason } });
      await this.boot(image, deadline);
    }
  }

  private async boot(image: ImageManifest, deadline: Deadline): Promise<void> {
    const cfg = this.record.config;
    deadline.phase = "starting QEMU";
    const accel = cfg.accel as "kvm" | "tcg";
    const spec: VmLaunchSpec = {
      ...(await this.launchBase(cfg.hostPublicKey as string)),
      kernelPath: image.kernelPath,
      initrdPath: join(this.record.vmDir, "initrd.img"),
      kernelAppend: image.kernelCmdline,
      agentSocketPath: image.capabilities.agent ? this.vmPaths.agentSocket : undefined,
      // RAM in a shared tmpfs file, so snapshot() can copy it while the vCPUs are stopped.
      memoryFile: { path: this.vmPaths.ramFile, share: true },
    };
    if (image.rootfsPath) spec.rootfsPath = await this.overlayFor(image);
    buildQemuArgv(spec); // validates before anything is spawned
    await rm(spec.serialLogPath, { force: true });
    await rm(rotatedPath(spec.serialLogPath), { force: true });
    const t0 = performance.now();
    const { launched, networkReady } = await this.launchWithPolicy(spec, deadline);
    const qemuStartMs = performance.now() - t0;
    this.update({ status: "running", pid: launched.pid, sshPort: spec.sshHostPort, ports: [] });
    await this.closeChannel();
    const kind = this.plannedChannel();
    const watch = new CrashWatch({ pid: launched.pid, files: this.vmPaths, accel }, true);
    this.qemuLogSeen = 0;
    try {
      await this.untilCrash(watch, 250, () =>
        // The policy daemon's failure ends the wait at once, with its own error.
        Promise.all([
          (async () => {
            if (kind === "ssh") {
              deadline.phase = "waiting for SSH";
              await this.ssh().waitForSsh({ timeoutMs: deadline.remaining(), signal: deadline.signal });
            } else await this.waitForAgent(kind === "auto", deadline);
            deadline.phase = "waiting for the guest network";
            await this.waitForMilestone("network-up", deadline);
          })(),
          deadline.race(networkReady),
        ]),
      );
      this.qemuLogSeen = watch.logSize;
    } catch (e) {
      if (e instanceof VMStateError && e.code === "VM_CRASHED") throw e;
      // The policy daemon failed and took QEMU down with it: its own error says why.
      if (e instanceof SmolVMError && e.code === "NETWORK_DAEMON_FAILED") throw e;
      const log = await tailFile(spec.serialLogPath, 1500);
      if (!isQemuAlive(launched.pid, this.vmPaths.marker)) {
        this.update({ status: "crashed", pid: null });
        throw new VMStateError(`VM ${this.id} stopped during boot. Serial console tail:\n${log}`, {
          code: "VM_CRASHED",
          cause: e,
        });
      }
      // The caller's own deadline or signal: its own error, naming the phase that was running.
      if (deadline.expired) throw deadline.reason;
      if (e instanceof SmolVMError) {
        throw new VMStateError(
          `VM ${this.id} did not answer on ${kind === "ssh" ? "SSH" : "its agent"} while booting (${e.message}). Serial console tail:\n${log}`,
          { cause: e, code: e.code },
        );
      }
      throw e;
    }
    deadline.phase = undefined;
    const bootToChannelMs = Math.round(performance.now() - t0);
    const ms = serialMilestones(await tailFile(this.vmPaths.serialLog, 65536));
    const ready = this.chan === this.agentChan && this.chan ? "agent" : "ssh";
    this.bootTimings = {
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
      accelReason: cfg.accelReason as string | undefined,
    };
  }

  /**
   * Waits until the guest's init logged `name` on the serial console (create() returns a VM
   * whose network is configured, not just one whose agent answers).
   */
  private async waitForMilestone(name: string, deadline: Deadline): Promise<void> {
    for (;;) {
      const log = await tailFile(this.vmPaths.serialLog, 65536);
      if (serialMilestones(log)[name] !== undefined) return;
      await sleep(10, deadline.signal);
    }
  }

  /**
   * Runs `fn` while watching the guest: if it dies (QEMU gone, or alive but in a dead run state
   * such as KVM's internal-error), QEMU is killed, the VM marked crashed, and `fn`'s wait ends
   * with VM_CRASHED at once instead of at its deadline.
   */
  private async untilCrash<T>(watch: CrashWatch, intervalMs: number, fn: () => Promise<T>): Promise<T> {
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
        await this.onCrash(first);
      }
      return await work;
    } finally {
      done.abort();
    }
  }

  private async onCrash(report: CrashReport): Promise<never> {
    const pid = this.record.pid;
    if (pid) {
      await stopQemu(
        { pid, qmpSocketPath: this.vmPaths.qmpSocket, marker: this.vmPaths.marker },
        { timeoutMs: 5_000, force: true },
      ).catch(() => {});
    }
    await this.closeChannel();
    await rm(this.vmPaths.ramFile, { force: true });
    releasePorts(this.store, this.id);
    this.update({ status: "crashed", pid: null, sshPort: null, ports: [] });
    throw this.crashedError(undefined, report);
  }

  /**
   * Waits for the guest agent; with `fallback` (auto), SSH is used when the agent does not
   * answer in time, so an image whose agent is broken still works.
   */
  private async waitForAgent(fallback: boolean, deadline: Deadline): Promise<void> {
    const agent = this.agent();
    try {
      deadline.phase = "waiting for the agent";
      const budget = deadline.remaining(fallback ? AUTO_AGENT_WAIT_MS : undefined);
      await agent.waitReady({ timeoutMs: budget, signal: deadline.signal });
      this.chan = agent;
    } catch (e) {
      // The agent's wait ran to the end of the caller's deadline, or the caller aborted: the
      // caller's own error, naming the phase.
      if (deadline.expired) throw deadline.reason;
      if (deadline.remainingMs < 50) deadline.expire();
      // An agent that fails authentication means the VM cannot be trusted: never fall back.
      if (!fallback || e instanceof AuthenticationError) throw e;
      deadline.phase = "waiting for SSH";
      await this.ssh().waitForSsh({ timeoutMs: deadline.remaining(), signal: deadline.signal });
      this.chan = new SshChannel(this.ssh());
    }
  }

  /**
   * Starts QEMU inside the VM's network policy: its cgroup and a closed nftables table first, the
   * policy daemon alongside QEMU, and resolves once both run (network/host.ts). If the daemon
   * fails, QEMU is killed: a guest never runs without its policy.
   */
  /**
   * Starts QEMU inside the VM's network policy. The policy daemon starts beside it; `networkReady`
   * settles once it serves (QEMU is killed when it cannot), so a caller overlaps that start with
   * the guest's own and awaits it before handing the VM out.
   */
  private async launchWithPolicy(
    spec: VmLaunchSpec,
    deadline: Deadline,
  ): Promise<{ launched: LaunchedQemu; networkReady: Promise<void> }> {
    const dir = this.record.vmDir;
    // A daemon left from a QEMU that just died would otherwise outlive it into this boot.
    await teardownVmNetwork(dir, this.id);
    const net = prepareVmNetwork(dir, this.id, this.network);
    const daemon = startNetworkDaemon(dir, this.id, {
      timeoutMs: deadline.remaining(30_000),
      signal: deadline.signal,
    });
    daemon.catch(() => {});
    let launched: LaunchedQemu;
    try {
      launched = await launchQemu(spec, {
        timeoutMs: deadline.remaining(30_000),
        signal: deadline.signal,
        cgroupProcs: net.cgroupProcs,
      });
    } catch (e) {
      await daemon.catch(() => {});
      await teardownVmNetwork(dir, this.id);
      throw e;
    }
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
    return { launched, networkReady };
  }

  /** Copy-on-write disk over the image's rootfs, so the image itself is never written. */
  private async overlayFor(image: ImageManifest): Promise<string> {
    const overlay = join(this.record.vmDir, "rootfs.qcow2");
    // The VM's disk: made once, kept across stop()/start(), removed with the VM.
    if (existsSync(overlay)) return overlay;
    const { exec } = await import("../image/exec.js");
    const diskMib = this.record.config.diskMib as number | undefined;
    await exec("qemu-img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-F",
      "raw",
      "-b",
      image.rootfsPath!,
      overlay,
      ...(diskMib ? [`${diskMib}M`] : []),
    ]);
    return overlay;
  }

  private ssh(): SSHClient {
    if (!this.sshClient) {
      const cfg = this.record.config;
      this.sshClient = new SSHClient({
        host: "127.0.0.1",
        port: this.record.sshPort ?? 22,
        user: "root",
        keyPath: cfg.clientKeyPath as string,
        hostKey: { policy: "strict", fingerprint: this.record.hostKeyFingerprint ?? undefined },
        connectTimeoutMs: 10_000,
        keepaliveIntervalMs: 5_000,
        keepaliveCountMax: 3,
      });
    }
    return this.sshClient;
  }

  private async channel(): Promise<CommChannel> {
    if (!this.canRunCommands()) {
      throw new CommandExecutionUnavailableError(
        `VM ${this.id} (image ${this.record.image}) has no command channel.`,
        'Create it from an image with SSH or the agent, e.g. SmolVM.create({ image: "tiny" }).',
      );
    }
    this.requireRunning("run commands");
    await rotateSerialLog(this.vmPaths.serialLog);
    await rotateSerialLog(this.vmPaths.qemuLog);
    if (this.chan) return this.chan;
    const kind = this.plannedChannel();
    if (kind === "ssh") this.chan = new SshChannel(this.ssh());
    else if (kind === "agent") this.chan = this.agent();
    else {
      // auto on a VM we did not boot ourselves: the agent if it answers now, else SSH.
      const agent = this.agent();
      try {
        await agent.waitReady({ timeoutMs: AUTO_AGENT_PROBE_MS });
        this.chan = agent;
      } catch (e) {
        if (e instanceof AuthenticationError) throw e;
        this.chan = new SshChannel(this.ssh());
      }
    }
    return this.chan;
  }

  private async closeChannel(): Promise<void> {
    this.pendingAgentSocket?.destroy();
    this.pendingAgentSocket = undefined;
    const s = this.sshClient;
    const a = this.agentChan;
    this.chan = undefined;
    this.sshClient = undefined;
    this.agentChan = undefined;
    await a?.close();
    await s?.close();
  }

  /** Which channel calls go through: explicit > persisted with the VM > auto. */
  private plannedChannel(): "ssh" | "agent" | "auto" {
    const caps = this.record.config.capabilities as { ssh: boolean; agent: boolean } | undefined;
    const choice = this.commChannel;
    if (choice === "ssh") return "ssh";
    if (isAgentChoice(choice)) {
      if (!caps?.agent) throw noAgentError(`VM ${this.id} (image ${this.record.image})`, choice);
      return "agent";
    }
    return caps?.agent ? "auto" : "ssh";
  }

  private agent(): AgentChannel {
    if (!this.agentChan) {
      const socket = this.vmPaths.agentSocket;
      const lock = this.vmPaths.agentLock;
      // Held while this channel's socket is open. The channel connects only when its previous
      // socket is dead, so a lock still held from that one is ours to drop.
      let release: (() => void) | undefined;
      const connect = async (signal: AbortSignal) => {
        release?.();
        const mine = acquireAgentLock(lock, this.name);
        release = mine;
        const drop = () => {
          mine();
          if (release === mine) release = undefined;
        };
        try {
          // A restore connects before the snapshot's devices load (see bootFromSnapshot).
          const sock = this.pendingAgentSocket ?? (await connectUnix(socket, signal));
          this.pendingAgentSocket = undefined;
          sock.once("close", drop);
          return sock;
        } catch (err) {
          drop();
          throw err;
        }
      };
      this.agentChan = new AgentChannel({
        connect,
        secret: readFileSync(this.vmPaths.agentSecret),
        name: `the agent of VM ${this.name}`,
      });
    }
    return this.agentChan;
  }

  /**
   * Runs a call on the guest while watching it: a guest that dies meanwhile ends the call with
   * VM_CRASHED within about a second, and a transport failure on a dead VM says so.
   */
  private async explain<T>(fn: () => Promise<T>): Promise<T> {
    try {
      const pid = this.record.pid;
      if (!pid) return await fn();
      const accel = this.record.config.accel === "kvm" ? "kvm" : "tcg";
      const watch = new CrashWatch({ pid, files: this.vmPaths, accel }, false, this.qemuLogSeen);
      try {
        return await this.untilCrash(watch, CALL_WATCH_INTERVAL_MS, fn);
      } finally {
        this.qemuLogSeen = watch.logSize;
      }
    } catch (e) {
      if ((e instanceof SSHConnectionError || e instanceof ConnectionLostError) && !this.pidAlive()) {
        this.update({ status: "crashed" });
        throw this.crashedError(e);
      }
      throw e;
    }
  }

  private pidAlive(): boolean {
    return this.record.pid !== null && isQemuAlive(this.record.pid, this.vmPaths.marker);
  }

  private refreshLiveness(): void {
    const fresh = this.store.get(this.id);
    if (fresh) this.record = fresh;
    if (this.record.status === "running" && !this.pidAlive()) {
      releasePorts(this.store, this.id);
      this.update({ status: "crashed", pid: null });
    }
  }

  private requireRunning(what: string): void {
    const s = this.status;
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

  private crashedError(cause?: unknown, report?: CrashReport): VMStateError {
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
      `VM ${this.id} crashed: ${what}.${kvmHint} See vm.serialLog() or ${this.vmPaths.serialLog} and ${this.vmPaths.qemuLog}; vm.start() boots it again, vm.delete() removes it.${said}${serial}`,
      { code: "VM_CRASHED", cause, details: { id: this.id, crash: report } },
    );
  }

  private deletedOrStateError(what: string): VMStateError {
    if (!this.store.get(this.id)) return this.deletedError();
    return new VMStateError(`cannot ${what} VM ${this.id}: it is ${this.record.status}.`, {
      details: { id: this.id, status: this.record.status },
    });
  }

  private deletedError(): VMStateError {
    return new VMStateError(`VM ${this.id} was deleted: create a new one with SmolVM.create().`, {
      details: { id: this.id },
    });
  }

  private update(patch: Partial<VmRecord>): void {
    if (this.deleted) return;
    this.record = this.store.update(this.id, patch);
  }
}

function validateCreateOptions(o: SmolVMCreateOptions) {
  const memoryMib = o.memoryMib ?? 512;
  const vcpus = o.vcpus ?? 1;
  if (!Number.isInteger(memoryMib) || memoryMib < 64 || memoryMib > 65536) {
    throw new ValidationError(`memoryMib must be an integer from 64 to 65536, got ${String(o.memoryMib)}.`);
  }
  if (!Number.isInteger(vcpus) || vcpus < 1 || vcpus > 64) {
    throw new ValidationError(`vcpus must be an integer from 1 to 64, got ${String(o.vcpus)}.`);
  }
  if (o.name !== undefined && !NAME_RE.test(o.name)) {
    throw new ValidationError(
      `VM name ${JSON.stringify(o.name)} is invalid: use 1-63 letters, digits, '.', '_' or '-'.`,
    );
  }
  const commChannel = o.commChannel ?? "auto";
  if (!["ssh", "agent", "vsock", "auto"].includes(commChannel)) {
    throw new ValidationError(
      `commChannel must be "ssh", "agent", "vsock" or "auto", got ${JSON.stringify(o.commChannel)}.`,
    );
  }
  if (o.env) validateEnv(o.env);
  validateTtl(o.ttlMs);
  validateLabels(o.labels);
  if (o.diskMib !== undefined && (!Number.isInteger(o.diskMib) || o.diskMib < 64 || o.diskMib > 1 << 20)) {
    throw new ValidationError(`diskMib must be an integer from 64 to 1048576, got ${String(o.diskMib)}.`);
  }
  if (o.timeoutMs !== undefined && !(o.timeoutMs > 0))
    throw new ValidationError("timeoutMs must be a positive number.");
  const network = normalizePolicy(o.network);
  return {
    network,
    image: o.image ?? "tiny",
    memoryMib,
    vcpus,
    name: o.name,
    env: o.env ?? {},
    commChannel,
    accel: o.accel,
    dataDir: o.dataDir,
    timeoutMs: o.timeoutMs ?? DEFAULT_CREATE_TIMEOUT_MS,
    template: o.template ?? true,
    signal: o.signal,
    onProgress: o.onProgress,
    ttlMs: o.ttlMs,
    labels: o.labels,
    diskMib: o.diskMib,
  } as const;
}

/**
 * "vsock" is the seed's name for the network-free agent channel: it selects the agent, with the
 * same strictness as "agent". smolvm's VMs carry it on virtio-serial, which every QEMU host has
 * (vhost-vsock is often missing, and Node has no AF_VSOCK socket).
 */
function isAgentChoice(c: CommChannelChoice | undefined): boolean {
  return c === "agent" || c === "vsock";
}

function noAgentError(subject: string, choice: CommChannelChoice): CommandExecutionUnavailableError {
  return new CommandExecutionUnavailableError(
    `${subject} has no guest agent, but commChannel "${choice}" was asked for.`,
    'Use commChannel "ssh" or "auto", or rebuild the image with the agent (smolvm image build --force).',
  );
}

function lastLines(text: string, n: number): string {
  return text.trim().split("\n").slice(-n).join("\n");
}

function reportAccel(
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

/** The per-VM archive appended to the image's initramfs: identity and settings for /init. */
function vmConfigCpio(c: {
  hostKeyPem: string | Buffer;
  clientPublicKey: string;
  agentSecret: Buffer;
  env: Record<string, string>;
  hostname: string;
  diskMib?: number;
}): Buffer {
  return buildVmConfigCpio([
    { path: "smolvm/config/ssh_host_ed25519_key", mode: 0o600, data: c.hostKeyPem },
    { path: "smolvm/config/authorized_keys", mode: 0o600, data: `${c.clientPublicKey}\n` },
    { path: "smolvm/config/agent_secret", mode: 0o600, data: c.agentSecret },
    { path: "smolvm/config/env", mode: 0o600, data: renderEnvFile(c.env) },
    { path: "smolvm/config/hostname", mode: 0o644, data: `${c.hostname}\n` },
    ...(c.diskMib !== undefined
      ? [{ path: "smolvm/config/disk_mib", mode: 0o644, data: `${c.diskMib}\n` }]
      : []),
  ]);
}

function safeHostname(name: string): string {
  return name.replace(/[^A-Za-z0-9-]/g, "-").slice(0, 63) || "smolvm";
}

function checkPort(what: string, p: number): void {
  if (!Number.isInteger(p) || p < 1 || p > 65535)
    throw new ValidationError(`${what} must be an integer 1..65535, got ${String(p)}.`);
}
