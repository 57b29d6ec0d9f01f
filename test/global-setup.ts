/**
 * Suite-wide set-up: every temp dir the suite makes (data dirs, sshd dirs, VM sockets and
 * pidfiles) goes under one root, by pointing TMPDIR there for the test workers. The teardown
 * then kills whatever the suite started and left running, found by the pidfiles under that root
 * and by command lines naming it, even when a test failed or a worker crashed; and removes the root.
 */
import { spawnSync } from "node:child_process";
import { chmodSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { cgroup2Mount } from "../src/vm/network/firewall.js";

export const SUITE_ROOT_ENV = "SMOLVM_TEST_ROOT";
/** The VM nftables tables and cgroups that existed before the suite (JSON), see networkTraces. */
export const NETWORK_BEFORE_ENV = "SMOLVM_TEST_NETWORK_BEFORE";

/**
 * smolvm's nftables tables and per-VM cgroups on this host, as sorted lines: a VM's network
 * teardown removes both, so any the suite added and left is a leak.
 */
export function networkTraces(): string[] {
  const out: string[] = [];
  const nft = spawnSync("nft", ["list", "tables"], { encoding: "utf8" });
  for (const line of (nft.stdout ?? "").split("\n")) if (/^table inet smolvm_/.test(line)) out.push(line);
  const mount = cgroup2Mount();
  try {
    for (const id of mount ? readdirSync(join(mount, "smolvm")) : []) {
      if (!id.startsWith("cgroup.") && !id.includes(".")) out.push(`cgroup smolvm/${id}`);
    }
  } catch {
    // no smolvm cgroup yet
  }
  return out.sort();
}

/** Pids of live processes whose command line mentions `root`. */
export function processesUnder(root: string): { pid: number; args: string }[] {
  const out: { pid: number; args: string }[] = [];
  for (const name of readdirSync("/proc")) {
    const pid = Number(name);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
      if (state === "Z") continue;
      const args = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").join(" ").trim();
      if (args.includes(root)) out.push({ pid, args });
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

function pidfilesUnder(dir: string, depth = 0): number[] {
  if (depth > 8) return [];
  const pids: number[] = [];
  let entries: import("node:fs").Dirent[];
  try {
    entries = readdirSync(dir, { withFileTypes: true });
  } catch {
    return pids;
  }
  for (const e of entries) {
    const p = join(dir, e.name);
    if (e.isDirectory()) pids.push(...pidfilesUnder(p, depth + 1));
    else if (e.isFile() && e.name.endsWith(".pid")) {
      const n = Number.parseInt(readFileSync(p, "utf8").trim(), 10);
      if (Number.isInteger(n) && n > 0) pids.push(n);
    }
  }
  return pids;
}

function kill(pid: number): void {
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // already gone
  }
}

export default function setup(): () => Promise<void> {
  const root = mkdtempSync(join(tmpdir(), "smolvm-suite-"));
  // sshd reads the fixtures' AuthorizedKeysFile as the test user: it must be able to traverse.
  chmodSync(root, 0o711);
  process.env[SUITE_ROOT_ENV] = root;
  process.env.TMPDIR = root;
  process.env[NETWORK_BEFORE_ENV] = JSON.stringify(networkTraces());
  return async () => {
    // Pidfiles first (QEMU's, sshd's), each checked against its command line so a recycled pid
    // is never hit; then anything else still naming the root.
    const ours = new Set(processesUnder(root).map((p) => p.pid));
    for (const pid of pidfilesUnder(root)) if (ours.has(pid)) kill(pid);
    for (const p of processesUnder(root)) kill(p.pid);
    await new Promise((r) => setTimeout(r, 200));
    rmSync(root, { recursive: true, force: true });
  };
}
