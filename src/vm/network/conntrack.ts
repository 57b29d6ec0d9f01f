/**
 * Where a redirected connection was going. nftables rewrote its destination to the network
 * daemon; the kernel's connection tracking still holds the original, and Node has no
 * SO_ORIGINAL_DST, so the daemon reads it from /proc/net/nf_conntrack (one small text file per
 * network namespace).
 */
import { readFileSync } from "node:fs";

export interface OriginalDestination {
  ip: string;
  port: number;
}

/** Finds the tuple in conntrack text (pure, for tests). */
export function findOriginalDestination(
  text: string,
  peer: { address: string; port: number },
  localPort: number,
): OriginalDestination | undefined {
  const needle = `src=${peer.address} `;
  const sport = `sport=${peer.port} `;
  for (const line of text.split("\n")) {
    if (!line.includes(needle) || !line.includes(sport)) continue;
    const m =
      /\bsrc=(\S+) dst=(\S+) sport=(\d+) dport=(\d+) .*?\bsrc=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)/.exec(
        line,
      );
    if (!m) continue;
    if (m[1] === peer.address && Number(m[3]) === peer.port && Number(m[7]) === localPort) {
      return { ip: m[2]!, port: Number(m[4]) };
    }
  }
  return undefined;
}

/**
 * Synchronous on purpose: a /proc read takes about 0.5 ms, and the thread pool's round trip
 * (plus readFile's chunked reads of a file that reports size 0) tripled that per connection.
 */
export function originalDestination(
  peer: { address: string; port: number },
  localPort: number,
): OriginalDestination | undefined {
  let text = "";
  try {
    text = readFileSync("/proc/net/nf_conntrack", "utf8");
  } catch {
    return undefined;
  }
  return findOriginalDestination(text, peer, localPort);
}
