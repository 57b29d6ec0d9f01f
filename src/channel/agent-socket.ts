/**
 * Puts an agent session on a socket: the session's bytes go out corked per tick and its
 * backpressure waits for the socket's drain; what the socket reads, and its end, go to the
 * session. The only place the agent channel touches a socket after connecting.
 */
import type { Socket } from "node:net";
import type { Duplex } from "node:stream";
import { AgentSession, type SessionOutput } from "./agent-session.js";

class SocketOutput implements SessionOutput {
  readonly closed: Promise<void>;
  private corked = false;
  private drainWaiters: Array<() => void> = [];

  constructor(private readonly sock: Duplex) {
    this.closed = sock.destroyed
      ? Promise.resolve()
      : new Promise<void>((resolve) => sock.once("close", () => resolve()));
    sock.on("drain", () => this.flushDrain());
    sock.on("close", () => this.flushDrain());
  }

  /**
   * Frames written in one tick leave in one write: under emulation every host write is an
   * interrupt and a wakeup in the guest, so EXEC and its EOF should arrive together.
   */
  write(buf: Buffer): void {
    if (!this.corked) {
      this.corked = true;
      this.sock.cork();
      process.nextTick(() => {
        this.corked = false;
        this.sock.uncork();
      });
    }
    this.sock.write(buf);
  }

  drained(): Promise<void> {
    if (this.sock.destroyed || !(this.sock as Socket).writableNeedDrain) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  destroy(): void {
    this.sock.destroy();
    this.flushDrain();
  }

  private flushDrain(): void {
    const w = this.drainWaiters;
    this.drainWaiters = [];
    for (const f of w) f();
  }
}

/** A session reading from and writing to `sock`; call handshake() on it next, in the same tick. */
export function sessionOverSocket(
  sock: Duplex,
  name: string,
  onDead: (s: AgentSession) => void,
): AgentSession {
  const session = new AgentSession(new SocketOutput(sock), name, onDead);
  sock.on("data", (chunk: Buffer) => session.receive(chunk));
  sock.on("error", (err) => session.transportLost(err));
  sock.on("close", () => session.transportLost());
  sock.resume?.();
  return session;
}
