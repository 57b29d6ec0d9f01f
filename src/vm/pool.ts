/**
 * Warm pools (SmolVM.pool()): VMs restored from their image's template ahead of need, warmed,
 * and handed out by create() in tens of milliseconds.
 *
 * Why warm, not just restored: under TCG a new QEMU translates every guest code path the first
 * time it runs it, so a fresh restore spends well over 100 ms of CPU (the agent handshake, the
 * identity, the first exec) before its first command answers. A standby has paid that already:
 * it ran a few `true` commands with the template's identity and nothing else. create() then
 * gives it its own identity exactly as a template restore does (new agent secret, host key,
 * hostname, entropy and RNG reseed, clock, env) before the caller's first command.
 *
 * Standbys are ordinary VM records labelled `smolvm.pool=<pool id>`, each with a short TTL the
 * pool renews while it is open: if the process dies without close(), the data dir's reaper
 * removes them within STANDBY_TTL_MS. A normal exit kills their QEMU at once.
 */
import { randomBytes } from "node:crypto";
import { validateEnv } from "../command.js";
import { Deadline } from "../common/deadline.js";
import { ValidationError, VMStateError } from "../errors.js";
import { createVm } from "./create.js";
import { deleteVm, setTtl } from "./lifecycle.js";
import { becomeItself, validateVmName } from "./provision.js";
import type { VmRuntime } from "./runtime.js";
import { validateLabels, validateTtl } from "./ttl.js";
import type { SmolVMCreateOptions } from "./vm-types.js";

