/**
 * SSHClient: runs commands over one lazily opened, shared, self-healing SSH connection.
 * Concurrent first calls share one connect; a dead transport is replaced on the next call; a
 * command that never reached the server (no exec request went out) is retried on the new
 * connection while its deadline has time, a command that did start is never silently re-run
 * (it fails with ConnectionLostError, details.commandStarted true).
 */
import * as net from "node:net";
import {
  DEFAULT_RUN_TIMEOUT_MS,
  type ExecExtras,
  emptyResult,
  type RunEncoding,
  type Runner,
  type RunOptions,
  type RunResult,
  type ShellKind,
  validateRunOptions,
  validateShellKind,
  validateTimeout,
} from "../command.js";
import { Deadline, sleep } from "../common/deadline.js";
import { validatePort } from "../common/port.js";
import {
  AuthenticationError,
  ConnectionLostError,
  OperationTimeoutError,
  SmolVMError,
  SSHConnectionError,
  ValidationError,
} from "../errors.js";
import {
  authFromOptions,
  type CredentialOptions,
  type KeepaliveSpellings,
  keepaliveFromOptions,
  userFromOptions,
} from "./client-options.js";
import type { ConnectOptions } from "./connect-options.js";
import { SSHConnection } from "./connection.js";
import type { EventSink } from "./events.js";
import type { HostKeyOptions } from "./hostkeys.js";
import { resolveKeepalive } from "./keepalive.js";
import { RetryPolicy, retryWithPolicy } from "./retry.js";

/**
 * Connections open at once for servers that serve one session per connection (tinysshd), where
 * each command gets a connection of its own.
 */
export const PER_COMMAND_CONNECTIONS = 8;
/** Bound on a kill sweep sent over a connection of its own. */
const SWEEP_TIMEOUT_MS = 5_000;

/**
 * The reconnect policy of SSHClient.run: a command that never reached the server is retried on
 * a new connection up to 20 times, 50 ms apart doubling to 1 s, while its deadline has time.
 */
export function defaultClientRetryPolicy(): RetryPolicy {
  return new RetryPolicy({ maxRetries: 20, baseDelayMs: 50, maxDelayMs: 1000, jitter: false });
}

/**
 * Credentials in either spelling (`user` or `username`, default "root"; `keyPath`,
 * `password`, `agent` or `auth`) and the keepalive in either spelling (`keepalive: {...}` or
 * `keepaliveIntervalMs`/`keepaliveCountMax`): a link silent for interval x count is closed with
 * ConnectionLostError and replaced by the next call.
 */
export interface SSHClientOptions extends CredentialOptions, KeepaliveSpellings {
  host: string;
  /** Default 22. */
  port?: number;
  /** TCP + handshake + auth. Default 10 000. */
  connectTimeoutMs?: number;
  /** How `shell: "login"` wraps commands. Default "sh". */
  shellKind?: ShellKind;
  /** Default: strict, ~/.ssh/known_hosts. */
  hostKey?: HostKeyOptions;
  events?: EventSink;
  /**
   * When a command that never reached the server is retried on a new connection (the same
   * RetryPolicy and failure classes as SSHSupervisor's reconnects). Default
   * defaultClientRetryPolicy(); the call's deadline bounds it in any case.
   */
  retryPolicy?: RetryPolicy;
}

export interface WaitForSshOptions {
  /** Default 60 000. */
  timeoutMs?: number;
  /** Longest pause between probes. Default 100. */
  intervalMs?: number;
  signal?: AbortSignal;
}

type Encoding = "utf8" | "buffer";

export class SSHClient implements AsyncDisposable, Runner<ExecExtras> {
  readonly host: string;
  readonly user: string;
  readonly port: number;
  readonly shellKind: ShellKind;
  /** When run() retries a command that never reached the server on a new connection. */
  readonly retryPolicy: RetryPolicy;
  private readonly connectOptions: ConnectOptions;
  private conn: SSHConnection | undefined;
  private connecting: Promise<SSHConnection> | undefined;
  private isClosed = false;
  private readonly lifetime = new AbortController();
  /** Learned from the first connection: the server serves one session per connection. */
  private onePerConnection = false;
  /** Connections still running a command after they stopped being the shared one. */
  private readonly others = new Set<SSHConnection>();
  private perCommandOpen = 0;
  private readonly perCommandWaiters: Array<() => void> = [];

