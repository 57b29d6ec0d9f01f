/**
 * The one way an agent operation talks to the guest: request() opens a stream on the channel's
 * session, wires the agent's end and a session failure to the caller's handlers, races the
 * caller's deadline, and sends CANCEL when the call fails before the agent ended the stream.
 * Commands, file transfers, small requests, watches, processes and terminals all go through it.
 */
import { DEFAULT_RUN_TIMEOUT_MS, validateTimeout } from "../command.js";
import { Deadline } from "../common/deadline.js";
import { ProtocolError } from "../errors.js";
import type { AgentErrorMessage } from "./agent-errors.js";
import type { AgentInfo } from "./agent-messages.js";
import { FrameType, MAX_PAYLOAD } from "./agent-protocol.js";
import type { AgentSession, EndMessage, StreamKind } from "./agent-session.js";

/** What runs requests: AgentChannel (agent-fs.ts and its siblings take one). */
export interface Requester {
  request<T>(spec: RequestSpec<T>, deadline: Deadline): Promise<T>;
}

/** Hands out the live session, connecting (and authenticating) first when there is none. */
export interface SessionSource {
  /** What to call the peer in messages, e.g. "the agent of VM web-1". */
  readonly name: string;
  session(deadline: Deadline): Promise<AgentSession>;
}

/** One open stream, as a request's handlers and its caller use it. */
export interface RequestStream {
  readonly id: number;
  /** What the connected agent reported at the handshake. */
  readonly info: AgentInfo;
  /** Returns `n` consumed bytes to the agent's send window. */
  grant(n: number): void;
  /** Sends a control frame (EOF, SIGNAL, RESIZE, ...) while the stream is open. */
  control(type: number, payload?: Buffer): void;
  /**
   * Sends bytes as DATA within credit; resolves false when the stream ended first. Waiting for
   * credit ends with `signal` (default: the request's deadline).
   */
  send(data: Buffer, signal?: AbortSignal): Promise<boolean>;
  /**
   * Ends the call on the host side: CANCEL, and what the agent still sends is dropped. With
   * `reportEnd` the agent's confirmation still reaches onEnd (closing a watch waits for it).
   */
  cancel(reportEnd?: boolean): void;
}

/** What a request's handlers may do: settle it, and reach its stream. */
export interface RequestControl<T> {
  resolve(value: T): void;
  reject(err: unknown): void;
  /** The open stream (undefined only before the request frame was sent). */
  readonly stream: RequestStream | undefined;
  /** True once the agent ended the stream (or the session failed under it). */
  readonly ended: boolean;
}

export interface RequestSpec<T> {
  type: number;
  kind: StreamKind;
  /** The request payload; may depend on the agent (its capabilities) and throw to refuse. */
  payload: Buffer | ((info: AgentInfo) => Buffer);
  /** Called once the request frame is out (send stdin, or settle a long-lived request). */
  onOpen?(ctl: RequestControl<T>): void;
  onData?(fd: number, data: Buffer, ctl: RequestControl<T>): void;
  onEnd(m: EndMessage, ctl: RequestControl<T>): void;
  /** The session failed under the stream. Default: reject with `err`. */
  onFail?(err: Error, ctl: RequestControl<T>): void;
  /** The error to throw when the deadline ended the call after the stream opened. */
  onDeadline?(): unknown;
  /**
   * When the call fails before the agent ended the stream, the stream is cancelled; with this
   * set, the agent's confirming end (or a session failure) still reaches onEnd/onFail, once (a
   * watch's `ended` waits for it). Default: what the agent still sends is dropped unseen.
   */
  reportEndAfterCancel?: boolean;
}

/**
 * Runs one request on its own stream until a handler settles it or `deadline` ends it; on any
 * failure before the agent ended the stream, the stream is cancelled (CANCEL, output dropped).
 */
