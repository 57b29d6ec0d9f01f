/**
 * The SDK's side of the network policy: before QEMU starts, a cgroup for it and a closed
 * nftables table (nothing the guest starts gets out), or rootless the namespace QEMU will start
 * in (netns.ts); then the per-VM network daemon, which opens the table to itself once it listens;
 * live policy changes and (rootless) port forwards over its control socket; the decision log;
 * and teardown once QEMU is gone.
 */
import { spawn } from "node:child_process";
import { closeSync, existsSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { connect } from "node:net";
import { join } from "node:path";
import { Deadline, sleep } from "../../common/deadline.js";
import { HostDependencyError, SmolVMError, VMStateError } from "../../errors.js";
import { daemonArgv, daemonEnv } from "./daemon-bundle.js";
import { networkFiles } from "./files.js";
import {
  applyRulesetAsync,
  cgroupEmpty,
  createCgroup,
  networkMechanisms,
  removeCgroup,
  removeRulesetAsync,
  renderRuleset,
  type VmCgroup,
  vmCgroup,
} from "./firewall.js";
import { netnsWrap, renderNetnsRuleset } from "./netns.js";
import type { NetworkLogEntry, NetworkPolicy } from "./policy.js";

export interface PreparedNetwork {
  /** How launchQemu must start QEMU: in the VM's cgroup (root) or its own namespaces (rootless). */
  launch: { cgroupProcs: string } | { wrap: ReturnType<typeof netnsWrap> };
  /**
   * Settles once the closed table is in place (with `deferRules`; otherwise it already is). The
   * guest must not run before, nor the daemon start (its own ruleset replaces this one).
   */
  closed: Promise<void>;
}

/** "userns" when the VM's current (or last) start used the rootless mechanism. */
function mechanismOf(vmDir: string): "cgroup" | "userns" {
  try {
    return JSON.parse(readFileSync(networkFiles(vmDir).policy, "utf8")).mechanism === "userns"
      ? "userns"
      : "cgroup";
  } catch {
    return "cgroup";
  }
}

/**
 * Fails closed: as root, creates the VM's cgroup and an nftables table that drops everything
 * QEMU's sockets in it start; rootless, writes the rules QEMU's namespace is born with (nothing
 * leaves it but through the daemon). Call before QEMU is spawned. With `deferRules` (a QEMU
 * whose guest stays stopped until PreparedNetwork.closed settles) the table is loaded while
 * QEMU starts rather than before.
 */
export async function prepareVmNetwork(
  vmDir: string,
  vmId: string,
  policy: NetworkPolicy,
  options: { deferRules?: boolean } = {},
): Promise<PreparedNetwork> {
  const m = networkMechanisms();
  if (!m.mechanism) {
    throw new HostDependencyError(
      `this host cannot enforce a network policy: ${m.problems.join("; ")}. See \`smolvm doctor\`.`,
      { code: "NETWORK_POLICY_UNAVAILABLE", details: { ...m } },
    );
  }
  const files = networkFiles(vmDir);
  // Written first: a VM directory without it has never had anything to tear down (see
  // networkPrepared).
  if (m.mechanism === "userns-nftables-proxy") {
    writeFileSync(files.policy, JSON.stringify({ policy, mechanism: "userns" }), { mode: 0o600 });
    rmSync(files.netnsPid, { force: true });
    writeFileSync(files.netnsRules, renderNetnsRuleset(), { mode: 0o600 });
    return { launch: { wrap: netnsWrap(files.netnsRules, files.netnsPid) }, closed: Promise.resolve() };
  }
  writeFileSync(files.policy, JSON.stringify({ policy, mechanism: "cgroup" }), { mode: 0o600 });
  const cg = vmCgroup(vmId);
  createCgroup(cg);
  const closed = applyRulesetAsync(renderRuleset(vmId, cg));
  if (options.deferRules) closed.catch(() => {});
  else await closed;
  return { launch: { cgroupProcs: join(cg.dir, "cgroup.procs") }, closed };
}

/**
 * Whether prepareVmNetwork ever ran for this VM directory. When it did not (a VM's first start),
 * there is no daemon, cgroup or table to tear down, and the nft and cgroup calls that would find
 * that out are saved.
 */
export function networkPrepared(vmDir: string): boolean {
  return existsSync(networkFiles(vmDir).policy);
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
  const rootless = mechanismOf(vmDir) === "userns";
  const [cmd, ...args] = await daemonArgv();
  const relay = rootless ? await daemonArgv("relay") : undefined;
  const logFd = openSync(files.daemonLog, "w", 0o600);
  const child = spawn(cmd!, [...args, vmDir, vmId], {
    detached: true,
    stdio: ["ignore", "pipe", logFd],
    env: daemonEnv(relay ? { SMOLVM_NET_RELAY: JSON.stringify(relay) } : {}),
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
  // Rootless, nothing outlives QEMU and the daemon: the namespace goes with its last process.
  if (mechanismOf(vmDir) === "userns") return;
  let cg: VmCgroup | undefined;
  try {
    cg = vmCgroup(vmId);
  } catch {
    return;
  }
  if (await cgroupEmptied(cg, CGROUP_EXIT_WAIT_MS)) {
    await removeRulesetAsync(vmId);
    removeCgroup(cg);
  }
}

/**
 * How long teardown waits for a just-stopped QEMU to leave its cgroup. Its main thread is a
 * zombie (so it counts as stopped) while its other threads still unmap guest RAM and TCG's code
 * buffer, and cgroup.procs lists it until the last of them is gone: tens of ms on a slow host.
 */
const CGROUP_EXIT_WAIT_MS = 5_000;

/** Polls until the cgroup has no process; false if one is still there after `ms`. */
async function cgroupEmptied(cg: VmCgroup, ms: number): Promise<boolean> {
  const until = performance.now() + ms;
  while (!cgroupEmpty(cg)) {
    if (performance.now() >= until) return false;
    await sleep(10);
  }
  return true;
}

/** One request on the daemon's control socket; resolves with its `ok` reply. */
async function control(
  vmDir: string,
  vmId: string,
  req: object,
  what: string,
  options: { timeoutMs: number; signal?: AbortSignal },
): Promise<void> {
  const deadline = new Deadline(options.timeoutMs, options.signal, `${what} of VM ${vmId}`);
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
        s.write(`${JSON.stringify(req)}\n`);
      }),
    );
    const r = JSON.parse(reply) as { ok: boolean; error?: string };
    if (!r.ok) throw new SmolVMError(`the network daemon of VM ${vmId} refused ${what}: ${r.error}`);
  } finally {
    deadline.dispose();
  }
}

/** Sends a new policy to the running daemon; resolves once it is in force. */
export function sendPolicy(
  vmDir: string,
  vmId: string,
  policy: NetworkPolicy,
  options: { timeoutMs: number; signal?: AbortSignal },
): Promise<void> {
  return control(vmDir, vmId, { op: "set", policy }, "changing the network policy", options);
}

/**
 * Rootless, QEMU's forwards listen inside its namespace: the daemon opens (`open: true`) or closes
 * the host side of forward `hostPort`. As root QEMU listens on the host itself and this does nothing.
 */
export async function hostForward(
  vmDir: string,
  vmId: string,
  hostPort: number,
  open: boolean,
  options: { timeoutMs: number; signal?: AbortSignal },
): Promise<void> {
  if (mechanismOf(vmDir) !== "userns") return;
  await control(
    vmDir,
    vmId,
    { op: open ? "forward" : "unforward", port: hostPort },
    `forwarding host port ${hostPort}`,
    options,
  );
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
