/**
 * Reaching a host through something else: ProxyJump chains (each hop a full SSH connection,
 * authenticated and host-key-verified with its own settings, whose direct-tcpip channel is the
 * next hop's socket) and ProxyCommand (a local command whose stdin/stdout carry the SSH stream).
 */
import { type ChildProcess, spawn } from "node:child_process";
import { Duplex } from "node:stream";
import type { Client } from "ssh2";
import { ConnectionLostError, SSHConnectionError, ValidationError } from "../errors.js";
import type { ConnectOptions } from "./connect-options.js";

/** What a hop or target connection must offer here (SSHConnection does). */
export interface ProxiedConnection {
  readonly client: Client;
  readonly host: string;
  readonly port: number;
  readonly alive: boolean;
  close(): Promise<void>;
  /** Ties resources to the connection: closed with it. */
  own(...closers: Array<() => Promise<void> | void>): unknown;
}

/** Opens one direct connection (SSHConnection.connectDirect). */
export type DirectConnector<C extends ProxiedConnection> = (opts: ConnectOptions) => Promise<C>;

// ---------------------------------------------------------------- ProxyJump

/** Opens a direct-tcpip channel to host:port through `conn`, bounded by timeoutMs. */
export function openTunnel(
  conn: ProxiedConnection,
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
 * Connects to `target` through `hops` in order. Each hop is connected with its own options
 * (auth, hostKey, timeouts); the tunnel through hop N becomes hop N+1's socket. The hops are
 * closed when the target connection closes; a failure anywhere closes what was opened.
 */
export async function connectThroughJumps<C extends ProxiedConnection>(
  hops: ConnectOptions[],
  target: ConnectOptions,
  connectDirect: DirectConnector<C>,
): Promise<C> {
  const opened: C[] = [];
  try {
    let sock: Duplex | undefined;
    for (const hop of hops) {
      const c = await connectDirect({
        ...hop,
        ...(sock ? { sock } : {}),
        signal: hop.signal ?? target.signal,
      });
      opened.push(c);
      const next = hops[opened.length] ?? target;
      sock = await openTunnel(c, next.host, next.port ?? 22, next.connectTimeoutMs ?? 10_000);
    }
    const conn = await connectDirect({ ...target, ...(sock ? { sock } : {}) });
    conn.own(...opened.map((c) => () => c.close()));
    return conn;
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
export async function connectThroughCommand<C extends ProxiedConnection>(
  command: string,
  target: ConnectOptions,
  connectDirect: DirectConnector<C>,
): Promise<C> {
  const stream = new ProxyCommandStream(command);
  try {
    const conn = await connectDirect({ ...target, sock: stream });
    conn.own(() => void stream.destroy());
    return conn;
  } catch (e) {
    stream.destroy();
    throw e;
  }
}
