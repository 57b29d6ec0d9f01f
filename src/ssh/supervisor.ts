/**
 * SSHSupervisor: one logical SSH session that survives drops. It owns the current
 * SSHConnection, notices a drop the moment it happens (transport close, or the connection's
 * keepalive declaring the link dead after interval x countMax of silence), reconnects under a
 * RetryPolicy, and replays open forwards onto the new transport on the same local ports.
 *
 * States: DISCONNECTED (not started) → CONNECTING → CONNECTED ⇄ RECONNECTING; FAILED (permanent
 * error or retries exhausted); CLOSED (close() called, from any state).
 *
 * Commands are never re-run behind the caller's back: a command cut by a drop fails with
 * ConnectionLostError unless the caller marked it `idempotent`.
 */
import type { Client } from "ssh2";
import {
  DEFAULT_RUN_TIMEOUT_MS,
  type ExecExtras,
  type RunEncoding,
  type RunOptions,
  type RunResult,
  validateRunOptions,
} from "../command.js";
import { Deadline, sleep } from "../common/deadline.js";
import { ConnectionLostError, SSHConnectionError, ValidationError } from "../errors.js";
import {
  authFromOptions,
  type CredentialOptions,
  type KeepaliveSpellings,
  keepaliveFromOptions,
  userFromOptions,
} from "./client-options.js";
import type { SessionConnectOptions } from "./connect-options.js";
import { connectSession, type SSHConnection } from "./connection.js";
import { EventCollector, type EventSink } from "./events.js";
import type { ExecStream, StreamExecEvent, StreamExecOptions } from "./exec-stream.js";
import { ForwardManager } from "./forward.js";
import type {
  DynamicForwardHandle,
  DynamicForwardSpec,
  LocalForwardHandle,
  LocalForwardSpec,
  RemoteForwardHandle,
  RemoteForwardSpec,
} from "./forward-handles.js";
import { type KeepaliveConfig, resolveKeepalive } from "./keepalive.js";
import { RetryPolicy, retryWithPolicy } from "./retry.js";
import { type WatchedStream, watchStream } from "./watchdog.js";

export const ConnectionState = {
  DISCONNECTED: "DISCONNECTED",
  CONNECTING: "CONNECTING",
  CONNECTED: "CONNECTED",
  RECONNECTING: "RECONNECTING",
  FAILED: "FAILED",
  CLOSED: "CLOSED",
} as const;
export type ConnectionState = (typeof ConnectionState)[keyof typeof ConnectionState];

export type Connector = (options: SessionConnectOptions) => Promise<SSHConnection>;

/**
 * Connect options (sshConfig, proxyJump and proxyCommand included: proxies are rebuilt per
 * attempt) plus supervision. Credentials and keepalive are accepted in SSHClient's spelling too
 * (`user`, `keyPath`, `password`, `agent`, `keepaliveIntervalMs`/`keepaliveCountMax`).
 */
export interface SupervisorOptions
  extends Omit<SessionConnectOptions, "signal" | "eventLogPath">,
    CredentialOptions,
    KeepaliveSpellings {
  /** Default: new RetryPolicy() (5 retries, 1 s base, x2, 60 s max, jitter). */
  retryPolicy?: RetryPolicy;
  /**
   * Each connection's keepalive (the SSHConnection one): default 15 s x 3, or the config file's
   * ServerAliveInterval/CountMax. `false` turns it off (drops are then seen on socket close only).
   */
  keepalive?: Partial<KeepaliveConfig> | false;
  /** Writes events to this JSONL file (when `events` is not given). */
  eventLogPath?: string;
  /** How long forwarded connections wait for a reconnect before giving up. Default 30 000. */
  forwardPendingTimeoutMs?: number;
  /** How each attempt connects (default connectSession). */
  connect?: Connector;
}

export interface SupervisorExecOptions extends RunOptions, ExecExtras {
  /** The command may safely run twice: re-run it after a reconnect if a drop cut it. Default false. */
  idempotent?: boolean;
}

export interface SupervisorStreamOptions extends StreamExecOptions {
  /** Output silence that raises PROGRESS_WARNING. */
  progressTimeoutMs?: number;
  /** Cancel the command when it stalls (the iteration ends with OperationTimeoutError). */
  abortOnStall?: boolean;
}