  constructor(options: SSHClientOptions) {
    if (!options || typeof options.host !== "string" || options.host === "") {
      throw new ValidationError("SSHClient needs a host: pass { host: '<address>' }.");
    }
    const port = validatePort("port", options.port ?? 22);
    validateTimeout("connectTimeoutMs", options.connectTimeoutMs);
    validateShellKind(options.shellKind);
    if (options.retryPolicy !== undefined && !(options.retryPolicy instanceof RetryPolicy)) {
      throw new ValidationError("retryPolicy must be a RetryPolicy.");
    }
    this.retryPolicy = options.retryPolicy ?? defaultClientRetryPolicy();
    this.host = options.host;
    this.user = userFromOptions(options) ?? "root";
    this.port = port;
    this.shellKind = options.shellKind ?? "sh";
    this.connectOptions = {
      host: this.host,
      port,
      username: this.user,
      auth: authFromOptions(options),
      hostKey: options.hostKey,
      connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
      keepalive: resolveKeepalive(keepaliveFromOptions(options)),
      events: options.events,
      signal: this.lifetime.signal,
    };
  }

  /** True only while the transport is alive. */
  get connected(): boolean {
    return this.conn?.alive === true;
  }

  /** The live connection, opening one if needed (concurrent callers share one connect). */
  connection(options: { signal?: AbortSignal } = {}): Promise<SSHConnection> {
    if (this.isClosed) return Promise.reject(this.closedError());
    const c = this.conn;
    if (c?.reusable) return Promise.resolve(c);
    this.connecting ??= SSHConnection.connectDirect(this.connectOptions).then(
      (conn) => {
        this.connecting = undefined;
        if (this.isClosed) {
          void conn.close();
          throw this.closedError();
        }
        const old = this.conn;
        if (old?.alive) this.keep(old);
        this.adopt(conn);
        this.conn = conn;
        return conn;
      },
      (e) => {
        this.connecting = undefined;
        throw this.isClosed ? this.closedError() : e;
      },
    );
    if (!options.signal) return this.connecting;
    return raceSignal(this.connecting, options.signal);
  }

  /**
   * Runs a command. Non-zero exit is a result (`ok` false), not an error. `timeoutMs` (default
   * 30 000) is a total deadline, connect included; when it passes, or `signal` fires, the remote
   * command is killed and OperationTimeoutError carries the output so far on `partial`.
   * `shellKind` overrides the client's for this call.
   */
  async run<E extends RunEncoding = undefined>(
    command: string,
    options: RunOptions & ExecExtras & { encoding?: E } = {},
  ): Promise<RunResult<E>> {
    validateRunOptions(command, options);
    validateShellKind(options.shellKind);
    if (this.isClosed) throw this.closedError();
    const deadline = new Deadline(
      options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS,
      options.signal,
      `command on ${this.host}:${this.port}`,
    );
    const opts = { ...options, shellKind: options.shellKind ?? this.shellKind };
    const encoding = options.encoding ?? "utf8";
    try {
      for (let attempt = 0; ; attempt++) {
        const acquire = async (): Promise<{ conn: SSHConnection; done: (() => void) | undefined }> => {
          const c = this.conn;
          if (c?.reusable) return { conn: c, done: undefined };
          if (!this.onePerConnection)
            return { conn: await this.connectWithin(deadline, encoding), done: undefined };
          return this.perCommandConnection(deadline, encoding);
        };
        // Reopening after a lost connection (or, for a server that needs a connection per
        // command, opening one more): a server that is restarting refuses for a moment, so the
        // open is retried under the client's RetryPolicy (the supervisor's reconnect loop).
        const reopening = attempt > 0 || this.onePerConnection;
        let acquired: { conn: SSHConnection; done: (() => void) | undefined };
        try {
          acquired = reopening
            ? await retryWithPolicy(this.retryPolicy, acquire, {
                signal: AbortSignal.any([deadline.signal, this.lifetime.signal]),
              })
            : await acquire();
        } catch (e) {
          if (this.isClosed) throw this.closedError();
          if (deadline.expired && e === deadline.reason) throw withEmptyPartial(deadline, encoding);
          throw e;
        }
        const { conn, done } = acquired;
        try {
          return (await conn.execWithin(command, opts, deadline)) as RunResult<E>;
        } catch (e) {
          // The transport died before the command reached the server: safe to run it on a new
          // one, as long as the deadline has time (a server dying under load may need a few).
          if (
            attempt < this.retryPolicy.maxRetries &&
            e instanceof ConnectionLostError &&
            e.details.commandStarted === false &&
            !deadline.expired
          ) {
            if (attempt > 1) await sleep(Math.min(10 * 2 ** attempt, 500), deadline.signal);
            continue;
          }
          throw e;
        } finally {
          done?.();
        }
      }
    } finally {
      deadline.dispose();
    }
  }

