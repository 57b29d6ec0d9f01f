/**
 * The SDK's side of the network policy: before QEMU starts, a cgroup for it and a closed
 * nftables table (nothing the guest starts gets out); then the per-VM network daemon, which
 * opens the table to itself once it listens; live policy changes over its control socket; the
 * decision log; and teardown once QEMU is gone.
 */
import { spawn } from "node:child_process";
import { closeSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { connect } from "node:net";
import { join } from "node:path";
import { Deadline, sleep } from "../../common/deadline.js";
import { HostDependencyError, SmolVMError, VMStateError } from "../../errors.js";
import { daemonArgv } from "./daemon-bundle.js";
import { networkFiles } from "./files.js";
import {
  applyRuleset,
  cgroupEmpty,
  createCgroup,
  networkMechanisms,
  removeCgroup,
  removeRuleset,
  renderRuleset,
  vmCgroup,
} from "./firewall.js";
import type { NetworkLogEntry, NetworkPolicy } from "./policy.js";

export interface PreparedNetwork {
  /** QEMU must write its pid here before it opens any socket. */
  cgroupProcs: string;
}

/**
 * Fails closed: creates the VM's cgroup and an nftables table that drops everything QEMU's
 * sockets in it start. Call before QEMU is spawned.
 */
export function prepareVmNetwork(vmDir: string, vmId: string, policy: NetworkPolicy): PreparedNetwork {
  const m = networkMechanisms();
  if (!m.mechanism) {
    throw new HostDependencyError(
      `this host cannot enforce a network policy: ${m.problems.join("; ")}. See \`smolvm doctor\`.`,
      { code: "NETWORK_POLICY_UNAVAILABLE", details: { ...m } },
    );
  }
  const cg = vmCgroup(vmId);
  createCgroup(cg);
  applyRuleset(renderRuleset(vmId, cg));
  writeFileSync(networkFiles(vmDir).policy, JSON.stringify({ policy }), { mode: 0o600 });
  return { cgroupProcs: join(cg.dir, "cgroup.procs") };
}

/**
 * Starts the VM's network daemon (detached: it lives as long as the VM) and resolves when it has
 * taken over the VM's nftables table.
 */
export async function startNetworkDaemon(
  vmDir: string,
  vmId: string,
  options: { timeoutMs: number; signal?: AbortSignal },
): Promise<void> {
  const files = networkFiles(vmDir);
  const [cmd, ...args] = await daemonArgv();
  const logFd = openSync(files.daemonLog, "w", 0o600);
  const child = spawn(cmd!, [...args, vmDir, vmId], {
    detached: true,
    stdio: ["ignore", "pipe", logFd],
    env: process.env,
  });
  closeSync(logFd);
  const deadline = new Deadline(
    options.timeoutMs,
    options.signal,
    `starting the network daemon of VM ${vmId}`,
  );
  try {
    await deadline.race(
      new Promise<void>((resolve, reject) => {
        let out = "";
        child.stdout!.on("data", (d: Buffer) => {
          out += d.toString("utf8");
          if (out.includes("\n")) {
            if (out.includes('"ready":true')) resolve();
            else reject(new SmolVMError(`the network daemon of VM ${vmId} said: ${out.trim()}`));
          }
        });
        child.once("exit", async (code) => {
          const log = await readFile(files.daemonLog, "utf8").catch(() => "");
          reject(
            new SmolVMError(
              `the network daemon of VM ${vmId} exited (${String(code)}) before it was ready: ${log.trim().split("\n").slice(-3).join(" | ")}`,
              { code: "NETWORK_DAEMON_FAILED" },
            ),
          );
        });
        child.once("error", reject);
      }),
    );
  } catch (e) {
    child.kill("SIGKILL");
    throw e;
  } finally {
    deadline.dispose();
    child.stdout?.destroy();
    child.unref();
  }
}

function daemonPid(vmDir: string): number | undefined {
  try {
    const pid = Number(readFileSync(networkFiles(vmDir).pid, "utf8").trim());
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return !/\) Z /.test(stat);
  } catch {
    return false;
  }
}

/**
 * Stops the daemon and, once QEMU is gone from the cgroup, removes the table and the cgroup.
 * While QEMU still lives the table stays: a policy is never lifted from a running guest.
 */
export async function teardownVmNetwork(vmDir: string, vmId: string): Promise<void> {
  const pid = daemonPid(vmDir);
  if (pid && alive(pid)) {
    try {
      process.kill(pid, "SIGTERM");
    } catch {
      /* gone */
    }
    for (let i = 0; i < 40 && alive(pid); i++) await sleep(50);
    if (alive(pid)) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        /* gone */
      }
    }
  }
  let cg: ReturnType<typeof vmCgroup> | undefined;
  try {
    cg = vmCgroup(vmId);
  } catch {
    return;
  }
  if (cgroupEmpty(cg)) {
    removeRuleset(vmId);
    removeCgroup(cg);
  }
}

/** Sends a new policy to the running daemon; resolves once it is in force. */
export async function sendPolicy(
  vmDir: string,
  vmId: string,
  policy: NetworkPolicy,
  options: { timeoutMs: number; signal?: AbortSignal },
): Promise<void> {
  const deadline = new Deadline(
    options.timeoutMs,
    options.signal,
    `changing the network policy of VM ${vmId}`,
  );
  try {
    const reply = await deadline.race(
      new Promise<string>((resolve, reject) => {
        const s = connect({ path: networkFiles(vmDir).control });
        let buf = "";
        s.once("error", (e) =>
          reject(
            new VMStateError(
              `the network daemon of VM ${vmId} does not answer (${e.message}); its traffic stays blocked. Restart the VM (vm.stop(), vm.start()).`,
              { code: "NETWORK_DAEMON_DOWN", cause: e },
            ),
          ),
        );
        s.on("data", (d) => {
          buf += d.toString("utf8");
          if (buf.includes("\n")) {
            s.destroy();
            resolve(buf.slice(0, buf.indexOf("\n")));
          }
        });
        deadline.signal.addEventListener("abort", () => s.destroy(), { once: true });
        s.write(`${JSON.stringify({ op: "set", policy })}\n`);
      }),
    );
    const r = JSON.parse(reply) as { ok: boolean; error?: string };
    if (!r.ok) throw new SmolVMError(`the network daemon of VM ${vmId} refused the policy: ${r.error}`);
  } finally {
    deadline.dispose();
  }
}

/** The last `limit` decisions, oldest first. */
export async function readNetworkLog(vmDir: string, limit: number): Promise<NetworkLogEntry[]> {
  const f = networkFiles(vmDir).log;
  const [older, current] = await Promise.all([
    readFile(`${f}.1`, "utf8").catch(() => ""),
    readFile(f, "utf8").catch(() => ""),
  ]);
  const lines = `${older}${current}`.split("\n").filter(Boolean);
  const out: NetworkLogEntry[] = [];
  for (const l of lines.slice(-limit)) {
    try {
      out.push(JSON.parse(l) as NetworkLogEntry);
    } catch {
      /* a line cut by rotation */
    }
  }
  return out;
}
