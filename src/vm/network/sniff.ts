/**
 * Reads the name a connection is for from its first bytes, pure: the SNI of a TLS ClientHello or
 * the Host header of an HTTP/1.x request. The network daemon checks that name against the
 * allow-list, so an allowed address cannot carry a request for a name that is not allowed.
 */

export type SniffResult =
  /** More bytes are needed to decide. */
  | { kind: "more" }
  /** Not TLS or HTTP (or no name in it): decide on the address alone. */
  | { kind: "none" }
  | { kind: "host"; host: string; via: "sni" | "http" };

const HTTP_METHOD = /^(GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH|CONNECT|TRACE) /;
/** Enough for any real ClientHello or request head; beyond it, decide on what we have. */
export const SNIFF_LIMIT = 16 * 1024;

export function sniffHost(buf: Buffer): SniffResult {
  if (buf.length === 0) return { kind: "more" };
  if (buf[0] === 0x16) return sniffTls(buf);
  const head = buf.subarray(0, Math.min(buf.length, SNIFF_LIMIT)).toString("latin1");
  if (head.length < 8 && /^[A-Z]+$/.test(head)) return { kind: "more" };
  if (!HTTP_METHOD.test(head)) return { kind: "none" };
  const end = head.indexOf("\r\n\r\n");
  const lines = (end >= 0 ? head.slice(0, end) : head).split("\r\n");
  for (const line of lines.slice(1)) {
    const m = /^host:[ \t]*([^ \t]+)[ \t]*$/i.exec(line);
    if (m) return { kind: "host", host: stripPort(m[1]!), via: "http" };
  }
  if (end < 0 && buf.length < SNIFF_LIMIT) return { kind: "more" };
  return { kind: "none" };
}

function stripPort(h: string): string {
  if (h.startsWith("[")) return h.slice(0, h.indexOf("]") + 1);
  const i = h.lastIndexOf(":");
  return i > 0 && /^\d+$/.test(h.slice(i + 1)) ? h.slice(0, i) : h;
}

function sniffTls(buf: Buffer): SniffResult {
  if (buf.length < 5) return { kind: "more" };
  if (buf[1] !== 0x03) return { kind: "none" };
  const recLen = buf.readUInt16BE(3);
  if (buf.length < 5 + recLen)
    return recLen + 5 > SNIFF_LIMIT ? parseHello(buf.subarray(5)) : { kind: "more" };
  return parseHello(buf.subarray(5, 5 + recLen));
}

function parseHello(h: Buffer): SniffResult {
  try {
    if (h[0] !== 0x01) return { kind: "none" }; // not a ClientHello
    let p = 4 + 2 + 32; // handshake header, version, random
    p += 1 + h[p]!; // session id
    p += 2 + h.readUInt16BE(p); // cipher suites
    p += 1 + h[p]!; // compression methods
    if (p + 2 > h.length) return { kind: "none" };
    const extEnd = p + 2 + h.readUInt16BE(p);
    p += 2;
    while (p + 4 <= Math.min(extEnd, h.length)) {
      const type = h.readUInt16BE(p);
      const len = h.readUInt16BE(p + 2);
      p += 4;
      if (type === 0) {
        // server_name: list length, then (type 0 = host_name, length, name)
        let q = p + 2;
        const listEnd = p + h.readUInt16BE(p) + 2;
        while (q + 3 <= listEnd) {
          const nameType = h[q]!;
          const nameLen = h.readUInt16BE(q + 1);
          if (nameType === 0)
            return { kind: "host", host: h.toString("latin1", q + 3, q + 3 + nameLen), via: "sni" };
          q += 3 + nameLen;
        }
        return { kind: "none" };
      }
      p += len;
    }
    return { kind: "none" };
  } catch {
    return { kind: "none" };
  }
}