  /** Wires a new connection into the client (what it learned, where its kill sweeps go). */
  private adopt(conn: SSHConnection): void {
    if (conn.quirks.sessionsPerConnection <= 1) {
      this.onePerConnection = true;
      conn.sweeper = (script) => void this.sweep(script);
    }
  }

  /** Tracks a connection that still runs a command until it closes (close() ends it too). */
  private keep(conn: SSHConnection): void {
    this.others.add(conn);
    conn.onClose(() => this.others.delete(conn));
  }

  /**
   * A connection of its own for one command (servers with one session per connection), at most
   * PER_COMMAND_CONNECTIONS at once; `done` closes it once the command has ended.
   */
  private async perCommandConnection(
    deadline: Deadline,
    encoding: Encoding,
  ): Promise<{ conn: SSHConnection; done: () => void }> {
    if (this.perCommandOpen >= PER_COMMAND_CONNECTIONS) {
      deadline.throwIfExpired();
      await new Promise<void>((resolve, reject) => {
        const granted = () => {
          deadline.signal.removeEventListener("abort", onAbort);
          resolve();
        };
        const onAbort = () => {
          const i = this.perCommandWaiters.indexOf(granted);
          if (i >= 0) this.perCommandWaiters.splice(i, 1);
          reject(withEmptyPartial(deadline, encoding));
        };
        deadline.signal.addEventListener("abort", onAbort, { once: true });
        this.perCommandWaiters.push(granted);
      });
    } else this.perCommandOpen++;
    const free = () => {
      const next = this.perCommandWaiters.shift();
      if (next) next();
      else this.perCommandOpen--;
    };
    try {
      const conn = await SSHConnection.connectDirect({
        ...this.connectOptions,
        signal: AbortSignal.any([this.lifetime.signal, deadline.signal]),
      });
      this.adopt(conn);
      this.keep(conn);
      return {
        conn,
        done: () => {
          void conn.close().finally(free);
        },
      };
    } catch (e) {
      free();
      if (deadline.expired) throw withEmptyPartial(deadline, encoding);
      throw this.isClosed ? this.closedError() : e;
    }
  }

  /** Runs a kill sweep on a connection of its own (fire and forget, bounded). */
  private async sweep(script: string): Promise<void> {
    if (this.isClosed) return;
    const signal = AbortSignal.any([this.lifetime.signal, AbortSignal.timeout(SWEEP_TIMEOUT_MS)]);
    let conn: SSHConnection | undefined;
    try {
      conn = await SSHConnection.connectDirect({ ...this.connectOptions, signal });
      this.keep(conn);
      await conn.exec(script, { shell: "raw", signal, timeoutMs: SWEEP_TIMEOUT_MS });
    } catch {
      // Best effort: the command's own channel close already asked the server to stop it.
    } finally {
      await conn?.close();
    }
  }

  private async connectWithin(deadline: Deadline, encoding: Encoding): Promise<SSHConnection> {
    try {
      return await this.connection({ signal: deadline.signal });
    } catch (e) {
      if (deadline.expired && e === deadline.reason) {
        // Nothing ran yet: the partial result is empty.
        throw withEmptyPartial(deadline, encoding);
      }
      throw e;
    }
  }

