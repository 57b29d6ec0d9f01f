/**
 * How the host reaches into a VM: port forwards added and removed live over QMP (leased from the
 * host-wide port table, recorded with the VM so any process sees them; rootless, QEMU listens in
 * its own network namespace and the VM's network daemon takes the host side, network/host.ts),
 * and the SSH port with ready-to-paste OpenSSH commands that pin the VM's host key.
 */
import { quoteSh } from "../command.js";
import { validatePort } from "../common/port.js";
import { ValidationError } from "../errors.js";
import { hostForward } from "./network/host.js";
import { leasePort, releasePorts } from "./ports.js";
import type { VmRuntime } from "./runtime.js";
import type { SshCommands } from "./vm-types.js";

/** Forwards host 127.0.0.1:hostPort (leased when omitted) to the guest's guestPort. */
export async function exposeLocal(
  rt: VmRuntime,
  guestPort: number,
  hostPort: number | undefined,
  options: { timeoutMs?: number },
): Promise<number> {
  validatePort("guestPort", guestPort);
  if (hostPort !== undefined) validatePort("hostPort", hostPort);
  rt.requireRunning("expose a port");
  const { store, id } = rt;
  let port: number;
  if (hostPort === undefined) port = await leasePort(store, id, `expose:${guestPort}`);
  else if (store.tryLeasePort(hostPort, id, `expose:${guestPort}`)) port = hostPort;
  else
    throw new ValidationError(
      `host port ${hostPort} is already leased by a smolvm VM: pick another or omit it.`,
    );
  let added = false;
  try {
    await rt.withQmp(options, (qmp) => qmp.hostfwdAdd(port, guestPort));
    added = true;
    await hostForward(rt.record.vmDir, id, port, true, { timeoutMs: options.timeoutMs ?? 5_000 });
  } catch (e) {
    if (added) await rt.withQmp(options, (qmp) => qmp.hostfwdRemove(port)).catch(() => {});
    releasePorts(store, id, port);
    throw e;
  }
  // Read-modify-write in one transaction: concurrent exposes (any process) all land.
  rt.record = store.transaction(() => {
    const ports = store.require(id).ports.filter((p) => p.hostPort !== port);
    return store.update(id, { ports: [...ports, { hostPort: port, guestPort }] });
  });
  return port;
}

/** Removes a forward made by exposeLocal() and frees its host port. */
export async function unexposeLocal(
  rt: VmRuntime,
  hostPort: number,
  options: { timeoutMs?: number },
): Promise<void> {
  validatePort("hostPort", hostPort);
  const { store, id } = rt;
  if (!rt.record.ports.some((p) => p.hostPort === hostPort)) {
    throw new ValidationError(`host port ${hostPort} is not exposed by VM ${id}.`);
  }
  if (rt.refreshStatus() === "running") {
    await rt.withQmp(options, (qmp) => qmp.hostfwdRemove(hostPort));
    await hostForward(rt.record.vmDir, id, hostPort, false, { timeoutMs: options.timeoutMs ?? 5_000 });
  }
  releasePorts(store, id, hostPort);
  rt.record = store.transaction(() =>
    store.update(id, {
      ports: store.require(id).ports.filter((p) => p.hostPort !== hostPort),
    }),
  );
}

/** Ready-to-paste commands for OpenSSH tools, with the VM's host key pinned. */
export function sshCommands(rt: VmRuntime, options: { user?: string; keyPath?: string }): SshCommands {
  const user = options.user ?? "root";
  const key = options.keyPath ?? rt.config.clientKeyPath ?? "";
  const port = rt.record.sshPort ?? 22;
  const common = `-i ${quoteSh(key)} -o UserKnownHostsFile=${quoteSh(rt.knownHostsPath)} -o StrictHostKeyChecking=yes`;
  return {
    ssh: `ssh ${common} -p ${port} ${user}@127.0.0.1`,
    scpToGuest: `scp ${common} -P ${port} <local> ${user}@127.0.0.1:<remote>`,
    scpFromGuest: `scp ${common} -P ${port} ${user}@127.0.0.1:<remote> <local>`,
  };
}
