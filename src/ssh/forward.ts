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
import type { Client } from "ssh2";
import { validatePort } from "../common/port.js";
import { ConnectionLostError, ValidationError } from "../errors.js";
import type { EventSink } from "./events.js";
import {
  DynamicForwardHandle,
  type DynamicForwardSpec,
  type ForwardHandle,
  type ForwardIntent,
  type ForwardLink,
  type ForwardManagerOptions,
  type ForwardOwner,
  LocalForwardHandle,
  type LocalForwardSpec,
  RemoteForwardHandle,
  type RemoteForwardSpec,
} from "./forward-handles.js";

/** Open forwards of one session and their replay onto each new transport. */
export class ForwardManager implements ForwardOwner {
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
