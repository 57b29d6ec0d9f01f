/**
 * One authenticated SSH transport (an ssh2 Client) and the commands run over it: buffered exec,
 * streamed exec, a channel limiter that queues and retries when the server refuses channels
 * (OpenSSH MaxSessions), remote termination on timeout/abort, and typed errors.
 */
import { randomBytes } from "node:crypto";
import { createRequire } from "node:module";
import * as net from "node:net";
import type { Duplex } from "node:stream";
import ssh2, { type ClientChannel, type ConnectConfig, type Client as SSH2Client } from "ssh2";
import {
  type AnyCommandResult,
  DEFAULT_RUN_TIMEOUT_MS,
  OutputCollector,
  type RunOptions,
  type RunOptionsUtf8,
  type RunResult,
  type ShellKind,
  validateRunOptions,
  validateTimeout,
  wrapCommand,
} from "../command.js";
import { Deadline, sleep } from "../common/deadline.js";
import { validatePort } from "../common/port.js";
import {
  ConnectionLostError,
  OperationAbortedError,
  OperationTimeoutError,
  SmolVMError,
  SSHConnectionError,
  ValidationError,
} from "../errors.js";
import { type AuthConfig, createAuthHandler, defaultAuth, prepareAuth } from "./auth.js";
import {
  type AlgorithmLists,
  type ConnectContext,
  classifyConnectError,
  connectTimeoutError,
  isChannelOpenRefused,
  parseServerKexInit,
} from "./classify.js";
import { connectSession, getEvidenceBundle, type SessionConnectOptions } from "./connect-options.js";
import type { EventSink } from "./events.js";
import type { EvidenceBundle } from "./evidence.js";
import { createHostKeyVerifier, type HostKeyOptions } from "./hostkeys.js";
import { type KeepaliveConfig, KeepaliveMonitor, resolveKeepalive } from "./keepalive.js";
import {
  type PutFileOptions as SftpPutOptions,
  getFile as sftpGet,
  putFile as sftpPut,
  type TransferOptions,
} from "./sftp.js";
import { openShell, type ShellOptions, type ShellSession } from "./shell.js";
import { watchStream } from "./watchdog.js";

// ssh2 is CommonJS: its named exports are only visible through the default import.
const { Client } = ssh2;
type Client = SSH2Client;
const require = createRequire(import.meta.url);
const SSH2_DEFAULTS = require("ssh2/lib/protocol/constants.js") as Record<string, string[]>;

export type KeepaliveOptions = KeepaliveConfig;

export interface ConnectOptions {
  host: string;
  port?: number;
  username: string;
  /** One method or an ordered list tried on one connection. Default: agent, then default keys. */
  auth?: AuthConfig | AuthConfig[];
  hostKey?: HostKeyOptions;
  /** TCP connect + handshake + auth. Default 10 000. */
  connectTimeoutMs?: number;
  /**
   * keepalive@openssh.com every `intervalMs`; `countMax` unanswered in a row close the
   * connection with ConnectionLostError (details.reason "keepalive_timeout"). Default on,
   * 15 000 ms x 3 (DEFAULT_KEEPALIVE); `false` turns it off.
   */
  keepalive?: Partial<KeepaliveOptions> | false;
  events?: EventSink;
  /** A pre-connected stream (proxy, jump host); host/port then only label errors and known_hosts. */
  sock?: Duplex;
  signal?: AbortSignal;
  /** ssh2 algorithm lists (exact lists replace the defaults). */
  algorithms?: ConnectConfig["algorithms"];
}

export interface ExecExtras {
  /** How `shell: "login"` wraps this command (overrides the client's default). Default "sh". */
  shellKind?: ShellKind;
}

export const SHELL_KINDS: readonly ShellKind[] = ["sh", "powershell", "cmd"];

export function validateShellKind(kind: unknown): void {
  if (kind !== undefined && !SHELL_KINDS.includes(kind as ShellKind)) {
    throw new ValidationError(`shellKind must be one of ${SHELL_KINDS.join(", ")}, got ${String(kind)}.`);
  }
}

