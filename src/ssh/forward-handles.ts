/**
 * What one forward is: its intent (kind, ports, id) and its handle, whose local listener lives
 * as long as the handle whatever happens to the transport. -L accepts locally and opens
 * direct-tcpip channels; -D runs a SOCKS5 server whose CONNECTs become direct-tcpip channels;
 * -R asks the server to listen and takes forwarded-tcpip channels back. forward.ts holds the
 * manager that attaches handles to each new transport.
 */
import net from "node:net";
import type { Duplex } from "node:stream";
import type { Client, ClientChannel, TcpConnectionDetails } from "ssh2";
import { ConnectionLostError, SSHConnectionError } from "../errors.js";
import type { EventSink } from "./events.js";
import { SocksServer } from "./socks.js";
import type { SocksCredentials } from "./socks-codec.js";

export type ForwardKind = "local" | "remote" | "dynamic";

export interface LocalForwardSpec {
  /** Default 127.0.0.1. */
  localHost?: string;
  /** 0 picks a free port (see handle.localPort). */
  localPort?: number;
  remoteHost: string;
  remotePort: number;
}

export interface RemoteForwardSpec {
  /** Address the server binds; default 127.0.0.1 (the server's loopback). */
  remoteHost?: string;
  /** 0 lets the server pick (see handle.remotePort); replays reuse the port first bound. */
  remotePort: number;
  /** Where connections are delivered on this side. Default 127.0.0.1. */
  localHost?: string;
  localPort: number;
}

export interface DynamicForwardSpec {
  /** Default 127.0.0.1. */
  localHost?: string;
  localPort?: number;
  /** Require SOCKS5 username/password auth (RFC 1929). */
  auth?: SocksCredentials;
}

/** What a forward was asked to do (credentials are never part of it). */
export interface ForwardIntent {
  id: number;
  kind: ForwardKind;
  localHost: string;
  localPort: number;
  remoteHost?: string;
  remotePort?: number;
}

/** Where forwards get a live transport. The supervisor waits through reconnects; a plain connection does not. */
export interface ForwardLink {
  /** A live ssh2 client, waiting up to `timeoutMs` for one; throws when there will be none. */
  acquire(timeoutMs: number): Promise<Client>;
  readonly alive: boolean;
}

export interface ForwardManagerOptions {
  events?: EventSink;
  /** How long a new forwarded connection waits for a live transport (during a reconnect). Default 30 000. */
  pendingTimeoutMs?: number;
  /** Bound on channel opens. Default 15 000. */
  channelOpenTimeoutMs?: number;
}

/** What a handle needs from the manager that holds it (ForwardManager). */
export interface ForwardOwner {
  readonly link: ForwardLink;
  readonly pendingTimeoutMs: number;
  readonly channelOpenTimeoutMs: number;
  /** Emits a FORWARD event about `h`. */
  emit(action: string, h: ForwardHandle, extra?: Record<string, unknown>): void;
  /** Drops a closed handle: it is never replayed. */
  forget(h: ForwardHandle): void;
}

let nextId = 1;

function openDirect(
  client: Client,
  src: { host: string; port: number },
  dst: { host: string; port: number },
  timeoutMs: number,
): Promise<ClientChannel> {
  return new Promise((resolve, reject) => {
    let done = false;
    const t = setTimeout(() => {
      done = true;
      reject(
        Object.assign(
          new SSHConnectionError(
            `opening a forwarded channel to ${dst.host}:${dst.port} took over ${timeoutMs} ms.`,
          ),
          { reason: undefined },
        ),
      );
    }, timeoutMs);
    try {
      client.forwardOut(src.host || "127.0.0.1", src.port || 0, dst.host, dst.port, (err, ch) => {
        clearTimeout(t);
        if (done) {
          ch?.close();
          return;
        }
        done = true;
        if (err) reject(err);
        else resolve(ch);
      });
    } catch (e) {
      clearTimeout(t);
      reject(
        new ConnectionLostError("the SSH transport closed before the channel could open.", { cause: e }),
      );
    }
  });
}

