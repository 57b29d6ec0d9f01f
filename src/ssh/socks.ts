/**
 * SOCKS5 (RFC 1928) server side with optional username/password auth (RFC 1929), CONNECT only.
 * The codec below is pure; SocksServer does the I/O and asks a `connectOut(host, port)` function
 * for the outbound stream (an SSH direct-tcpip channel for -D, a plain socket in unit tests).
 * Success is replied only after connectOut resolved, so a client never sends into a channel
 * that failed to open.
 */
import net from "node:net";
import type { Duplex } from "node:stream";
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

// ---------------------------------------------------------------- server

export type ConnectOut = (
  host: string,
  port: number,
  info: { srcHost: string; srcPort: number },
) => Promise<Duplex>;

export interface SocksServerOptions {
  connectOut: ConnectOut;
  /** Listen address; default 127.0.0.1 so the proxy is not open to the network. */
  host?: string;
  /** 0 (default) picks a free port. */
  port?: number;
  /** Require RFC 1929 username/password auth with these credentials. */
  auth?: SocksCredentials;
  /** Time allowed from accept to a complete request. Default 10 000. */
  handshakeTimeoutMs?: number;
  /** Time allowed for connectOut. Default 30 000. */
  connectTimeoutMs?: number;
  /** Called for each finished or failed CONNECT (for events); never receives credentials. */
  onConnection?: (info: SocksConnectionInfo) => void;
}

export interface SocksConnectionInfo {
  host: string;
  port: number;
  reply: number;
  error?: unknown;
}

/** A SOCKS5 listener; close() stops listening and destroys every open connection. */
export class SocksServer {
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();
  private readonly outbound = new Set<Duplex>();
  private closed = false;
  private boundPort = 0;

  private constructor(private readonly options: SocksServerOptions) {
    this.server = net.createServer((s) => this.accept(s));
  }

  static async listen(options: SocksServerOptions): Promise<SocksServer> {
    if (typeof options.connectOut !== "function") throw new ValidationError("SocksServer needs connectOut.");
    const srv = new SocksServer(options);
    const host = options.host ?? "127.0.0.1";
    await new Promise<void>((resolve, reject) => {
      srv.server.once("error", reject);
      srv.server.listen({ host, port: options.port ?? 0 }, () => {
        srv.server.off("error", reject);
        resolve();
      });
    });
    srv.boundPort = (srv.server.address() as net.AddressInfo).port;
    return srv;
  }

  get port(): number {
    return this.boundPort;
  }

  get host(): string {
    return (this.server.address() as net.AddressInfo | null)?.address ?? this.options.host ?? "127.0.0.1";
  }

  get listening(): boolean {
    return this.server.listening;
  }

  /** Client connections currently open (handshaking or relaying). */
  get connectionCount(): number {
    return this.sockets.size;
  }

  private accept(socket: net.Socket): void {
    if (this.closed) {
      socket.destroy();
      return;
    }
    this.sockets.add(socket);
    socket.on("close", () => this.sockets.delete(socket));
    socket.on("error", () => {});
    socket.setNoDelay(true);
    void this.handshake(socket).catch(() => socket.destroy());
  }

  private async handshake(socket: net.Socket): Promise<void> {
    const reader = new HandshakeReader(socket, this.options.handshakeTimeoutMs ?? 10_000);
    try {
      const greeting = await reader.read(parseGreeting);
      const wanted = this.options.auth ? SocksMethod.USERNAME_PASSWORD : SocksMethod.NO_AUTH;
      if (!greeting.methods.includes(wanted)) {
        socket.end(encodeMethodSelection(SocksMethod.NO_ACCEPTABLE));
        return;
      }
      socket.write(encodeMethodSelection(wanted));
      if (this.options.auth) {
        const creds = await reader.read(parseUserPass);
        const ok =
          safeEqual(creds.username, this.options.auth.username) &&
          safeEqual(creds.password, this.options.auth.password);
        if (!ok) {
          socket.end(encodeAuthStatus(false));
          return;
        }
        socket.write(encodeAuthStatus(true));
      }
      let req: SocksRequest;
      try {
        req = await reader.read(parseRequest);
      } catch (err) {
        if (err instanceof SocksRequestError) socket.end(encodeReply(err.reply));
        throw err;
      }
      if (req.command !== SocksCommand.CONNECT) {
        socket.end(encodeReply(SocksReply.COMMAND_NOT_SUPPORTED));
        this.options.onConnection?.({
          host: req.host,
          port: req.port,
          reply: SocksReply.COMMAND_NOT_SUPPORTED,
        });
        return;
      }
      const rest = reader.finish();
      await this.relay(socket, req, rest);
    } finally {
      reader.dispose();
    }
  }

