/**
 * CommChannel over the guest agent (agent/PROTOCOL.md): one authenticated byte stream to the
 * guest (virtio-serial Unix socket, vsock, or a test socket) multiplexing every call.
 *
 * The guest is untrusted: every frame is validated (agent-protocol.ts), every stream's inbound
 * bytes are capped by the credit we granted, and any violation is a ProtocolError that fails the
 * calls in flight and drops the connection; the next call reconnects.
 */
import { randomBytes } from "node:crypto";
import { type FileHandle, open } from "node:fs/promises";
import { connect as netConnect, type Socket } from "node:net";
import type { Duplex } from "node:stream";
import {
  type CommandResult,
  DEFAULT_RUN_TIMEOUT_MS,
  OutputCollector,
  type RunOptions,
  type RunOptionsBuffer,
  type RunOptionsUtf8,
  type ShellMode,
  validateEnv,
  validateRunOptions,
  validateTimeout,
  type WrappedCommand,
  wrapCommand,
} from "../command.js";
import { Deadline, sleep } from "../common/deadline.js";
import { guestText } from "../common/guest-text.js";
import { downloadTo, validateMaxBytes } from "../common/safe-download.js";
import {
  AuthenticationError,
  ConnectionLostError,
  ConnectionRefusedError,
  ConnectionTimeoutError,
  OperationAbortedError,
  OperationTimeoutError,
  ProtocolError,
  SmolVMError,
  ValidationError,
} from "../errors.js";
import {
  type AgentInfo,
  type AgentMessage,
  agentProof,
  decodeAgentFrame,
  decodeInfoFields,
  decodeU64,
  type ExecRequest,
  encodeExec,
  encodeFrame,
  encodeGet,
  encodeHello,
  encodePut,
  encodeWaitPort,
  FrameDecoder,
  FrameType,
  hostProof,
  INITIAL_WINDOW,
  MAX_PAYLOAD,
  NONCE_SIZE,
  proofsEqual,
  SECRET_SIZE,
  u16,
  u32,
} from "./agent-protocol.js";
import { ENV_FILE_MAX, envFileTooLarge, mergeEnv, parseEnvFile, renderEnvFile } from "./env-file.js";
import { validateGuestPath } from "./guest-path.js";
import type {
  CallOptions,
  CommandStream,
  CommChannel,
  GetFileOptions,
  PutFileOptions,
  StreamEvent,
} from "./types.js";

const FILE_TIMEOUT_MS = 300_000;
const CONNECT_TIMEOUT_MS = 10_000;
const HELLO_RESEND_MS = 500;
/** close() waits at most this long for the socket's close event. */
const SOCKET_CLOSE_WAIT_MS = 1_000;
/** The agent enforces a command's timeout this long after the host's, as a backstop. */
const AGENT_TIMEOUT_SLACK_MS = 250;

export interface AgentChannelOptions {
  /** Opens a fresh byte stream to the agent (e.g. `(signal) => connectUnix(path, signal)`). */
  connect: (signal: AbortSignal) => Promise<Duplex>;
  /** The per-VM agent secret (32 bytes). Never logged. */
  secret: Buffer | Uint8Array;
  /** Bound on connect + handshake when the call itself allows longer. Default 10 000. */
  connectTimeoutMs?: number;
  /** What to call the peer in messages, e.g. "the agent of VM web-1". */
  name?: string;
}

export interface ExecArgvOptions extends Omit<RunOptions, "shell"> {
  /** Run on a pseudo-terminal of this size (stdout and stderr merge into stdout). */
  pty?: { rows: number; cols: number };
}

/** A running command with interactive stdin, signals and PTY resize. */
export interface AgentCommandStream extends CommandStream {
  write(data: string | Buffer | Uint8Array): Promise<void>;
  /** Closes stdin (EOF). */
  end(): Promise<void>;
  signal(name: "TERM" | "INT" | "KILL" | "HUP" | "QUIT" | "USR1" | "USR2" | "STOP" | "CONT" | "WINCH"): void;
  resize(rows: number, cols: number): void;
}

// ---------------------------------------------------------------- transports

function connectError(err: NodeJS.ErrnoException, what: string): SmolVMError {
  if (err.code === "ECONNREFUSED" || err.code === "ENOENT") {
    return new ConnectionRefusedError(
      `${what} refused the connection (${err.code}): the agent or the VM is not running; start the VM or use commChannel "ssh".`,
      { code: "AGENT_CONNECTION_REFUSED", cause: err },
    );
  }
  return new ConnectionLostError(`${what} could not be reached (${err.code ?? err.message}).`, {
    code: "AGENT_CONNECTION_LOST",
    cause: err,
  });
}

function socketConnect(path: string, signal?: AbortSignal): Promise<Socket> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const sock = netConnect({ path });
    const onAbort = () => {
      sock.destroy();
      reject(signal?.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    sock.once("connect", () => {
      signal?.removeEventListener("abort", onAbort);
      sock.removeAllListeners("error");
      resolve(sock);
    });
    sock.once("error", (err) => {
      signal?.removeEventListener("abort", onAbort);
      reject(connectError(err, `the agent socket ${path}`));
    });
  });
}

/** Connects to a Unix socket (QEMU's host side of the virtio-serial port, or a test agent). */
export function connectUnix(path: string, signal?: AbortSignal): Promise<Duplex> {
  return socketConnect(path, signal);
}

/**
 * Connects to a guest vsock port through a Firecracker-style Unix socket: writes
 * `CONNECT <port>\n` and expects one `OK <assigned>\n` line before the byte stream begins.
 */
export async function connectVsockUds(path: string, port: number, signal?: AbortSignal): Promise<Duplex> {
  if (!Number.isInteger(port) || port <= 0 || port > 0xffffffff) {
    throw new ValidationError(`vsock port must be a positive 32-bit integer, got ${String(port)}.`);
  }
  const sock = await socketConnect(path, signal);
  return new Promise((resolve, reject) => {
    let line = Buffer.alloc(0);
    const finish = (err?: Error) => {
      sock.off("data", onData);
      sock.off("error", onError);
      sock.off("close", onClose);
      signal?.removeEventListener("abort", onAbort);
      if (err) {
        sock.destroy();
        reject(err);
      }
    };
    const onData = (chunk: Buffer) => {
      line = Buffer.concat([line, chunk]);
      const nl = line.indexOf(10);
      if (nl < 0) {
        if (line.length > 64)
          finish(new ProtocolError(`vsock proxy ${path} sent an overlong handshake line.`));
        return;
      }
      const text = line.subarray(0, nl).toString("latin1");
      if (!/^OK \d+$/.test(text.trim())) {
        finish(
          new ConnectionRefusedError(
            `vsock proxy ${path} refused port ${port}: nothing listens there in the guest yet.`,
            { code: "AGENT_CONNECTION_REFUSED" },
          ),
        );
        return;
      }
      finish();
      sock.pause();
      const rest = line.subarray(nl + 1);
      if (rest.length) sock.unshift(rest);
      resolve(sock);
    };
    const onError = (err: Error) => finish(connectError(err, `vsock proxy ${path}`));
    const onClose = () =>
      finish(
        new ConnectionRefusedError(`vsock proxy ${path} closed before accepting port ${port}.`, {
          code: "AGENT_CONNECTION_REFUSED",
        }),
      );
    const onAbort = () => finish(signal?.reason as Error);
    sock.on("data", onData);
    sock.on("error", onError);
    sock.on("close", onClose);
    signal?.addEventListener("abort", onAbort, { once: true });
    sock.write(`CONNECT ${port}\n`);
  });
}

