/**
 * Fake agents for faults the real agent (ours) cannot produce: they stand in for a guest root
 * that replaced it. Each authenticates correctly, then misbehaves.
 */
import { randomBytes } from "node:crypto";
import { Duplex } from "node:stream";
import { AgentChannel } from "../../src/channel/agent-channel.js";
import { agentProof } from "../../src/channel/agent-messages.js";
import {
  encodeFields,
  encodeFrame,
  Field,
  FrameDecoder,
  FrameType,
  INITIAL_WINDOW,
  MAX_PAYLOAD,
  u16,
} from "../../src/channel/agent-protocol.js";

/**
 * The part every fake agent shares: it proves the secret like the real agent (HELLO,
 * CHALLENGE, AUTH, AUTH_OK), then hands every later frame to `onRequest`. Input it cannot
 * decode ends the connection.
 */
export abstract class AuthenticatingFakeAgent extends Duplex {
  private readonly decoder = new FrameDecoder();
  private hostNonce = Buffer.alloc(0);
  private readonly agentNonce = randomBytes(32);

  constructor(private readonly secret: Buffer) {
    super();
  }

  override _read(): void {}

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    try {
      for (const f of this.decoder.push(chunk)) this.onFrame(f.type, f.stream, f.payload);
    } catch {
      this.destroy();
    }
    cb();
  }

  private onFrame(type: number, stream: number, payload: Buffer): void {
    if (type === FrameType.HELLO) {
      this.hostNonce = Buffer.from(payload.subarray(4));
      this.push(encodeFrame(FrameType.CHALLENGE, 0, Buffer.concat([u16(1), u16(0), this.agentNonce])));
    } else if (type === FrameType.AUTH) {
      const proof = agentProof(this.secret, this.hostNonce, this.agentNonce);
      const info = encodeFields([
        [Field.VERSION, "0.1.0"],
        [Field.CAPS, "exec"],
        [Field.START_UPTIME, "0.5"],
      ]);
      this.push(encodeFrame(FrameType.AUTH_OK, 0, Buffer.concat([proof, info])));
    } else this.onRequest(type, stream, payload);
  }

  /** Every frame after the handshake. */
  protected abstract onRequest(type: number, stream: number, payload: Buffer): void;
}

/** Authenticates, then answers EXEC with endless stdout within credit; CANCEL is ignored. */
export class FloodingAgent extends AuthenticatingFakeAgent {
  private credit = new Map<number, number>();
  private readonly chunk = Buffer.alloc(MAX_PAYLOAD, 0x41);
  /** Bytes of DATA sent so far, and CANCELs received. */
  sent = 0;
  cancels = 0;

  protected onRequest(type: number, stream: number, payload: Buffer): void {
    if (type === FrameType.EXEC) {
      this.credit.set(stream, INITIAL_WINDOW);
      this.flood(stream);
    } else if (type === FrameType.CREDIT) {
      this.credit.set(stream, (this.credit.get(stream) ?? 0) + payload.readUInt32BE(0));
      this.flood(stream);
    } else if (type === FrameType.CANCEL) {
      this.cancels++;
    }
  }

  private flood(stream: number): void {
    setImmediate(() => {
      let c = this.credit.get(stream) ?? 0;
      while (c > 0 && !this.destroyed) {
        const n = Math.min(c, MAX_PAYLOAD);
        this.push(encodeFrame(FrameType.DATA, stream, this.chunk.subarray(0, n), 1));
        this.sent += n;
        c -= n;
      }
      this.credit.set(stream, 0);
    });
  }
}

/** An agent channel whose every connection is a FloodingAgent; `peers` collects them. */
export function floodingChannel(): { ch: AgentChannel; peers: FloodingAgent[] } {
  const secret = randomBytes(32);
  const peers: FloodingAgent[] = [];
  const ch = new AgentChannel({
    connect: async () => {
      const p = new FloodingAgent(secret);
      peers.push(p);
      return p;
    },
    secret,
  });
  return { ch, peers };
}
