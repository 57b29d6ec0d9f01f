/**
 * Where a redirected connection was going. nftables rewrote its destination to the network
 * daemon; the kernel's connection tracking still holds the original, and Node has no
 * SO_ORIGINAL_DST, so the daemon reads it from /proc/net/nf_conntrack (one small text file per
 * network namespace).
 */
import { closeSync, openSync, readSync } from "node:fs";

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
  /** Another network namespace's table: `/proc/<pid of a process in it>/net/nf_conntrack`. */
  path = "/proc/net/nf_conntrack",
): OriginalDestination | undefined {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch {
    return undefined;
  }
  try {
    let len = 0;
    for (;;) {
      if (len === buf.length) {
        const bigger = Buffer.allocUnsafe(buf.length * 2);
        buf.copy(bigger, 0, 0, len);
        buf = bigger;
      }
      const n = readSync(fd, buf, len, buf.length - len, null);
      if (n === 0) break;
      len += n;
    }
    return findOriginalDestination(buf.toString("latin1", 0, len), peer, localPort);
  } catch {
    return undefined;
  } finally {
    closeSync(fd);
  }
}

/** Reused between reads (the file reports size 0, so readFileSync grows a buffer every time). */
let buf = Buffer.allocUnsafe(256 * 1024);