  private async relay(socket: net.Socket, req: SocksRequest, early: Buffer): Promise<void> {
    socket.pause();
    let remote: Duplex;
    try {
      remote = await withTimeout(
        this.options.connectOut(req.host, req.port, {
          srcHost: socket.remoteAddress ?? "",
          srcPort: socket.remotePort ?? 0,
        }),
        this.options.connectTimeoutMs ?? 30_000,
        (late) => late.destroy(),
      );
    } catch (error) {
      const reply = replyForError(error);
      this.options.onConnection?.({ host: req.host, port: req.port, reply, error });
      if (!socket.destroyed) socket.end(encodeReply(reply));
      return;
    }
    if (this.closed || socket.destroyed) {
      remote.destroy();
      return;
    }
    this.outbound.add(remote);
    remote.on("close", () => this.outbound.delete(remote));
    remote.on("error", () => socket.destroy());
    socket.on("close", () => remote.destroy());
    remote.on("close", () => socket.destroy());
    socket.write(encodeReply(SocksReply.SUCCEEDED));
    this.options.onConnection?.({ host: req.host, port: req.port, reply: SocksReply.SUCCEEDED });
    if (early.length) remote.write(early);
    socket.pipe(remote);
    remote.pipe(socket);
    socket.resume();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const done = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.sockets) s.destroy();
    for (const r of this.outbound) r.destroy();
    await done;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

function safeEqual(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  let diff = x.length ^ y.length;
  for (let i = 0; i < Math.max(x.length, y.length); i++) diff |= (x[i] ?? 0) ^ (y[i] ?? 0);
  return diff === 0;
}

function withTimeout<T>(p: Promise<T>, ms: number, onLate: (v: T) => void): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    let done = false;
    const timer = setTimeout(() => {
      done = true;
      const err = new Error(`outbound connect did not finish within ${ms} ms`) as Error & { code: string };
      err.code = "ETIMEDOUT";
      reject(err);
    }, ms);
    p.then(
      (v) => {
        clearTimeout(timer);
        if (done) onLate(v);
        else resolve(v);
      },
      (e) => {
        clearTimeout(timer);
        if (!done) reject(e);
      },
    );
  });
}

/**
 * Reads handshake messages off a socket with a bound on total bytes and on elapsed time, so a
 * slow or hostile client cannot hold a connection or memory.
 */
class HandshakeReader {
  private buf: Buffer = Buffer.alloc(0);
  private total = 0;
  private waiter: (() => void) | undefined;
  private failure: Error | undefined;
  private readonly timer: NodeJS.Timeout;
  private readonly onData = (d: Buffer) => {
    this.total += d.length;
    if (this.total > MAX_SOCKS_MESSAGE * 3) {
      this.fail(new ProtocolError(`SOCKS handshake exceeded ${MAX_SOCKS_MESSAGE * 3} bytes: closing.`));
      return;
    }
    this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
    this.wake();
  };
  private readonly onEnd = () => this.fail(new ProtocolError("SOCKS client closed during the handshake."));

  constructor(
    private readonly socket: net.Socket,
    timeoutMs: number,
  ) {
    this.timer = setTimeout(
      () => this.fail(new ProtocolError(`SOCKS handshake not completed within ${timeoutMs} ms: closing.`)),
      timeoutMs,
    );
    socket.on("data", this.onData);
    socket.on("end", this.onEnd);
    socket.on("close", this.onEnd);
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  private fail(err: Error): void {
    if (!this.failure) this.failure = err;
    this.socket.destroy();
    this.wake();
  }

  async read<T>(parse: (b: Buffer) => Parsed<T>): Promise<T> {
    for (;;) {
      if (this.failure) throw this.failure;
      const r = parse(this.buf);
      if (r) {
        this.buf = this.buf.subarray(r.length);
        return r.value;
      }
      await new Promise<void>((resolve) => {
        this.waiter = resolve;
      });
    }
  }

  /** Stops reading and returns bytes that arrived after the last message. */
  finish(): Buffer {
    this.socket.pause();
    this.dispose();
    return this.buf;
  }

  dispose(): void {
    clearTimeout(this.timer);
    this.socket.off("data", this.onData);
    this.socket.off("end", this.onEnd);
    this.socket.off("close", this.onEnd);
  }
}

// ---------------------------------------------------------------- client (for tools and tests)

export interface Socks5ConnectOptions {
  proxyHost?: string;
  proxyPort: number;
  host: string;
  port: number;
  auth?: SocksCredentials;
  timeoutMs?: number;
}

/** Error from socks5Connect when the proxy answered with a non-success reply. */
export class SocksReplyError extends ProtocolError {
  constructor(readonly reply: number) {
    super(`SOCKS proxy refused the CONNECT with reply code ${reply}.`, {
      code: "SOCKS_REPLY",
      details: { reply },
    });
  }
}

/**
 * Opens a CONNECT tunnel through a SOCKS5 proxy; resolves with the socket once it succeeded.
 * The socket comes back paused so no byte is lost: pipe it, or attach listeners then resume().
 */
export async function socks5Connect(options: Socks5ConnectOptions): Promise<net.Socket> {
  const socket = net.connect({ host: options.proxyHost ?? "127.0.0.1", port: options.proxyPort });
  socket.on("error", () => {});
  const reader = new HandshakeReader(socket, options.timeoutMs ?? 10_000);
  try {
    await new Promise<void>((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("error", reject);
    });
    const method = options.auth ? SocksMethod.USERNAME_PASSWORD : SocksMethod.NO_AUTH;
    socket.write(Buffer.from([SOCKS_VERSION, 1, method]));
    const sel = await reader.read((b) => (b.length >= 2 ? { value: b[1]!, length: 2 } : undefined));
    if (sel !== method) throw new SocksReplyError(sel);
    if (options.auth) {
      socket.write(encodeUserPass(options.auth.username, options.auth.password));
      const status = await reader.read((b) => (b.length >= 2 ? { value: b[1]!, length: 2 } : undefined));
      if (status !== 0) throw new SocksReplyError(SocksReply.NOT_ALLOWED);
    }
    socket.write(encodeRequest({ host: options.host, port: options.port }));
    const reply = await reader.read(parseReply);
    if (reply.code !== SocksReply.SUCCEEDED) throw new SocksReplyError(reply.code);
    const rest = reader.finish();
    if (rest.length) socket.unshift(rest);
    return socket;
  } catch (err) {
    reader.dispose();
    socket.destroy();
    throw err;
  }
}