export type StateListener = (to: ConnectionState, from: ConnectionState, error?: unknown) => void;

export class SSHSupervisor implements AsyncDisposable {
  readonly retryPolicy: RetryPolicy;
  /** The keepalive asked for (undefined: the connection's default or the config file's). */
  readonly keepalive: Partial<KeepaliveConfig> | false | undefined;
  readonly forwardManager: ForwardManager;
  readonly events: EventSink | undefined;
  /** Successful reconnections after drops. */
  reconnectionCount = 0;
  /** The error behind the last failed attempt or drop. */
  lastError: unknown;
  /** Why the last connection ended ("keepalive_timeout", "connection_closed", an error code). */
  lastDisconnectReason: string | undefined;
  private current: SSHConnection | undefined;
  private st: ConnectionState = ConnectionState.DISCONNECTED;
  private readonly stop = new AbortController();
  private loop: Promise<void> = Promise.resolve();
  private closing: Promise<void> | undefined;
  private readonly listeners = new Set<StateListener>();
  private readonly ownedEvents: EventCollector | undefined;
  private readonly connector: Connector;
  private readonly connectOptions: SessionConnectOptions;

  private constructor(options: SupervisorOptions) {
    if (!options || typeof options.host !== "string" || !options.host) {
      throw new ValidationError("SSHSupervisor needs host.");
    }
    const {
      retryPolicy,
      eventLogPath,
      forwardPendingTimeoutMs,
      connect,
      user: _user,
      username: _username,
      keyPath: _keyPath,
      passphrase: _passphrase,
      password: _password,
      agent: _agent,
      auth: _auth,
      keepalive: _keepalive,
      keepaliveIntervalMs: _interval,
      keepaliveCountMax: _count,
      ...rest
    } = options;
    const username = userFromOptions(options);
    const auth = authFromOptions(options);
    const keepalive = keepaliveFromOptions(options);
    const connectOptions: SessionConnectOptions = {
      ...rest,
      ...(username !== undefined ? { username } : {}),
      ...(auth !== undefined ? { auth } : {}),
      ...(keepalive !== undefined ? { keepalive } : {}),
    };
    if (retryPolicy !== undefined && !(retryPolicy instanceof RetryPolicy)) {
      throw new ValidationError("retryPolicy must be a RetryPolicy.");
    }
    this.retryPolicy = retryPolicy ?? new RetryPolicy();
    this.keepalive = keepalive;
    // Invalid settings fail here, not on every connect attempt.
    resolveKeepalive(keepalive);
    if (!options.events && eventLogPath) this.ownedEvents = new EventCollector({ logPath: eventLogPath });
    this.events = options.events ?? this.ownedEvents;
    this.connectOptions = { ...connectOptions, events: this.events };
    this.connector = connect ?? connectSession;
    const self = this;
    this.forwardManager = new ForwardManager(
      {
        acquire: (ms) => self.acquireClient(ms),
        get alive() {
          return self.isConnected;
        },
      },
      { events: this.events, pendingTimeoutMs: forwardPendingTimeoutMs },
    );
  }

  /** Creates the supervisor and starts connecting; await waitConnected() to know when it is up. */
  static async start(options: SupervisorOptions): Promise<SSHSupervisor> {
    const sup = new SSHSupervisor(options);
    sup.loop = sup.connectLoop(false);
    return sup;
  }

  get state(): ConnectionState {
    return this.st;
  }

  get isConnected(): boolean {
    return this.st === ConnectionState.CONNECTED && !!this.current?.alive;
  }

  /** The live connection, if any (it changes across reconnects: do not keep it). */
  get connection(): SSHConnection | undefined {
    return this.current;
  }

