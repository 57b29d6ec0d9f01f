/**
 * SSHConnection: one authenticated SSH transport (opened by handshake.ts) and what runs over it:
 * the channel limiter that queues and retries when the server refuses channels (OpenSSH
 * MaxSessions), buffered exec, streamed exec (exec-stream.ts), remote termination on
 * timeout/abort, keepalive, SFTP and shells, and the resources it owns (jump hosts, a proxy
 * command, an event log) that close with it.
 */
import * as net from "node:net";
import type { Duplex } from "node:stream";
import type { Client, ClientChannel } from "ssh2";
import {
  type AnyCommandResult,
  DEFAULT_RUN_TIMEOUT_MS,
  type ExecExtras,
  type RunEncoding,
  type RunOptions,
  type RunResult,
  validateRunOptions,
  validateShellKind,
  validateTimeout,
} from "../command.js";
import { Deadline, sleep } from "../common/deadline.js";
import { ConnectionLostError, SmolVMError, SSHConnectionError } from "../errors.js";
import { ChannelLimiter } from "./channel-limiter.js";
import { isChannelOpenRefused } from "./classify.js";
import { type ConnectOptions, resolveSessionOptions, type SessionConnectOptions } from "./connect-options.js";
import { EventCollector, type EventSink } from "./events.js";
import { type EvidenceBundle, type EvidenceExtra, getEvidenceBundle } from "./evidence.js";
import { execBuffered } from "./exec-buffered.js";
import {
  type ExecChannel,
  execState,
  killByRunIdScript,
  killChannel,
  newRunId,
  RUN_ID_ENV,
} from "./exec-channel.js";
import { ExecStream, type StreamExecOptions } from "./exec-stream.js";
import { type ConnectTimings, openTransport } from "./handshake.js";
import { type KeepaliveConfig, KeepaliveMonitor } from "./keepalive.js";
import { connectThroughCommand, connectThroughJumps } from "./proxy.js";
import { type ServerQuirks, serverQuirks } from "./server-quirks.js";
import type { ExecHost, SessionHost } from "./session-host.js";
import {
  type PutFileOptions as SftpPutOptions,
  getFile as sftpGet,
  putFile as sftpPut,
  type TransferOptions,
} from "./sftp.js";
import { openShell, type ShellOptions, type ShellSession } from "./shell.js";
import { watchStream } from "./watchdog.js";

export type CloseListener = (reason: Error | undefined) => void;

const KILL_SWEEP_TIMEOUT_MS = 5_000;
/** Refusals in a row with no other channel open before a refused exec request is final. */
const REFUSED_ALONE_MAX = 5;

/** The part of ssh2's channel manager we read: local id -> pending-open callback or channel. */
interface ChannelTable {
  _channels?: Record<number, unknown>;
  add(v: unknown): number;
}

export class SSHConnection implements AsyncDisposable, ExecHost, SessionHost {
  readonly client: Client;
  readonly host: string;
  readonly port: number;
  readonly username: string;
  /** Algorithms agreed in the handshake (for evidence bundles). */
  negotiated: Record<string, unknown> | undefined;
  /** The server's identification string, e.g. "OpenSSH_9.2p1 Debian-2+deb12u10". */
  serverVersion: string | undefined;
  timings: ConnectTimings = { tcpMs: 0, handshakeMs: 0, authMs: 0, totalMs: 0 };
  /** Where this connection's events go (CONNECT, EXEC, KEEPALIVE, DISCONNECT, ...). */
  readonly events: EventSink | undefined;
  /** The running keepalive, if on. */
  keepaliveMonitor: KeepaliveMonitor | undefined;
  private isAlive = true;
  private closeReason: Error | undefined;
  private lastError: Error | undefined;
  private readonly closeListeners = new Set<CloseListener>();
  private closed: Promise<void>;
  /** Adapts to the server's session limit (learned from refusals). */
  private readonly limiter = new ChannelLimiter();
  /** Closed with this connection, last opened first (jump hosts, a proxy command, an event log). */
  private readonly owned: Array<() => Promise<void> | void> = [];
  private closingOwned: Promise<void> | undefined;
  /** The server's known limits (from its identification). */
  quirks: ServerQuirks = serverQuirks(undefined);
  private sessionsStarted = 0;
  /**
   * Where kill sweeps go when this connection cannot open another session for them (a server
   * with one session per connection): SSHClient sets it to run the sweep on a new connection.
   */
  sweeper: ((script: string) => void) | undefined;

