/**
 * The rootless half of the network policy. Without root there is no host nftables and no cgroup
 * to match QEMU's sockets on, so QEMU runs in a user + network namespace of its own (made by
 * `unshare`, allowed to ordinary users where the host permits unprivileged user namespaces). That
 * namespace has only a loopback device: no link to anything outside it. Its own nftables rules
 * (loaded by QEMU's launcher, before QEMU execs) redirect every TCP connection and DNS query
 * QEMU's user-mode network starts to listening sockets that a small relay (relay.ts) opens inside
 * the namespace and hands, as file descriptors, to the VM's network daemon in the host namespace.
 * The daemon reads the original destination from the namespace's conntrack table, decides exactly
 * as in root mode, and connects out itself. Port forwards go the other way: the daemon listens on
 * the host port and asks the relay for a connection to QEMU's forward inside the namespace.
 */
import { spawnSync } from "node:child_process";

/** Inside the namespace: the relay's transparent TCP proxy port (all guest TCP is redirected here). */
export const RELAY_TCP_PORT = 1;
/** Inside the namespace: the relay's DNS port (UDP and TCP). */
export const RELAY_DNS_PORT = 53;
/** The relay's own connections to QEMU's forwards leave from this address; they are not redirected. */
export const RELAY_SOURCE = "127.0.0.2";

/** PATH with the sbin directories, where `ip` and `nft` live (ordinary users often lack them). */
export function toolPath(): string {
  return `${process.env.PATH ?? "/usr/bin:/bin"}:/usr/sbin:/sbin`;
}

/**
 * The namespace's nftables ruleset. Every new IPv4 TCP connection and DNS query goes to the relay's
 * sockets (whose file descriptors the host-side daemon holds); IPv6 and any other new traffic is
 * dropped. The namespace has no outside link, so a packet the rules let through still goes nowhere.
 */
export function renderNetnsRuleset(): string {
  return `table inet smolvm {
  chain nat {
    type nat hook output priority -100; policy accept;
    ip saddr ${RELAY_SOURCE} accept
    meta nfproto ipv4 udp dport 53 redirect to :${RELAY_DNS_PORT}
    meta nfproto ipv4 tcp dport 53 redirect to :${RELAY_DNS_PORT}
    meta nfproto ipv4 meta l4proto tcp redirect to :${RELAY_TCP_PORT}
  }
  chain out {
    type filter hook output priority 0; policy drop;
    meta nfproto ipv6 drop
    ct state established,related accept
    ip saddr ${RELAY_SOURCE} ip daddr 127.0.0.1 meta l4proto tcp accept
    ct status dnat ip daddr 127.0.0.1 accept
    counter drop
  }
}
`;
}

/**
 * Run inside the new namespaces (as `sh -c SETUP sh qemu args...`): loopback up, a default route
 * over it (so connections to outside addresses reach the output hook instead of failing with "no
 * route"), the rules, QEMU's pid for the daemon, then exec QEMU (which keeps the pid).
 */
const SETUP =
  'ip link set lo up && ip route add default dev lo src 127.0.0.1 && nft -f "$SMOLVM_NETNS_RULES" && echo $$ > "$SMOLVM_NETNS_PID" && exec "$@"';

/**
 * The argv prefix and environment that start a command in a fresh user + network namespace. The
 * network namespace is made after the user namespace's id maps are written (two unshare calls), or
 * its conntrack table would not be readable by the user.
 */
export function netnsWrap(rulesPath: string, pidPath: string): { argv: string[]; env: NodeJS.ProcessEnv } {
  return {
    argv: ["unshare", "-Ur", "unshare", "-n", "--", "/bin/sh", "-c", SETUP, "sh"],
    env: { ...process.env, PATH: toolPath(), SMOLVM_NETNS_RULES: rulesPath, SMOLVM_NETNS_PID: pidPath },
  };
}

let probed: { ok: boolean; problem?: string } | undefined;

/**
 * Whether this host lets this user do all of it: unprivileged user namespaces, a network namespace
 * with loopback, the ruleset (nf_tables with NAT), a readable conntrack table, and nsenter. Runs
 * the real thing once per process (about 10 ms) and remembers the answer.
 */
export function probeUserNamespaces(): { ok: boolean; problem?: string } {
  if (probed) return probed;
  const r = spawnSync(
    "unshare",
    [
      "-Ur",
      "unshare",
      "-n",
      "--",
      "/bin/sh",
      "-c",
      'ip link set lo up && ip route add default dev lo src 127.0.0.1 && printf "%s" "$R" | nft -f - && test -r /proc/self/net/nf_conntrack && command -v nsenter >/dev/null',
    ],
    {
      encoding: "utf8",
      timeout: 10_000,
      env: { ...process.env, PATH: toolPath(), R: renderNetnsRuleset() },
    },
  );
  if (r.error) {
    probed = {
      ok: false,
      problem: `cannot run unshare (${(r.error as NodeJS.ErrnoException).code}): install util-linux`,
    };
  } else if (r.status !== 0) {
    const why = (r.stderr ?? "").trim().split("\n").slice(-2).join(" | ") || `exit ${r.status}`;
    probed = {
      ok: false,
      problem: `unprivileged user + network namespaces with nftables and conntrack do not work here (${why}): allow them (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0; on Ubuntu kernel.apparmor_restrict_unprivileged_userns=0), install nftables and iproute2, or run as root`,
    };
  } else probed = { ok: true };
  return probed;
}
