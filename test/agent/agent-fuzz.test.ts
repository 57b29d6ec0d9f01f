/**
 * Fuzzing: random and mutated frames into the pure decoder (≥ 1,000,000 per run), into
 * AgentChannel from a hostile fake guest (random frames; and a flood that ignores CANCEL after
 * deadlines, aborts and cancels), and into the real agent from a hostile host.
 * SMOLVM_FUZZ_FRAMES scales the decoder run (the other two scale with it).
 */
import { randomBytes } from "node:crypto";
import { connect, type Socket } from "node:net";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AgentChannel } from "../../src/channel/agent-channel.js";
import { decodeAgentFrame, hostProof } from "../../src/channel/agent-messages.js";
import {
  encodeExec,
  encodeFields,
  encodeFrame,
  encodeGet,
  encodeHello,
  encodeWaitPort,
  Field,
  FrameDecoder,
  FrameType,
  HEADER_SIZE,
  MAX_PAYLOAD,
  u16,
  u32,
} from "../../src/channel/agent-protocol.js";
import { ProtocolError, SmolVMError } from "../../src/errors.js";
import { AuthenticatingFakeAgent, floodingChannel } from "./fake-agents.js";
import { startAgent, type TestAgent } from "./helpers.js";

const FRAMES = Number(process.env.SMOLVM_FUZZ_FRAMES ?? 1_000_000);

/** A full garbage collection (V8's gc, exposed at run time), so retained memory can be measured. */
function gc(): void {
  setFlagsFromString("--expose-gc");
  (runInNewContext("gc") as () => void)();
}

/** Small deterministic PRNG so a failure can be replayed from its seed. */
function rng(seed: number) {
  let s = seed >>> 0 || 1;
  const next = () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s;
  };
  // Random bytes come from a seeded pool: per-byte generation would dominate the run time.
  const pool = Buffer.allocUnsafe(1 << 20);
  for (let i = 0; i < pool.length; i += 4) pool.writeUInt32LE(next(), i);
  return {
    int: (n: number) => next() % n,
    bytes: (n: number) => {
      const at = next() % (pool.length - n);
      return Buffer.from(pool.subarray(at, at + n));
    },
  };
}
type Rng = ReturnType<typeof rng>;

const TYPES = Object.values(FrameType);

/** A plausible agent→host frame: right shape most of the time, wrong in small ways often. */
function agentFrame(r: Rng, stream: number): Buffer {
  const type = r.int(10) === 0 ? r.int(256) : TYPES[r.int(TYPES.length)]!;
  let payload: Buffer;
  switch (type) {
    case FrameType.EXIT:
      payload = Buffer.concat([
        u32(r.int(3) === 0 ? 0xffffffff : r.int(300)),
        Buffer.from([r.int(5)]),
        r.int(2) ? Buffer.from("KILL") : Buffer.alloc(0),
      ]);
      break;
    case FrameType.CREDIT:
      payload = u32(r.int(3) === 0 ? 0 : r.int(1 << 20));
      break;
    case FrameType.ERROR:
      payload = Buffer.concat([u16(r.int(14)), u32(r.int(40)), r.bytes(r.int(40))]);
      break;
    case FrameType.AUTH_OK:
      payload = Buffer.concat([
        r.bytes(32),
        encodeFields([
          [Field.VERSION, "0.1.0"],
          [Field.CAPS, "exec"],
          [Field.START_UPTIME, "1.5"],
        ]),
      ]);
      break;
    case FrameType.OK:
      payload = r.int(2) ? Buffer.alloc(8) : r.bytes(r.int(12));
      break;
    default:
      payload = r.bytes(r.int(4) === 0 ? r.int(2000) : r.int(64));
  }
  const flags = type === FrameType.DATA ? r.int(4) : r.int(20) === 0 ? 1 : 0;
  const frame = Buffer.alloc(HEADER_SIZE + payload.length);
  frame.writeUInt32BE(0x534d4147, 0);
  frame[4] = 1;
  frame[5] = type;
  frame.writeUInt16BE(flags, 6);
  frame.writeUInt32BE(r.int(8) === 0 ? r.int(1000) : stream, 8);
  frame.writeUInt32BE(payload.length, 12);
  payload.copy(frame, HEADER_SIZE);
  return frame;
}

function mutate(r: Rng, frame: Buffer): Buffer {
  switch (r.int(8)) {
    case 0: {
      const b = Buffer.from(frame);
      for (let i = 0, n = 1 + r.int(3); i < n; i++) b[r.int(b.length)] = r.int(256);
      return b;
    }
    case 1:
      return frame.subarray(0, r.int(frame.length + 1));
    case 2: {
      const b = Buffer.from(frame);
      b.writeUInt32BE(r.int(2) ? MAX_PAYLOAD + 1 + r.int(1 << 30) : r.int(MAX_PAYLOAD), 12);
      return b;
    }
    case 3:
      return r.bytes(r.int(40));
    default:
      return frame;
  }
}