// ---------------------------------------------------------------- one connection

export type StreamKind = "exec" | "put" | "get" | "simple";

export interface StreamHandler {
  kind: StreamKind;
  onData?(fd: number, data: Buffer): void;
  onCredit?(): void;
  onEnd(msg: Extract<AgentMessage, { type: "exit" | "ok" | "error" }>): void;
  onFail(err: Error): void;
}

interface StreamState {
  handler: StreamHandler;
  /** Bytes the agent may still send us. */
  recvWindow: number;
  /** Bytes we may still send the agent. */
  sendCredit: number;
  pendingGrant: number;
  /** The call ended on the host side: input for this stream is dropped (see Session.abandon). */
  abandoned?: boolean;
}

class Session {
  readonly streams = new Map<number, StreamState>();
  private nextId = 1;
  private readonly decoder = new FrameDecoder();
  private failure: Error | undefined;
  private drainWaiters: Array<() => void> = [];
  private grantScheduled = false;
  private corked = false;
  private challengeNonce: Buffer | undefined;
  info!: AgentInfo;

  /** Settles once the socket has closed (close() waits for it: nothing outlives the channel). */
  readonly socketClosed: Promise<void>;

  constructor(
    private readonly sock: Duplex,
    private readonly name: string,
    private readonly onDead: (s: Session) => void,
  ) {
    this.socketClosed = sock.destroyed
      ? Promise.resolve()
      : new Promise<void>((resolve) => sock.once("close", () => resolve()));
  }

  get dead(): boolean {
    return this.failure !== undefined;
  }

  /** HELLO / CHALLENGE / AUTH / AUTH_OK, then the session serves calls. */
  async handshake(secret: Buffer, deadline: Deadline): Promise<void> {
    const hostNonce = randomBytes(NONCE_SIZE);
    this.decoder.resync(FrameType.CHALLENGE);
    let step: "challenge" | "authOk" = "challenge";
    let settle!: { resolve: () => void; reject: (e: Error) => void };
    const done = new Promise<void>((resolve, reject) => {
      settle = { resolve, reject };
    });
    let agentNonce: Buffer | undefined;
    const onMessage = (m: AgentMessage) => {
      if (step === "challenge" && m.type === "challenge") {
        agentNonce = m.nonce;
        this.challengeNonce = m.nonce;
        step = "authOk";
        this.write(encodeFrame(FrameType.AUTH, 0, hostProof(secret, m.nonce, hostNonce)));
        return;
      }
      if (step === "authOk" && m.type === "challenge" && agentNonce && m.nonce.equals(agentNonce)) return;
      if (step === "authOk" && m.type === "authOk") {
        if (!proofsEqual(m.proof, agentProof(secret, hostNonce, agentNonce!))) {
          settle.reject(
            new AuthenticationError(
              `${this.name} could not prove it holds this VM's agent secret: something else answers on the agent port; do not trust this VM, recreate it.`,
              { code: "AGENT_AUTH_PEER" },
            ),
          );
          return;
        }
        this.info = m.info;
        settle.resolve();
        return;
      }
      if (m.type === "error" && m.stream === 0 && m.code === "AUTH_FAILED") {
        settle.reject(
          new AuthenticationError(
            `${this.name} rejected this host's secret: the secret smolvm holds for the VM does not match the one the VM booted with; recreate the VM, or use commChannel "ssh".`,
            { code: "AGENT_AUTH_FAILED" },
          ),
        );
        return;
      }
      settle.reject(new ProtocolError(`${this.name} sent ${m.type} during the handshake.`));
    };
    this.handshakeHandler = onMessage;
    this.handshakeFail = (e) => settle.reject(e);
    this.sock.on("data", (chunk: Buffer) => this.onChunk(chunk));
    this.sock.on("error", (err) => this.fail(this.lost(err)));
    this.sock.on("close", () => this.fail(this.lost()));
    this.sock.on("drain", () => this.flushDrain());
    this.sock.resume?.();
    const hello = encodeFrame(FrameType.HELLO, 0, encodeHello(hostNonce));
    this.write(hello);
    // Repeat the same HELLO until answered: a virtio port drops bytes while the guest has it closed.
    const timer = setInterval(() => {
      if (step === "challenge" && !this.dead) this.write(hello);
    }, HELLO_RESEND_MS);
    try {
      await deadline.race(done);
    } finally {
      clearInterval(timer);
      this.handshakeHandler = undefined;
      this.handshakeFail = undefined;
    }
  }

  private handshakeHandler: ((m: AgentMessage) => void) | undefined;
  private handshakeFail: ((e: Error) => void) | undefined;

  private lost(err?: Error): Error {
    return new ConnectionLostError(
      `the connection to ${this.name} closed${err ? ` (${(err as NodeJS.ErrnoException).code ?? err.message})` : ""}: the agent may have crashed or the VM stopped; retry the call (it reconnects), or use commChannel "ssh".`,
      { code: "AGENT_CONNECTION_LOST", cause: err },
    );
  }

  private onChunk(chunk: Buffer): void {
    if (this.dead) return;
    try {
      for (const frame of this.decoder.push(chunk)) {
        const msg = decodeAgentFrame(frame);
        if (this.handshakeHandler) this.handshakeHandler(msg);
        else this.route(msg);
        if (this.dead) return;
      }
    } catch (err) {
      this.fail(
        err instanceof ProtocolError
          ? new ProtocolError(`${this.name} broke the protocol: ${err.message} The connection was reset.`, {
              cause: err,
            })
          : (err as Error),
      );
    }
  }

