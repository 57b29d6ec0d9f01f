/**
 * Reaching a host through something else: ProxyJump chains (each hop a full SSH connection,
 * authenticated and host-key-verified with its own settings, whose direct-tcpip channel is the
 * next hop's socket) and ProxyCommand (a local command whose stdin/stdout carry the SSH stream).
 */
import { type ChildProcess, spawn } from "node:child_process";
import { Duplex } from "node:stream";
import { isPort } from "../common/port.js";
import { ConnectionLostError, SSHConnectionError, ValidationError } from "../errors.js";
import { type ConnectOptions, SSHConnection } from "./connection.js";

// ---------------------------------------------------------------- ProxyJump

export interface JumpSpec {
  user?: string;
  host: string;
  port?: number;
}

/**
 * Parses OpenSSH's ProxyJump / -J syntax: `[user@]host[:port]` or `ssh://[user@]host[:port]`,
 * comma separated, first hop first; IPv6 hosts in brackets. "none" means no jump.
 */
export function parseProxyJump(spec: string): JumpSpec[] {
  const s = spec.trim();
  if (s === "" || s.toLowerCase() === "none") return [];
  return s.split(",").map((raw) => {
    let part = raw.trim();
    if (part.startsWith("ssh://")) part = part.slice(6).replace(/\/$/, "");
    let user: string | undefined;
    const at = part.lastIndexOf("@");
    if (at >= 0) {
      user = part.slice(0, at);
      part = part.slice(at + 1);
    }
    let host = part;
    let port: number | undefined;
    const v6 = /^\[([^\]]+)\](?::(\d+))?$/.exec(part);
    if (v6) {
      host = v6[1]!;
      if (v6[2]) port = Number(v6[2]);
    } else if ((part.match(/:/g) ?? []).length === 1) {
      const i = part.indexOf(":");
      host = part.slice(0, i);
      port = Number(part.slice(i + 1));
    }
    if (!host || (user !== undefined && !user)) {
      throw new ValidationError(`ProxyJump entry ${JSON.stringify(raw)} is not [user@]host[:port].`);
    }
    if (port !== undefined && !isPort(port)) {
      throw new ValidationError(`ProxyJump entry ${JSON.stringify(raw)} has an invalid port.`);
    }
    return { ...(user ? { user } : {}), host, ...(port ? { port } : {}) };
  });
}

/** Opens a direct-tcpip channel to host:port through `conn`, bounded by timeoutMs. */
export function openTunnel(
  conn: SSHConnection,
  host: string,
  port: number,
  timeoutMs: number,
): Promise<Duplex> {
  return new Promise((resolve, reject) => {
    if (!conn.alive) {
      reject(new ConnectionLostError(`jump host ${conn.host}:${conn.port} is no longer connected.`));
      return;
    }
    let done = false;
    const t = setTimeout(() => {
      done = true;
      reject(
        new SSHConnectionError(
          `jump host ${conn.host}:${conn.port} did not open a channel to ${host}:${port} within ${timeoutMs} ms.`,
        ),
      );
    }, timeoutMs);
    conn.client.forwardOut("127.0.0.1", 0, host, port, (err, ch) => {
      clearTimeout(t);
      if (done) {
        ch?.close();
        return;
      }
      done = true;
      if (err) {
        reject(
          new SSHConnectionError(
            `jump host ${conn.host}:${conn.port} could not reach ${host}:${port}: check the address and that the jump host allows TCP forwarding.`,
            {
              cause: err,
              details: { jumpHost: conn.host, host, port, reason: (err as { reason?: unknown }).reason },
            },
          ),
        );
      } else resolve(ch);
    });
  });
}

/**
 * Ties extra resources to a connection: they are closed when it closes (on its own or through
 * close(), which then also waits for them).
 */
export function ownResources(conn: SSHConnection, closers: Array<() => Promise<void> | void>): SSHConnection {
  let closing: Promise<void> | undefined;
  const closeAll = () =>
    (closing ??= (async () => {
      for (const c of [...closers].reverse()) await Promise.resolve(c()).catch(() => {});
    })());
  conn.onClose(() => void closeAll());
  const base = conn.close.bind(conn);
  // Instance override: close() and Symbol.asyncDispose (which calls close()) wait for the owned resources.
  Object.defineProperty(conn, "close", {
    value: async () => {
      await base();
      await closeAll();
    },
    configurable: true,
  });
  return conn;
}

