/**
 * Keeps one authenticated session to the agent: connects and runs the handshake on first use,
 * shares one connection attempt among concurrent callers, and reconnects on the next call after
 * the session died. AgentChannel and every request (agent-request.ts) get their session here.
 */
import type { Duplex } from "node:stream";
import { validateTimeout } from "../command.js";
import { Deadline } from "../common/deadline.js";
import { ConnectionTimeoutError, OperationTimeoutError, ValidationError } from "../errors.js";
import { channelClosed } from "./agent-errors.js";
import type { AgentInfo } from "./agent-messages.js";
import { SECRET_SIZE } from "./agent-protocol.js";
import type { SessionSource } from "./agent-request.js";
import type { AgentSession } from "./agent-session.js";
import { sessionOverSocket } from "./agent-socket.js";

const CONNECT_TIMEOUT_MS = 10_000;
/** close() waits at most this long for the socket's close event. */
const SOCKET_CLOSE_WAIT_MS = 1_000;

export interface AgentConnectorOptions {
  /** Opens a fresh byte stream to the agent (e.g. `(signal) => connectUnix(path, signal)`). */
  connect: (signal: AbortSignal) => Promise<Duplex>;
  /** The per-VM agent secret (32 bytes). Never logged. */
  secret: Buffer | Uint8Array;
  /** Bound on connect + handshake when the call itself allows longer. Default 10 000. */
  connectTimeoutMs?: number;
  /** What to call the peer in messages, e.g. "the agent of VM web-1". */
  name?: string;
}

export class AgentConnector implements SessionSource {
  readonly name: string;
  private secret: Buffer;
  private current: AgentSession | undefined;
  private connecting: Promise<AgentSession> | undefined;
  private closedFlag = false;

  constructor(private readonly options: AgentConnectorOptions) {
    this.secret = checkSecret(options.secret);
    this.name = options.name ?? "the guest agent";
    validateTimeout("connectTimeoutMs", options.connectTimeoutMs);
  }

  get closed(): boolean {
    return this.closedFlag;
  }

  /** What the agent reported at the handshake of the live session, if any. */
  get info(): AgentInfo | undefined {
    return this.current?.info;
  }

  /** The secret later sessions prove; the current session stays authenticated. */
  rekey(secret: Buffer): void {
    this.secret = checkSecret(secret);
  }

  async session(deadline: Deadline): Promise<AgentSession> {
    if (this.closedFlag) throw channelClosed(`the channel to ${this.name} is closed: create a new channel.`);
    if (this.current && !this.current.dead) return this.current;
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

  private async connectOnce(callDeadline: Deadline): Promise<AgentSession> {
    const limit = callDeadline.remaining(this.options.connectTimeoutMs ?? CONNECT_TIMEOUT_MS);
    // The connect is shared by concurrent callers: bound it by its own deadline, not one caller's signal.
    const d = new Deadline(limit, undefined, `connecting to ${this.name}`);
    let sock: Duplex | undefined;
    try {
      sock = await d.race(this.options.connect(d.signal));
      const session = sessionOverSocket(sock, this.name, (s) => {
        if (this.current === s) this.current = undefined;
      });
      try {
        await session.handshake(this.secret, d);
      } catch (err) {
        session.fail(err as Error);
        throw err;
      }
      if (this.closedFlag) {
        session.close();
        throw channelClosed(`the channel to ${this.name} was closed.`);
      }
      this.current = session;
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

  /** Ends the session (calls in flight fail) and waits, briefly, for the socket to close. */
  async close(): Promise<void> {
    if (this.closedFlag) return;
    this.closedFlag = true;
    const session = this.current;
    this.current = undefined;
    if (!session) return;
    session.close();
    let timer: NodeJS.Timeout | undefined;
    const cap = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, SOCKET_CLOSE_WAIT_MS);
    });
    await Promise.race([session.transportClosed, cap]);
    clearTimeout(timer);
  }
}

function checkSecret(secret: Buffer | Uint8Array): Buffer {
  const b = Buffer.from(secret);
  if (b.length !== SECRET_SIZE) {
    throw new ValidationError(`the agent secret must be ${SECRET_SIZE} bytes, got ${b.length}.`);
  }
  return b;
}
