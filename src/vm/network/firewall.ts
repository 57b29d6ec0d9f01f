/**
 * The kernel half of the network policy: each VM's QEMU runs in its own cgroup (v2), and one
 * nftables table per VM, matching that cgroup's sockets, sends every new TCP connection and DNS
 * query QEMU's user-mode network makes for the guest to the VM's network daemon on 127.0.0.1,
 * and drops everything else it starts (other UDP, ICMP, IPv6). Replies on connections the host
 * opened to the guest (SSH, exposeLocal forwards) pass. The guest cannot change any of it: it is
 * host kernel state keyed on the QEMU process, outside the VM.
 */
import { execFile, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from "node:fs";
import { join, relative } from "node:path";
import { HostDependencyError } from "../../errors.js";
import { probeUserNamespaces } from "./netns.js";

/** nft resolves `socket cgroupv2` paths relative to this directory. */
const NFT_CGROUP_ROOT = "/sys/fs/cgroup";

/** Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts). */
export function cgroup2Mount(): string | undefined {
  try {
    for (const line of readFileSync("/proc/self/mounts", "utf8").split("\n")) {
      const [, mnt, type] = line.split(" ");
      if (type === "cgroup2" && mnt && (mnt === NFT_CGROUP_ROOT || mnt.startsWith(`${NFT_CGROUP_ROOT}/`)))
        return mnt;
    }
  } catch {
    /* no /proc */
  }
  return undefined;
}

/** nftables table name for a VM id (letters, digits, underscores). */
export function tableName(vmId: string): string {
  return `smolvm_${vmId.replace(/[^A-Za-z0-9]/g, "_")}`;
}

export interface VmCgroup {
  /** Absolute directory; write a pid to `${dir}/cgroup.procs` to move it in. */
  dir: string;
  /** The path nft's `socket cgroupv2` takes (relative to /sys/fs/cgroup). */
  nftPath: string;
  /** Its depth in the cgroup v2 hierarchy. */
  level: number;
}

export function vmCgroup(vmId: string): VmCgroup {
  const mnt = cgroup2Mount();
  if (!mnt) {
    throw new HostDependencyError(
      "network policies need cgroup v2 mounted under /sys/fs/cgroup (to tell each VM's QEMU sockets apart); mount it or use a host with systemd's unified or hybrid hierarchy.",
    );
  }
  const dir = join(mnt, "smolvm", vmId);
  return { dir, nftPath: relative(NFT_CGROUP_ROOT, dir), level: 2 };
}

export function createCgroup(cg: VmCgroup): void {
  mkdirSync(cg.dir, { recursive: true });
}

/**
 * Removes the VM's cgroup once no process is left in it (a no-op when it is gone). A task that
 * just exited can keep it busy for a moment, so EBUSY is retried for up to a second.
 */
export function removeCgroup(cg: VmCgroup): void {
  for (let i = 0; i < 50; i++) {
    try {
      rmdirSync(cg.dir);
      return;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EBUSY") return; // gone, or not ours to remove
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20);
    }
  }
}

export function cgroupEmpty(cg: VmCgroup): boolean {
  try {
    return readFileSync(join(cg.dir, "cgroup.procs"), "utf8").trim() === "";
  } catch {
    return true;
  }
}

export function joinCgroup(cg: VmCgroup, pid: number): void {
  writeFileSync(join(cg.dir, "cgroup.procs"), String(pid));
}

export interface DaemonPorts {
  /** The daemon's transparent TCP proxy on 127.0.0.1. */
  tcp: number;
  /** The daemon's DNS server on 127.0.0.1 (UDP and TCP, same number). */
  dns: number;
}

/** IPv4 ranges "public" never reaches (policy.ts NON_PUBLIC_RANGES, the IPv4 part). */
const NON_PUBLIC_V4 = [
  "0.0.0.0/8",
  "10.0.0.0/8",
  "100.64.0.0/10",
  "127.0.0.0/8",
  "169.254.0.0/16",
  "172.16.0.0/12",
  "192.168.0.0/16",
  "224.0.0.0/4",
  "240.0.0.0/4",
];

