/**
 * SmolVM: a disposable microVM with a command channel. This class is the facade: it holds one
 * VmRuntime (runtime.ts: the record, store and channels of this handle) and delegates to the
 * modules behind it: create.ts (create, fromSnapshot, fork), provision.ts (identity, initramfs,
 * launch spec), boot.ts (launch and readiness), channel-selector.ts (agent or SSH), guard.ts
 * (crash-watched calls), lifecycle.ts (start/stop/delete/pause/resume/TTL), forwards.ts (ports,
 * SSH commands) and vm-snapshots.ts. State lives in the store, so `fromId` works from any process.
 */
import type { CommandStream, CommChannel } from "../channel/types.js";
import { type RunEncoding, type RunOptions, type RunResult, validateEnv } from "../command.js";
import { Deadline } from "../common/deadline.js";
import { dataDir as defaultDataDir } from "../common/paths.js";
import { ValidationError, VMNotFoundError } from "../errors.js";
import { createVm, forkVm, restoreSnapshot } from "./create.js";
import { type DoctorOptions, type DoctorReport, doctor } from "./doctor.js";
import { type ChannelAccess, VmFiles } from "./files.js";
import { exposeLocal, sshCommands, unexposeLocal } from "./forwards.js";
import { explain } from "./guard.js";
import { deleteVm, disposeVm, pauseVm, resumeVm, setTtl, startVm, stopVm } from "./lifecycle.js";
import { readNetworkLog, sendPolicy } from "./network/host.js";
import { type NetworkLogEntry, type NetworkPolicy, normalizePolicy } from "./network/policy.js";
import { type PoolCreateOptions, type SmolVMPoolOptions, VmPool } from "./pool.js";
import { VmProcesses } from "./processes.js";
import { type PruneResult, pruneDataDir } from "./prune.js";
import { VmPty } from "./pty.js";
import { VmRuntime } from "./runtime.js";
import { readSerialLog, waitForMilestone } from "./serial-log.js";
import { publicInfo, type SnapshotInfo, validateSnapshotName } from "./snapshot.js";
import { type VmRecord, VmStore } from "./store.js";
import { validateLabels } from "./ttl.js";
import { captureSnapshot, deleteSnapshot, listSnapshots } from "./vm-snapshots.js";
import type {
  BootTimings,
  BoundedOptions,
  FromIdOptions,
  FromSnapshotOptions,
  ListOptions,
  SmolVMCreateOptions,
  SshCommands,
  VmStatus,
} from "./vm-types.js";

export type { PoolCreateOptions, SmolVMPoolOptions } from "./pool.js";
export type { RestoredFrom, VmConfig } from "./vm-config.js";
export type {
  AccelProgress,
  BootTimings,
  BoundedOptions,
  CommChannelChoice,
  FromIdOptions,
  FromSnapshotOptions,
  ListOptions,
  SmolVMCreateOptions,
  SmolVMProgress,
  SshCommands,
  VmStatus,
} from "./vm-types.js";
export type { VmRecord };

export class SmolVM implements AsyncDisposable {
  private readonly rt: VmRuntime;
  private filesApi: VmFiles | undefined;
  private processesApi: VmProcesses | undefined;
  private ptyApi: VmPty | undefined;

  private constructor(rt: VmRuntime) {
    this.rt = rt;
  }

  // ------------------------------------------------------------ making and finding VMs

  /**
   * Creates and boots a VM (from its image's template when there is one, see
   * SmolVMCreateOptions.template). The returned handle owns the VM: disposing it deletes the VM.
   */
  static async create(options: SmolVMCreateOptions = {}): Promise<SmolVM> {
    return new SmolVM(await createVm(options));
  }

  /**
   * A pool of warm VMs: restored from the image's template ahead of need (the template is built
   * first when there is none) and already past the guest's first-run costs, so pool.create()
   * hands one out, with its own identity, in tens of milliseconds. Resolves once the pool is
   * full. Close it (or `await using`) to delete the VMs it still holds.
   */
  static async pool(options: SmolVMPoolOptions = {}): Promise<SmolVMPool> {
    return new SmolVMPool(await VmPool.open(options), (rt) => new SmolVM(rt));
  }

