/**
 * One authenticated agent session, without a socket (as ssh2's Protocol): bytes come in through
 * receive(), go out through the SessionOutput it was given (agent-socket.ts adapts a Duplex).
 * It runs the handshake, validates and routes every frame to the stream it belongs to, and
 * keeps each stream's credit both ways. The guest is untrusted: a frame that breaks the
 * protocol, or more bytes than the credit we granted, fails every call and drops the session.
 */
import { randomBytes } from "node:crypto";
import type { Deadline } from "../common/deadline.js";
import { guestText } from "../common/guest-text.js";
import { AuthenticationError, ProtocolError, ValidationError } from "../errors.js";
import { channelClosed, connectionLost } from "./agent-errors.js";
import {
  type AgentInfo,
  type AgentMessage,
  agentProof,
  decodeAgentFrame,
  hostProof,
  proofsEqual,
} from "./agent-messages.js";
import {
  encodeFrame,
  encodeHello,
  FrameDecoder,
  FrameType,
  INITIAL_WINDOW,
  MAX_PAYLOAD,
  NONCE_SIZE,
  u32,
} from "./agent-protocol.js";

const HELLO_RESEND_MS = 500;
/** Consumed bytes are granted back once this many have piled up (a quarter of the window). */
const GRANT_AT = INITIAL_WINDOW / 4;
/** After a call ended, the agent may flush this much more output for it (credit still flows). */
const ABANDONED_DRAIN_BYTES = 4 * INITIAL_WINDOW;
/** Cancelled streams the agent may leave unanswered before the connection is reset. */
const MAX_ABANDONED_STREAMS = 256;

/** Where a session's bytes go: a socket adapter in production, anything in a test. */
export interface SessionOutput {
  /** Sends bytes to the agent. */
  write(buf: Buffer): void;
  /** Resolves once the transport accepts more (backpressure), or at once when it is gone. */
  drained(): Promise<void>;
  /** The session is over: drop the transport. */
  destroy(): void;
  /** Settles once the transport has closed. */
  readonly closed: Promise<void>;
}

export type StreamKind = "exec" | "put" | "get" | "simple";

export type EndMessage = Extract<AgentMessage, { type: "exit" | "ok" | "error" }>;

export interface StreamHandler {
  kind: StreamKind;
  onData?(fd: number, data: Buffer): void;
  onCredit?(): void;
  onEnd(msg: EndMessage): void;
  onFail(err: Error): void;
}

interface StreamState {
  handler: StreamHandler;
  /** Bytes the agent may still send us. */
  recvWindow: number;
  /** Bytes we may still send the agent. */
  sendCredit: number;
  pendingGrant: number;
  /** The call ended on the host side: input for this stream is dropped (see abandon). */
  abandoned?: boolean;
}

export class AgentSession {
  readonly streams = new Map<number, StreamState>();
  private nextId = 1;
  private readonly decoder = new FrameDecoder();
  private failure: Error | undefined;
  private grantScheduled = false;
  private challengeNonce: Buffer | undefined;
  private handshakeHandler: ((m: AgentMessage) => void) | undefined;
  private handshakeFail: ((e: Error) => void) | undefined;
  info!: AgentInfo;

  constructor(
    private readonly out: SessionOutput,
    private readonly name: string,
    private readonly onDead: (s: AgentSession) => void,
  ) {}

  get dead(): boolean {
    return this.failure !== undefined;
  }

  /** Settles once the transport has closed (close() waits for it: nothing outlives the channel). */
  get transportClosed(): Promise<void> {
    return this.out.closed;
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
    this.handshakeHandler = (m: AgentMessage) => {
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
    this.handshakeFail = (e) => settle.reject(e);
    if (this.failure) settle.reject(this.failure);
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

  /** Bytes from the agent, in any chunking. */
  receive(chunk: Buffer): void {
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

  /** The transport ended or failed under the session. */
  transportLost(err?: Error): void {
    this.fail(connectionLost(this.name, err));
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

  /** Ends the session with `err`: every open stream fails with it, the transport is dropped. */
  fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.handshakeFail?.(err);
    this.out.destroy();
    const streams = [...this.streams.values()];
    this.streams.clear();
    for (const st of streams) st.handler.onFail(err);
    this.onDead(this);
  }

  /** Raises the session's failure if it is dead. */
  check(): void {
    if (this.failure) throw this.failure;
  }

  private write(buf: Buffer): void {
    if (!this.dead) this.out.write(buf);
  }

  /** Waits until the transport accepts more (bounded by backpressure, never by memory). */
  waitDrain(): Promise<void> {
    return this.dead ? Promise.resolve() : this.out.drained();
  }

  /** Opens a stream: sends the request frame and routes what comes back to `handler`. */
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

  /** Whether stream `id` is still open (the agent has not ended it, the session lives). */
  isOpen(id: number): boolean {
    return this.streams.has(id);
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
    this.fail(channelClosed(`the channel to ${this.name} was closed: create a new channel to continue.`));
  }
}