  private route(m: AgentMessage): void {
    if (m.stream === 0) {
      if (m.type === "challenge" && this.challengeNonce && m.nonce.equals(this.challengeNonce)) return;
      if (m.type === "error") {
        throw new ProtocolError(
          `agent reported a session error ${m.code}: ${guestText(m.message, { max: 200 })}.`,
        );
      }
      throw new ProtocolError(`unexpected ${m.type} on stream 0.`);
    }
    const st = this.streams.get(m.stream);
    if (!st) throw new ProtocolError(`frame ${m.type} for stream ${m.stream}, which is not open.`);
    const kind = st.handler.kind;
    switch (m.type) {
      case "data": {
        const okFd = kind === "exec" ? m.fd === 1 || m.fd === 2 : kind === "get" ? m.fd === 0 : false;
        if (!okFd) throw new ProtocolError(`DATA on fd ${m.fd} is not valid for a ${kind} stream.`);
        if (m.data.length > st.recvWindow) {
          throw new ProtocolError(`stream ${m.stream} sent ${m.data.length} bytes beyond its credit.`);
        }
        st.recvWindow -= m.data.length;
        st.handler.onData!(m.fd, m.data);
        return;
      }
      case "credit":
        if (kind !== "exec" && kind !== "put") throw new ProtocolError(`CREDIT on a ${kind} stream.`);
        if (st.sendCredit + m.bytes > INITIAL_WINDOW) {
          throw new ProtocolError(`stream ${m.stream} granted more credit than was ever used.`);
        }
        st.sendCredit += m.bytes;
        st.handler.onCredit?.();
        return;
      case "exit":
        if (kind !== "exec") throw new ProtocolError(`EXIT on a ${kind} stream.`);
        this.streams.delete(m.stream);
        st.handler.onEnd(m);
        return;
      case "ok":
        if (kind === "exec") throw new ProtocolError("OK on an exec stream.");
        this.streams.delete(m.stream);
        st.handler.onEnd(m);
        return;
      case "error":
        this.streams.delete(m.stream);
        st.handler.onEnd(m);
        return;
      default:
        throw new ProtocolError(`unexpected ${m.type} on stream ${m.stream}.`);
    }
  }

  fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.handshakeFail?.(err);
    this.sock.destroy();
    const streams = [...this.streams.values()];
    this.streams.clear();
    for (const st of streams) st.handler.onFail(err);
    this.flushDrain();
    this.onDead(this);
  }

  /** Raises the session's failure if it is dead. */
  check(): void {
    if (this.failure) throw this.failure;
  }

  /**
   * Frames written in one tick leave in one write: under emulation every host write is an
   * interrupt and a wakeup in the guest, so EXEC and its EOF should arrive together.
   */
  write(buf: Buffer): boolean {
    if (this.dead) return false;
    if (!this.corked) {
      this.corked = true;
      this.sock.cork();
      process.nextTick(() => {
        this.corked = false;
        this.sock.uncork();
      });
    }
    return this.sock.write(buf);
  }

  private flushDrain(): void {
    const w = this.drainWaiters;
    this.drainWaiters = [];
    for (const f of w) f();
  }

  /** Waits until the socket accepts more (bounded by socket backpressure, never by memory). */
  waitDrain(): Promise<void> {
    if (this.dead || !(this.sock as Socket).writableNeedDrain) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  open(type: number, payload: Buffer, handler: StreamHandler): number {
    this.check();
    if (payload.length > MAX_PAYLOAD) {
      throw new ValidationError(
        `the request is ${payload.length} bytes, over the agent's ${MAX_PAYLOAD} byte frame limit: pass long scripts on stdin instead.`,
      );
    }
    const id = this.nextId++;
    if (id > 0xffffffff) throw new ProtocolError("stream ids exhausted: reconnect.");
    this.streams.set(id, {
      handler,
      recvWindow: INITIAL_WINDOW,
      sendCredit: INITIAL_WINDOW,
      pendingGrant: 0,
    });
    this.write(encodeFrame(type, id, payload));
    return id;
  }

  credit(id: number): number {
    return this.streams.get(id)?.sendCredit ?? 0;
  }

  /** Sends DATA within credit; returns false when the stream is gone. */
  sendData(id: number, data: Buffer): boolean {
    const st = this.streams.get(id);
    if (!st || this.dead) return false;
    if (data.length > st.sendCredit) throw new Error("internal: DATA beyond credit");
    st.sendCredit -= data.length;
    this.write(encodeFrame(FrameType.DATA, id, data));
    return true;
  }

  control(type: number, id: number, payload?: Buffer): void {
    if (this.streams.has(id)) this.write(encodeFrame(type, id, payload));
  }

  /**
   * The call on stream `id` is over (deadline, signal, cancel, a callback threw): CANCEL it and
   * from now on drop whatever output the agent still sends for it, without buffering or
   * callbacks, and without holding anything of the call. With `reportEnd` (a caller that waits
   * for the agent to confirm, like closing a watch) the end is still reported, once.
   * Credit flows back for a bounded drain (an agent flushes what the killed command's pipes held
   * before its EXIT), then stops, so an agent that ignores CANCEL is held to one window more; an
   * agent that leaves too many cancelled streams open loses the connection.
   */
  abandon(id: number, reportEnd = false): void {
    const st = this.streams.get(id);
    if (!st || st.abandoned) return;
    st.abandoned = true;
    this.write(encodeFrame(FrameType.CANCEL, id));
    let drained = 0;
    const { kind, onEnd, onFail } = st.handler;
    st.handler = {
      kind,
      onData: (_fd, data) => {
        drained += data.length;
        if (drained <= ABANDONED_DRAIN_BYTES) this.grant(id, data.length);
      },
      onEnd: reportEnd ? onEnd : () => {},
      onFail: reportEnd ? onFail : () => {},
    };
    let open = 0;
    for (const s of this.streams.values()) if (s.abandoned) open++;
    if (open > MAX_ABANDONED_STREAMS) {
      this.fail(
        new ProtocolError(
          `${this.name} left ${open} cancelled streams open: it ignores CANCEL. The connection was reset.`,
        ),
      );
    }
  }

  /**
   * Returns consumed bytes to the agent's window, once a quarter of it is used (so a command
   * with little output costs no CREDIT frames) and coalesced per tick.
   */
  grant(id: number, n: number): void {
    const st = this.streams.get(id);
    if (!st || n <= 0) return;
    st.pendingGrant += n;
    if (st.pendingGrant < GRANT_AT || this.grantScheduled) return;
    this.grantScheduled = true;
    setImmediate(() => {
      this.grantScheduled = false;
      for (const [sid, s] of this.streams) {
        if (s.pendingGrant >= GRANT_AT) {
          s.recvWindow += s.pendingGrant;
          this.write(encodeFrame(FrameType.CREDIT, sid, u32(s.pendingGrant)));
          s.pendingGrant = 0;
        }
      }
    });
  }

  close(): void {
    this.fail(
      new ConnectionLostError(`the channel to ${this.name} was closed: create a new channel to continue.`, {
        code: "AGENT_CHANNEL_CLOSED",
      }),
    );
  }
}