/**
 * Connects to `target` through `hops` in order. Each hop is connected with its own options
 * (auth, hostKey, timeouts); the tunnel through hop N becomes hop N+1's socket. The hops are
 * closed when the target connection closes; a failure anywhere closes what was opened.
 */
export async function connectThroughJumps(
  hops: ConnectOptions[],
  target: ConnectOptions,
): Promise<SSHConnection> {
  const opened: SSHConnection[] = [];
  try {
    let sock: Duplex | undefined;
    for (const hop of hops) {
      const c = await SSHConnection.connectDirect({
        ...hop,
        ...(sock ? { sock } : {}),
        signal: hop.signal ?? target.signal,
      });
      opened.push(c);
      const next = hops[opened.length] ?? target;
      sock = await openTunnel(c, next.host, next.port ?? 22, next.connectTimeoutMs ?? 10_000);
    }
    const conn = await SSHConnection.connectDirect({ ...target, ...(sock ? { sock } : {}) });
    return ownResources(
      conn,
      opened.map((c) => () => c.close()),
    );
  } catch (e) {
    for (const c of opened.reverse()) await c.close().catch(() => {});
    throw e;
  }
}

// ---------------------------------------------------------------- ProxyCommand

/**
 * The stdin/stdout of a local command as one Duplex. stderr is drained (a full stderr pipe would
 * block the command) and its tail kept for error messages; when the command exits, the stream
 * ends, so the SSH connection over it sees EOF instead of hanging.
 */
export class ProxyCommandStream extends Duplex {
  readonly child: ChildProcess;
  private stderrTail = "";
  exitCode: number | null = null;

  constructor(readonly command: string) {
    super({ allowHalfOpen: false });
    if (typeof command !== "string" || command.trim() === "") {
      throw new ValidationError("ProxyCommand is empty.");
    }
    this.child = spawn("/bin/sh", ["-c", command], { stdio: ["pipe", "pipe", "pipe"] });
    const { stdin, stdout, stderr } = this.child;
    stdin!.on("error", () => {});
    stdout!.on("data", (d: Buffer) => {
      if (!this.push(d)) stdout!.pause();
    });
    stdout!.on("end", () => this.push(null));
    stderr!.on("data", (d: Buffer) => {
      this.stderrTail = (this.stderrTail + d.toString("utf8")).slice(-2048);
    });
    this.child.on("error", (err) => this.destroy(err));
    this.child.on("close", (code) => {
      this.exitCode = code;
      this.push(null);
      // EOF reached the reader; tear down so the transport's close handlers run.
      setImmediate(() => this.destroy());
    });
  }

  /** The last bytes the command wrote to stderr (for diagnostics; may hold anything it printed). */
  get stderr(): string {
    return this.stderrTail;
  }

  override _read(): void {
    this.child.stdout?.resume();
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    const stdin = this.child.stdin;
    if (!stdin || stdin.destroyed) {
      cb(new ConnectionLostError(`ProxyCommand exited (code ${this.exitCode}).`));
      return;
    }
    stdin.write(chunk, (err) => cb(err ?? null));
  }

  override _final(cb: (e?: Error | null) => void): void {
    this.child.stdin?.end();
    cb();
  }

  override _destroy(err: Error | null, cb: (e?: Error | null) => void): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill("SIGTERM");
    this.child.stdin?.destroy();
    this.child.stdout?.destroy();
    this.child.stderr?.destroy();
    cb(err);
  }
}

/** Connects through a ProxyCommand (its stream is the socket; the command dies with the connection). */
export async function connectThroughCommand(command: string, target: ConnectOptions): Promise<SSHConnection> {
  const stream = new ProxyCommandStream(command);
  try {
    const conn = await SSHConnection.connectDirect({ ...target, sock: stream });
    return ownResources(conn, [() => void stream.destroy()]);
  } catch (e) {
    stream.destroy();
    throw e;
  }
}