  /** Calls `listener` on every state change; returns the unsubscribe function. */
  onStateChange(listener: StateListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private setState(to: ConnectionState, data: Record<string, unknown> = {}, error?: unknown): void {
    const from = this.st;
    if (from === to) return;
    this.st = to;
    this.events?.emit("STATE_CHANGE", { from, to, ...data });
    for (const l of [...this.listeners]) {
      try {
        l(to, from, error);
      } catch {
        // A faulty listener must not break the supervisor.
      }
    }
  }

  private get stopped(): boolean {
    return this.closing !== undefined;
  }

  private async connectLoop(reconnect: boolean): Promise<void> {
    this.setState(reconnect ? ConnectionState.RECONNECTING : ConnectionState.CONNECTING);
    if (this.stopped) return;
    let conn: SSHConnection;
    try {
      conn = await retryWithPolicy(
        this.retryPolicy,
        () => this.connector({ ...this.connectOptions, signal: this.stop.signal }),
        {
          signal: this.stop.signal,
          onRetry: (e, attempt, delayMs) => {
            this.lastError = e;
            this.events?.emit("ERROR", {
              phase: reconnect ? "reconnect" : "connect",
              code: (e as { code?: string }).code,
              attempt: attempt + 1,
              retryInMs: delayMs,
            });
          },
          onGiveUp: (e, attempts, kind) => {
            if (this.stopped) return;
            this.lastError = e;
            this.setState(
              ConnectionState.FAILED,
              { code: (e as { code?: string }).code, attempts, failure: kind },
              e,
            );
          },
        },
      );
    } catch {
      // FAILED (set by onGiveUp) or closed: either way this loop is over.
      return;
    }
    if (this.stopped) {
      await conn.close().catch(() => {});
      return;
    }
    this.adopt(conn);
    if (reconnect) this.reconnectionCount++;
    this.setState(ConnectionState.CONNECTED, reconnect ? { reconnectionCount: this.reconnectionCount } : {});
    this.wakeWaiters();
    await this.forwardManager.attach(conn.client);
  }

  private adopt(conn: SSHConnection): void {
    this.current = conn;
    conn.onClose((reason) => {
      if (this.current !== conn) return;
      this.current = undefined;
      this.forwardManager.detach();
      if (this.stopped) return;
      const r = reason as { code?: string; details?: { reason?: unknown } } | undefined;
      this.lastDisconnectReason =
        typeof r?.details?.reason === "string" ? r.details.reason : (r?.code ?? "connection_closed");
      this.lastError = new ConnectionLostError(
        `SSH connection to ${conn.host}:${conn.port} dropped (${this.lastDisconnectReason}).`,
        { cause: reason, details: { reason: this.lastDisconnectReason } },
      );
      if (this.retryPolicy.maxRetries === 0) {
        this.setState(
          ConnectionState.FAILED,
          { reason: this.lastDisconnectReason, attempts: 0 },
          this.lastError,
        );
        this.wakeWaiters();
        return;
      }
      this.loop = this.connectLoop(true);
    });
  }

  // ------------------------------------------------------------ waiting for a connection

  private waiters = new Set<() => void>();

  private wakeWaiters(): void {
    for (const w of [...this.waiters]) w();
  }

  private waitForState(signal: AbortSignal): Promise<void> {
    return new Promise((resolve, reject) => {
      const done = () => {
        this.waiters.delete(done);
        off();
        signal.removeEventListener("abort", onAbort);
        resolve();
      };
      const off = this.onStateChange(() => done());
      const onAbort = () => {
        this.waiters.delete(done);
        off();
        reject(signal.reason);
      };
      this.waiters.add(done);
      if (signal.aborted) onAbort();
      else signal.addEventListener("abort", onAbort, { once: true });
    });
  }

  /** Resolves true once CONNECTED; false when `timeoutMs` passes or the supervisor FAILED/CLOSED (see lastError). */
  async waitConnected(timeoutMs: number): Promise<boolean> {
    const deadline = new Deadline(timeoutMs, undefined, "waiting for the SSH connection");
    try {
      for (;;) {
        if (this.isConnected) return true;
        if (this.st === ConnectionState.FAILED || this.st === ConnectionState.CLOSED) return false;
        try {
          await this.waitForState(deadline.signal);
        } catch {
          return this.isConnected;
        }
      }
    } finally {
      deadline.dispose();
    }
  }

  /** The live connection, waiting through CONNECTING/RECONNECTING within the deadline. */
  private async acquire(deadline: Deadline): Promise<SSHConnection> {
    for (;;) {
      if (this.isConnected) return this.current!;
      if (this.st === ConnectionState.FAILED) {
        throw new SSHConnectionError(
          `SSH session to ${this.connectOptions.host}:${this.connectOptions.port ?? 22} has FAILED: see the cause; start a new supervisor once it is fixed.`,
          { cause: this.lastError, details: { state: this.st } },
        );
      }
      if (this.st === ConnectionState.CLOSED || this.stopped) {
        throw new SSHConnectionError("the SSH supervisor is closed.", { details: { state: this.st } });
      }
      await this.waitForState(deadline.signal);
    }
  }

  private async acquireClient(timeoutMs: number): Promise<Client> {
    const deadline = new Deadline(timeoutMs, undefined, "waiting for the SSH connection");
    try {
      return (await this.acquire(deadline)).client;
    } finally {
      deadline.dispose();
    }
  }

  // ------------------------------------------------------------ commands

  /**
   * Runs a command on the live connection, waiting through a reconnect within timeoutMs. A
   * command cut by a drop fails with ConnectionLostError (it may or may not have run), unless
   * `idempotent: true`, in which case it is run again once the session is back.
   */
  async exec<E extends RunEncoding = undefined>(
    command: string,
    options: SupervisorExecOptions & { encoding?: E } = {},
  ): Promise<RunResult<E>> {
    validateRunOptions(command, options);
    const { idempotent, ...runOptions } = options;
    const deadline = new Deadline(options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS, options.signal, "SSH command");
    try {
      for (;;) {
        const conn = await this.acquire(deadline);
        try {
          return (await conn.execWithin(command, runOptions, deadline)) as RunResult<E>;
        } catch (e) {
          if (e instanceof ConnectionLostError && idempotent && !deadline.expired && !this.stopped) {
            // Wait for the drop to be seen, then for the reconnect.
            if (conn.alive) await sleep(20, deadline.signal);
            continue;
          }
          throw e;
        }
      }
    } finally {
      deadline.dispose();
    }
  }

  /**
   * streamExec on the live connection (never re-run: a drop ends it with ConnectionLostError).
   * With `progressTimeoutMs`, silence emits PROGRESS_WARNING (and with `abortOnStall` stops it).
   */
  streamExec(
    command: string,
    options: SupervisorStreamOptions = {},
  ): ExecStream | WatchedStream<StreamExecEvent> {
    const conn = this.current;
    if (!conn || !this.isConnected) {
      throw new ConnectionLostError(
        `SSH session to ${this.connectOptions.host} is ${this.st}, not CONNECTED: await waitConnected() first.`,
        { details: { state: this.st } },
      );
    }
    const { progressTimeoutMs, abortOnStall, ...rest } = options;
    const stream = conn.streamExec(command, rest);
    if (progressTimeoutMs === undefined) return stream;
    return watchStream(stream, {
      progressTimeoutMs,
      abortOnStall,
      events: this.events,
      context: { command },
    });
  }

  // ------------------------------------------------------------ forwards

  /** -L that survives reconnects (the local port never changes). */
  forwardLocal(spec: LocalForwardSpec): Promise<LocalForwardHandle> {
    this.assertUsable();
    return this.forwardManager.forwardLocal(spec);
  }

  /** -R, re-requested on the same remote port after each reconnect. */
  forwardRemote(spec: RemoteForwardSpec): Promise<RemoteForwardHandle> {
    this.assertUsable();
    return this.forwardManager.forwardRemote(spec);
  }

  /** -D (SOCKS5 on 127.0.0.1 by default). */
  forwardDynamic(spec: DynamicForwardSpec = {}): Promise<DynamicForwardHandle> {
    this.assertUsable();
    return this.forwardManager.forwardDynamic(spec);
  }

  private assertUsable(): void {
    if (this.stopped || this.st === ConnectionState.FAILED) {
      throw new SSHConnectionError(
        `the SSH supervisor is ${this.stopped ? "closed" : "FAILED"}: no new forwards.`,
        {
          cause: this.lastError,
        },
      );
    }
  }

  // ------------------------------------------------------------ lifecycle

  /** Stops reconnecting, closes forwards and the connection. Works from any state; idempotent. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      this.stop.abort(new SSHConnectionError("the SSH supervisor was closed."));
      await this.forwardManager.closeAll();
      const conn = this.current;
      this.current = undefined;
      await conn?.close().catch(() => {});
      await this.loop.catch(() => {});
      this.setState(ConnectionState.CLOSED);
      this.wakeWaiters();
      await this.ownedEvents?.close();
    })();
    return this.closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