/** Options of SmolVM.pool(): the pool's size, and what every VM of it is made of. */
export interface SmolVMPoolOptions
  extends Pick<
    SmolVMCreateOptions,
    | "image"
    | "memoryMib"
    | "vcpus"
    | "diskMib"
    | "commChannel"
    | "network"
    | "accel"
    | "dataDir"
    | "onProgress"
  > {
  /** Warm VMs kept ready (1-16). Default 1. */
  size?: number;
  /** Bound on SmolVM.pool(): building the template when there is none, and filling the pool. Default 180 000. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** Options of pool.create(): what makes the VM the caller's. */
export interface PoolCreateOptions {
  name?: string;
  /** Env vars present from the first command on. */
  env?: Record<string, string>;
  labels?: Record<string, string>;
  /** Delete the VM this long after create() returns. */
  ttlMs?: number;
  /** Default 60 000: spent on a restore on the spot when no warm VM is ready. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** The label every standby carries (its value is the pool's id). */
export const POOL_LABEL = "smolvm.pool";
/** A standby outlives a dead pool process by at most this long (the reaper removes it). */
const STANDBY_TTL_MS = 5 * 60_000;
const RENEW_MS = 60_000;
/** A refill starts this long after a take, so it does not compete with the taker's first commands. */
const REFILL_DELAY_MS = 250;
const REFILL_TIMEOUT_MS = 120_000;
/** Commands a standby runs before it counts as warm: the first pays the translation, the next few its tail. */
const WARM_RUNS = 3;

/** The runtime-level pool behind SmolVMPool (smolvm.ts). */
export class VmPool {
  readonly id = `pool-${randomBytes(4).toString("hex")}`;
  readonly size: number;
  /** Why the last refill failed, when it did (create() then restores on the spot). */
  lastError: unknown;
  private readonly ready: VmRuntime[] = [];
  private filling: Promise<void> | undefined;
  private refillTimer: NodeJS.Timeout | undefined;
  private readonly renewTimer: NodeJS.Timeout;
  private readonly abort = new AbortController();
  private closing: Promise<void> | undefined;

  private constructor(private readonly options: SmolVMPoolOptions) {
    const size = options.size ?? 1;
    if (!Number.isInteger(size) || size < 1 || size > 16) {
      throw new ValidationError(`pool size must be an integer from 1 to 16, got ${String(options.size)}.`);
    }
    this.size = size;
    this.renewTimer = setInterval(() => void this.renew(), RENEW_MS);
    this.renewTimer.unref();
    openPools.add(this);
    if (openPools.size === 1) process.on("exit", killStandbys);
  }

  /** Builds the template when missing and fills the pool; resolves once it is full. */
  static async open(options: SmolVMPoolOptions): Promise<VmPool> {
    const pool = new VmPool(options);
    const deadline = new Deadline(options.timeoutMs ?? 180_000, options.signal, "filling the VM pool");
    try {
      await pool.fill(deadline);
      return pool;
    } catch (e) {
      await pool.close();
      throw e;
    } finally {
      deadline.dispose();
    }
  }

  /** Warm VMs ready to hand out now. */
  get warm(): number {
    return this.ready.length;
  }

  /**
   * A VM of the pool made the caller's: a warm standby given its own identity, or, when none is
   * ready (and none is being warmed), a template restore on the spot. The pool refills behind it.
   */
  async take(o: PoolCreateOptions = {}): Promise<VmRuntime> {
    if (this.closing) throw new VMStateError(`VM pool ${this.id} is closed.`, { code: "POOL_CLOSED" });
    validateVmName(o.name);
    if (o.env) validateEnv(o.env);
    validateLabels(o.labels);
    validateTtl(o.ttlMs);
    const t0 = performance.now();
    const deadline = new Deadline(o.timeoutMs ?? 60_000, o.signal, `creating a VM from pool ${this.id}`);
    try {
      let rt = this.ready.shift();
      // A standby being warmed is nearer than a restore started now (a failed one: see below).
      while (!rt && this.filling) {
        await deadline.race(this.filling.catch(() => {}));
        rt = this.ready.shift();
      }
      this.scheduleRefill();
      if (!rt) {
        return await createVm({
          ...this.createOptions(),
          name: o.name,
          env: o.env,
          labels: o.labels,
          ttlMs: o.ttlMs,
          timeoutMs: deadline.remaining(),
          signal: deadline.signal,
        });
      }
      try {
        await adopt(rt, o, deadline);
      } catch (e) {
        await deleteVm(rt).catch(() => {});
        throw e;
      }
      if (rt.bootTimings) {
        rt.bootTimings = {
          ...rt.bootTimings,
          channel: rt.channels.onAgent ? "agent" : "ssh",
          pooled: true,
          totalMs: Math.round(performance.now() - t0),
        };
      }
      return rt;
    } finally {
      deadline.dispose();
    }
  }

  /** Stops refilling and deletes the standbys (VMs handed out are the caller's). Idempotent. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      this.abort.abort(new VMStateError(`VM pool ${this.id} is closed.`, { code: "POOL_CLOSED" }));
      clearTimeout(this.refillTimer);
      clearInterval(this.renewTimer);
      await this.filling?.catch(() => {});
      const standbys = this.ready.splice(0);
      await Promise.all(standbys.map((rt) => deleteVm(rt).catch(() => {})));
      openPools.delete(this);
      if (openPools.size === 0) process.off("exit", killStandbys);
    })();
    return this.closing;
  }

  private createOptions(): SmolVMCreateOptions {
    const { size: _s, timeoutMs: _t, signal: _g, ...rest } = this.options;
    return { ...rest, template: true };
  }

  private async fill(deadline: Deadline): Promise<void> {
    while (!this.closing && this.ready.length < this.size) {
      const p = this.addStandby(deadline);
      this.filling = p;
      try {
        await p;
      } finally {
        if (this.filling === p) this.filling = undefined;
      }
    }
  }

  /** One standby: restored without its identity, then warmed. */
  private async addStandby(deadline: Deadline): Promise<void> {
    const signal = AbortSignal.any([deadline.signal, this.abort.signal]);
    const o: SmolVMCreateOptions = {
      ...this.createOptions(),
      labels: { [POOL_LABEL]: this.id },
      ttlMs: STANDBY_TTL_MS,
      timeoutMs: deadline.remaining(),
      signal,
    };
    let rt: VmRuntime;
    try {
      rt = await createVm(o, true);
    } catch (e) {
      if (!(e instanceof VMStateError && e.code === "POOL_TEMPLATE_MISSING")) throw e;
      // The first create of this image and size leaves the template; that VM is not needed.
      await deleteVm(await createVm({ ...o, ttlMs: undefined }));
      rt = await createVm({ ...o, timeoutMs: deadline.remaining() }, true);
    }
    try {
      const agent = rt.channels.agent();
      for (let i = 0; i < WARM_RUNS; i++) {
        const r = await agent.run("true", { timeoutMs: deadline.remaining(10_000), signal });
        if (r.exitCode !== 0) throw new VMStateError(`warming standby ${rt.id}: true exited ${r.exitCode}.`);
      }
    } catch (e) {
      await deleteVm(rt).catch(() => {});
      throw e;
    }
    if (this.closing) await deleteVm(rt).catch(() => {});
    else this.ready.push(rt);
  }

  private scheduleRefill(): void {
    if (this.closing || this.refillTimer) return;
    this.refillTimer = setTimeout(() => {
      this.refillTimer = undefined;
      if (this.closing || this.filling) return;
      const d = new Deadline(REFILL_TIMEOUT_MS, this.abort.signal, `refilling VM pool ${this.id}`);
      this.fill(d)
        .catch((e) => {
          this.lastError = e;
        })
        .finally(() => d.dispose());
    }, REFILL_DELAY_MS);
    this.refillTimer.unref();
  }

  /** Pushes the standbys' TTL out while the pool is open. */
  private async renew(): Promise<void> {
    for (const rt of this.ready) await setTtl(rt, STANDBY_TTL_MS).catch(() => {});
  }

  /** The standbys' QEMU pids (for the exit hook). */
  standbyPids(): number[] {
    return this.ready.flatMap((rt) => (rt.record.pid ? [rt.record.pid] : []));
  }
}

const openPools = new Set<VmPool>();

/**
 * On a normal exit without close(): the standbys' QEMU is killed at once (an exit hook cannot
 * wait); their records and files go with the reaper's next pass, as their TTL ends.
 */
function killStandbys(): void {
  for (const pool of openPools) {
    for (const pid of pool.standbyPids()) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // already gone
      }
    }
  }
}

/** A standby becomes the caller's VM: its name, labels, TTL, and its own identity and env. */
async function adopt(rt: VmRuntime, o: PoolCreateOptions, deadline: Deadline): Promise<void> {
  const identity = rt.pendingIdentity;
  if (!identity) throw new VMStateError(`VM ${rt.id} is not a pool standby.`);
  rt.update({
    name: o.name ?? rt.id,
    labels: o.labels ?? {},
    config: { ...rt.config, creatorPid: process.pid },
  });
  deadline.phase = "giving the VM its own identity";
  await becomeItself(rt, deadline, { ...identity, env: o.env ?? {} });
  rt.pendingIdentity = undefined;
  await setTtl(rt, o.ttlMs ?? null);
}