/**
 * The VM's nftables ruleset, as one `nft -f` transaction that (re)places the table atomically.
 * Without `ports` (before the daemon listens) it drops every connection the guest starts.
 *
 * With `mode: "public"`, TCP to a public unicast address that is not one of the host's own
 * (`fib daddr type local`, evaluated per packet, so new host addresses are covered at once) goes
 * straight out through QEMU's user networking: the kernel is the whole check, at no cost. Only
 * connections to the ranges "public" refuses go to the daemon, which logs and resets them. In
 * "none" and allow-list modes every new TCP connection goes to the daemon.
 */
export function renderRuleset(
  vmId: string,
  cg: VmCgroup,
  ports?: DaemonPorts,
  mode: "public" | "none" | "allow" = "none",
): string {
  const t = tableName(vmId);
  const match = `socket cgroupv2 level ${cg.level} ${JSON.stringify(cg.nftPath)}`;
  const v4 = "meta nfproto ipv4";
  const nonPublic = `{ ${NON_PUBLIC_V4.join(", ")} }`;
  const tcpToDaemon =
    mode === "public"
      ? [
          `${match} ${v4} meta l4proto tcp ip daddr ${nonPublic} dnat ip to 127.0.0.1:${ports?.tcp}`,
          `${match} ${v4} meta l4proto tcp fib daddr type != unicast dnat ip to 127.0.0.1:${ports?.tcp}`,
          `${match} ${v4} meta l4proto tcp fib daddr type local dnat ip to 127.0.0.1:${ports?.tcp}`,
        ]
      : [`${match} ${v4} meta l4proto tcp dnat ip to 127.0.0.1:${ports?.tcp}`];
  const nat = ports
    ? `  chain nat {
    type nat hook output priority -100; policy accept;
    ${match} ${v4} udp dport 53 dnat ip to 127.0.0.1:${ports.dns}
    ${match} ${v4} tcp dport 53 dnat ip to 127.0.0.1:${ports.dns}
    ${tcpToDaemon.join("\n    ")}
  }
`
    : "";
  const accepts = ports
    ? [
        `ct status dnat ip daddr 127.0.0.1 tcp dport { ${ports.tcp}, ${ports.dns} } accept`,
        `ct status dnat ip daddr 127.0.0.1 udp dport ${ports.dns} accept`,
        ...(mode === "public"
          ? [`${v4} meta l4proto tcp ip daddr != ${nonPublic} fib daddr type unicast accept`]
          : []),
      ]
    : [];
  return `table inet ${t}
delete table inet ${t}
table inet ${t} {
${nat}  chain out {
    type filter hook output priority 0; policy accept;
    ${match} jump vm
  }
  chain vm {
    ct state established,related accept
    ${accepts.join("\n    ")}
    counter drop
  }
}
`;
}

const NFT_OPTIONS = {
  timeout: 10_000,
  env: { ...process.env, PATH: `${process.env.PATH ?? "/usr/bin:/bin"}:/usr/sbin:/sbin` },
};

function runNft(args: string[], input?: string): { ok: boolean; err: string } {
  const r = spawnSync("nft", args, { ...NFT_OPTIONS, input, encoding: "utf8" });
  if (r.error) return { ok: false, err: String((r.error as Error).message) };
  return { ok: r.status === 0, err: (r.stderr ?? "").trim() };
}

/** runNft without blocking the event loop: several VMs starting at once apply theirs in parallel. */
function runNftAsync(args: string[], input?: string): Promise<{ ok: boolean; err: string }> {
  return new Promise((resolve) => {
    const child = execFile("nft", args, NFT_OPTIONS, (error, _stdout, stderr) =>
      resolve({ ok: !error, err: (String(stderr).trim() || error?.message) ?? "" }),
    );
    // nft can be gone before the write (a command that reads no stdin, an nft that failed to
    // start): the write then fails with EPIPE, which must not become an uncaught error. The exit
    // status, in the callback above, reports the outcome.
    child.stdin?.on("error", () => {});
    child.stdin?.end(input);
  });
}

