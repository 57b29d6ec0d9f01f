/**
 * Which channel a VM's calls go through (the guest agent or SSH) and the connections behind it.
 * The choice: explicit (create/fromId `commChannel`) > persisted with the VM > auto (the agent
 * when the image has one and it answers, else SSH). The agent socket is held under a per-VM lock
 * (agent-lock.ts) while this handle's channel has it open.
 */
import { readFileSync } from "node:fs";
import type { Duplex } from "node:stream";
import { AgentChannel } from "../channel/agent-channel.js";
import { connectUnix } from "../channel/agent-transport.js";
import { SshChannel } from "../channel/ssh-channel.js";
import type { CommChannel } from "../channel/types.js";
import type { Deadline } from "../common/deadline.js";
import { AuthenticationError, CommandExecutionUnavailableError } from "../errors.js";
import { SSHClient } from "../ssh/client.js";
import { acquireAgentLock } from "./agent-lock.js";
import { rotateSerialLog } from "./serial-log.js";
import type { VmRecord, vmFiles } from "./store.js";
import type { VmConfig } from "./vm-config.js";
import type { CommChannelChoice } from "./vm-types.js";

/** What the selector needs of its VM (VmRuntime provides it; kept narrow so neither imports the other). */
export interface ChannelHost {
  readonly id: string;
  readonly name: string;
  readonly record: VmRecord;
  readonly config: VmConfig;
  readonly paths: ReturnType<typeof vmFiles>;
  requireRunning(action: string): void;
}

/** auto: how long boot waits for the agent before settling for SSH. */
const AUTO_AGENT_WAIT_MS = 60_000;
/** auto on re-attach: how long the agent gets to answer before SSH is used. */
const AUTO_AGENT_PROBE_MS = 2_000;
const CHOICES: readonly CommChannelChoice[] = ["ssh", "agent", "vsock", "auto"];

/** A channel choice as given or stored (the store keeps null for auto); undefined if unknown. */
export function parseChannelChoice(value: unknown): CommChannelChoice | undefined {
  return CHOICES.find((c) => c === value);
}

/**
 * "vsock" is the seed's name for the network-free agent channel: it selects the agent, with the
 * same strictness as "agent". smolvm's VMs carry it on virtio-serial, which every QEMU host has
 * (vhost-vsock is often missing, and Node has no AF_VSOCK socket).
 */
export function isAgentChoice(c: CommChannelChoice | undefined): boolean {
  return c === "agent" || c === "vsock";
}

export function noAgentError(subject: string, choice: CommChannelChoice): CommandExecutionUnavailableError {
  return new CommandExecutionUnavailableError(
    `${subject} has no guest agent, but commChannel "${choice}" was asked for.`,
    'Use commChannel "ssh" or "auto", or rebuild the image with the agent (smolvm image build --force).',
  );
}

export class ChannelSelector {
  /** The channel calls go through, once chosen. */
  current: CommChannel | undefined;
  /** An agent socket opened ahead of the channel (restores connect before devices load). */
  pendingAgentSocket: Duplex | undefined;
  readonly choice: CommChannelChoice;
  private sshClient: SSHClient | undefined;
  private agentChan: AgentChannel | undefined;

  constructor(
    private readonly rt: ChannelHost,
    choice?: CommChannelChoice,
  ) {
    this.choice = choice ?? parseChannelChoice(rt.record.channel) ?? "auto";
  }

  /** Whether the chosen channel is the agent (for BootTimings.channel). */
  get onAgent(): boolean {
    return this.current !== undefined && this.current === this.agentChan;
  }

  /** True when the image has a command channel (SSH or the agent). */
  canRunCommands(): boolean {
    const caps = this.rt.config.capabilities;
    return Boolean(caps?.ssh || caps?.agent);
  }

  /** Which channel calls go through: explicit > persisted with the VM > auto. */
  planned(): "ssh" | "agent" | "auto" {
    const caps = this.rt.config.capabilities;
    if (this.choice === "ssh") return "ssh";
    if (isAgentChoice(this.choice)) {
      if (!caps?.agent) throw noAgentError(`VM ${this.rt.id} (image ${this.rt.record.image})`, this.choice);
      return "agent";
    }
    return caps?.agent ? "auto" : "ssh";
  }

