/**
 * The little of the DNS wire format (RFC 1035) the policy's DNS forwarder needs, pure: read one
 * question, answer it with A records, NODATA, NXDOMAIN or an error code.
 */

export const QTYPE_A = 1;
export const QTYPE_AAAA = 28;
export const RCODE_SERVFAIL = 2;
export const RCODE_NXDOMAIN = 3;
export const RCODE_REFUSED = 5;

export interface DnsQuestion {
  id: number;
  /** Recursion desired, echoed back. */
  rd: boolean;
  name: string;
  qtype: number;
  qclass: number;
  /** The question section's bytes, echoed back in the answer. */
  raw: Buffer;
}

/** Parses a query with exactly one question; undefined for anything else. */
export function parseQuery(msg: Buffer): DnsQuestion | undefined {
  if (msg.length < 12) return undefined;
  const flags = msg.readUInt16BE(2);
  if (flags & 0x8000) return undefined; // a response, not a query
  if (((flags >> 11) & 0xf) !== 0) return undefined; // opcode QUERY only
  if (msg.readUInt16BE(4) !== 1) return undefined;
  const labels: string[] = [];
  let p = 12;
  for (;;) {
    if (p >= msg.length) return undefined;
    const len = msg[p]!;
    if (len === 0) {
      p += 1;
      break;
    }
    if (len > 63 || p + 1 + len > msg.length) return undefined; // no compression in questions
    labels.push(msg.toString("latin1", p + 1, p + 1 + len));
    p += 1 + len;
  }
  if (p + 4 > msg.length) return undefined;
  return {
    id: msg.readUInt16BE(0),
    rd: Boolean(flags & 0x0100),
    name: labels.join(".").toLowerCase(),
    qtype: msg.readUInt16BE(p),
    qclass: msg.readUInt16BE(p + 2),
    raw: msg.subarray(12, p + 4),
  };
}

/** A response to `q`: `addresses` as A records (IPv4 only) with `ttl`, or an rcode. */
export function buildResponse(
  q: DnsQuestion,
  rcode: number,
  addresses: readonly string[] = [],
  ttl = 30,
): Buffer {
  const answers = q.qtype === QTYPE_A && rcode === 0 ? addresses : [];
  const head = Buffer.alloc(12);
  head.writeUInt16BE(q.id, 0);
  head.writeUInt16BE(0x8000 | 0x0080 | (q.rd ? 0x0100 : 0) | (rcode & 0xf), 2); // QR, RA, RD, rcode
  head.writeUInt16BE(1, 4);
  head.writeUInt16BE(answers.length, 6);
  const rrs = answers.map((ip) => {
    const rr = Buffer.alloc(16);
    rr.writeUInt16BE(0xc00c, 0); // pointer to the question's name
    rr.writeUInt16BE(QTYPE_A, 2);
    rr.writeUInt16BE(1, 4);
    rr.writeUInt32BE(ttl, 6);
    rr.writeUInt16BE(4, 10);
    ip.split(".").forEach((o, i) => {
      rr[12 + i] = Number(o);
    });
    return rr;
  });
  return Buffer.concat([head, q.raw, ...rrs]);
}