export interface StreamExecOptions
  extends Omit<RunOptions, "encoding" | "onStdout" | "onStderr" | "maxOutputBytes" | "stdin"> {
  /** No output for this long emits PROGRESS_WARNING (and, with abortOnStall, stops the command). */
  progressTimeoutMs?: number;
  abortOnStall?: boolean;
  shellKind?: ShellKind;
  /** Allocate a pseudo-terminal (stdout and stderr then arrive merged as stdout). */
  pty?: boolean;
  /** Keep stdin open for write()/end(); otherwise EOF is sent at once. */
  stdin?: boolean;
}

export type StreamExecEvent =
  | { stream: "stdout" | "stderr"; data: Buffer }
  | { stream: "exit"; exitCode: number | null; signal: string | null };

/** An open exec channel with its exit status and close recorded from the moment it opened. */
export interface ExecChannel {
  channel: ClientChannel;
  /** Tags every process of this command (env SMOLVM_RUN_ID) so it can be found and killed. */
  runId: string;
  terminated?: boolean;
  exitCode: number | null;
  /** Signal name without "SIG". */
  signal: string | null;
  closed: boolean;
  onClose: (() => void) | undefined;
}

export interface ConnectTimings {
  tcpMs: number;
  handshakeMs: number;
  authMs: number;
  totalMs: number;
}

export type CloseListener = (reason: Error | undefined) => void;

const RUN_ID_ENV = "SMOLVM_RUN_ID";
const KILL_SWEEP_TIMEOUT_MS = 5_000;

function newRunId(): string {
  return randomBytes(8).toString("hex");
}

/**
 * Kills every process whose environment carries SMOLVM_RUN_ID=<id>, and its process group
 * (which catches children that cleared their environment). Process group 0/1 and our own are
 * never touched. A fast pass with one `grep -l` comes first (GNU grep sees every match; busybox
 * grep stops at the first NUL, so it sees only processes that have the id first, such as the
 * login wrapper's shell); a thorough pass then reads each environment line by line. The id is
 * hex, so it needs no quoting.
 */
export function killByRunIdScript(runId: string): string {
  if (!/^[0-9a-f]{16}$/.test(runId)) throw new ValidationError("run id must be 16 hex digits.");
  const tag = `${RUN_ID_ENV}=${runId}`;
  return [
    "k() { p=${1#/proc/}; p=${p%/environ}; s=$(cat /proc/$p/stat 2>/dev/null) || return 0",
    "s=${s##*) }; set -- $s",
    '[ "$3" -gt 1 ] 2>/dev/null && [ "$3" != "$$" ] && kill -KILL -"$3" 2>/dev/null',
    'kill -KILL "$p" 2>/dev/null; return 0; }',
    `for f in $(grep -l -F '${tag}' /proc/[0-9]*/environ 2>/dev/null); do k "$f"; done`,
    "for f in /proc/[0-9]*/environ; do",
    `tr '\\0' '\\n' < "$f" 2>/dev/null | grep -qxF '${tag}' && k "$f"`,
    "done; true",
  ].join("\n");
}

/** Grace for the server to confirm a killed channel closed before we report the timeout. */
const KILL_GRACE_MS = 1000;
const INITIAL_CHANNEL_LIMIT = 64;
/** Refusals in a row with no other channel open before a refused exec request is final. */
const REFUSED_ALONE_MAX = 5;

/** The part of ssh2's channel manager we read: local id -> pending-open callback or channel. */
interface ChannelTable {
  _channels?: Record<number, unknown>;
  add(v: unknown): number;
}

export class SSHConnection implements AsyncDisposable {
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
  // Channel limiter: adapts to the server's session limit (learned from refusals).
  private inFlight = 0;
  private limit = INITIAL_CHANNEL_LIMIT;
  /** A ceiling for servers known to break with overlapping sessions (see serverQuirks). */
  private maxLimit = Number.POSITIVE_INFINITY;
  /** The server's known limits (from its identification). */
  quirks: ServerQuirks = serverQuirks(undefined);
  private sessionsStarted = 0;
  /**
   * Where kill sweeps go when this connection cannot open another session for them (a server
   * with one session per connection): SSHClient sets it to run the sweep on a new connection.
   */
  sweeper: ((script: string) => void) | undefined;
  private opensSinceRefusal = 0;
  private readonly waiters: Array<{ grant: () => void; signal: AbortSignal; onAbort: () => void }> = [];

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
        for (const w of this.waiters.splice(0)) w.grant();
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