  private constructor(client: Client, opts: ConnectOptions, port: number) {
    this.client = client;
    this.host = opts.host;
    this.port = port;
    this.username = opts.username;
    this.events = opts.events;
    this.closed = new Promise((resolve) => {
      client.once("close", () => {
        this.isAlive = false;
        this.keepaliveMonitor?.stop();
        this.closeReason ??= this.lastError;
        this.events?.emit("DISCONNECT", {
          host: this.host,
          port: this.port,
          reason: disconnectReason(this.closeReason),
        });
        for (const l of this.closeListeners) l(this.closeReason);
        this.closeListeners.clear();
        this.limiter.wakeAll();
        resolve();
      });
    });
    client.on("error", (err) => {
      this.lastError = err;
      this.events?.emit("ERROR", {
        host: this.host,
        port: this.port,
        level: (err as { level?: string }).level,
      });
    });
  }

  /**
   * Connects with everything the public options allow: OpenSSH config (`sshConfig`), ProxyJump,
   * ProxyCommand and a JSONL event log (`eventLogPath`). What it creates for the connection
   * (jump connections, the proxy command, the log) is closed with it.
   */
  static async connect(opts: SessionConnectOptions): Promise<SSHConnection> {
    let log: EventCollector | undefined;
    let events: EventSink | undefined = opts.events;
    if (!events && opts.eventLogPath) {
      log = new EventCollector({ logPath: opts.eventLogPath });
      events = log;
    }
    try {
      const r = resolveSessionOptions({ ...opts, ...(events ? { events } : {}) });
      const direct = (o: ConnectOptions) => SSHConnection.connectDirect(o);
      const conn = r.proxyCommand
        ? await connectThroughCommand(r.proxyCommand, r.target, direct)
        : r.jumps.length
          ? await connectThroughJumps(r.jumps, r.target, direct)
          : await direct(r.target);
      if (log) {
        const l = log;
        conn.own(() => l.close());
      }
      return conn;
    } catch (e) {
      await log?.close();
      throw e;
    }
  }

  /** One direct connection with exactly these options (no config files, no proxies). */
  static async connectDirect(opts: ConnectOptions): Promise<SSHConnection> {
    let conn: SSHConnection | undefined;
    const t = await openTransport(opts, {
      onClient: (client, port) => {
        conn = new SSHConnection(client, opts, port);
      },
      onHandshake: (negotiated) => {
        conn!.negotiated = negotiated;
      },
    });
    const c = conn!;
    c.timings = t.timings;
    c.serverVersion = t.serverVersion;
    c.quirks = serverQuirks(t.serverVersion);
    c.limiter.cap(c.quirks.maxSessions);
    if (t.keepalive) c.startKeepalive(t.keepalive, t.sock);
    return c;
  }

  private startKeepalive(k: KeepaliveConfig, sock: Duplex): void {
    if (!this.isAlive) return;
    if (!this.quirks.answersKeepalive) {
      // Unanswered requests would read as a dead link: let the kernel probe the TCP peer.
      if (sock instanceof net.Socket) sock.setKeepAlive(true, k.intervalMs);
      this.events?.emit("KEEPALIVE", { phase: "tcp_fallback", host: this.host, port: this.port });
      return;
    }
    this.keepaliveMonitor = new KeepaliveMonitor(this.client, {
      ...k,
      events: this.events,
      host: this.host,
      port: this.port,
      onTimeout: ({ silentMs, unanswered }) => {
        // Set before the transport is destroyed, so every waiter fails with this reason.
        this.closeReason = new ConnectionLostError(
          `SSH connection to ${this.host}:${this.port} stopped answering: no keepalive reply for ` +
            `${Math.round(silentMs)} ms (${unanswered} unanswered, every ${k.intervalMs} ms, at most ${k.countMax}): ` +
            "check the network path to the server, then reconnect.",
          {
            details: {
              host: this.host,
              port: this.port,
              reason: "keepalive_timeout",
              silentMs: Math.round(silentMs),
              intervalMs: k.intervalMs,
              countMax: k.countMax,
            },
          },
        );
      },
    }).start();
  }

  /** True while the transport is up. */
  get alive(): boolean {
    return this.isAlive;
  }

