/**
 * The SOCKS5 wire format (RFC 1928, with RFC 1929 username/password): constants, incremental
 * parsers that return undefined until a whole message is in, encoders, and the mapping from a
 * failed outbound open to a SOCKS reply code. Pure: no sockets here (socks.ts does the I/O).
 */
import net from "node:net";
import { ProtocolError, ValidationError } from "../errors.js";

// ---------------------------------------------------------------- constants

export const SOCKS_VERSION = 0x05;
export const AUTH_VERSION = 0x01;

export const SocksMethod = {
  NO_AUTH: 0x00,
  USERNAME_PASSWORD: 0x02,
  NO_ACCEPTABLE: 0xff,
} as const;

export const SocksCommand = { CONNECT: 0x01, BIND: 0x02, UDP_ASSOCIATE: 0x03 } as const;
export const SocksAddressType = { IPV4: 0x01, DOMAIN: 0x03, IPV6: 0x04 } as const;

export const SocksReply = {
  SUCCEEDED: 0x00,
  GENERAL_FAILURE: 0x01,
  NOT_ALLOWED: 0x02,
  NETWORK_UNREACHABLE: 0x03,
  HOST_UNREACHABLE: 0x04,
  CONNECTION_REFUSED: 0x05,
  TTL_EXPIRED: 0x06,
  COMMAND_NOT_SUPPORTED: 0x07,
  ADDRESS_TYPE_NOT_SUPPORTED: 0x08,
} as const;
export type SocksReplyCode = (typeof SocksReply)[keyof typeof SocksReply];

/** Longest legal handshake message: a request with a 255-byte domain (4 + 1 + 255 + 2). */
export const MAX_SOCKS_MESSAGE = 513;

// ---------------------------------------------------------------- pure codec

/** A parse step: `undefined` means "need more bytes"; otherwise the value and bytes consumed. */
export type Parsed<T> = { value: T; length: number } | undefined;

export interface SocksGreeting {
  methods: number[];
}

export function parseGreeting(buf: Buffer): Parsed<SocksGreeting> {
  if (buf.length < 1) return undefined;
  if (buf[0] !== SOCKS_VERSION) {
    throw new ProtocolError(
      `SOCKS client sent version ${buf[0]}, only SOCKS5 is served: configure the client for SOCKS5.`,
      { details: { version: buf[0] } },
    );
  }
  if (buf.length < 2) return undefined;
  const n = buf[1]!;
  if (n === 0) throw new ProtocolError("SOCKS5 greeting offers no authentication method.");
  if (buf.length < 2 + n) return undefined;
  return { value: { methods: [...buf.subarray(2, 2 + n)] }, length: 2 + n };
}

export function encodeMethodSelection(method: number): Buffer {
  return Buffer.from([SOCKS_VERSION, method]);
}

export interface SocksCredentials {
  username: string;
  password: string;
}

export function parseUserPass(buf: Buffer): Parsed<SocksCredentials> {
  if (buf.length < 1) return undefined;
  if (buf[0] !== AUTH_VERSION) {
    throw new ProtocolError(`SOCKS username/password sub-negotiation version ${buf[0]} is not 1.`);
  }
  if (buf.length < 2) return undefined;
  const ulen = buf[1]!;
  if (buf.length < 2 + ulen + 1) return undefined;
  const plen = buf[2 + ulen]!;
  const total = 3 + ulen + plen;
  if (buf.length < total) return undefined;
  return {
    value: {
      username: buf.subarray(2, 2 + ulen).toString("utf8"),
      password: buf.subarray(3 + ulen, total).toString("utf8"),
    },
    length: total,
  };
}

export function encodeUserPass(username: string, password: string): Buffer {
  const u = Buffer.from(username, "utf8");
  const p = Buffer.from(password, "utf8");
  if (u.length > 255 || p.length > 255) {
    throw new ValidationError("SOCKS username and password must each be at most 255 bytes.");
  }
  return Buffer.concat([Buffer.from([AUTH_VERSION, u.length]), u, Buffer.from([p.length]), p]);
}

