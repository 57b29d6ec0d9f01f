/**
 * The public shapes of the SmolVM facade: option bags, progress and timing reports. Kept apart
 * from the facade so the modules behind it (provision, boot, lifecycle ...) share them without
 * importing the facade itself.
 */
import type { ImageBuildProgress, ImageName } from "../image/index.js";
import type { NetworkPolicy } from "./network/policy.js";
import type { VmStatus as StoredStatus } from "./store.js";

export type CommChannelChoice = "ssh" | "agent" | "vsock" | "auto";
export type VmStatus = StoredStatus | "deleted";

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
  /**
   * Whether this handle owns the VM: an owned VM is deleted when the handle is disposed
   * (`await using`), a borrowed one is only closed. Default false (re-attaching borrows).
   */
  owned?: boolean;
}

/** Options of start(), stop(), delete(), pause(), resume(), waitForSsh(). */
export interface BoundedOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
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
  /** /init start until port 22 listened for sshd (its listener; each connection starts its own sshd). */
  initToSshdMs?: number;
  /** Host side: QEMU spawn until the channel answered (the agent's handshake or SSH's). */
  bootToChannelMs: number;
  /** Host side: QEMU spawn until the SSH handshake completed (only when create() waited for SSH). */
  bootToSshMs?: number;
  /** create() called until it returned. */
  totalMs: number;
  /** The first create of a template: how long capturing it took (the guest was paused for part of it). */
  templateCaptureMs?: number;
  /** Handed out warm by a pool (SmolVM.pool()); totalMs is then pool.create()'s own time. */
  pooled?: boolean;
}

export interface SshCommands {
  ssh: string;
  scpToGuest: string;
  scpFromGuest: string;
}