  /** Calls `listener` once when the transport ends, with the error that ended it if any. */
  onClose(listener: CloseListener): () => void {
    if (!this.isAlive) {
      queueMicrotask(() => listener(this.closeReason));
      return () => {};
    }
    this.closeListeners.add(listener);
    return () => this.closeListeners.delete(listener);
  }

  /** Closes the transport (idempotent); resolves once the socket is closed. */
  async close(): Promise<void> {
    await this.closeTransport();
    await this.closeOwned();
  }

  /**
   * Ties resources to this connection: they are closed when it closes, on its own or through
   * close(), which then also waits for them. One call's closers run last first; calls run in
   * the order made (so jump hosts close before the event log that records them).
   */
  own(...closers: Array<() => Promise<void> | void>): this {
    if (!this.owned.length) this.onClose(() => void this.closeOwned());
    this.owned.push(...closers.reverse());
    return this;
  }

  private closeOwned(): Promise<void> {
    if (!this.owned.length) return Promise.resolve();
    this.closingOwned ??= (async () => {
      for (const c of this.owned) await Promise.resolve(c()).catch(() => {});
    })();
    return this.closingOwned;
  }

  private async closeTransport(): Promise<void> {
    if (this.isAlive) {
      this.closeReason ??= undefined;
      this.client.end();
      const t = setTimeout(() => this.client.destroy(), 1000);
      await this.closed;
      clearTimeout(t);
    }
    await this.closed;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  // ------------------------------------------------------------ channel limiter

  /**
   * Opens an exec channel, waiting for a free slot and retrying while the server refuses (its
   * session limit): a refused channel open (OpenSSH MaxSessions) and a refused exec request
   * (dropbear under load) both lower the adaptive limit and wait for a slot, so the call only
   * fails when its deadline does. A request refused with nothing else open on the connection,
   * REFUSED_ALONE_MAX times in a row, is the server's answer, not load: SSHConnectionError.
   * The returned channel's slot is released when it closes. Whatever the server does (it may
   * never answer the open or the exec request), the call ends when `signal` fires, releasing
   * its slot; a channel that opens after that is closed and its command killed.
   */
  async openExec(
    command: string,
    signal: AbortSignal,
    pty = false,
    runId = newRunId(),
  ): Promise<ExecChannel> {
    let refusedAlone = 0;
    for (let attempt = 0; ; attempt++) {
      if (!this.isAlive) throw this.lostError("before the command started");
      if (signal.aborted) throw signal.reason;
      await this.limiter.acquire(signal);
      if (!this.isAlive) {
        this.limiter.release();
        throw this.lostError("before the command started");
      }
      if (this.sessionsStarted >= this.quirks.sessionsPerConnection) {
        // The server closes this connection after the session it has: ask on another one.
        this.limiter.release();
        throw this.spentError();
      }
      let ch: ExecChannel;
      this.sessionsStarted++;
      try {
        ch = await this.requestExec(command, signal, pty, runId);
      } catch (e) {
        if (e instanceof SmolVMError || e === signal.reason) throw e;
        const openRefused = isChannelOpenRefused(e);
        if (openRefused || this.isAlive) {
          // The server is at its limit: remember it (what is open now is what it allows).
          this.limiter.refused();
          if (this.limiter.count === 0) {
            if (!openRefused && ++refusedAlone >= REFUSED_ALONE_MAX) {
              throw new SSHConnectionError(
                `SSH server ${this.host}:${this.port} would not run the command (it refused the exec ` +
                  "request with no other session open): check that the account may run commands.",
                { cause: e, details: { host: this.host, port: this.port, reason: "exec_refused" } },
              );
            }
          } else refusedAlone = 0;
          this.events?.emit("EXEC", {
            phase: "refused",
            host: this.host,
            request: openRefused ? "open" : "exec",
          });
          // Back off before asking again (this also lets a dying transport's close get through);
          // a refused open with others in flight waits for their slots as well.
          await sleep(Math.min(5 * 2 ** Math.min(attempt, 6), 200), signal);
          continue;
        }
        throw this.lostError("before the command started", e);
      }
      this.limiter.opened();
      return ch;
    }
  }

  /** Alive and able to open another session (false once a one-session server used its one). */
  get reusable(): boolean {
    return this.isAlive && this.sessionsStarted < this.quirks.sessionsPerConnection;
  }

  /**
   * @internal Counts a session opened outside the exec limiter (SFTP, shell); throws the
   * not-started ConnectionLostError when this server's sessions per connection are used up.
   */
  claimSession(): void {
    if (this.sessionsStarted >= this.quirks.sessionsPerConnection) throw this.spentError();
    this.sessionsStarted++;
  }

  private spentError(): ConnectionLostError {
    return new ConnectionLostError(
      `SSH server ${this.host}:${this.port} serves ${this.quirks.sessionsPerConnection} session per connection and this one is used: run the command on a new connection.`,
      {
        details: {
          host: this.host,
          port: this.port,
          commandStarted: false,
          reason: "sessions_per_connection",
        },
      },
    );
  }

  /** Channels this connection holds or waits for (its limiter's count), for diagnostics. */
  get channelsInFlight(): number {
    return this.limiter.count;
  }

  /**
   * One session channel + exec request, holding one limiter slot (taken by the caller). Settles
   * on the server's answer, on `signal` or on the transport's end, whichever comes first; the
   * slot is released exactly once (on failure, on abandon, or when the channel closes). A
   * transport lost after the exec request went out is a started command (it may have run).
   */
  private requestExec(
    command: string,
    signal: AbortSignal,
    pty: boolean,
    runId: string,
  ): Promise<ExecChannel> {
    let slotHeld = true;
    const free = () => {
      if (slotHeld) {
        slotHeld = false;
        this.limiter.release();
      }
    };
    return new Promise<ExecChannel>((resolve, reject) => {
      let settled = false;
      let localId = -1;
      const mgr = (this.client as unknown as { _chanMgr?: ChannelTable })._chanMgr;
      /** Whether the server confirmed the channel, so our exec request went out. */
      const execSent = (): boolean => {
        const entry = localId >= 0 ? mgr?._channels?.[localId] : undefined;
        return typeof entry === "object" && entry !== null;
      };
      const settle = (fn: () => void) => {
        if (settled) return false;
        settled = true;
        signal.removeEventListener("abort", onAbort);
        offClose();
        fn();
        return true;
      };
      const onAbort = () => {
        const sent = execSent();
        const pending = sent ? (mgr!._channels![localId] as unknown as ClientChannel) : undefined;
        settle(() => {
          free();
          // The exec request may have started the command: close the channel and sweep by run id.
          if (pending) this.terminate(execState(pending, runId));
          reject(signal.reason);
        });
      };
      // Runs before ssh2 fails its pending channels, so execSent() still sees their state.
      const offClose = this.onClose(() => {
        const started = execSent();
        settle(() => {
          free();
          reject(this.lostError(started ? "after the command was sent" : "before the command started"));
        });
      });
      const cb = (err: Error | undefined, channel: ClientChannel) => {
        if (err) {
          settle(() => {
            free();
            reject(err);
          });
          return;
        }
        // Exit status and close can arrive in the same packet batch as the exec reply, before a
        // promise continuation runs: record them synchronously here.
        channel.once("close", free);
        const st = execState(channel, runId);
        if (!settle(() => resolve(st))) {
          // Abandoned (deadline or signal) before the server answered: stop what it started.
          this.terminate(st);
        }
      };
      signal.addEventListener("abort", onAbort, { once: true });
      // The env request is pipelined (no reply awaited): free where AcceptEnv allows it.
      const env = { [RUN_ID_ENV]: runId };
      const add = mgr?.add;
      if (mgr && add) {
        mgr.add = function (this: ChannelTable, v: unknown) {
          localId = add.call(this, v);
          return localId;
        };
      }
      let inCall = true;
      const syncFail = (e: unknown) =>
        settle(() => {
          free();
          // ssh2 fails synchronously only for local reasons (socket no longer writable, no
          // channel ids): the transport is gone even if its close event has not run yet.
          this.client.destroy();
          reject(this.lostError("before the command started", e));
        });
      const cbOnce = (err: Error | undefined, channel: ClientChannel) =>
        inCall && err ? syncFail(err) : cb(err, channel);
      try {
        if (pty) this.client.exec(command, { pty: true, env }, cbOnce);
        else this.client.exec(command, { env }, cbOnce);
      } catch (e) {
        syncFail(e);
      } finally {
        inCall = false;
        if (mgr && add) mgr.add = add;
      }
    });
  }

  /** @internal The error for a command cut by the transport's end. */
  lostError(when: string, cause?: unknown): ConnectionLostError {
    const started = !when.startsWith("before");
    return new ConnectionLostError(
      `SSH connection to ${this.host}:${this.port} was lost ${when}: ${started ? "check whether it took effect, then retry" : "reconnect and retry"}.`,
      {
        cause: cause ?? this.closeReason,
        details: { host: this.host, port: this.port, commandStarted: started },
      },
    );
  }

  /**
   * Stops a remote command for good. The "signal" request kills the session's process group
   * where sshd honours it (OpenSSH >= 7.9, but not for root logins, which run without privilege
   * separation); as a fallback a second channel kills every process tagged with the command's
   * run id (and their process groups). Fire and forget, bounded.
   */
  terminate(st: ExecChannel): void {
    if (st.terminated) return;
    st.terminated = true;
    killChannel(st.channel);
    // A kill sweep that is itself abandoned is not swept again.
    if (!/^[0-9a-f]{16}$/.test(st.runId)) return;
    if (this.quirks.sessionsPerConnection <= 1) {
      this.sweeper?.(killByRunIdScript(st.runId));
      return;
    }
    if (!this.isAlive) return;
    const signal = AbortSignal.timeout(KILL_SWEEP_TIMEOUT_MS);
    this.openExec(killByRunIdScript(st.runId), signal, false, `kill-${st.runId}`).then(
      (k) => {
        k.channel.on("data", () => {});
        k.channel.stderr.on("data", () => {});
        k.channel.end();
      },
      () => {},
    );
  }

  // ------------------------------------------------------------ exec

  /** Runs a command and buffers its output. Non-zero exit is a result, not an error. */
  async exec<E extends RunEncoding = undefined>(
    command: string,
    options: RunOptions & ExecExtras & { encoding?: E } = {},
  ): Promise<RunResult<E>> {
    validateRunOptions(command, options);
    validateShellKind(options.shellKind);
    const deadline = new Deadline(options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS, options.signal, "SSH command");
    try {
      return (await this.execWithin(command, options, deadline)) as RunResult<E>;
    } finally {
      deadline.dispose();
    }
  }

  /**
   * exec under a caller-owned deadline (SSHClient counts connect time in it). Options must be
   * validated already.
   */
  execWithin(
    command: string,
    options: RunOptions & ExecExtras,
    deadline: Deadline,
  ): Promise<AnyCommandResult> {
    return execBuffered(this, command, options, deadline);
  }

  /** Runs a command and yields its output as it arrives, then one exit event. */
  streamExec(command: string, options: StreamExecOptions = {}): ExecStream {
    validateRunOptions(command, { ...options, stdin: undefined });
    validateShellKind(options.shellKind);
    const stream = new ExecStream(this, command, options);
    if (options.progressTimeoutMs === undefined) return stream;
    validateTimeout("progressTimeoutMs", options.progressTimeoutMs);
    // The watchdog wraps the stream but keeps its type: write/end/cancel pass through.
    return watchStream(stream, {
      progressTimeoutMs: options.progressTimeoutMs,
      abortOnStall: options.abortOnStall,
      events: this.events,
      context: { command },
    }) as unknown as ExecStream;
  }

  /** An interactive login shell on a PTY (what `ssh host` gives); drivable by AutomationEngine. */
  shell(options: ShellOptions = {}): Promise<ShellSession> {
    return openShell(this, options);
  }

  /** Uploads over SFTP; the remote file is replaced atomically. */
  putFile(localPath: string, remotePath: string, options: SftpPutOptions = {}): Promise<void> {
    return sftpPut(this, localPath, remotePath, options);
  }

  /** Downloads over SFTP. */
  getFile(remotePath: string, localPath: string, options: TransferOptions = {}): Promise<void> {
    return sftpGet(this, remotePath, localPath, options);
  }

  /** Everything needed to debug this session: events, algorithms, timings, why it ended. */
  getEvidenceBundle(extra: EvidenceExtra = {}): EvidenceBundle {
    return getEvidenceBundle(this, extra);
  }
}

/** Why a transport ended, for DISCONNECT events: "keepalive_timeout", an error code, "closed". */
function disconnectReason(e: Error | undefined): string {
  if (!e) return "closed";
  const reason = (e as SmolVMError).details?.reason;
  if (typeof reason === "string") return reason;
  return (e as { code?: string }).code ?? e.name;
}

/** Connects with everything the public options allow (SSHConnection.connect). */
export function connectSession(opts: SessionConnectOptions): Promise<SSHConnection> {
  return SSHConnection.connect(opts);
}