describe("decoder fuzz", () => {
  it(`survives ${FRAMES} random and mutated frames with only ProtocolErrors and bounded buffering`, () => {
    const r = rng(0x5eed);
    // Stack traces of the expected ProtocolErrors would dominate the run time.
    const stackLimit = Error.stackTraceLimit;
    Error.stackTraceLimit = 0;
    let decoder = new FrameDecoder();
    let fed = 0;
    let decoded = 0;
    let protocolErrors = 0;
    let maxBuffered = 0;
    while (fed < FRAMES) {
      // A batch of frames fed in random chunk sizes; after an error a fresh decoder (a new
      // connection) starts at the next frame boundary.
      const parts: Buffer[] = [];
      const bounds: number[] = [];
      let total = 0;
      for (let i = 0; i < 200; i++, fed++) {
        const f = agentFrame(r, 1 + r.int(4));
        const piece = r.int(8) === 0 ? mutate(r, f) : f;
        parts.push(piece);
        total += piece.length;
        bounds.push(total);
      }
      const bytes = Buffer.concat(parts);
      decoder = new FrameDecoder();
      let startIdx = 0; // the frame the current decoder started at
      let k = 0; // frames the current decoder produced
      for (let off = 0; off < bytes.length; ) {
        const n = 1 + r.int(r.int(16) === 0 ? 16 : 8192);
        try {
          for (const frame of decoder.push(bytes.subarray(off, off + n))) {
            decoded++;
            k++;
            try {
              decodeAgentFrame(frame);
            } catch (err) {
              if (!(err instanceof ProtocolError)) throw err;
            }
          }
        } catch (err) {
          if (!(err instanceof ProtocolError)) throw err;
          protocolErrors++;
          decoder = new FrameDecoder();
          startIdx += k + 1; // skip the frame that failed
          k = 0;
          off = bounds[startIdx - 1] ?? bytes.length;
          continue;
        }
        maxBuffered = Math.max(maxBuffered, decoder.buffered);
        off += n;
      }
    }
    Error.stackTraceLimit = stackLimit;
    expect(fed).toBeGreaterThanOrEqual(FRAMES);
    expect(decoded).toBeGreaterThan(FRAMES / 10);
    expect(protocolErrors).toBeGreaterThan(100);
    expect(maxBuffered).toBeLessThan(HEADER_SIZE + MAX_PAYLOAD);
  });
});

// ---------------------------------------------------------------- hostile guest

/**
 * A fake agent in process. A hostile guest cannot be produced with the real agent (it is ours),
 * so this is the one place a fake peer stands in: it authenticates correctly, then answers every
 * request with random and mutated frames.
 */
class HostileGuest extends AuthenticatingFakeAgent {
  constructor(
    secret: Buffer,
    private readonly r: Rng,
    private readonly budget: { frames: number },
  ) {
    super(secret);
  }

  protected onRequest(type: number, stream: number, _payload: Buffer): void {
    if (stream > 0 && type !== FrameType.CREDIT && type !== FrameType.EOF && type !== FrameType.DATA) {
      // Reply asynchronously, like a real peer, with a burst of hostile frames.
      setImmediate(() => {
        const n = 1 + this.r.int(12);
        for (let i = 0; i < n && !this.destroyed; i++) {
          this.budget.frames++;
          const f = agentFrame(this.r, stream);
          this.push(this.r.int(3) === 0 ? mutate(this.r, f) : f);
        }
        // Usually end the stream too, so calls settle fast instead of waiting for their timeout.
        if (!this.destroyed && this.r.int(64) !== 0) {
          this.budget.frames++;
          const end = [
            encodeFrame(FrameType.OK, stream),
            encodeFrame(FrameType.OK, stream, Buffer.alloc(8)),
            encodeFrame(FrameType.EXIT, stream, Buffer.concat([u32(0), Buffer.from([0])])),
            encodeFrame(FrameType.ERROR, stream, Buffer.concat([u16(5), u32(2), Buffer.from("gone")])),
          ][this.r.int(4)]!;
          this.push(end);
        }
      });
    }
  }
}