// ---------------------------------------------------------------- helpers

/** exec/streamExec input: a non-empty argv without NUL bytes, and valid run options. */
function validateArgv(argv: string[], options: Omit<RunOptions, "shell">): void {
  if (
    !Array.isArray(argv) ||
    argv.length === 0 ||
    argv.some((a) => typeof a !== "string" || a.includes("\0"))
  ) {
    throw new ValidationError("argv must be a non-empty array of strings without NUL bytes.");
  }
  validateRunOptions(argv[0] || "-", { ...options, shell: undefined });
}

function toBuffer(v: string | Buffer | Uint8Array | undefined): Buffer {
  if (v === undefined) return Buffer.alloc(0);
  return typeof v === "string" ? Buffer.from(v, "utf8") : Buffer.from(v.buffer, v.byteOffset, v.byteLength);
}

function deadlineError(deadline: Deadline, partial?: unknown): OperationTimeoutError {
  return deadline.reason instanceof OperationAbortedError
    ? deadline.abortError(partial)
    : deadline.timeoutError(partial);
}

export function agentError(
  m: Extract<AgentMessage, { type: "error" }>,
  what: string,
  path?: string,
): SmolVMError {
  const details = { agentCode: m.code, errno: m.errno, ...(path ? { path } : {}) };
  const text = guestText(m.message, { max: 300 });
  switch (m.code) {
    case "INVALID_PATH":
    case "BAD_REQUEST":
      return new ValidationError(`${what} was refused by the guest agent: ${text}.`, { details });
    case "NOT_FOUND":
    case "IO":
      return new SmolVMError(`${what} failed in the guest: ${text}.`, { code: "FILE_TRANSFER", details });
    case "SPAWN_FAILED":
      return new SmolVMError(
        `${what} could not start in the guest: ${text}; check the program path and cwd.`,
        {
          code: "GUEST_SPAWN_FAILED",
          details,
        },
      );
    case "TIMEOUT":
      return new OperationTimeoutError(`${what} timed out in the guest: ${text}.`, { details });
    case "LIMIT":
      return new SmolVMError(`${what} was refused: ${text}; wait for other calls to finish.`, {
        code: "AGENT_LIMIT",
        details,
      });
    default:
      return new ProtocolError(`${what} failed with agent error ${m.code}: ${text}.`, { details });
  }
}

/** Sends `data` as DATA frames within the stream's credit and the socket's backpressure. */
export async function sendWithCredit(
  session: Session,
  id: number,
  data: Buffer,
  waitCredit: () => Promise<void>,
): Promise<boolean> {
  let off = 0;
  while (off < data.length) {
    let credit = session.credit(id);
    while (credit === 0) {
      await waitCredit();
      if (!session.streams.has(id)) return false;
      credit = session.credit(id);
    }
    const n = Math.min(credit, MAX_PAYLOAD, data.length - off);
    if (!session.sendData(id, data.subarray(off, off + n))) return false;
    off += n;
    await session.waitDrain();
  }
  return true;
}

/** A one-shot signal the credit handler fires; waiters re-check their condition. */
export class Notifier {
  private waiters: Array<() => void> = [];
  wait(signal: AbortSignal): Promise<void> {
    return new Promise((resolve, reject) => {
      if (signal.aborted) return reject(signal.reason);
      const onAbort = () => reject(signal.reason);
      signal.addEventListener("abort", onAbort, { once: true });
      this.waiters.push(() => {
        signal.removeEventListener("abort", onAbort);
        resolve();
      });
    });
  }
  notify(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
}

/** Consumed bytes are granted back once this many have piled up (a quarter of the window). */
const GRANT_AT = INITIAL_WINDOW / 4;
/** After a call ended, the agent may flush this much more output for it (credit still flows). */
const ABANDONED_DRAIN_BYTES = 4 * INITIAL_WINDOW;
/** Cancelled streams the agent may leave unanswered before the connection is reset. */
const MAX_ABANDONED_STREAMS = 256;

// ---------------------------------------------------------------- shell commands

/** An EXEC request, or one that depends on what the connected agent can do. */
type AgentExec = ExecRequest | ((info: AgentInfo) => ExecRequest);

function forAgent(req: AgentExec, info: AgentInfo): ExecRequest {
  return typeof req === "function" ? req(info) : req;
}

/**
 * A shell command. Agents with the `shell` capability start the user's shell themselves, the
 * way sshd does (one exec instead of `/bin/sh -c 'exec "$SHELL" -lc …'`, two).
 */
function shellRequest(wrapped: WrappedCommand, shell: ShellMode | undefined): AgentExec {
  return (info) =>
    info.capabilities.includes("shell") && wrapped.script !== undefined
      ? { argv: [wrapped.script], shell: shell ?? "login" }
      : { argv: ["/bin/sh", "-c", wrapped.command] };
}

// ---------------------------------------------------------------- the channel

export class AgentChannel implements CommChannel {
  readonly kind = "agent" as const;
  private secret: Buffer;
  private readonly name: string;
  private session: Session | undefined;
  private connecting: Promise<Session> | undefined;
  private closed = false;
  private envLock: Promise<unknown> = Promise.resolve();

  constructor(private readonly options: AgentChannelOptions) {
    const secret = Buffer.from(options.secret);
    if (secret.length !== SECRET_SIZE) {
      throw new ValidationError(`the agent secret must be ${SECRET_SIZE} bytes, got ${secret.length}.`);
    }
    this.secret = secret;
    this.name = options.name ?? "the guest agent";
    validateTimeout("connectTimeoutMs", options.connectTimeoutMs);
  }

  /** What the agent reported at the handshake (undefined before the first connection). */
  get agentInfo(): AgentInfo | undefined {
    return this.session?.info;
  }

  private async getSession(deadline: Deadline): Promise<Session> {
    if (this.closed) {
      throw new ConnectionLostError(`the channel to ${this.name} is closed: create a new channel.`, {
        code: "AGENT_CHANNEL_CLOSED",
      });
    }
    if (this.session && !this.session.dead) return this.session;
    if (!this.connecting) {
      const p = this.connectOnce(deadline).finally(() => {
        if (this.connecting === p) this.connecting = undefined;
      });
      // Each caller races it with its own deadline; one that already expired never looks.
      p.catch(() => {});
      this.connecting = p;
    }
    return deadline.race(this.connecting);
  }

