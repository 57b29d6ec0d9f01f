/**
 * Port forwarding over SSH: -L (local → remote through direct-tcpip channels), -R (server
 * listens, connections come back through forwarded-tcpip channels) and -D (a SOCKS5 proxy whose
 * CONNECTs become direct-tcpip channels).
 *
 * A forward is an intent plus a handle. The handle's local listener lives as long as the handle,
 * independent of the transport: when the supervisor reconnects it re-attaches every open handle
 * to the new transport (re-requesting -R listeners on the same remote port), so local ports
 * never change and nothing else can grab them in between. A closed handle leaves the manager
 * at once and is never replayed.
 */
import net from "node:net";
import type { Duplex } from "node:stream";
import type { Client, ClientChannel, TcpConnectionDetails } from "ssh2";
import { validatePort } from "../common/port.js";
import { ConnectionLostError, SSHConnectionError, ValidationError } from "../errors.js";
import type { EventSink } from "./events.js";
import { type SocksCredentials, SocksServer } from "./socks.js";

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
    protected readonly manager: ForwardManager,
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
    manager: ForwardManager,
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

/** Open forwards of one session and their replay onto each new transport. */
export class ForwardManager {
  readonly pendingTimeoutMs: number;
  readonly channelOpenTimeoutMs: number;
  private readonly handles = new Set<ForwardHandle>();
  private readonly events: EventSink | undefined;

  constructor(
    readonly link: ForwardLink,
    options: ForwardManagerOptions = {},
  ) {
    this.events = options.events;
    this.pendingTimeoutMs = options.pendingTimeoutMs ?? 30_000;
    this.channelOpenTimeoutMs = options.channelOpenTimeoutMs ?? 15_000;
  }

  /** Intents of the forwards that are open (and will be replayed). */
  get intents(): ForwardIntent[] {
    return [...this.handles].map((h) => ({ ...h.intent }));
  }

  get activeForwards(): ForwardHandle[] {
    return [...this.handles].filter((h) => h.active);
  }

  get forwards(): ForwardHandle[] {
    return [...this.handles];
  }

  /** @internal */
  emit(action: string, h: ForwardHandle, extra: Record<string, unknown> = {}): void {
    this.events?.emit("FORWARD", {
      action,
      kind: h.intent.kind,
      id: h.intent.id,
      localPort: h.intent.localPort,
      remotePort: h.intent.remotePort,
      ...extra,
    });
  }

  /** @internal */
  forget(h: ForwardHandle): void {
    this.handles.delete(h);
  }

  private async add<H extends ForwardHandle>(h: H): Promise<H> {
    try {
      await h.open();
    } catch (e) {
      await h.close().catch(() => {});
      this.emit("open_failed", h, { code: (e as { code?: string }).code });
      throw e;
    }
    this.handles.add(h);
    this.emit("open", h);
    return h;
  }

  async forwardLocal(spec: LocalForwardSpec): Promise<LocalForwardHandle> {
    if (!spec || typeof spec.remoteHost !== "string" || spec.remoteHost === "") {
      throw new ValidationError("forwardLocal needs remoteHost.");
    }
    return this.add(
      new LocalForwardHandle(
        {
          kind: "local",
          localHost: spec.localHost ?? "127.0.0.1",
          localPort: validatePort("localPort", spec.localPort ?? 0, { allowZero: true }),
          remoteHost: spec.remoteHost,
          remotePort: validatePort("remotePort", spec.remotePort),
        },
        this,
      ),
    );
  }

  async forwardRemote(spec: RemoteForwardSpec): Promise<RemoteForwardHandle> {
    return this.add(
      new RemoteForwardHandle(
        {
          kind: "remote",
          localHost: spec.localHost ?? "127.0.0.1",
          localPort: validatePort("localPort", spec.localPort),
          remoteHost: spec.remoteHost ?? "127.0.0.1",
          remotePort: validatePort("remotePort", spec.remotePort, { allowZero: true }),
        },
        this,
      ),
    );
  }

  async forwardDynamic(spec: DynamicForwardSpec = {}): Promise<DynamicForwardHandle> {
    return this.add(
      new DynamicForwardHandle(
        {
          kind: "dynamic",
          localHost: spec.localHost ?? "127.0.0.1",
          localPort: validatePort("localPort", spec.localPort ?? 0, { allowZero: true }),
        },
        this,
        spec.auth,
      ),
    );
  }

  /** A new transport is live: replay every open forward onto it. Failures are reported, not thrown. */
  async attach(client: Client): Promise<void> {
    for (const h of [...this.handles]) {
      if (h.isClosed) continue;
      try {
        await h.attach(client);
        this.emit("replayed", h);
      } catch (e) {
        this.emit("replay_failed", h, { code: (e as { code?: string }).code });
      }
    }
  }

  /** The transport died: connections riding on it end; listeners stay for the replay. */
  detach(): void {
    for (const h of this.handles) {
      h.detach();
      this.emit("detached", h);
    }
  }

  async closeAll(): Promise<void> {
    await Promise.all([...this.handles].map((h) => h.close()));
  }
}

/** A link to one connection that never comes back: acquire fails once it is gone. */
export function connectionLink(conn: {
  client: Client;
  alive: boolean;
  host: string;
  port: number;
}): ForwardLink {
  return {
    get alive() {
      return conn.alive;
    },
    acquire: async () => {
      if (!conn.alive) {
        throw new ConnectionLostError(
          `SSH connection to ${conn.host}:${conn.port} is closed: the forward cannot open new channels.`,
        );
      }
      return conn.client;
    },
  };
}

type ConnLike = {
  client: Client;
  alive: boolean;
  host: string;
  port: number;
  onClose(l: (reason: Error | undefined) => void): () => void;
};

function managerFor(conn: ConnLike, options: ForwardManagerOptions): ForwardManager {
  const m = new ForwardManager(connectionLink(conn), options);
  // Without a supervisor nothing will replay: the forward ends with its connection.
  conn.onClose(() => void m.closeAll());
  return m;
}

/** -L on a single connection (ends when the connection ends; use the supervisor to survive drops). */
export function forwardLocal(conn: ConnLike, spec: LocalForwardSpec, options: ForwardManagerOptions = {}) {
  return managerFor(conn, options).forwardLocal(spec);
}

/** -R on a single connection. */
export function forwardRemote(conn: ConnLike, spec: RemoteForwardSpec, options: ForwardManagerOptions = {}) {
  return managerFor(conn, options).forwardRemote(spec);
}

/** -D on a single connection. */
export function forwardDynamic(
  conn: ConnLike,
  spec: DynamicForwardSpec = {},
  options: ForwardManagerOptions = {},
) {
  return managerFor(conn, options).forwardDynamic(spec);
}