  /**
   * Re-attaches to a VM created by any process (by id or name). The handle borrows the VM by
   * default (dispose only closes it); `{ owned: true }` makes dispose delete it.
   */
  static async fromId(idOrName: string, options: FromIdOptions = {}): Promise<SmolVM> {
    const base = options.dataDir ?? defaultDataDir();
    const store = VmStore.open(base);
    try {
      store.reconcile();
      const record = store.get(idOrName);
      if (!record) {
        throw new VMNotFoundError(
          `no VM named or with id ${JSON.stringify(idOrName)}: see SmolVM.list() or \`smolvm list\`.`,
          { details: { id: idOrName } },
        );
      }
      return new SmolVM(new VmRuntime(store, record, base, options.owned ?? false, options.commChannel));
    } catch (e) {
      store.close();
      throw e;
    }
  }

  /**
   * A new VM from a snapshot (by id or name): the snapshot's memory, processes and disk, with its
   * own identity (agent secret, SSH host key, hostname, RNG, clock, env) before it is returned.
   * The handle owns the VM.
   */
  static async fromSnapshot(idOrName: string, options: FromSnapshotOptions = {}): Promise<SmolVM> {
    return new SmolVM(await restoreSnapshot(idOrName, options));
  }

  /** The VMs of a data dir (their records), optionally filtered by labels and status. */
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

  /** Every snapshot in the data dir, oldest first. */
  static async listSnapshots(options: { dataDir?: string } = {}): Promise<SnapshotInfo[]> {
    return listSnapshots(options.dataDir ?? defaultDataDir());
  }

  /** Removes a snapshot; refused while a VM restored from it still needs its files. */
  static async deleteSnapshot(idOrName: string, options: { dataDir?: string } = {}): Promise<void> {
    return deleteSnapshot(options.dataDir ?? defaultDataDir(), idOrName);
  }

  // ------------------------------------------------------------ identity and state

  get id(): string {
    return this.rt.id;
  }
  get name(): string {
    return this.rt.name;
  }
  get sshPort(): number | null {
    return this.rt.record.sshPort;
  }
  /** Labels given at create(). */
  get labels(): Record<string, string> {
    return { ...this.rt.record.labels };
  }
  /** How create() (or fromSnapshot/fork) brought the VM up; undefined on handles from fromId(). */
  get bootTimings(): BootTimings | undefined {
    return this.rt.bootTimings;
  }
  /**
   * True when this handle owns the VM: disposing it (`await using`, `[Symbol.asyncDispose]()`)
   * deletes the VM. VMs from create(), fromSnapshot() and fork() are owned; handles from fromId()
   * borrow (dispose only closes them) unless `{ owned: true }` was given.
   */
  get owned(): boolean {
    return this.rt.owned;
  }

  /**
   * "running", "paused", "stopped", "crashed" (QEMU died without being asked to), "creating" or
   * "deleted". Reading it is live, not a cached field: the same as refreshStatus().
   */
  get status(): VmStatus {
    return this.rt.refreshStatus();
  }

  /**
   * The VM's status now. It re-reads the shared store (another process may have stopped or
   * restarted the VM), and when that says running but the VM's QEMU is gone (checked in /proc),
   * records the VM as crashed and frees its ports. `vm.status` does the same.
   */
  refreshStatus(): VmStatus {
    return this.rt.refreshStatus();
  }

  /** When the VM will be deleted (its TTL), or null. Re-reads the store. */
  get expiresAt(): Date | null {
    this.rt.reload();
    const at = this.rt.record.expiresAt;
    return at === null ? null : new Date(at);
  }

  /**
   * Sets the VM's lifetime to `ms` from now (null clears it). A detached reaper deletes the VM
   * once it expires, whichever process created it and whether or not that process still runs.
   */
  async setTtl(ms: number | null): Promise<void> {
    await setTtl(this.rt, ms);
  }

  // ------------------------------------------------------------ lifecycle

  /** Boots a stopped VM again with the same identity (tiny's RAM filesystem starts fresh). */
  async start(options: BoundedOptions = {}): Promise<void> {
    await startVm(this.rt, options);
  }

  /** Powers the VM off (ACPI, then quit, then SIGKILL, bounded) and frees its ports. */
  async stop(options: BoundedOptions = {}): Promise<void> {
    await stopVm(this.rt, options);
  }