  private async connectOnce(callDeadline: Deadline): Promise<Session> {
    const limit = callDeadline.remaining(this.options.connectTimeoutMs ?? CONNECT_TIMEOUT_MS);
    // The connect is shared by concurrent callers: bound it by its own deadline, not one caller's signal.
    const d = new Deadline(limit, undefined, `connecting to ${this.name}`);
    let sock: Duplex | undefined;
    try {
      sock = await d.race(this.options.connect(d.signal));
      const session = new Session(sock, this.name, (s) => {
        if (this.session === s) this.session = undefined;
      });
      try {
        await session.handshake(this.secret, d);
      } catch (err) {
        session.fail(err as Error);
        throw err;
      }
      if (this.closed) {
        session.close();
        throw new ConnectionLostError(`the channel to ${this.name} was closed.`, {
          code: "AGENT_CHANNEL_CLOSED",
        });
      }
      this.session = session;
      return session;
    } catch (err) {
      sock?.destroy();
      if (err instanceof OperationTimeoutError && d.expired && !callDeadline.expired) {
        throw new ConnectionTimeoutError(
          `${this.name} did not complete the handshake within ${Math.round(limit)} ms: the agent is not running, the image lacks it, or another process holds the VM's agent socket (it takes one host connection at a time: close that handle); check the VM's console log, or use commChannel "ssh".`,
          { code: "AGENT_CONNECT_TIMEOUT", cause: err },
        );
      }
      throw err;
    } finally {
      d.dispose();
    }
  }

  // ------------------------------------------------------------ run / exec

  run(command: string, options?: RunOptionsUtf8): Promise<CommandResult<string>>;
  run(command: string, options: RunOptionsBuffer): Promise<CommandResult<Buffer>>;
  run(command: string, options?: RunOptions): Promise<CommandResult<string> | CommandResult<Buffer>>;
  async run(
    command: string,
    options: RunOptions = {},
  ): Promise<CommandResult<string> | CommandResult<Buffer>> {
    validateRunOptions(command, options);
    const wrapped = wrapCommand(command, { shell: options.shell, env: options.env, cwd: options.cwd });
    const stdin = Buffer.concat([wrapped.stdinPrefix ?? Buffer.alloc(0), toBuffer(options.stdin)]);
    return this.execCollect(shellRequest(wrapped, options.shell), stdin, options, "command");
  }

  /** Runs argv directly (no shell). `env` and `cwd` are applied by the agent. */
  exec(argv: string[], options?: ExecArgvOptions & { encoding?: "utf8" }): Promise<CommandResult<string>>;
  exec(argv: string[], options: ExecArgvOptions & { encoding: "buffer" }): Promise<CommandResult<Buffer>>;
  async exec(
    argv: string[],
    options: ExecArgvOptions = {},
  ): Promise<CommandResult<string> | CommandResult<Buffer>> {
    validateArgv(argv, options);
    return this.execCollect(
      { argv, env: options.env, cwd: options.cwd, pty: options.pty },
      toBuffer(options.stdin),
      options,
      `${argv[0]}`,
    );
  }

  private async execCollect(
    req: AgentExec,
    stdin: Buffer,
    options: RunOptions,
    what: string,
  ): Promise<CommandResult<string> | CommandResult<Buffer>> {
    const deadline = new Deadline(
      options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS,
      options.signal,
      `${what} over ${this.name}`,
    );
    const collector = new OutputCollector(options.maxOutputBytes, options.onStdout, options.onStderr);
    const encoding = options.encoding ?? "utf8";
    try {
      const session = await this.getSession(deadline);
      const credit = new Notifier();
      let id = 0;
      let over = false;
      const result = new Promise<CommandResult<string> | CommandResult<Buffer>>((resolve, reject) => {
        id = session.open(
          FrameType.EXEC,
          encodeExec({
            ...forAgent(req, session.info),
            timeoutMs: deadline.remainingMs + AGENT_TIMEOUT_SLACK_MS,
          }),
          {
            kind: "exec",
            onData: (fd, data) => {
              try {
                collector.push(fd === 1 ? "stdout" : "stderr", data);
              } catch (err) {
                // The caller's onStdout/onStderr threw: stop the command, the channel is fine.
                over = true;
                session.abandon(id);
                reject(err);
                return;
              }
              session.grant(id, data.length);
            },
            onCredit: () => credit.notify(),
            onEnd: (m) => {
              credit.notify();
              if (over) return; // already settled: build no result nobody receives
              if (m.type === "error") return reject(agentError(m, what));
              if (m.type !== "exit") return reject(new ProtocolError("exec ended without EXIT."));
              const r = collector.result(m.exitCode, m.signal, deadline.elapsedMs, encoding);
              if (m.timedOut) reject(deadline.timeoutError(r));
              else resolve(r);
            },
            onFail: (err) => {
              credit.notify();
              reject(err);
            },
          },
        );
      });
      result.catch(() => {});
      void (async () => {
        if (stdin.length) await sendWithCredit(session, id, stdin, () => credit.wait(deadline.signal));
        session.control(FrameType.EOF, id);
      })().catch(() => {});
      try {
        return await deadline.race(result);
      } catch (err) {
        if (deadline.expired) {
          // Kill the whole process group now; what the agent still sends for it is dropped.
          over = true;
          session.abandon(id);
          throw deadlineError(deadline, collector.result(null, null, deadline.elapsedMs, encoding));
        }
        throw err;
      }
    } finally {
      deadline.dispose();
    }
  }

  stream(
    command: string,
    options: Omit<RunOptions, "encoding" | "onStdout" | "onStderr" | "maxOutputBytes"> = {},
  ): AgentCommandStream {
    validateRunOptions(command, options);
    const wrapped = wrapCommand(command, { shell: options.shell, env: options.env, cwd: options.cwd });
    // Like the SSH channel: stdin is what the caller gave (or nothing), then EOF.
    const stdin = Buffer.concat([wrapped.stdinPrefix ?? Buffer.alloc(0), toBuffer(options.stdin)]);
    return this.openStream(shellRequest(wrapped, options.shell), stdin, true, options);
  }

  /** Streams argv directly, optionally on a PTY; stdin stays open until end(). */
  streamExec(
    argv: string[],
    options: Omit<ExecArgvOptions, "encoding" | "onStdout" | "onStderr" | "maxOutputBytes"> = {},
  ): AgentCommandStream {
    validateArgv(argv, options);
    return this.openStream(
      { argv, env: options.env, cwd: options.cwd, pty: options.pty },
      toBuffer(options.stdin),
      options.stdin !== undefined,
      options,
    );
  }