export function request<T>(source: SessionSource, spec: RequestSpec<T>, deadline: Deadline): Promise<T> {
  let stream: RequestStream | undefined;
  let ended = false;
  let settle!: { resolve: (v: T) => void; reject: (e: unknown) => void };
  const result = new Promise<T>((resolve, reject) => {
    settle = { resolve, reject };
  });
  result.catch(() => {});
  const ctl: RequestControl<T> = {
    resolve: (v) => settle.resolve(v),
    reject: (e) => settle.reject(e),
    get stream() {
      return stream;
    },
    get ended() {
      return ended;
    },
  };
  const credit = new Notifier();
  const opened = source.session(deadline).then((session) => {
    const payload = typeof spec.payload === "function" ? spec.payload(session.info) : spec.payload;
    const id = session.open(spec.type, payload, {
      kind: spec.kind,
      ...(spec.onData ? { onData: (fd: number, data: Buffer) => spec.onData!(fd, data, ctl) } : {}),
      onCredit: () => credit.notify(),
      onEnd: (m) => {
        ended = true;
        credit.notify();
        spec.onEnd(m, ctl);
      },
      onFail: (err) => {
        ended = true;
        credit.notify();
        if (spec.onFail) spec.onFail(err, ctl);
        else ctl.reject(err);
      },
    });
    stream = openStream(session, id, credit, deadline.signal);
    spec.onOpen?.(ctl);
  });
  opened.catch((err) => ctl.reject(err));
  return deadline.race(result).catch(async (err) => {
    // A deadline that had already ended may still see the request go out on a live session:
    // wait for the open (bounded: session() races the same deadline) so that stream is cancelled.
    await opened.catch(() => {});
    if (!ended) stream?.cancel(spec.reportEndAfterCancel);
    if (stream && deadline.expired && spec.onDeadline) throw spec.onDeadline();
    throw err;
  });
}

/** A request answered by one OK (resolves with its payload) or one ERROR (`onError` maps it). */
export function simpleRequest(
  via: Requester,
  type: number,
  payload: RequestSpec<Buffer>["payload"],
  deadline: Deadline,
  onError: (m: AgentErrorMessage) => Error,
  what = "a file or process request",
): Promise<Buffer> {
  return via.request<Buffer>(
    {
      type,
      kind: "simple",
      payload,
      onEnd: (m, ctl) => {
        if (m.type === "ok") ctl.resolve(m.payload);
        else if (m.type === "error") ctl.reject(onError(m));
        else ctl.reject(new ProtocolError(`${what} ended with EXIT.`));
      },
    },
    deadline,
  );
}

function openStream(session: AgentSession, id: number, credit: Notifier, signal: AbortSignal): RequestStream {
  return {
    id,
    info: session.info,
    grant: (n) => session.grant(id, n),
    control: (type, payload) =>
      type === FrameType.CANCEL ? session.abandon(id, true) : session.control(type, id, payload),
    send: (data, s = signal) => sendWithCredit(session, id, data, () => credit.wait(s)),
    cancel: (reportEnd) => session.abandon(id, reportEnd),
  };
}

/** Sends `data` as DATA frames within the stream's credit and the transport's backpressure. */
async function sendWithCredit(
  session: AgentSession,
  id: number,
  data: Buffer,
  waitCredit: () => Promise<void>,
): Promise<boolean> {
  let off = 0;
  while (off < data.length) {
    let credit = session.credit(id);
    while (credit === 0) {
      await waitCredit();
      if (!session.isOpen(id)) return false;
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
class Notifier {
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

/**
 * Runs `fn` under the caller's timeoutMs/signal (validated; `defaultMs` when no timeoutMs was
 * given) and disposes the deadline after. Every bounded agent call gets its deadline here.
 */
export async function bounded<T>(
  options: { timeoutMs?: number; signal?: AbortSignal },
  what: string,
  fn: (deadline: Deadline) => Promise<T>,
  defaultMs = DEFAULT_RUN_TIMEOUT_MS,
): Promise<T> {
  validateTimeout("timeoutMs", options.timeoutMs);
  const deadline = new Deadline(options.timeoutMs ?? defaultMs, options.signal, what);
  try {
    return await fn(deadline);
  } finally {
    deadline.dispose();
  }
}