/** Pipes two streams both ways and destroys both when either side ends badly or closes. */
function splice(a: Duplex, b: Duplex, track: Set<Duplex>): void {
  track.add(a);
  track.add(b);
  const kill = () => {
    a.destroy();
    b.destroy();
  };
  a.on("error", kill);
  b.on("error", kill);
  a.on("close", () => {
    track.delete(a);
    b.destroy();
  });
  b.on("close", () => {
    track.delete(b);
    a.destroy();
  });
  a.pipe(b);
  b.pipe(a);
}

export abstract class ForwardHandle implements AsyncDisposable {
  readonly intent: ForwardIntent;
  protected closed = false;
  protected readonly streams = new Set<Duplex>();
  /** Connections forwarded so far. */
  connections = 0;

  constructor(
    intent: Omit<ForwardIntent, "id">,
    protected readonly manager: ForwardOwner,
  ) {
    this.intent = { id: nextId++, ...intent };
  }

  get kind(): ForwardKind {
    return this.intent.kind;
  }
  get localPort(): number {
    return this.intent.localPort;
  }
  get localHost(): string {
    return this.intent.localHost;
  }
  /** Listening and attached to a live transport. */
  abstract get active(): boolean;
  get isClosed(): boolean {
    return this.closed;
  }

  /** Starts listening (first open). */
  abstract open(): Promise<void>;
  /** A (new) transport is live: re-establish what lives on the server side. */
  abstract attach(client: Client): Promise<void>;
  /** The transport died: drop what rode on it. The listener stays. */
  detach(): void {
    for (const s of this.streams) s.destroy();
  }
  protected abstract shutdown(): Promise<void>;