  /**
   * Waits until sshd answers and a full handshake + auth succeeds; that connection is kept for
   * the next run. Phase 1 probes TCP for the "SSH-" banner (cheap), phase 2 connects.
   * Authentication and host key errors end the wait at once: they will not fix themselves.
   */
  async waitForSsh(options: WaitForSshOptions = {}): Promise<void> {
    validateTimeout("timeoutMs", options.timeoutMs);
    validateTimeout("intervalMs", options.intervalMs);
    if (this.isClosed) throw this.closedError();
    const intervalMs = options.intervalMs ?? 100;
    const deadline = new Deadline(
      options.timeoutMs ?? 60_000,
      options.signal,
      `waiting for SSH on ${this.host}:${this.port}`,
    );
    let delay = Math.min(10, intervalMs);
    let lastError: unknown;
    try {
      for (;;) {
        if (this.connected) return;
        deadline.throwIfExpired();
        if (await probeBanner(this.host, this.port, Math.min(1000, deadline.remainingMs), deadline.signal)) {
          try {
            await this.connection({ signal: deadline.signal });
            return;
          } catch (e) {
            if (deadline.expired) throw e;
            if (
              e instanceof AuthenticationError ||
              e instanceof ValidationError ||
              !(e instanceof SmolVMError)
            )
              throw e;
            lastError = e;
          }
        }
        await sleep(Math.min(delay, deadline.remainingMs), deadline.signal);
        delay = Math.min(intervalMs, delay * 1.5);
      }
    } catch (e) {
      if (deadline.expired && e === deadline.reason && lastError) {
        throw new OperationTimeoutError((e as Error).message, {
          code: (e as SmolVMError).code,
          details: (e as SmolVMError).details,
          cause: lastError,
        });
      }
      throw e;
    } finally {
      deadline.dispose();
    }
  }

  /** Closes the connection (idempotent). Calls after close fail with SSHConnectionError. */
  async close(): Promise<void> {
    this.isClosed = true;
    this.lifetime.abort();
    await this.connecting?.catch(() => {});
    const c = this.conn;
    this.conn = undefined;
    await Promise.all([c?.close(), ...[...this.others].map((o) => o.close())]);
    for (const w of this.perCommandWaiters.splice(0)) w();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  private closedError(): SSHConnectionError {
    return new SSHConnectionError(
      `SSHClient for ${this.host}:${this.port} is closed: create a new SSHClient to run more commands.`,
      { code: "SSH_CLIENT_CLOSED" },
    );
  }
}

/** The deadline's error carrying an empty result: nothing ran yet. */
function withEmptyPartial(deadline: Deadline, encoding: Encoding): OperationTimeoutError {
  return deadline.reason!.withPartial(emptyResult(deadline.elapsedMs, encoding));
}

function raceSignal<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener("abort", onAbort);
        resolve(v);
      },
      (e) => {
        signal.removeEventListener("abort", onAbort);
        reject(e);
      },
    );
  });
}

/** One TCP probe: true when the peer sends "SSH-" within `timeoutMs`. */
export function probeBanner(
  host: string,
  port: number,
  timeoutMs: number,
  signal?: AbortSignal,
): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host, port });
    let head = "";
    let done = false;
    const finish = (ok: boolean) => {
      if (done) return;
      done = true;
      clearTimeout(t);
      signal?.removeEventListener("abort", onAbort);
      s.destroy();
      resolve(ok);
    };
    const onAbort = () => finish(false);
    const t = setTimeout(() => finish(false), timeoutMs);
    signal?.addEventListener("abort", onAbort, { once: true });
    s.on("data", (d: Buffer) => {
      head += d.toString("latin1");
      // Lines before the identification are allowed; look for a line starting with SSH-.
      if (/(^|\n)SSH-/.test(head)) finish(true);
      else if (head.length > 8192) finish(false);
    });
    s.on("error", () => finish(false));
    s.on("close", () => finish(false));
  });
}