  /**
   * The async-iterable form. Output is granted back to the agent only as the consumer pulls it,
   * so a slow consumer slows the command instead of growing memory. `initial` goes to stdin
   * first; with `closeStdin` EOF follows, otherwise stdin stays open for write()/end().
   */
  private openStream(
    req: AgentExec,
    initial: Buffer,
    closeStdin: boolean,
    options: { timeoutMs?: number; signal?: AbortSignal },
  ): AgentCommandStream {
    const deadline = new Deadline(
      options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS,
      options.signal,
      `streamed command over ${this.name}`,
    );
    const queue: Array<StreamEvent | { error: Error }> = [];
    let wake: (() => void) | undefined;
    const credit = new Notifier();
    let ended = false;
    let id = 0;
    let writeChain: Promise<unknown> = Promise.resolve();
    const push = (ev: StreamEvent | { error: Error }) => {
      queue.push(ev);
      wake?.();
    };
    const started = this.getSession(deadline).then((session) => {
      id = session.open(
        FrameType.EXEC,
        encodeExec({
          ...forAgent(req, session.info),
          timeoutMs: deadline.remainingMs + AGENT_TIMEOUT_SLACK_MS,
        }),
        {
          kind: "exec",
          onData: (fd, data) => push({ stream: fd === 1 ? "stdout" : "stderr", data }),
          onCredit: () => credit.notify(),
          onEnd: (m) => {
            ended = true;
            credit.notify();
            if (m.type === "exit") {
              if (m.timedOut) push({ error: deadline.timeoutError() });
              else push({ stream: "exit", exitCode: m.exitCode, signal: m.signal });
            } else
              push({
                error: m.type === "error" ? agentError(m, "streamed command") : new ProtocolError("bad end"),
              });
          },
          onFail: (err) => {
            ended = true;
            credit.notify();
            push({ error: err });
          },
        },
      );
      const send = (data: Buffer) => {
        writeChain = writeChain.then(() =>
          sendWithCredit(session, id, data, () => credit.wait(deadline.signal)),
        );
        return writeChain;
      };
      if (initial.length) void send(initial).catch(() => {});
      if (closeStdin) writeChain = writeChain.then(() => session.control(FrameType.EOF, id));
      return { session, send };
    });
    started.catch((err) => push({ error: err }));
    const onDeadline = () => {
      ended = true;
      void started.then(({ session }) => session.abandon(id)).catch(() => {});
      push({ error: deadlineError(deadline) });
    };
    deadline.signal.addEventListener("abort", onDeadline, { once: true });

    const iterator: AsyncIterator<StreamEvent> = {
      next: async () => {
        for (;;) {
          const ev = queue.shift();
          if (ev) {
            if ("error" in ev) {
              deadline.dispose();
              queue.length = 0;
              throw ev.error;
            }
            if (ev.stream === "exit") {
              deadline.dispose();
              return { value: ev, done: false };
            }
            started.then(({ session }) => session.grant(id, ev.data.length)).catch(() => {});
            return { value: ev, done: false };
          }
          if (ended) return { value: undefined, done: true };
          await new Promise<void>((r) => {
            wake = r;
          });
          wake = undefined;
        }
      },
      return: async () => {
        await cancel();
        return { value: undefined, done: true };
      },
    };
    const cancel = async () => {
      if (!ended) {
        const s = await started.catch(() => undefined);
        s?.session.abandon(id);
      }
      ended = true;
      deadline.dispose();
      queue.length = 0;
      wake?.();
    };
    return {
      [Symbol.asyncIterator]: () => iterator,
      cancel,
      write: async (data) => {
        const { send } = await started;
        await deadline.race(send(toBuffer(data)));
      },
      end: async () => {
        const { session } = await started;
        writeChain = writeChain.then(() => session.control(FrameType.EOF, id));
        await deadline.race(writeChain);
      },
      signal: (name) => {
        void started
          .then(({ session }) => session.control(FrameType.SIGNAL, id, Buffer.from(name)))
          .catch(() => {});
      },
      resize: (rows, cols) => {
        void started
          .then(({ session }) => session.control(FrameType.RESIZE, id, Buffer.concat([u16(rows), u16(cols)])))
          .catch(() => {});
      },
    };
  }

  // ------------------------------------------------------------ files

  async putFile(localPath: string, guestPath: string, options: PutFileOptions = {}): Promise<void> {
    validateGuestPath(guestPath);
    const mode = options.mode ?? 0o644;
    if (!Number.isInteger(mode) || mode < 0 || mode > 0o7777)
      throw new ValidationError("mode must be 0..0o7777.");
    validateTimeout("timeoutMs", options.timeoutMs);
    const deadline = new Deadline(
      options.timeoutMs ?? FILE_TIMEOUT_MS,
      options.signal,
      `upload to ${guestPath}`,
    );
    let fh: FileHandle | undefined;
    try {
      fh = await open(localPath, "r");
      const file = fh;
      await this.putStream(
        { path: guestPath },
        mode,
        options.mkdirs !== false,
        async function* () {
          const buf = Buffer.allocUnsafe(MAX_PAYLOAD);
          for (;;) {
            const { bytesRead } = await file.read(buf, 0, buf.length, null);
            if (bytesRead === 0) return;
            yield buf.subarray(0, bytesRead);
          }
        },
        deadline,
        `upload to ${guestPath}`,
      );
    } catch (err) {
      throw this.mapDeadline(err, deadline);
    } finally {
      await fh?.close();
      deadline.dispose();
    }
  }

  private mapDeadline(err: unknown, deadline: Deadline): unknown {
    if (deadline.expired && err === deadline.reason) return err;
    if ((err as NodeJS.ErrnoException)?.code && !(err instanceof SmolVMError)) {
      return new SmolVMError(`local file error: ${(err as Error).message}`, {
        code: "FILE_TRANSFER",
        cause: err,
      });
    }
    return err;
  }