  /** Connects, verifies the host key and authenticates, all within connectTimeoutMs. */
  /**
   * Connects with everything the public options allow: OpenSSH config (`sshConfig`), ProxyJump,
   * ProxyCommand and a JSONL event log (`eventLogPath`). What it creates for the connection
   * (jump connections, the proxy command, the log) is closed with it.
   */
  static async connect(opts: SessionConnectOptions): Promise<SSHConnection> {
    return connectSession(opts);
  }

  /** One direct connection with exactly these options (no config files, no proxies). */
  static async connectDirect(opts: ConnectOptions): Promise<SSHConnection> {
    if (!opts || typeof opts.host !== "string" || opts.host === "") {
      throw new ValidationError("host is required: pass the SSH server's address.");
    }
    if (typeof opts.username !== "string" || opts.username === "") {
      throw new ValidationError("username is required.");
    }
    const port = validatePort("port", opts.port ?? 22);
    validateTimeout("connectTimeoutMs", opts.connectTimeoutMs);
    const keepalive = resolveKeepalive(opts.keepalive);
    const connectTimeoutMs = opts.connectTimeoutMs ?? 10_000;
    const ctx: ConnectContext = {
      host: opts.host,
      port,
      username: opts.username,
      connectTimeoutMs,
      tried: [],
    };
    // Keys are loaded before any network I/O so a bad key or passphrase fails fast and clearly.
    const methods = prepareAuth(
      opts.auth === undefined ? defaultAuth() : Array.isArray(opts.auth) ? opts.auth : [opts.auth],
    );
    const verifier = createHostKeyVerifier(opts.hostKey, opts.host, port);
    opts.signal?.throwIfAborted?.();

    const t0 = performance.now();
    const timings: ConnectTimings = { tcpMs: 0, handshakeMs: 0, authMs: 0, totalMs: 0 };
    let sock: Duplex;
    let timer: NodeJS.Timeout | undefined;
    let onAbort: (() => void) | undefined;
    let failed: ((e: unknown) => void) | undefined;
    let phase = "tcp";
    const fail = new Promise<never>((_, reject) => {
      failed = reject;
    });
    fail.catch(() => {});
    timer = setTimeout(() => failed!(connectTimeoutError(ctx, phase)), connectTimeoutMs);
    if (opts.signal) {
      onAbort = () =>
        failed!(
          new OperationAbortedError(
            `SSH connection to ${opts.host}:${port} was aborted by the caller's signal.`,
          ),
        );
      opts.signal.addEventListener("abort", onAbort, { once: true });
    }
    const cleanupTimers = () => {
      clearTimeout(timer);
      timer = undefined;
      if (onAbort) opts.signal!.removeEventListener("abort", onAbort);
    };

    let client: Client | undefined;
    try {
      if (opts.sock) {
        sock = opts.sock;
      } else {
        const s = net.connect({ host: opts.host, port });
        s.setNoDelay(true);
        sock = s;
        await Promise.race([
          fail,
          new Promise<void>((resolve, reject) => {
            s.once("connect", resolve);
            s.once("error", reject);
          }),
        ]).catch((e) => {
          s.destroy();
          throw classifyConnectError(e, ctx);
        });
      }
      timings.tcpMs = performance.now() - t0;
      phase = "handshake";

      // The server's KEXINIT is in clear: keep it to name both lists if negotiation fails.
      let head = Buffer.alloc(0);
      const tap = (d: Buffer) => {
        head = Buffer.concat([head, d]);
        try {
          const lists = parseServerKexInit(head);
          if (lists || head.length > 64 * 1024) {
            ctx.theirs = lists;
            sock.off("data", tap);
          }
        } catch {
          sock.off("data", tap);
        }
      };
      ctx.ours = ourLists(opts.algorithms);

      const c = new Client();
      client = c;
      const conn = new SSHConnection(c, opts, port);
      const ready = new Promise<void>((resolve, reject) => {
        c.once("ready", resolve);
        c.once("error", reject);
        c.once("close", () =>
          reject(c.listenerCount("ready") ? new Error("closed before ready") : undefined),
        );
      });
      c.once("handshake", (negotiated) => {
        conn.negotiated = negotiated as unknown as Record<string, unknown>;
        timings.handshakeMs = performance.now() - t0 - timings.tcpMs;
        phase = "auth";
      });
      c.connect({
        sock: sock as never,
        username: opts.username,
        // Our own timer governs the deadline; ssh2's would only duplicate it.
        readyTimeout: 0,
        // Keepalive is ours (KeepaliveMonitor, with events), never ssh2's timer as well.
        keepaliveInterval: 0,
        authHandler: createAuthHandler(methods, opts.username, ctx.tried),
        hostVerifier: ((key: Buffer, verify: (ok: boolean) => void) => {
          verifier(key).then(
            (err) => {
              if (err) ctx.hostKeyError = err;
              verify(!err);
            },
            (err) => {
              ctx.hostKeyError = err as SmolVMError;
              verify(false);
            },
          );
        }) as never,
        ...(opts.algorithms ? { algorithms: opts.algorithms } : {}),
      });
      sock.on("data", tap);
      await Promise.race([fail, ready]).catch((e) => {
        c.removeAllListeners("ready");
        throw classifyConnectError(e, ctx);
      });
      cleanupTimers();
      c.removeAllListeners("ready");
      sock.off("data", tap);
      timings.totalMs = performance.now() - t0;
      timings.authMs = timings.totalMs - timings.tcpMs - timings.handshakeMs;
      conn.timings = timings;
      conn.serverVersion = (c as unknown as { _remoteVer?: string })._remoteVer;
      conn.quirks = serverQuirks(conn.serverVersion);
      conn.maxLimit = conn.quirks.maxSessions;
      conn.limit = Math.min(conn.limit, conn.maxLimit);
      opts.events?.emit("CONNECT", {
        host: opts.host,
        port,
        tcpMs: round(timings.tcpMs),
        handshakeMs: round(timings.handshakeMs),
        serverVersion: conn.serverVersion,
      });
      opts.events?.emit("AUTH", {
        username: opts.username,
        methods: ctx.tried,
        ok: true,
        authMs: round(timings.authMs),
      });
      if (keepalive) conn.startKeepalive(keepalive, sock);
      return conn;
    } catch (e) {
      cleanupTimers();
      client?.removeAllListeners("error");
      client?.on("error", () => {});
      client?.end();
      (sock! as net.Socket | undefined)?.destroy?.();
      if (ctx.tried?.length && (e as SmolVMError).code === "SSH_AUTH_FAILED") {
        opts.events?.emit("AUTH", { username: opts.username, methods: ctx.tried, ok: false });
      }
      opts.events?.emit("ERROR", { phase, code: (e as SmolVMError).code });
      throw e;
    }
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
      if (this.inFlight >= this.limit) await this.waitSlot(signal);
      else this.inFlight++;
      if (!this.isAlive) {
        this.release();
        throw this.lostError("before the command started");
      }
      if (this.sessionsStarted >= this.quirks.sessionsPerConnection) {
        // The server closes this connection after the session it has: ask on another one.
        this.release();
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
          this.limit = Math.max(1, this.inFlight);
          this.opensSinceRefusal = 0;
          if (this.inFlight === 0) {
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
      if (this.inFlight >= this.limit && this.limit < this.maxLimit && ++this.opensSinceRefusal >= 32) {
        // Probe upward now and then: the limit may have been transient.
        this.limit++;
        this.opensSinceRefusal = 0;
      }
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
    return this.inFlight;
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
        this.release();
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
          if (pending) this.terminate(this.execState(pending, runId));
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
        const st = this.execState(channel, runId);
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

  /** Wraps an exec channel with its exit status and close, recorded from now on. */
  private execState(channel: ClientChannel, runId: string): ExecChannel {
    const st: ExecChannel = {
      channel,
      runId,
      exitCode: null,
      signal: null,
      closed: false,
      onClose: undefined,
    };
    channel.on("exit", (code: number | null, sig?: string) => {
      if (code !== null && code !== undefined) st.exitCode = code;
      else if (sig) st.signal = sig.startsWith("SIG") ? sig.slice(3) : sig;
    });
    channel.once("close", () => {
      st.closed = true;
      st.onClose?.();
    });
    return st;
  }

  private waitSlot(signal: AbortSignal): Promise<void> {
    return new Promise((resolve, reject) => {
      const w = {
        signal,
        grant: () => {
          signal.removeEventListener("abort", w.onAbort);
          resolve();
        },
        onAbort: () => {
          const i = this.waiters.indexOf(w);
          if (i >= 0) this.waiters.splice(i, 1);
          reject(signal.reason);
        },
      };
      signal.addEventListener("abort", w.onAbort, { once: true });
      this.waiters.push(w);
    });
  }

  private release(): void {
    this.inFlight--;
    while (this.inFlight < this.limit && this.waiters.length) {
      this.inFlight++;
      this.waiters.shift()!.grant();
    }
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
  async exec<O extends RunOptions & ExecExtras = RunOptionsUtf8>(
    command: string,
    options: O = {} as O,
  ): Promise<RunResult<O>> {
    validateRunOptions(command, options);
    validateShellKind(options.shellKind);
    const deadline = new Deadline(options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS, options.signal, "SSH command");
    try {
      return (await this.execWithin(command, options, deadline)) as RunResult<O>;
    } finally {
      deadline.dispose();
    }
  }

  /**
   * exec under a caller-owned deadline (SSHClient counts connect time in it). Options must be
   * validated already.
   */
  async execWithin(
    command: string,
    options: RunOptions & ExecExtras,
    deadline: Deadline,
  ): Promise<AnyCommandResult> {
    const runId = newRunId();
    const wrapped = wrapCommand(command, {
      shell: options.shell,
      shellKind: options.shellKind,
      env: options.env,
      cwd: options.cwd,
      runId,
    });
    const started = deadline.startedAt;
    const events = this.events;
    events?.emit("EXEC", { phase: "start", command, host: this.host });
    const collector = new OutputCollector(options.maxOutputBytes, options.onStdout, options.onStderr);
    const encoding = options.encoding ?? "utf8";
    const st = await this.openExec(wrapped.command, deadline.signal, false, runId).catch((e) => {
      throw e instanceof OperationTimeoutError
        ? e.withPartial(collector.result(null, null, performance.now() - started, encoding))
        : e;
    });
    const ch = st.channel;
    return new Promise((resolve, reject) => {
      let settled = false;
      let graceTimer: NodeJS.Timeout | undefined;
      ch.on("data", (d: Buffer) => collector.push("stdout", d));
      ch.stderr.on("data", (d: Buffer) => collector.push("stderr", d));
      const onAbort = () => {
        if (settled) return;
        settled = true;
        this.terminate(st);
        // Report once the server confirms the channel (and so the process group) is gone.
        graceTimer = setTimeout(finishAbort, KILL_GRACE_MS);
      };
      const finishAbort = () => {
        clearTimeout(graceTimer);
        graceTimer = undefined;
        reject(
          deadline.reason!.withPartial(
            collector.result(st.exitCode, st.signal, performance.now() - started, encoding),
          ),
        );
      };
      deadline.signal.addEventListener("abort", onAbort, { once: true });
      const onClose = () => {
        deadline.signal.removeEventListener("abort", onAbort);
        if (settled) {
          if (graceTimer) finishAbort();
          return;
        }
        settled = true;
        const { exitCode, signal } = st;
        const durationMs = performance.now() - started;
        const result = collector.result(exitCode, signal, durationMs, encoding);
        if (exitCode === null && signal === null && !this.isAlive) {
          reject(
            Object.assign(this.lostError("while the command ran (it may or may not have finished)"), {
              partial: result,
            }),
          );
          return;
        }
        events?.emit("EXEC", {
          phase: "end",
          command,
          exitCode,
          signal,
          durationMs: round(durationMs),
          bytesStdout: collector.bytesStdout,
          bytesStderr: collector.bytesStderr,
        });
        resolve(result);
      };
      // Buffered data events flush before 'close' (both are queued on the stream), so the
      // result is complete by the time onClose runs.
      if (st.closed) setImmediate(onClose);
      else st.onClose = onClose;
      // stdin: env prefix, the caller's bytes, then EOF, without waiting for anything.
      if (wrapped.stdinPrefix) ch.write(wrapped.stdinPrefix);
      if (options.stdin?.length) ch.write(options.stdin);
      ch.end();
    });
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
  getEvidenceBundle(extra: Parameters<typeof getEvidenceBundle>[1] = {}): EvidenceBundle {
    return getEvidenceBundle(this, extra);
  }
}

/**
 * Terminates the remote command: OpenSSH (>= 7.9) delivers a "signal" request with killpg() to
 * the session's process group, so background children die too. ssh2 only sends the request
 * while our side of the channel is writable, but we have usually sent EOF by now, so the
 * request is sent through the protocol object directly.
 */
export function killChannel(ch: ClientChannel): void {
  const c = ch as unknown as {
    outgoing: { id: number; state: string };
    _client: { _protocol: { signal(id: number, name: string): void } };
  };
  try {
    // Only on an open channel: a request for a channel the server already freed makes OpenSSH
    // drop the whole connection ("unknown channel").
    const st = c.outgoing.state;
    if (st === "open" || st === "eof") c._client._protocol.signal(c.outgoing.id, "KILL");
  } catch {}
  try {
    ch.close();
  } catch {}
}

/** What one server allows per connection, from its identification (see serverQuirks). */
export interface ServerQuirks {
  /** Sessions that may be open at once. */
  maxSessions: number;
  /** Sessions the server serves before it closes the connection (tinysshd: one). */
  sessionsPerConnection: number;
  /** Whether it answers keepalive@openssh.com (global requests); tinysshd does not. */
  answersKeepalive: boolean;
}

/**
 * Known limits by server identification. dropbear before 2024.86 can close a session that is
 * open but not yet exec'd when another session's command exits in that window (dropbear issue
 * #321): the exec is then refused, or it runs and the connection process dies on
 * `!channel->sent_close`, taking every session with it; one session at a time avoids the
 * window, so commands to those servers queue. tinysshd serves one session per connection and
 * then exits (SSHClient opens a connection per command for it), and leaves keepalive@openssh.com
 * unanswered: the SSH keepalive is off for it and TCP keepalive watches the link instead.
 */
export function serverQuirks(serverVersion: string | undefined): ServerQuirks {
  const v = serverVersion ?? "";
  const none = {
    maxSessions: Number.POSITIVE_INFINITY,
    sessionsPerConnection: Number.POSITIVE_INFINITY,
    answersKeepalive: true,
  };
  const m = /^dropbear_(\d{4})\.(\d+)/.exec(v);
  if (m && Number(m[1]) * 100 + Number(m[2]) < 2024_86) return { ...none, maxSessions: 1 };
  if (/^tinyssh_/.test(v)) return { maxSessions: 1, sessionsPerConnection: 1, answersKeepalive: false };
  return none;
}

function ourLists(algorithms: ConnectConfig["algorithms"] | undefined): AlgorithmLists {
  const pick = (given: unknown, def: string[] | undefined): string[] =>
    Array.isArray(given) && given.length ? (given as string[]) : (def ?? []);
  const a = (algorithms ?? {}) as Record<string, unknown>;
  return {
    kex: pick(a.kex, SSH2_DEFAULTS.DEFAULT_KEX),
    serverHostKey: pick(a.serverHostKey, SSH2_DEFAULTS.DEFAULT_SERVER_HOST_KEY),
    cipher: pick(a.cipher, SSH2_DEFAULTS.DEFAULT_CIPHER),
    mac: pick(a.hmac, SSH2_DEFAULTS.DEFAULT_MAC),
    compress: pick(a.compress, SSH2_DEFAULTS.DEFAULT_COMPRESSION),
  };
}

/** Why a transport ended, for DISCONNECT events: "keepalive_timeout", an error code, "closed". */
function disconnectReason(e: Error | undefined): string {
  if (!e) return "closed";
  const reason = (e as SmolVMError).details?.reason;
  if (typeof reason === "string") return reason;
  return (e as { code?: string }).code ?? e.name;
}

function round(ms: number): number {
  return Math.round(ms * 100) / 100;
}

/**
 * Output queued for a slow consumer above this pauses the channel: ssh2 then stops granting the
 * server window, so the remote command blocks on write instead of our memory growing. Reading
 * resumes once the queue is below the low-water mark.
 */
export const STREAM_HIGH_WATER_BYTES = 1024 * 1024;
export const STREAM_LOW_WATER_BYTES = 256 * 1024;

/** A streamed command: async-iterate its events; write()/end() feed stdin; cancel() kills it. */
export class ExecStream implements AsyncIterable<StreamExecEvent> {
  private readonly queue: StreamExecEvent[] = [];
  private queuedBytes = 0;
  private paused = false;
  private waiting: ((v: IteratorResult<StreamExecEvent>) => void) | undefined;
  private waitingReject: ((e: unknown) => void) | undefined;
  private error: unknown;
  private done = false;
  private channel: ClientChannel | undefined;
  private exec: ExecChannel | undefined;
  private readonly conn: SSHConnection;
  private readonly pendingStdin: Array<Buffer | null> = [];
  private readonly deadline: Deadline;
  private readonly opened: Promise<void>;
  private readonly command: string;
  private readonly startedAt = performance.now();
  private bytesStdout = 0;
  private bytesStderr = 0;
  private endReported = false;

  constructor(
    conn: SSHConnection,
    command: string,
    private readonly options: StreamExecOptions,
  ) {
    this.deadline = new Deadline(options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS, options.signal, "SSH command");
    const runId = newRunId();
    const wrapped = wrapCommand(command, {
      shell: options.shell,
      shellKind: options.shellKind,
      env: options.env,
      cwd: options.cwd,
      runId,
    });
    this.conn = conn;
    this.command = command;
    conn.events?.emit("EXEC", { phase: "start", command, host: conn.host, stream: true });
    this.opened = conn.openExec(wrapped.command, this.deadline.signal, options.pty, runId).then(
      (st) => {
        const ch = st.channel;
        this.channel = ch;
        this.exec = st;
        if (this.done) {
          conn.terminate(st);
          return;
        }
        ch.on("data", (d: Buffer) => {
          this.bytesStdout += d.length;
          this.push({ stream: "stdout", data: d });
        });
        ch.stderr.on("data", (d: Buffer) => {
          this.bytesStderr += d.length;
          this.push({ stream: "stderr", data: d });
        });
        const onClose = () => {
          // 'close' follows stdout's end; stderr may still hold output if we paused it.
          if (!ch.stderr.readableEnded && !ch.stderr.destroyed && !this.done) {
            ch.stderr.once("end", onClose);
            return;
          }
          const { exitCode, signal } = st;
          this.deadline.signal.removeEventListener("abort", this.onAbort);
          if (exitCode === null && signal === null && !conn.alive && !this.done) {
            this.fail(conn.lostError("while the command ran (it may or may not have finished)"));
            return;
          }
          this.push({ stream: "exit", exitCode, signal });
          this.reportEnd({ exitCode, signal });
          this.finish();
        };
        if (st.closed) setImmediate(onClose);
        else st.onClose = onClose;
        this.deadline.signal.addEventListener("abort", this.onAbort, { once: true });
        if (wrapped.stdinPrefix) ch.write(wrapped.stdinPrefix);
        if (!options.stdin) ch.end();
        else {
          for (const p of this.pendingStdin.splice(0)) {
            if (p === null) ch.end();
            else ch.write(p);
          }
        }
      },
      (e) => this.fail(e),
    );
    this.opened.catch(() => {});
  }

  private readonly onAbort = () => {
    if (this.exec) this.conn.terminate(this.exec);
    this.fail(this.deadline.reason);
  };

  private push(ev: StreamExecEvent): void {
    if (this.done) return;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = undefined;
      this.waitingReject = undefined;
      w({ value: ev, done: false });
      return;
    }
    this.queue.push(ev);
    if (ev.stream === "exit") return;
    this.queuedBytes += ev.data.length;
    if (!this.paused && this.queuedBytes > STREAM_HIGH_WATER_BYTES) this.setFlow(false);
  }

  private shift(): StreamExecEvent | undefined {
    const ev = this.queue.shift();
    if (ev && ev.stream !== "exit") {
      this.queuedBytes -= ev.data.length;
      if (this.paused && this.queuedBytes <= STREAM_LOW_WATER_BYTES) this.setFlow(true);
    }
    return ev;
  }

  /** Pauses or resumes reading both output streams of the channel. */
  private setFlow(on: boolean): void {
    this.paused = !on;
    const ch = this.channel;
    if (!ch) return;
    if (on) {
      ch.resume();
      ch.stderr.resume();
    } else {
      ch.pause();
      ch.stderr.pause();
    }
  }

  /** One EXEC end event per stream, however it ended (byte counts, never data or env). */
  private reportEnd(outcome: Record<string, unknown>): void {
    if (this.endReported) return;
    this.endReported = true;
    this.conn.events?.emit("EXEC", {
      phase: "end",
      command: this.command,
      stream: true,
      exitCode: null,
      signal: null,
      ...outcome,
      durationMs: round(performance.now() - this.startedAt),
      bytesStdout: this.bytesStdout,
      bytesStderr: this.bytesStderr,
    });
  }

  private finish(): void {
    this.done = true;
    this.deadline.dispose();
    // Nothing more is delivered: let the channel drain so it can close and free its slot.
    if (this.paused) this.setFlow(true);
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = undefined;
      w({ value: undefined, done: true });
    }
  }

  private fail(e: unknown): void {
    if (this.done) return;
    this.reportEnd({ error: (e as { code?: string } | null)?.code ?? (e as Error | null)?.name ?? "error" });
    this.error = e;
    this.done = true;
    this.deadline.dispose();
    if (this.paused) this.setFlow(true);
    if (this.waitingReject) {
      const r = this.waitingReject;
      this.waiting = undefined;
      this.waitingReject = undefined;
      r(e);
    }
  }

  /** Output received but not yet taken by the consumer (bounded by the high-water mark). */
  get bufferedBytes(): number {
    return this.queuedBytes;
  }

  /** Writes to the command's stdin (needs `stdin: true`). */
  write(data: string | Buffer): void {
    if (!this.options.stdin) throw new ValidationError("streamExec was started without stdin: true.");
    const b = typeof data === "string" ? Buffer.from(data) : data;
    if (this.channel) this.channel.write(b);
    else this.pendingStdin.push(b);
  }

  /** Sends EOF on stdin. */
  end(): void {
    if (this.channel) this.channel.end();
    else this.pendingStdin.push(null);
  }

  /** Kills the remote command and ends the iteration. */
  async cancel(): Promise<void> {
    if (this.done) return;
    if (this.exec) this.conn.terminate(this.exec);
    this.queue.length = 0;
    this.queuedBytes = 0;
    this.reportEnd({ cancelled: true });
    this.finish();
    // A channel that opens after this point is terminated by the open handler (done is set).
    await this.opened.catch(() => {});
  }

  [Symbol.asyncIterator](): AsyncIterator<StreamExecEvent> {
    return {
      next: () => {
        const ev = this.shift();
        if (ev) return Promise.resolve({ value: ev, done: false });
        if (this.error !== undefined) return Promise.reject(this.error);
        if (this.done) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve, reject) => {
          this.waiting = resolve;
          this.waitingReject = reject;
        });
      },
      return: async () => {
        await this.cancel();
        return { value: undefined, done: true };
      },
    };
  }
}