describe("AgentChannel against a hostile guest", () => {
  it("fails calls only with typed errors, never crashes, and keeps memory bounded", async () => {
    const target = Math.max(10_000, Math.floor(FRAMES / 100));
    const secret = randomBytes(32);
    const r = rng(0xbad);
    const budget = { frames: 0 };
    const outcomes = new Map<string, number>();
    const rss0 = process.memoryUsage().rss;
    let peers = 0;
    const ch = new AgentChannel({
      connect: async () => {
        peers++;
        return new HostileGuest(secret, r, budget);
      },
      secret,
      connectTimeoutMs: 2000,
    });
    try {
      // A pool of concurrent calls, each replaced as soon as it settles.
      let i = 0;
      const call = (): Promise<unknown> => {
        const opts = { timeoutMs: 50 };
        switch (i++ % 4) {
          case 0:
            return ch.run("echo hi", opts);
          case 1:
            return ch.ping(opts);
          case 2:
            return ch.listEnv(opts);
          default:
            return ch.info(opts);
        }
      };
      const worker = async () => {
        while (budget.frames < target) {
          let key = "ok";
          try {
            await call();
          } catch (err) {
            key = err instanceof SmolVMError ? err.name : `UNTYPED ${String(err)}`;
          }
          outcomes.set(key, (outcomes.get(key) ?? 0) + 1);
        }
      };
      await Promise.all(Array.from({ length: 8 }, worker));
    } finally {
      await ch.close();
    }
    console.log(
      `hostile guest: ${budget.frames} frames, ${peers} connections, outcomes ${JSON.stringify(Object.fromEntries(outcomes))}`,
    );
    const untyped = [...outcomes.keys()].filter((k) => k.startsWith("UNTYPED"));
    expect(untyped).toEqual([]);
    expect(outcomes.get("ProtocolError") ?? 0).toBeGreaterThan(100);
    expect(peers).toBeGreaterThan(50); // each violation reset the connection and the next call reconnected
    expect(process.memoryUsage().rss - rss0).toBeLessThan(200 << 20);
  }, 120_000);
});

// ---------------------------------------------------------------- post-deadline and flood

describe("AgentChannel against a flooding guest that ignores CANCEL", () => {
  it("keeps host memory within a fixed bound across thousands of timed-out, aborted and cancelled calls", async () => {
    // Fake agents (see fake-agents.ts): every EXEC is answered with endless stdout, as fast as
    // credit allows, and CANCEL is ignored. Each call keeps at most 1 MiB (maxOutputBytes), so
    // what is measured is what happens after calls end. Calls end by deadline, abort signal, a throwing
    // callback, or stream cancel, at random points; none may leave a stream that still buffers.
    const target = Math.max(2_000, Math.floor(FRAMES / 500));
    const r = rng(0xf100d);
    const { ch, peers } = floodingChannel();
    const outcomes = new Map<string, number>();
    let lateCallbacks = 0;
    gc();
    const heap0 = process.memoryUsage().heapUsed + process.memoryUsage().arrayBuffers;
    const rss0 = process.memoryUsage().rss;
    let peakRss = rss0;
    const sampler = setInterval(() => {
      peakRss = Math.max(peakRss, process.memoryUsage().rss);
    }, 20);
    let done = 0;
    try {
      const one = async (): Promise<void> => {
        let ended = false;
        const onStdout = () => {
          if (ended) lateCallbacks++;
        };
        const kind = r.int(4);
        try {
          if (kind === 0) {
            await ch.run("yes", { timeoutMs: 5 + r.int(40), onStdout, maxOutputBytes: 1 << 18 });
          } else if (kind === 1) {
            const ac = new AbortController();
            setTimeout(() => ac.abort(), r.int(30));
            await ch.run("yes", { signal: ac.signal, onStdout, maxOutputBytes: r.int(1 << 20) });
          } else if (kind === 2) {
            let n = 0;
            await ch.run("yes", {
              timeoutMs: 2_000,
              maxOutputBytes: 1 << 18,
              onStdout: () => {
                onStdout();
                if (++n > r.int(8)) throw new Error("consumer gave up");
              },
            });
          } else {
            const s = ch.stream("yes", { timeoutMs: 2_000 });
            let n = 0;
            for await (const _ of s) if (++n > r.int(8)) break;
          }
        } catch (err) {
          const key = err instanceof SmolVMError ? err.name : (err as Error).message;
          outcomes.set(key, (outcomes.get(key) ?? 0) + 1);
        } finally {
          ended = true;
        }
      };
      const worker = async () => {
        while (done < target) {
          done++;
          await one();
        }
      };
      await Promise.all(Array.from({ length: 16 }, worker));
      // The agents keep flooding after every call ended: give them time to try.
      await new Promise((res) => setTimeout(res, 500));
      peakRss = Math.max(peakRss, process.memoryUsage().rss);
    } finally {
      clearInterval(sampler);
      await ch.close();
    }
    const sent = peers.reduce((a, p) => a + p.sent, 0);
    const connections = peers.length;
    // The fake peers are the test's, not the channel's: what they still buffer is not counted.
    for (const p of peers) p.destroy();
    peers.length = 0;
    await new Promise((res) => setImmediate(res));
    gc();
    gc();
    const retained = process.memoryUsage().heapUsed + process.memoryUsage().arrayBuffers - heap0;
    console.log(
      `flooding guest: ${done} calls, ${connections} connections, ${(sent / 2 ** 20).toFixed(0)} MiB offered, rss peak +${((peakRss - rss0) / 2 ** 20).toFixed(0)} MiB, retained ${(retained / 2 ** 20).toFixed(1)} MiB, outcomes ${JSON.stringify(Object.fromEntries(outcomes))}`,
    );
    expect(done).toBeGreaterThanOrEqual(target);
    expect(lateCallbacks).toBe(0);
    // Every call ended on the host side (nothing was left to finish normally).
    expect([...outcomes.values()].reduce((a, b) => a + b, 0)).toBeGreaterThan(target / 2);
    // Nothing of the abandoned calls is kept, and the peak is a fixed bound however much the
    // agents offered in total (gigabytes; the peak is mostly garbage from decoded frames).
    expect(retained).toBeLessThan(32 << 20);
    expect(peakRss - rss0).toBeLessThan(256 << 20);
    // An agent that leaves hundreds of cancelled streams open loses its connection (and the
    // streams with it); the next call reconnects.
    expect(outcomes.get("ProtocolError") ?? 0).toBeGreaterThan(0);
    expect(connections).toBeGreaterThan(1);
  }, 180_000);
});