function rulesetRefused(err: string): HostDependencyError {
  return new HostDependencyError(
    `nftables refused the VM's network rules (${err.split("\n").slice(-3).join(" | ")}): network policies need root (CAP_NET_ADMIN) and the Debian package nftables (apt-get install nftables).`,
    { code: "NETWORK_POLICY_UNAVAILABLE" },
  );
}

export function applyRuleset(text: string): void {
  const r = runNft(["-f", "-"], text);
  if (!r.ok) throw rulesetRefused(r.err);
}

/** applyRuleset, for the SDK's path before QEMU starts (see runNftAsync). */
export async function applyRulesetAsync(text: string): Promise<void> {
  const r = await runNftAsync(["-f", "-"], text);
  if (!r.ok) throw rulesetRefused(r.err);
}

/** Deletes the VM's table (a no-op when it is gone). */
export function removeRuleset(vmId: string): void {
  runNft(["delete", "table", "inet", tableName(vmId)]);
}

/**
 * removeRuleset for the SDK's teardown: an nft run takes 10-30 ms (its own start and the
 * kernel's commit), which spawnSync would spend with the caller's event loop stopped.
 */
export async function removeRulesetAsync(vmId: string): Promise<void> {
  await runNftAsync(["delete", "table", "inet", tableName(vmId)]);
}

export interface NetworkMechanisms {
  /**
   * What enforces policies on this host for this user, or null when nothing can:
   * "cgroup-nftables-proxy" as root (host nftables matching the VM's cgroup), else
   * "userns-nftables-proxy" (QEMU in its own user + network namespace, see netns.ts).
   */
  mechanism: "cgroup-nftables-proxy" | "userns-nftables-proxy" | null;
  nft: boolean;
  cgroup2: string | null;
  root: boolean;
  conntrack: boolean;
  /** Whether the rootless mechanism works here (probed as this user; null when not probed). */
  userns: boolean | null;
  /** Present but unused alternatives, for the record. */
  slirp4netns: boolean;
  pasta: boolean;
  /** What keeps each mechanism from working (all of them when `mechanism` is null). */
  problems: string[];
}

function onPath(cmd: string): boolean {
  return ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/bin", "/usr/local/sbin"].some((d) =>
    existsSync(join(d, cmd)),
  );
}

/**
 * What network-policy mechanisms this host has (for `smolvm doctor` and each VM start): as root,
 * nftables + cgroup v2 + conntrack; otherwise (or with `probeAll`, as the doctor asks) whether
 * this user can run QEMU in its own user + network namespace with nftables and conntrack there.
 */
export function networkMechanisms(options: { probeAll?: boolean } = {}): NetworkMechanisms {
  const nft = onPath("nft");
  const mnt = cgroup2Mount() ?? null;
  const root = typeof process.getuid === "function" && process.getuid() === 0;
  const conntrack = existsSync("/proc/net/nf_conntrack");
  const rootProblems: string[] = [];
  if (!nft) rootProblems.push("install nftables (apt-get install nftables)");
  if (!mnt) rootProblems.push("mount cgroup v2 under /sys/fs/cgroup");
  if (!root) rootProblems.push("run as root (nftables and cgroups need CAP_NET_ADMIN and CAP_SYS_ADMIN)");
  if (!conntrack)
    rootProblems.push("enable the kernel's /proc/net/nf_conntrack (CONFIG_NF_CONNTRACK_PROCFS)");
  let userns: boolean | null = null;
  const problems = rootProblems.map((p) => `root nftables: ${p}`);
  if (rootProblems.length || options.probeAll) {
    const probe = probeUserNamespaces();
    userns = probe.ok;
    if (probe.problem) problems.push(`rootless user namespaces: ${probe.problem}`);
  }
  return {
    mechanism: !rootProblems.length ? "cgroup-nftables-proxy" : userns ? "userns-nftables-proxy" : null,
    nft,
    cgroup2: mnt,
    root,
    conntrack,
    userns,
    slirp4netns: onPath("slirp4netns"),
    pasta: onPath("pasta"),
    problems,
  };
}