  /** Stops the forward for good; it will not be replayed. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.manager.forget(this);
    for (const s of this.streams) s.destroy();
    await this.shutdown();
    this.manager.emit("close", this);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  toJSON(): ForwardIntent & { active: boolean } {
    return { ...this.intent, active: this.active };
  }
}

async function listen(server: net.Server, host: string, port: number): Promise<number> {
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen({ host, port }, () => {
      server.off("error", reject);
      resolve();
    });
  });
  return (server.address() as net.AddressInfo).port;
}

export class LocalForwardHandle extends ForwardHandle {
  private readonly server = net.createServer((s) => this.onClient(s));

  get active(): boolean {
    return !this.closed && this.server.listening && this.manager.link.alive;
  }
  get remoteHost(): string {
    return this.intent.remoteHost!;
  }
  get remotePort(): number {
    return this.intent.remotePort!;
  }

  async open(): Promise<void> {
    this.intent.localPort = await listen(this.server, this.intent.localHost, this.intent.localPort);
  }

  async attach(): Promise<void> {}

  private onClient(socket: net.Socket): void {
    if (this.closed) {
      socket.destroy();
      return;
    }
    socket.pause();
    socket.setNoDelay(true);
    this.streams.add(socket);
    socket.on("error", () => {});
    socket.on("close", () => this.streams.delete(socket));
    this.connections++;
    const m = this.manager;
    m.link
      .acquire(m.pendingTimeoutMs)
      .then((client) =>
        openDirect(
          client,
          { host: socket.remoteAddress ?? "127.0.0.1", port: socket.remotePort ?? 0 },
          { host: this.intent.remoteHost!, port: this.intent.remotePort! },
          m.channelOpenTimeoutMs,
        ),
      )
      .then(
        (ch) => {
          if (this.closed || socket.destroyed) {
            ch.close();
            return;
          }
          splice(socket, ch, this.streams);
          socket.resume();
        },
        (err) => {
          m.emit("channel_error", this, {
            code: (err as { code?: string }).code,
            reason: (err as { reason?: unknown }).reason,
          });
          socket.destroy();
        },
      );
  }

  protected async shutdown(): Promise<void> {
    await new Promise<void>((resolve) =>
      this.server.listening ? this.server.close(() => resolve()) : resolve(),
    );
  }
}

export class DynamicForwardHandle extends ForwardHandle {
  private socks: SocksServer | undefined;

  constructor(
    intent: Omit<ForwardIntent, "id">,
    manager: ForwardOwner,
    private readonly auth: SocksCredentials | undefined,
  ) {
    super(intent, manager);
  }

  get active(): boolean {
    return !this.closed && !!this.socks?.listening && this.manager.link.alive;
  }

  async open(): Promise<void> {
    const m = this.manager;
    this.socks = await SocksServer.listen({
      host: this.intent.localHost,
      port: this.intent.localPort,
      auth: this.auth,
      connectTimeoutMs: m.pendingTimeoutMs + m.channelOpenTimeoutMs,
      connectOut: async (host, port, src) => {
        this.connections++;
        const client = await m.link.acquire(m.pendingTimeoutMs);
        const ch = await openDirect(
          client,
          { host: src.srcHost, port: src.srcPort },
          { host, port },
          m.channelOpenTimeoutMs,
        );
        this.streams.add(ch);
        ch.on("close", () => this.streams.delete(ch));
        return ch;
      },
      onConnection: (info) => {
        if (info.reply !== 0) m.emit("channel_error", this, { socksReply: info.reply });
      },
    });
    this.intent.localPort = this.socks.port;
  }

  async attach(): Promise<void> {}

  protected async shutdown(): Promise<void> {
    await this.socks?.close();
  }
}

export class RemoteForwardHandle extends ForwardHandle {
  private client: Client | undefined;
  private bound = false;
  private readonly onTcp = (info: TcpConnectionDetails, accept: () => ClientChannel, reject: () => void) => {
    if (info.destPort !== this.intent.remotePort || !this.bound) return;
    if (this.closed) {
      reject();
      return;
    }
    this.connections++;
    const ch = accept();
    ch.pause();
    const sock = net.connect({ host: this.intent.localHost, port: this.intent.localPort });
    sock.setNoDelay(true);
    sock.once("connect", () => {
      splice(sock, ch, this.streams);
      ch.resume();
    });
    sock.once("error", (err) => {
      this.manager.emit("channel_error", this, { code: (err as NodeJS.ErrnoException).code });
      ch.close();
    });
  };

  get active(): boolean {
    return !this.closed && this.bound && !!this.client && this.manager.link.alive;
  }
  get remoteHost(): string {
    return this.intent.remoteHost!;
  }
  get remotePort(): number {
    return this.intent.remotePort!;
  }

  async open(): Promise<void> {
    const client = await this.manager.link.acquire(this.manager.pendingTimeoutMs);
    await this.attach(client);
  }

  async attach(client: Client): Promise<void> {
    this.detachClient();
    this.client = client;
    client.on("tcp connection", this.onTcp);
    const port = await new Promise<number>((resolve, reject) => {
      const t = setTimeout(
        () =>
          reject(
            new SSHConnectionError(
              `the server did not answer the -R request within ${this.manager.channelOpenTimeoutMs} ms.`,
            ),
          ),
        this.manager.channelOpenTimeoutMs,
      );
      try {
        client.forwardIn(this.intent.remoteHost!, this.intent.remotePort!, (err, bound) => {
          clearTimeout(t);
          if (err) {
            reject(
              new SSHConnectionError(
                `the server refused to listen on ${this.intent.remoteHost}:${this.intent.remotePort} for -R: ` +
                  "check AllowTcpForwarding/PermitListen on the server and that the port is free.",
                { cause: err, details: { remotePort: this.intent.remotePort } },
              ),
            );
          } else resolve(bound || this.intent.remotePort!);
        });
      } catch (e) {
        clearTimeout(t);
        reject(
          new ConnectionLostError("the SSH transport closed before -R could be requested.", { cause: e }),
        );
      }
    });
    // Replays ask for the port first bound, so the server-side address stays stable.
    this.intent.remotePort = port;
    this.bound = true;
  }

  private detachClient(): void {
    this.client?.off("tcp connection", this.onTcp);
    this.client = undefined;
    this.bound = false;
  }

  override detach(): void {
    super.detach();
    this.detachClient();
  }

  protected async shutdown(): Promise<void> {
    const c = this.client;
    const wasBound = this.bound;
    this.detachClient();
    if (c && wasBound && this.manager.link.alive) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 2000);
        try {
          c.unforwardIn(this.intent.remoteHost!, this.intent.remotePort!, () => {
            clearTimeout(t);
            resolve();
          });
        } catch {
          clearTimeout(t);
          resolve();
        }
      });
    }
  }
}
