/**
 * What a VM is made of before and as it launches: validated create options, its identity (host
 * key, authorized client key, agent secret, hostname) baked into a per-VM initramfs archive, the
 * launch spec every boot shares (leased SSH port, pinned known_hosts, RAM file, disk overlay),
 * and, for a VM restored from a template or snapshot, `becomeItself`: the new identity it takes
 * over the agent before its first command.
 */
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { setIdentity } from "../channel/agent-identity.js";
import { renderEnvFile } from "../channel/env-file.js";
import { validateEnv } from "../command.js";
import type { Deadline } from "../common/deadline.js";
import { ValidationError } from "../errors.js";
import { buildVmConfigCpio, composeInitrd, type ImageManifest, knownHostsLine } from "../image/index.js";
import { findQemu, hostTscKhz } from "./accel.js";
import { normalizePolicy } from "./network/policy.js";
import { leasePort } from "./ports.js";
import { deviceModelSpec, type VmLaunchSpec } from "./qemu.js";
import type { VmRuntime } from "./runtime.js";
import { waitForMilestone } from "./serial-log.js";
import { validateLabels, validateTtl } from "./ttl.js";
import type { CommChannelChoice, SmolVMCreateOptions } from "./vm-types.js";

export const DEFAULT_CREATE_TIMEOUT_MS = 180_000;
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
const CHANNELS: readonly CommChannelChoice[] = ["ssh", "agent", "vsock", "auto"];
/**
 * A VM restored from a snapshot of an image built before sshd ran per connection, whose listening
 * sshd loaded its key once (OpenSSH 9.8 or later, or an image that did not record it), still
 * holds the snapshot's host key: once the init's sshd is up, replace it with one that loads the
 * VM's own key (written just before), and log a milestone on the console. The agent starts it in
 * the background at the lowest priority (sshd itself is set back to normal), so the first
 * commands do not wait for it. Under load the old sshd may be slow to go and free port 22: it is
 * killed outright after 5 s, and the new one retried until it binds.
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

/**
 * When commands go over the agent, sshd is re-keyed this many seconds after the restore rather
 * than at once: its restart costs a guest under TCG about a third of a second of host CPU, which
 * would otherwise compete with the first commands (of this VM, and of its siblings in a fork).
 * Only SSH waits for it (waitForSsh() waits for the sshd-rekeyed milestone).
 */
const REKEY_SSHD_DELAY_S = 1;

/** A new VM id. */
export function newVmId(): string {
  return `vm-${randomBytes(6).toString("hex")}`;
}

/** Refuses a VM name that is not 1-63 letters, digits, '.', '_' or '-'. */
export function validateVmName(name: string | undefined): void {
  if (name !== undefined && !NAME_RE.test(name)) {
    throw new ValidationError(
      `VM name ${JSON.stringify(name)} is invalid: use 1-63 letters, digits, '.', '_' or '-'.`,
    );
  }
}