  /** PUT: chunks from `source` go out only as the agent grants credit, so memory stays bounded. */
  private async putStream(
    target: { path: string } | { envFile: true },
    mode: number | undefined,
    mkdirs: boolean,
    source: () => AsyncIterable<Buffer>,
    deadline: Deadline,
    what: string,
  ): Promise<void> {
    const session = await this.getSession(deadline);
    const credit = new Notifier();
    let id = 0;
    let finished = false;
    const result = new Promise<void>((resolve, reject) => {
      id = session.open(FrameType.PUT, encodePut(target, mode, mkdirs), {
        kind: "put",
        onCredit: () => credit.notify(),
        onEnd: (m) => {
          finished = true;
          credit.notify();
          if (m.type === "ok") {
            decodeU64(m.payload, "PUT");
            resolve();
          } else if (m.type === "error")
            reject(agentError(m, what, "path" in target ? target.path : undefined));
          else reject(new ProtocolError("PUT ended with EXIT."));
        },
        onFail: (err) => {
          finished = true;
          credit.notify();
          reject(err);
        },
      });
    });
    result.catch(() => {});
    const sender = (async () => {
      for await (const chunk of source()) {
        if (finished) return;
        // The chunk buffer is reused by the reader: copy only what goes on the wire (sendData copies).
        if (!(await sendWithCredit(session, id, chunk, () => credit.wait(deadline.signal)))) return;
      }
      session.control(FrameType.EOF, id);
    })();
    sender.catch(() => {});
    try {
      await deadline.race(Promise.race([result, sender.then(() => result)]));
    } catch (err) {
      if (!finished) session.abandon(id);
      throw err;
    }
  }

  async getFile(guestPath: string, localPath: string, options: GetFileOptions = {}): Promise<void> {
    validateGuestPath(guestPath);
    validateTimeout("timeoutMs", options.timeoutMs);
    validateMaxBytes(options.maxBytes);
    const deadline = new Deadline(
      options.timeoutMs ?? FILE_TIMEOUT_MS,
      options.signal,
      `download of ${guestPath}`,
    );
    try {
      await downloadTo(localPath, `guest file ${guestPath}`, options.maxBytes, async (write) => {
        let written = 0;
        await this.getStream(
          { path: guestPath },
          async (data) => {
            await write(data);
            written += data.length;
          },
          (total) => {
            if (total !== written)
              throw new ProtocolError(`agent reported ${total} bytes but sent ${written}.`);
          },
          deadline,
          `download of ${guestPath}`,
        );
      });
    } catch (err) {
      throw this.mapDeadline(err, deadline);
    } finally {
      deadline.dispose();
    }
  }

  /** GET: each chunk is handed to `sink` in order; credit goes back only after the sink finished. */
  private async getStream(
    target: { path: string } | { envFile: true },
    sink: (data: Buffer) => Promise<void> | void,
    onTotal: (total: number) => void,
    deadline: Deadline,
    what: string,
  ): Promise<void> {
    const session = await this.getSession(deadline);
    let chain: Promise<void> = Promise.resolve();
    let id = 0;
    let finished = false;
    const result = new Promise<void>((resolve, reject) => {
      id = session.open(FrameType.GET, encodeGet(target), {
        kind: "get",
        onData: (_fd, data) => {
          chain = chain.then(async () => {
            await sink(data);
            session.grant(id, data.length);
          });
          chain.catch(reject);
        },
        onEnd: (m) => {
          finished = true;
          if (m.type === "ok") {
            const total = decodeU64(m.payload, "GET");
            chain.then(() => onTotal(total)).then(resolve, reject);
          } else if (m.type === "error")
            reject(agentError(m, what, "path" in target ? target.path : undefined));
          else reject(new ProtocolError("GET ended with EXIT."));
        },
        onFail: (err) => {
          finished = true;
          reject(err);
        },
      });
    });
    result.catch(() => {});
    try {
      await deadline.race(result);
    } catch (err) {
      if (!finished) session.abandon(id);
      throw err;
    }
  }

  // ------------------------------------------------------------ env

  async listEnv(options: CallOptions = {}): Promise<Record<string, string>> {
    return this.bounded(options, "reading the guest env file", async (deadline) => {
      return parseEnvFile(await this.readEnvFile(deadline));
    });
  }

  private async readEnvFile(deadline: Deadline): Promise<string> {
    const parts: Buffer[] = [];
    let size = 0;
    try {
      await this.getStream(
        { envFile: true },
        (data) => {
          size += data.length;
          if (size > ENV_FILE_MAX) throw envFileTooLarge();
          parts.push(data);
        },
        () => {},
        deadline,
        "reading the guest env file",
      );
    } catch (err) {
      if (err instanceof SmolVMError && err.details.agentCode === "NOT_FOUND") return "";
      throw err;
    }
    return Buffer.concat(parts).toString("utf8");
  }

  async setEnv(vars: Record<string, string>, options: CallOptions = {}): Promise<void> {
    validateEnv(vars);
    return this.updateEnv(vars, [], options);
  }

  async unsetEnv(names: string[], options: CallOptions = {}): Promise<void> {
    mergeEnv({}, {}, names);
    return this.updateEnv({}, names, options);
  }

  /** Read-merge-write, serialized per channel so concurrent updates do not lose each other. */
  private updateEnv(set: Record<string, string>, unset: string[], options: CallOptions): Promise<void> {
    validateTimeout("timeoutMs", options.timeoutMs);
    const deadline = new Deadline(
      options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS,
      options.signal,
      "updating the guest env file",
    );
    const task = this.envLock.then(async () => {
      const next = mergeEnv(parseEnvFile(await this.readEnvFile(deadline)), set, unset);
      const body = Buffer.from(renderEnvFile(next));
      await this.putStream(
        { envFile: true },
        0o600,
        true,
        async function* () {
          for (let off = 0; off < body.length; off += MAX_PAYLOAD)
            yield body.subarray(off, off + MAX_PAYLOAD);
        },
        deadline,
        "writing the guest env file",
      );
    });
    this.envLock = task.catch(() => {});
    return deadline.race(task).finally(() => deadline.dispose());
  }

  // ------------------------------------------------------------ small requests

  private async simple(type: number, payload: Buffer, deadline: Deadline, what: string): Promise<Buffer> {
    const session = await this.getSession(deadline);
    let id = 0;
    let finished = false;
    const result = new Promise<Buffer>((resolve, reject) => {
      id = session.open(type, payload, {
        kind: "simple",
        onEnd: (m) => {
          finished = true;
          if (m.type === "ok") resolve(m.payload);
          else if (m.type === "error") reject(agentError(m, what));
          else reject(new ProtocolError(`${what} ended with EXIT.`));
        },
        onFail: (err) => {
          finished = true;
          reject(err);
        },
      });
    });
    result.catch(() => {});
    try {
      return await deadline.race(result);
    } catch (err) {
      if (!finished) session.abandon(id);
      throw err;
    }
  }

  /** Runs one request under the caller's timeoutMs/signal (validated), disposing the deadline. */
  private async bounded<T>(
    options: CallOptions,
    what: string,
    fn: (deadline: Deadline) => Promise<T>,
  ): Promise<T> {
    validateTimeout("timeoutMs", options.timeoutMs);
    const deadline = new Deadline(options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS, options.signal, what);
    try {
      return await fn(deadline);
    } finally {
      deadline.dispose();
    }
  }