export function encodeAuthStatus(ok: boolean): Buffer {
  return Buffer.from([AUTH_VERSION, ok ? 0x00 : 0x01]);
}

export interface SocksRequest {
  command: number;
  addressType: number;
  /** Dotted IPv4, canonical IPv6 (no brackets) or the domain name as sent. */
  host: string;
  port: number;
}

/**
 * Parses a request. Unknown address types cannot be skipped (their length is unknown), so they
 * throw a SocksRequestError carrying the reply code to send before closing.
 */
export function parseRequest(buf: Buffer): Parsed<SocksRequest> {
  if (buf.length < 4) return undefined;
  if (buf[0] !== SOCKS_VERSION) throw new ProtocolError(`SOCKS request version ${buf[0]} is not 5.`);
  const command = buf[1]!;
  const addressType = buf[3]!;
  let host: string;
  let off: number;
  if (addressType === SocksAddressType.IPV4) {
    if (buf.length < 4 + 4 + 2) return undefined;
    host = [...buf.subarray(4, 8)].join(".");
    off = 8;
  } else if (addressType === SocksAddressType.IPV6) {
    if (buf.length < 4 + 16 + 2) return undefined;
    host = formatIPv6(buf.subarray(4, 20));
    off = 20;
  } else if (addressType === SocksAddressType.DOMAIN) {
    if (buf.length < 5) return undefined;
    const n = buf[4]!;
    if (n === 0)
      throw new SocksRequestError("SOCKS request names an empty domain.", SocksReply.GENERAL_FAILURE);
    if (buf.length < 5 + n + 2) return undefined;
    host = buf.subarray(5, 5 + n).toString("latin1");
    off = 5 + n;
  } else {
    throw new SocksRequestError(
      `SOCKS request uses address type ${addressType}; supported: IPv4, IPv6, domain.`,
      SocksReply.ADDRESS_TYPE_NOT_SUPPORTED,
    );
  }
  const port = buf.readUInt16BE(off);
  return { value: { command, addressType, host, port }, length: off + 2 };
}

export function encodeRequest(req: { command?: number; host: string; port: number }): Buffer {
  const command = req.command ?? SocksCommand.CONNECT;
  let addr: Buffer;
  const family = net.isIP(req.host);
  if (family === 4) {
    addr = Buffer.from([SocksAddressType.IPV4, ...req.host.split(".").map(Number)]);
  } else if (family === 6) {
    addr = Buffer.concat([Buffer.from([SocksAddressType.IPV6]), parseIPv6(req.host)]);
  } else {
    const name = Buffer.from(req.host, "latin1");
    if (name.length === 0 || name.length > 255)
      throw new ValidationError("SOCKS domain must be 1-255 bytes.");
    addr = Buffer.concat([Buffer.from([SocksAddressType.DOMAIN, name.length]), name]);
  }
  const port = Buffer.alloc(2);
  port.writeUInt16BE(req.port);
  return Buffer.concat([Buffer.from([SOCKS_VERSION, command, 0x00]), addr, port]);
}

/** A reply; the bound address defaults to 0.0.0.0:0 as OpenSSH's -D sends. */
export function encodeReply(code: number, bindHost = "0.0.0.0", bindPort = 0): Buffer {
  const family = net.isIP(bindHost);
  const addr =
    family === 6
      ? Buffer.concat([Buffer.from([SocksAddressType.IPV6]), parseIPv6(bindHost)])
      : Buffer.from([
          SocksAddressType.IPV4,
          ...(family === 4 ? bindHost.split(".").map(Number) : [0, 0, 0, 0]),
        ]);
  const port = Buffer.alloc(2);
  port.writeUInt16BE(bindPort);
  return Buffer.concat([Buffer.from([SOCKS_VERSION, code, 0x00]), addr, port]);
}

export interface SocksReplyMessage {
  code: number;
  bindHost: string;
  bindPort: number;
}

export function parseReply(buf: Buffer): Parsed<SocksReplyMessage> {
  if (buf.length < 4) return undefined;
  const r = parseRequest(buf); // same layout, with the reply code where the command sits
  if (!r) return undefined;
  return {
    value: { code: r.value.command, bindHost: r.value.host, bindPort: r.value.port },
    length: r.length,
  };
}