/** create()'s options, checked and with their defaults, before anything is built or spawned. */
export function validateCreateOptions(o: SmolVMCreateOptions) {
  const memoryMib = o.memoryMib ?? 512;
  const vcpus = o.vcpus ?? 1;
  if (!Number.isInteger(memoryMib) || memoryMib < 64 || memoryMib > 65536) {
    throw new ValidationError(`memoryMib must be an integer from 64 to 65536, got ${String(o.memoryMib)}.`);
  }
  if (!Number.isInteger(vcpus) || vcpus < 1 || vcpus > 64) {
    throw new ValidationError(`vcpus must be an integer from 1 to 64, got ${String(o.vcpus)}.`);
  }
  validateVmName(o.name);
  const commChannel = CHANNELS.find((c) => c === (o.commChannel ?? "auto"));
  if (!commChannel) {
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
/** The per-VM archive appended to the image's initramfs: identity and settings for /init. */
export function vmConfigCpio(c: {
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

export function safeHostname(name: string): string {
  return name.replace(/[^A-Za-z0-9-]/g, "-").slice(0, 63) || "smolvm";
}

/**
 * What every launch of this VM shares: its name, size, accelerator, files, and a freshly leased
 * SSH port whose known_hosts line pins `hostPublicKey`.
 */
export async function launchBase(
  rt: VmRuntime,
  hostPublicKey: string,
): Promise<Omit<VmLaunchSpec, "kernelPath" | "initrdPath" | "kernelAppend">> {
  const { accel, memoryMib, vcpus } = rt.launch;
  const sshPort = await leasePort(rt.store, rt.id, "ssh");
  await writeFile(rt.knownHostsPath, knownHostsLine("127.0.0.1", sshPort, hostPublicKey), {
    mode: 0o600,
  });
  return {
    name: rt.id,
    qemuPath: findQemu(),
    accel,
    memoryMib,
    vcpus,
    tscKhz: accel === "tcg" ? hostTscKhz() : undefined,
    ...deviceModelSpec(rt.config.deviceModel),
    qmpSocketPath: rt.paths.qmpSocket,
    serialLogPath: rt.paths.serialLog,
    pidfilePath: rt.paths.pidfile,
    sshHostPort: sshPort,
  };
}

/** Copy-on-write disk over the image's rootfs, so the image itself is never written. */
export async function overlayFor(
  rt: VmRuntime,
  image: ImageManifest & { rootfsPath: string },
): Promise<string> {
  const overlay = join(rt.record.vmDir, "rootfs.qcow2");
  // The VM's disk: made once, kept across stop()/start(), removed with the VM.
  if (existsSync(overlay)) return overlay;
  const { exec } = await import("../image/exec.js");
  const diskMib = rt.config.diskMib;
  await exec("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-F",
    "raw",
    "-b",
    image.rootfsPath,
    overlay,
    ...(diskMib ? [`${diskMib}M`] : []),
  ]);
  return overlay;
}

/** The identity a restored VM takes: its own host key, the client key it trusts, and its env. */
/** A restored VM's per-VM initramfs archive, kept until a cold boot needs its initramfs. */
const VM_CONFIG_CPIO = "initrd-config.cpio";

/**
 * The VM's initramfs for a cold boot: `initrd.img` in its directory, made on first need from the
 * image's and the per-VM archive a restore left (see becomeItself).
 */
export async function vmInitrd(rt: VmRuntime, imageInitrdPath: string): Promise<string> {
  const out = join(rt.record.vmDir, "initrd.img");
  const archive = join(rt.record.vmDir, VM_CONFIG_CPIO);
  if (existsSync(out) || !existsSync(archive)) return out;
  await composeInitrd(imageInitrdPath, await readFile(archive), out);
  await rm(archive, { force: true });
  return out;
}

export interface NewIdentity {
  hostKey: { privateKeyPem: string | Buffer };
  clientPublicKey: string;
  env: Record<string, string>;
}

/**
 * Every restored VM wakes with the snapshot's memory: before its first command it gets a new
 * agent secret (over the session the old one opened), host entropy and an immediate RNG
 * reseed, the host's clock, its hostname, its env file and a new SSH host key. An sshd that
 * loads its key per connection (the image's sshHostKeyPerConnection: it runs per connection under
 * the agent) serves the new key from the next connection on; an older image's listening sshd
 * restarts with it in the background, a second later when SSH is not the VM's channel (SSH users
 * wait for that).
 */
export async function becomeItself(rt: VmRuntime, deadline: Deadline, id: NewIdentity): Promise<void> {
  const agent = rt.channels.agent();
  const secret = randomBytes(32);
  const hostname = safeHostname(rt.name);
  // What the VM's own initramfs needs, for when start() boots it cold after a stop(): only the
  // small per-VM archive now (vmInitrd() appends it to the image's on that boot), not a copy of
  // the whole initramfs on every restore's path.
  const cfg = rt.config;
  const perConnection = cfg.capabilities?.sshHostKeyPerConnection === true;
  const configCpio = writeFile(
    join(rt.record.vmDir, VM_CONFIG_CPIO),
    vmConfigCpio({
      hostKeyPem: id.hostKey.privateKeyPem,
      clientPublicKey: id.clientPublicKey,
      agentSecret: secret,
      env: id.env,
      hostname,
      diskMib: cfg.diskMib,
    }),
    { mode: 0o600 },
  );
  configCpio.catch(() => {});
  // No ping first: the agent socket was connected before the devices loaded (bootFromSnapshot),
  // and the IDENTITY request opens the session itself, one round trip sooner.
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
      // An sshd that reads its host key per connection takes the new file as it is.
      run: perConnection
        ? undefined
        : rt.channels.planned() === "ssh"
          ? REKEY_SSHD
          : `sleep ${REKEY_SSHD_DELAY_S}\n${REKEY_SSHD}`,
    },
    deadline,
  );
  agent.rekey(secret);
  await writeFile(rt.paths.agentSecret, secret, { mode: 0o600 });
  await configCpio;
  rt.channels.current = agent;
  if (rt.channels.planned() === "ssh") {
    if (perConnection) {
      // The first connection starts its sshd (and an older image's listener may still be starting).
      deadline.phase = "waiting for SSH";
      await rt.channels.ssh().waitForSsh({ timeoutMs: deadline.remaining(), signal: deadline.signal });
    } else {
      deadline.phase = "waiting for sshd with the new host key";
      await waitForMilestone(rt.paths.serialLog, "sshd-rekeyed", deadline);
    }
    rt.channels.current = undefined;
  }
}