  /**
   * The secret later sessions prove (after the agent was told a new one, see setIdentity in
   * agent-ops.ts); the current session stays authenticated.
   */
  rekey(secret: Buffer): void {
    if (secret.length !== SECRET_SIZE) {
      throw new ValidationError(`the agent secret must be ${SECRET_SIZE} bytes, got ${secret.length}.`);
    }
    this.secret = Buffer.from(secret);
  }

  /** Round trip to the agent; resolves with the elapsed milliseconds. */
  async ping(options: CallOptions = {}): Promise<number> {
    return this.bounded(options, `ping of ${this.name}`, async (deadline) => {
      const p = await this.simple(FrameType.PING, Buffer.alloc(0), deadline, "ping");
      if (p.length) throw new ProtocolError("agent PING reply has a payload.");
      return deadline.elapsedMs;
    });
  }

  /** Version, capabilities, start uptime and the boot milestones the init logged. */
  async info(options: CallOptions = {}): Promise<AgentInfo> {
    return this.bounded(options, `info of ${this.name}`, async (deadline) => {
      return decodeInfoFields(await this.simple(FrameType.INFO, Buffer.alloc(0), deadline, "info"));
    });
  }

  /** Waits until something accepts TCP connections on 127.0.0.1:`port` inside the guest. */
  async waitForPort(port: number, options: CallOptions = {}): Promise<void> {
    if (!Number.isInteger(port) || port < 1 || port > 65535) {
      throw new ValidationError(`port must be 1..65535, got ${String(port)}.`);
    }
    return this.bounded(options, `waiting for guest port ${port}`, async (deadline) => {
      const p = await this.simple(
        FrameType.WAIT_PORT,
        encodeWaitPort(port, deadline.remainingMs),
        deadline,
        `waiting for guest port ${port}`,
      );
      if (p.length !== 4) throw new ProtocolError("agent WAIT_PORT reply is malformed.");
    });
  }

  /**
   * Resolves once the agent answers an authenticated ping, retrying connection failures (the
   * VM may still be booting). A wrong secret fails at once: retrying cannot fix it.
   */
  async waitReady(options: CallOptions = {}): Promise<void> {
    validateTimeout("timeoutMs", options.timeoutMs);
    const deadline = new Deadline(
      options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS,
      options.signal,
      `waiting for ${this.name}`,
    );
    let last: unknown;
    try {
      for (;;) {
        try {
          await this.simple(FrameType.PING, Buffer.alloc(0), deadline, "ping");
          return;
        } catch (err) {
          if (
            err instanceof AuthenticationError ||
            err instanceof ValidationError ||
            (err instanceof SmolVMError && err.code === "AGENT_BUSY") ||
            this.closed
          )
            throw err;
          if (!deadline.expired) last = err;
        }
        if (!deadline.expired)
          await sleep(Math.min(100, deadline.remainingMs), deadline.signal).catch(() => {});
        if (deadline.expired) {
          const detail = last instanceof Error ? ` The last attempt failed: ${last.message}` : "";
          const e = deadlineError(deadline);
          throw new (e.constructor as typeof OperationTimeoutError)(`${e.message}${detail}`, {
            code: e.code,
            cause: last,
          });
        }
      }
    } finally {
      deadline.dispose();
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const session = this.session;
    this.session = undefined;
    if (!session) return;
    session.close();
    let timer: NodeJS.Timeout | undefined;
    const cap = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, SOCKET_CLOSE_WAIT_MS);
    });
    await Promise.race([session.socketClosed, cap]);
    clearTimeout(timer);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  // ------------------------------------------------------------ requests beyond CommChannel

  /**
   * Opens one protocol stream for the requests agent-ops.ts implements (file operations,
   * watches, background processes, terminals). `payload` may depend on the connected agent
   * (its capabilities) and may throw to refuse before anything is sent.
   */
  async openRaw(
    type: number,
    payload: Buffer | ((info: AgentInfo) => Buffer),
    handler: StreamHandler,
    deadline: Deadline,
  ): Promise<RawStream> {
    const session = await this.getSession(deadline);
    const id = session.open(type, typeof payload === "function" ? payload(session.info) : payload, handler);
    return {
      id,
      info: session.info,
      grant: (n) => session.grant(id, n),
      // CANCEL ends the call on the host side too: what the agent still sends is dropped.
      control: (t, p) => (t === FrameType.CANCEL ? session.abandon(id, true) : session.control(t, id, p)),
      send: (data, waitCredit) => sendWithCredit(session, id, data, waitCredit),
    };
  }

  /** PUT from any chunk source (streamed within the agent's credit, atomic in the guest). */
  async putFrom(
    guestPath: string,
    source: () => AsyncIterable<Buffer>,
    options: PutFileOptions = {},
  ): Promise<void> {
    validateGuestPath(guestPath);
    validateTimeout("timeoutMs", options.timeoutMs);
    const deadline = new Deadline(
      options.timeoutMs ?? FILE_TIMEOUT_MS,
      options.signal,
      `write of ${guestPath}`,
    );
    try {
      await this.putStream(
        { path: guestPath },
        options.mode,
        options.mkdirs !== false,
        source,
        deadline,
        `write of ${guestPath}`,
      );
    } catch (err) {
      throw this.mapDeadline(err, deadline);
    } finally {
      deadline.dispose();
    }
  }

  /** GET into a sink; credit goes back only as the sink finishes each chunk (bounded memory). */
  async getTo(
    guestPath: string,
    sink: (data: Buffer) => Promise<void> | void,
    options: CallOptions = {},
  ): Promise<number> {
    validateGuestPath(guestPath);
    validateTimeout("timeoutMs", options.timeoutMs);
    const deadline = new Deadline(
      options.timeoutMs ?? FILE_TIMEOUT_MS,
      options.signal,
      `read of ${guestPath}`,
    );
    let total = 0;
    try {
      await this.getStream(
        { path: guestPath },
        sink,
        (t) => {
          total = t;
        },
        deadline,
        `read of ${guestPath}`,
      );
      return total;
    } catch (err) {
      throw this.mapDeadline(err, deadline);
    } finally {
      deadline.dispose();
    }
  }
}

/** One open protocol stream handed to agent-ops.ts. */
export interface RawStream {
  readonly id: number;
  readonly info: AgentInfo;
  grant(n: number): void;
  control(type: number, payload?: Buffer): void;
  send(data: Buffer, waitCredit: () => Promise<void>): Promise<boolean>;
}
