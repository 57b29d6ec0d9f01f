/**
 * What a VM record's `config` column holds, typed and checked. The store keeps it as JSON that
 * any smolvm process (or a person with sqlite3) may have written, so it is validated when read:
 * a damaged record is a VMStateError VM_RECORD_DAMAGED naming the field, never a value of the
 * wrong type travelling on. Keys this version does not know (a newer smolvm's) are kept.
 */
import { VMStateError } from "../errors.js";
import type { NetworkPolicy } from "./network/policy.js";

/** Where a restored VM came from (its files stay in use while it runs). */
export interface RestoredFrom {
  kind: "snapshot" | "template";
  /** The snapshot's id. */
  id: string;
  /** The snapshot's (or template's) directory. */
  dir: string;
  /** A fork's snapshot: removed with its last clone. */
  ephemeral?: boolean;
}

/**
 * `VmRecord.config`: a VM's settings and what its launches need. Every field is optional in the
 * store (a record being created has few); `launchConfig()` requires what a boot needs.
 */
export interface VmConfig {
  memoryMib?: number;
  vcpus?: number;
  /** Writable space, MiB (see SmolVMCreateOptions.diskMib). */
  diskMib?: number;
  /** The accelerator the VM runs under, and why it was chosen. */
  accel?: "kvm" | "tcg";
  accelReason?: string;
  imageFingerprint?: string;
  kernelPath?: string;
  kernelCmdline?: string;
  /** The VM's own initramfs (image + per-VM config archive). */
  initrdPath?: string;
  capabilities?: { ssh: boolean; agent: boolean; sshHostKeyPerConnection?: boolean };
  /** The guest's SSH host public key, pinned in the VM's known_hosts. */
  hostPublicKey?: string;
  /** The client key authorized in the guest. */
  clientKeyPath?: string;
  /** The process creating or starting the VM (prune leaves it alone while that process lives). */
  creatorPid?: number;
  network?: NetworkPolicy;
  /** False when a restored VM's RAM lives in the snapshot's file (not a per-VM tmpfs file). */
  ramInFile?: boolean;
  restoredFrom?: RestoredFrom;
  /**
   * How the current (or last) boot began. After a restore the guest's sshd switches to the VM's
   * own host key once it is up; a cold boot (start() after stop()) has it from the start.
   */
  lastBoot?: "cold" | "restore";
  /**
   * The devices QEMU gave the VM (qemu.ts DEVICE_MODEL) when it last booted cold. A restore must
   * present the same devices its snapshot was taken with; absent means model 1.
   */
  deviceModel?: number;
}

/** The config fields every launch of a VM needs. */
export type LaunchConfig = VmConfig &
  Required<
    Pick<VmConfig, "memoryMib" | "vcpus" | "accel" | "kernelPath" | "kernelCmdline" | "hostPublicKey">
  >;

type Check = (v: unknown) => boolean;

const isStr: Check = (v) => typeof v === "string";
const isBool: Check = (v) => typeof v === "boolean";
const isInt: Check = (v) => Number.isInteger(v);
const isObj = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);
const isStrArray: Check = (v) => Array.isArray(v) && v.every(isStr);

/** Each known field and the shape it must have; the text says it in the error. */
const FIELDS: Record<keyof VmConfig, [Check, string]> = {
  memoryMib: [isInt, "an integer"],
  vcpus: [isInt, "an integer"],
  diskMib: [isInt, "an integer"],
  accel: [(v) => v === "kvm" || v === "tcg", '"kvm" or "tcg"'],
  accelReason: [isStr, "a string"],
  imageFingerprint: [isStr, "a string"],
  kernelPath: [isStr, "a string"],
  kernelCmdline: [isStr, "a string"],
  initrdPath: [isStr, "a string"],
  capabilities: [(v) => isObj(v) && isBool(v.ssh) && isBool(v.agent), "{ ssh: boolean, agent: boolean }"],
  hostPublicKey: [isStr, "a string"],
  clientKeyPath: [isStr, "a string"],
  creatorPid: [isInt, "an integer"],
  network: [
    (v) =>
      v === "public" ||
      v === "none" ||
      (isObj(v) && isStrArray(v.allow) && (v.deny === undefined || isStrArray(v.deny))),
    '"public", "none" or { allow: string[], deny?: string[] }',
  ],
  ramInFile: [isBool, "a boolean"],
  lastBoot: [(v) => v === "cold" || v === "restore", '"cold" or "restore"'],
  deviceModel: [isInt, "an integer"],
  restoredFrom: [
    (v) =>
      isObj(v) &&
      (v.kind === "snapshot" || v.kind === "template") &&
      isStr(v.id) &&
      isStr(v.dir) &&
      (v.ephemeral === undefined || isBool(v.ephemeral)),
    '{ kind: "snapshot" | "template", id: string, dir: string, ephemeral?: boolean }',
  ],
};

const VM_REMEDY = "Delete that VM (`smolvm rm`, or remove its row and directory) and create it again.";

function damaged(owner: string, what: string, remedy = VM_REMEDY): VMStateError {
  return new VMStateError(`the stored config of ${owner} is damaged: ${what}. ${remedy}`, {
    code: "VM_RECORD_DAMAGED",
    details: { owner, problem: what },
  });
}

function isVmConfig(v: unknown, owner: string, remedy?: string): v is VmConfig {
  if (!isObj(v)) {
    const kind = Array.isArray(v) ? "an array" : v === null ? "null" : `a ${typeof v}`;
    throw damaged(owner, `config is ${kind}, not an object`, remedy);
  }
  for (const [key, [check, shape]] of Object.entries(FIELDS)) {
    const value = v[key];
    if (value !== undefined && !check(value)) {
      const got = JSON.stringify(value)?.slice(0, 80);
      throw damaged(owner, `config.${key} should be ${shape}, got ${got}`, remedy);
    }
  }
  return true;
}

/**
 * Validates a parsed config (a VmRecord's, or a snapshot's); `owner` names it in the error
 * ("VM vm-1234", "snapshot snap-…") and `remedy` says what to do (default: delete the VM).
 */
export function checkVmConfig(value: unknown, owner: string, remedy?: string): VmConfig {
  if (!isVmConfig(value, owner, remedy)) throw damaged(owner, "config is not an object", remedy);
  return value;
}

/** Parses the JSON text of a config column. */
export function parseVmConfig(json: string, owner: string): VmConfig {
  let value: unknown;
  try {
    value = JSON.parse(json);
  } catch {
    throw damaged(owner, "config is not valid JSON");
  }
  return checkVmConfig(value, owner);
}

/** The config of a VM about to launch: every field a launch needs, or VM_RECORD_DAMAGED. */
export function launchConfig(config: VmConfig, owner: string): LaunchConfig {
  const { memoryMib, vcpus, accel, kernelPath, kernelCmdline, hostPublicKey } = config;
  if (
    memoryMib === undefined ||
    vcpus === undefined ||
    accel === undefined ||
    kernelPath === undefined ||
    kernelCmdline === undefined ||
    hostPublicKey === undefined
  ) {
    const need = { memoryMib, vcpus, accel, kernelPath, kernelCmdline, hostPublicKey };
    const missing = Object.entries(need)
      .filter(([, v]) => v === undefined)
      .map(([k]) => k);
    throw damaged(owner, `config lacks ${missing.join(", ")} (the VM was never fully created)`);
  }
  return { ...config, memoryMib, vcpus, accel, kernelPath, kernelCmdline, hostPublicKey };
}