  /** Stops the VM and removes every trace of it (record, directory, port leases). */
  async delete(options: BoundedOptions = {}): Promise<void> {
    await deleteVm(this.rt, options);
  }

  /** Freezes the guest: no guest code runs (its clock does not advance its processes) until resume(). */
  async pause(options: BoundedOptions = {}): Promise<void> {
    await pauseVm(this.rt, options);
  }

  /** Continues a paused guest. */
  async resume(options: BoundedOptions = {}): Promise<void> {
    await resumeVm(this.rt, options);
  }

  /** Closes this object's connections; the VM keeps running (see delete()). */
  async close(): Promise<void> {
    await this.rt.channels.close();
  }

  /** Owned handles (see `owned`) delete the VM on dispose; borrowed ones are only closed. */
  async [Symbol.asyncDispose](): Promise<void> {
    await disposeVm(this.rt);
  }

  // ------------------------------------------------------------ snapshots and fork

  /**
   * Captures the running VM (memory, devices, running processes, and debian's disk) under
   * `<dataDir>/snapshots/<id>/`. The guest is paused for the capture (a few hundred ms at most
   * for tiny) and continues unaffected. Restore with SmolVM.fromSnapshot(id or name).
   */
  async snapshot(
    options: { name?: string; timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<SnapshotInfo> {
    if (options.name !== undefined) validateSnapshotName(options.name);
    return publicInfo(await captureSnapshot(this.rt, options, false));
  }

  /**
   * `count` new VMs, each a copy of this one as it is now (files, processes, memory) with its
   * own identity; this VM keeps running. The snapshot behind them is removed with the last one.
   * Each returned handle owns its VM.
   */
  async fork(options: { count?: number; timeoutMs?: number; signal?: AbortSignal } = {}): Promise<SmolVM[]> {
    return (await forkVm(this.rt, options)).map((rt) => new SmolVM(rt));
  }

  // ------------------------------------------------------------ commands, files, env

  /**
   * Runs a shell command in the guest (login shell unless `shell: "raw"`) and collects its output.
   * A non-zero exit is a result, not an error; `timeoutMs` (default 30 s) kills it and raises
   * OperationTimeoutError with the partial output.
   */
  async run<E extends RunEncoding = undefined>(
    command: string,
    options?: RunOptions & { encoding?: E },
  ): Promise<RunResult<E>> {
    const ch = await this.channel();
    return explain(this.rt, () => ch.run(command, options));
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

  /** Copies a local file into the guest (`mode` default 0644). */
  async uploadFile(
    localPath: string,
    guestPath: string,
    options: { mode?: number; timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<void> {
    const ch = await this.channel();
    await explain(this.rt, () => ch.putFile(localPath, guestPath, options));
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
    await explain(this.rt, () => ch.getFile(guestPath, localPath, options));
  }

  /** Sets env vars for later commands (persisted in the guest's env file). */
  async setEnvVars(vars: Record<string, string>, options: BoundedOptions = {}): Promise<void> {
    validateEnv(vars);
    const ch = await this.channel();
    await explain(this.rt, () => ch.setEnv(vars, options));
  }

  /** Removes env vars set by create({ env }) or setEnvVars(). */
  async unsetEnvVars(names: string[], options: BoundedOptions = {}): Promise<void> {
    const ch = await this.channel();
    await explain(this.rt, () => ch.unsetEnv(names, options));
  }

  /** The env vars set by create({ env }) and setEnvVars(). */
  async listEnvVars(options: BoundedOptions = {}): Promise<Record<string, string>> {
    const ch = await this.channel();
    return explain(this.rt, () => ch.listEnv(options));
  }

  /** True when the image has a command channel (SSH or the agent). */
  canRunCommands(): boolean {
    return this.rt.channels.canRunCommands();
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
    return exposeLocal(this.rt, guestPort, hostPort, options);
  }

  /** Removes a forward made by exposeLocal() and frees its host port. */
  async unexposeLocal(hostPort: number, options: { timeoutMs?: number } = {}): Promise<void> {
    await unexposeLocal(this.rt, hostPort, options);
  }

  /** The network policy in force (see SmolVMCreateOptions.network). Re-reads the store. */
  get network(): NetworkPolicy {
    this.rt.reload();
    return this.rt.config.network ?? "public";
  }

  /**
   * Changes the network policy of a running VM live (no reboot): new connections and DNS
   * questions are decided under it at once. On a stopped VM it applies from the next start.
   */
  async setNetwork(policy: NetworkPolicy, options: BoundedOptions = {}): Promise<void> {
    const p = normalizePolicy(policy);
    const rt = this.rt;
    if (rt.deleted) throw rt.deletedError();
    if (rt.refreshStatus() === "running") {
      await sendPolicy(rt.record.vmDir, rt.id, p, {
        timeoutMs: options.timeoutMs ?? 5_000,
        signal: options.signal,
      });
    }
    rt.update({ config: { ...rt.config, network: p } });
  }

  /** The most recent network decisions (DNS and TCP), oldest first. Default limit 100. */
  async networkLog(options: { limit?: number } = {}): Promise<NetworkLogEntry[]> {
    const limit = options.limit ?? 100;
    if (!Number.isInteger(limit) || limit < 1)
      throw new ValidationError(`limit must be a positive integer, got ${String(limit)}.`);
    return readNetworkLog(this.rt.record.vmDir, limit);
  }

  /** The address the host reaches the guest's forwarded ports on (user-mode networking). */
  getIp(): string {
    return "127.0.0.1";
  }

  /** Ready-to-paste commands for OpenSSH tools, with the VM's host key pinned. */
  sshCommands(options: { user?: string; keyPath?: string } = {}): SshCommands {
    return sshCommands(this.rt, options);
  }

  /** Waits until the guest's sshd accepts this VM's pinned host key and client key. */
  async waitForSsh(options: BoundedOptions = {}): Promise<void> {
    const rt = this.rt;
    rt.requireRunning("wait for SSH");
    const { lastBoot, restoredFrom, capabilities } = rt.config;
    const restored = lastBoot === "restore" || (lastBoot === undefined && restoredFrom);
    if (restored && capabilities?.sshHostKeyPerConnection !== true) {
      // A restored VM's sshd restarts with the VM's own host key shortly after it is up (an
      // sshd that reads the key per connection needs no restart: see becomeItself).
      const deadline = new Deadline(options.timeoutMs ?? 60_000, options.signal, "waiting for SSH");
      try {
        deadline.phase = "waiting for sshd with the VM's own host key";
        await waitForMilestone(rt.paths.serialLog, "sshd-rekeyed", deadline);
      } finally {
        deadline.dispose();
      }
    }
    await explain(rt, () =>
      rt.channels.ssh().waitForSsh({ timeoutMs: options.timeoutMs ?? 60_000, signal: options.signal }),
    );
  }

  /**
   * The newest ~1 MiB of the serial console (boot milestones, kernel messages), for diagnosis.
   * Guest-controlled text: strip control sequences before showing it on a terminal.
   */
  async serialLog(): Promise<string> {
    return readSerialLog(this.rt.paths.serialLog);
  }

  // ------------------------------------------------------------ internals

  private channel(): Promise<CommChannel> {
    return this.rt.channels.channel();
  }

  private channelAccess(): ChannelAccess {
    return { channel: () => this.channel(), explain: (fn) => explain(this.rt, fn), name: this.name };
  }
}

/** Warm VMs of one image and size, handed out by create() (see SmolVM.pool()). */
export class SmolVMPool implements AsyncDisposable {
  /** @internal */
  constructor(
    private readonly pool: VmPool,
    private readonly wrap: (rt: VmRuntime) => SmolVM,
  ) {}

  /** The pool's id: its standbys carry it in their `smolvm.pool` label. */
  get id(): string {
    return this.pool.id;
  }

  /** How many warm VMs the pool keeps. */
  get size(): number {
    return this.pool.size;
  }

  /** Warm VMs ready to hand out right now. */
  get warm(): number {
    return this.pool.warm;
  }

  /**
   * A VM of the pool, made the caller's (name, labels, TTL, env, and its own agent secret, host
   * key, hostname, RNG and clock) before it is returned; the handle owns it like create()'s.
   * With no warm VM ready it waits for the one being warmed, else restores the template on the
   * spot. The pool refills in the background.
   */
  async create(options: PoolCreateOptions = {}): Promise<SmolVM> {
    return this.wrap(await this.pool.take(options));
  }

  /** Deletes the warm VMs the pool still holds and stops refilling; VMs handed out stay. */
  close(): Promise<void> {
    return this.pool.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