// ---------------------------------------------------------------- hostile host vs the real agent

let agent: TestAgent;
beforeAll(async () => {
  agent = await startAgent();
});
afterAll(async () => {
  await agent?.stop();
});

async function authedSocket(secret: Buffer, path: string): Promise<Socket> {
  const sock = connect(path);
  await new Promise((res, rej) => sock.once("connect", res).once("error", rej));
  const hn = randomBytes(32);
  const dec = new FrameDecoder();
  sock.write(encodeFrame(FrameType.HELLO, 0, encodeHello(hn)));
  const nonce = await new Promise<Buffer>((res, rej) => {
    sock.on("data", (c: Buffer) => {
      for (const f of dec.push(c)) if (f.type === FrameType.CHALLENGE) res(f.payload.subarray(4));
    });
    sock.once("error", rej);
  });
  sock.write(encodeFrame(FrameType.AUTH, 0, hostProof(secret, nonce, hn)));
  sock.on("error", () => {});
  return sock;
}

describe("the real agent against a hostile host", () => {
  it("survives random and mutated frames after authentication and keeps serving", async () => {
    const target = Math.max(20_000, Math.floor(FRAMES / 40));
    const r = rng(0xa6e);
    // Mutations never touch EXEC or PUT (they would run or write arbitrary things as this user).
    const templates = (id: number): Buffer[] => [
      encodeFrame(FrameType.GET, id, encodeGet({ path: "/nonexistent/smolvm-fuzz" })),
      encodeFrame(FrameType.PING, id),
      encodeFrame(FrameType.INFO, id),
      encodeFrame(FrameType.WAIT_PORT, id, encodeWaitPort(1, 5)),
      encodeFrame(FrameType.DATA, id, r.bytes(r.int(300))),
      encodeFrame(FrameType.EOF, id),
      encodeFrame(FrameType.CREDIT, id, u32(r.int(70_000))),
      encodeFrame(FrameType.SIGNAL, id, Buffer.from(["TERM", "KILL", "HUP", "BOGUS"][r.int(4)]!)),
      encodeFrame(FrameType.RESIZE, id, Buffer.concat([u16(r.int(500)), u16(r.int(500))])),
      encodeFrame(FrameType.CANCEL, id),
      encodeFrame(FrameType.HELLO, 0, encodeHello(r.bytes(32))),
      encodeFrame(FrameType.AUTH, 0, r.bytes(32)),
    ];
    let sent = 0;
    let connections = 0;
    while (sent < target) {
      const sock = await authedSocket(agent.secret, agent.socket);
      connections++;
      let id = 1;
      // Some real work in flight while the garbage arrives.
      sock.write(encodeFrame(FrameType.EXEC, id++, encodeExec({ argv: ["/bin/sh", "-c", "sleep 0.2"] })));
      for (let i = 0; i < 2000 && !sock.destroyed; i++, sent++) {
        const t = templates(r.int(4) === 0 ? r.int(1 << 16) : id++);
        const f = t[r.int(t.length)]!;
        sock.write(r.int(2) === 0 ? mutate(r, f) : f);
      }
      await new Promise((res) => setTimeout(res, 20));
      sock.destroy();
    }
    expect(sent).toBeGreaterThanOrEqual(target);
    expect(connections).toBeGreaterThan(1);
    expect(agent.proc.exitCode).toBeNull();
    expect(agent.proc.signalCode).toBeNull();
    await using ch = agent.channel();
    expect((await ch.run("echo alive", { shell: "raw" })).stdout).toBe("alive\n");
  }, 120_000);
});
