/**
 * Host ports for VM forwards, on 127.0.0.1 only. The OS picks a port that is free right now
 * (bind :0, close); the store's lease (port is the primary key) makes it ours across every smolvm
 * process until released, covering the gap before QEMU binds it.
 */
import { createServer } from "node:net";
import { SmolVMError } from "../errors.js";
import type { VmStore } from "./store.js";

function osFreePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.unref();
    s.once("error", reject);
    s.listen({ port: 0, host: "127.0.0.1", exclusive: true }, () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

export interface LeaseOptions {
  /** Candidate ports tried before giving up. Default 50. */
  attempts?: number;
}

/** Leases a free 127.0.0.1 port for `vmId`; `purpose` is e.g. "ssh" or "forward:8080". */
export async function leasePort(
  store: VmStore,
  vmId: string,
  purpose: string,
  options: LeaseOptions = {},
): Promise<number> {
  const attempts = options.attempts ?? 50;
  for (let i = 0; i < attempts; i++) {
    const port = await osFreePort();
    if (store.tryLeasePort(port, vmId, purpose)) return port;
  }
  throw new SmolVMError(
    `Could not lease a free 127.0.0.1 port for VM ${vmId} (${purpose}) after ${attempts} tries: release unused VMs' ports (delete stopped VMs).`,
    { code: "NO_FREE_PORT", details: { vmId, purpose, attempts } },
  );
}

/** Frees one or all of the VM's leases; returns how many were freed. */
export function releasePorts(store: VmStore, vmId: string, port?: number): number {
  return store.releaseLeases(vmId, port);
}
