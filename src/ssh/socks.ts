/**
 * SOCKS5 (RFC 1928) server side with optional username/password auth (RFC 1929), CONNECT only.
 * The codec is pure (socks-codec.ts); SocksServer does the I/O and asks a `connectOut(host, port)` function
 * for the outbound stream (an SSH direct-tcpip channel for -D, a plain socket in unit tests).
 * Success is replied only after connectOut resolved, so a client never sends into a channel
 * that failed to open.
 */
import net from "node:net";
import type { Duplex } from "node:stream";
import { ProtocolError, ValidationError } from "../errors.js";
import {
  encodeAuthStatus,
  encodeMethodSelection,
  encodeReply,
  encodeRequest,
  encodeUserPass,
  MAX_SOCKS_MESSAGE,
  type Parsed,
  parseGreeting,
  parseReply,
  parseRequest,
  parseUserPass,
  replyForError,
  SOCKS_VERSION,
  SocksCommand,
  type SocksCredentials,
  SocksMethod,
  SocksReply,
  type SocksRequest,
  SocksRequestError,
} from "./socks-codec.js";

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