function formatIPv6(bytes: Buffer): string {
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(bytes.readUInt16BE(i).toString(16));
  // Compress the longest run of zero groups, as RFC 5952 asks.
  let bestStart = -1;
  let bestLen = 0;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== "0") {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === "0") j++;
    if (j - i > bestLen && j - i > 1) {
      bestStart = i;
      bestLen = j - i;
    }
    i = j;
  }
  if (bestStart < 0) return groups.join(":");
  const head = groups.slice(0, bestStart).join(":");
  const tail = groups.slice(bestStart + bestLen).join(":");
  return `${head}::${tail}`;
}

function parseIPv6(text: string): Buffer {
  let s = text.replace(/^\[|\]$/g, "");
  const zone = s.indexOf("%");
  if (zone >= 0) s = s.slice(0, zone);
  // An embedded IPv4 tail (::ffff:1.2.3.4) becomes two hex groups.
  const v4 = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(s);
  if (v4) {
    const [a, b, c, d] = v4.slice(1).map(Number) as [number, number, number, number];
    s = `${s.slice(0, v4.index)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const [left, right] = s.includes("::") ? s.split("::") : [s, undefined];
  const l = left ? left.split(":") : [];
  const r = right !== undefined && right !== "" ? right.split(":") : [];
  const fill = right === undefined ? [] : new Array(8 - l.length - r.length).fill("0");
  const groups = [...l, ...fill, ...r];
  const out = Buffer.alloc(16);
  groups.forEach((g, i) => {
    out.writeUInt16BE(Number.parseInt(g, 16), i * 2);
  });
  return out;
}

/** A request that cannot be served; `reply` is the code to answer with. */
export class SocksRequestError extends ProtocolError {
  constructor(
    message: string,
    readonly reply: SocksReplyCode,
  ) {
    super(message, { code: "SOCKS_REQUEST", details: { reply } });
  }
}

/** SSH channel-open failure reasons (RFC 4254 §5.1). */
const SSH_OPEN_ADMINISTRATIVELY_PROHIBITED = 1;
const SSH_OPEN_CONNECT_FAILED = 2;

const ERRNO_REPLY: Record<string, SocksReplyCode> = {
  ECONNREFUSED: SocksReply.CONNECTION_REFUSED,
  EHOSTUNREACH: SocksReply.HOST_UNREACHABLE,
  EHOSTDOWN: SocksReply.HOST_UNREACHABLE,
  ENOTFOUND: SocksReply.HOST_UNREACHABLE,
  EAI_AGAIN: SocksReply.HOST_UNREACHABLE,
  ENETUNREACH: SocksReply.NETWORK_UNREACHABLE,
  ENETDOWN: SocksReply.NETWORK_UNREACHABLE,
  ETIMEDOUT: SocksReply.TTL_EXPIRED,
  EACCES: SocksReply.NOT_ALLOWED,
  EPERM: SocksReply.NOT_ALLOWED,
};

/**
 * Maps an outbound failure to a reply code, from codes only: errno codes of plain sockets and
 * the numeric `reason` ssh2 attaches to a refused channel open. OpenSSH reports every failed
 * outbound connect as CONNECT_FAILED, which most often is a refusal.
 */
export function replyForError(error: unknown): SocksReplyCode {
  if (error instanceof SocksRequestError) return error.reply;
  const e = error as { code?: unknown; reason?: unknown; cause?: unknown } | null;
  if (typeof e?.code === "string" && e.code in ERRNO_REPLY) return ERRNO_REPLY[e.code]!;
  if (e?.reason === SSH_OPEN_ADMINISTRATIVELY_PROHIBITED) return SocksReply.NOT_ALLOWED;
  if (e?.reason === SSH_OPEN_CONNECT_FAILED) return SocksReply.CONNECTION_REFUSED;
  if (e?.cause !== undefined && e.cause !== error) {
    const inner = replyForError(e.cause);
    if (inner !== SocksReply.GENERAL_FAILURE) return inner;
  }
  return SocksReply.GENERAL_FAILURE;
}