  /** The channel for a call on a running VM, chosen (and connected lazily) on first use. */
  async channel(): Promise<CommChannel> {
    const rt = this.rt;
    if (!this.canRunCommands()) {
      throw new CommandExecutionUnavailableError(
        `VM ${rt.id} (image ${rt.record.image}) has no command channel.`,
        'Create it from an image with SSH or the agent, e.g. SmolVM.create({ image: "tiny" }).',
      );
    }
    rt.requireRunning("run commands");
    await rotateSerialLog(rt.paths.serialLog);
    await rotateSerialLog(rt.paths.qemuLog);
    if (this.current) return this.current;
    const kind = this.planned();
    if (kind === "ssh") this.current = new SshChannel(this.ssh());
    else if (kind === "agent") this.current = this.agent();
    else {
      // auto on a VM we did not boot ourselves: the agent if it answers now, else SSH.
      const agent = this.agent();
      try {
        await agent.waitReady({ timeoutMs: AUTO_AGENT_PROBE_MS });
        this.current = agent;
      } catch (e) {
        if (e instanceof AuthenticationError) throw e;
        this.current = new SshChannel(this.ssh());
      }
    }
    return this.current;
  }

  /**
   * Waits for the guest agent; with `fallback` (auto), SSH is used when the agent does not
   * answer in time, so an image whose agent is broken still works.
   */
  async waitForAgent(fallback: boolean, deadline: Deadline): Promise<void> {
    const agent = this.agent();
    try {
      deadline.phase = "waiting for the agent";
      const budget = deadline.remaining(fallback ? AUTO_AGENT_WAIT_MS : undefined);
      await agent.waitReady({ timeoutMs: budget, signal: deadline.signal });
      this.current = agent;
    } catch (e) {
      // The agent's wait ran to the end of the caller's deadline, or the caller aborted: the
      // caller's own error, naming the phase.
      if (deadline.expired) throw deadline.reason;
      if (deadline.remainingMs < 50) deadline.expire();
      // An agent that fails authentication means the VM cannot be trusted: never fall back.
      if (!fallback || e instanceof AuthenticationError) throw e;
      deadline.phase = "waiting for SSH";
      await this.ssh().waitForSsh({ timeoutMs: deadline.remaining(), signal: deadline.signal });
      this.current = new SshChannel(this.ssh());
    }
  }

  /** The SSH client of this handle (lazy; pinned to the VM's host key). */
  ssh(): SSHClient {
    if (!this.sshClient) {
      const r = this.rt.record;
      this.sshClient = new SSHClient({
        host: "127.0.0.1",
        port: r.sshPort ?? 22,
        user: "root",
        keyPath: r.config.clientKeyPath,
        hostKey: { policy: "strict", fingerprint: r.hostKeyFingerprint ?? undefined },
        connectTimeoutMs: 10_000,
        keepaliveIntervalMs: 5_000,
        keepaliveCountMax: 3,
      });
    }
    return this.sshClient;
  }

  /** The agent channel of this handle (lazy; connects under the VM's agent lock). */
  agent(): AgentChannel {
    if (!this.agentChan) {
      const { agentSocket: socket, agentLock: lock, agentSecret } = this.rt.paths;
      // Held while this channel's socket is open. The channel connects only when its previous
      // socket is dead, so a lock still held from that one is ours to drop.
      let release: (() => void) | undefined;
      const connect = async (signal: AbortSignal) => {
        release?.();
        const mine = acquireAgentLock(lock, this.rt.name);
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
        secret: readFileSync(agentSecret),
        name: `the agent of VM ${this.rt.name}`,
      });
    }
    return this.agentChan;
  }

  /** Closes this handle's connections (the VM keeps running). */
  async close(): Promise<void> {
    this.pendingAgentSocket?.destroy();
    this.pendingAgentSocket = undefined;
    const s = this.sshClient;
    const a = this.agentChan;
    this.current = undefined;
    this.sshClient = undefined;
    this.agentChan = undefined;
    await a?.close();
    await s?.close();
  }
}
