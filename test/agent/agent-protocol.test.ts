/**
 * The frame codec (pure) and the real agent spoken to frame by frame: resync, the auth
 * handshake, agent-side request validation, and credit enforcement.
 */
import { randomBytes } from "node:crypto";
import { connect, type Socket } from "node:net";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import {
  type AgentMessage,
  agentProof,
  decodeAgentFrame,
  hostProof,
} from "../../src/channel/agent-messages.js";
import {
  decodeFields,
  encodeExec,
  encodeFields,
  encodeFrame,
  encodeGet,
  encodeHello,
  encodePut,
  Field,
  FrameDecoder,
  FrameType,
  HEADER_SIZE,
  INITIAL_WINDOW,
  MAX_PAYLOAD,
  u32,
} from "../../src/channel/agent-protocol.js";
import { ProtocolError } from "../../src/errors.js";
import { startAgent, type TestAgent } from "./helpers.js";

describe("frame codec", () => {
  it("decodes a 64 KiB frame fed one byte at a time in linear time (joins it once, not per chunk)", () => {
    const frame = encodeFrame(FrameType.DATA, 3, randomBytes(MAX_PAYLOAD), 1);
    // Count the bytes Buffer.concat produces: a decoder that re-joins its partial frame on every
    // chunk copies about frame^2/2 bytes (2 GiB here) and burned hundreds of ms of host CPU.
    let copied = 0;
    const real = Buffer.concat;
    const spy = vi.spyOn(Buffer, "concat").mockImplementation((list, len) => {
      const out = real(list, len);
      copied += out.length;
      return out;
    });
    try {
      const d = new FrameDecoder();
      const got = [];
      for (let i = 0; i < frame.length; i++) got.push(...d.push(frame.subarray(i, i + 1)));
      expect(got).toHaveLength(1);
      expect(got[0]!.payload.equals(frame.subarray(HEADER_SIZE))).toBe(true);
      expect(d.buffered).toBe(0);
    } finally {
      spy.mockRestore();
    }
    expect(copied).toBeLessThanOrEqual(2 * frame.length);
  });

  it("decodes frames split at every byte boundary", () => {
    const frames = [
      encodeFrame(FrameType.DATA, 7, Buffer.from("hello"), 1),
      encodeFrame(FrameType.OK, 7),
      encodeFrame(FrameType.CREDIT, 9, u32(1234)),
    ];
    const all = Buffer.concat(frames);
    for (let split = 0; split <= all.length; split++) {
      const d = new FrameDecoder();
      const got = [...d.push(all.subarray(0, split)), ...d.push(all.subarray(split))];
      expect(got.map((f) => [f.type, f.stream, f.flags, f.payload.toString("hex")])).toEqual([
        [FrameType.DATA, 7, 1, Buffer.from("hello").toString("hex")],
        [FrameType.OK, 7, 0, ""],
        [FrameType.CREDIT, 9, 0, "000004d2"],
      ]);
      expect(d.buffered).toBe(0);
    }
  });

  it("rejects bad magic, version, type, flags and oversized lengths, and stays failed", () => {
    const good = encodeFrame(FrameType.OK, 1);
    const cases: Array<(b: Buffer) => void> = [
      (b) => b.writeUInt32BE(0x12345678, 0),
      (b) => b.writeUInt8(2, 4),
      (b) => b.writeUInt8(0x7f, 5),
      (b) => b.writeUInt16BE(1, 6),
      (b) => b.writeUInt32BE(MAX_PAYLOAD + 1, 12),
    ];
    for (const mutate of cases) {
      const b = Buffer.from(good);
      mutate(b);
      const d = new FrameDecoder();
      expect(() => d.push(b)).toThrow(ProtocolError);
      expect(() => d.push(good)).toThrow(ProtocolError);
    }
    expect(() => encodeFrame(FrameType.DATA, 1, Buffer.alloc(MAX_PAYLOAD + 1))).toThrow(ProtocolError);
  });

  it("resyncs past stale bytes to the awaited frame, within a bound", () => {
    const d = new FrameDecoder();
    d.resync(FrameType.CHALLENGE);
    const stale = Buffer.concat([
      randomBytes(1000),
      encodeFrame(FrameType.DATA, 3, Buffer.from("old")).subarray(0, 10),
    ]);
    const challenge = encodeFrame(
      FrameType.CHALLENGE,
      0,
      Buffer.concat([Buffer.from([0, 1, 0, 0]), randomBytes(32)]),
    );
    const frames = [...d.push(stale), ...d.push(challenge.subarray(0, 5)), ...d.push(challenge.subarray(5))];
    expect(frames.length).toBe(1);
    expect(decodeAgentFrame(frames[0]!).type).toBe("challenge");
    const flood = new FrameDecoder();
    flood.resync(FrameType.CHALLENGE);
    expect(() => {
      for (let i = 0; i < 20; i++) flood.push(Buffer.alloc(64 << 10));
    }).toThrow(ProtocolError);
  });

  it("decodes agent messages strictly", () => {
    const exit = (code: number, flags: number, sig = "") =>
      decodeAgentFrame({
        type: FrameType.EXIT,
        flags: 0,
        stream: 1,
        payload: Buffer.concat([
          Buffer.from([code >>> 24, (code >> 16) & 255, (code >> 8) & 255, code & 255]),
          Buffer.from([flags]),
          Buffer.from(sig),
        ]),
      });
    expect(exit(3, 0)).toMatchObject({ exitCode: 3, signal: null, timedOut: false });
    expect(exit(-1, 1, "KILL")).toMatchObject({ exitCode: null, signal: "KILL", timedOut: true });
    expect(() => exit(256, 0)).toThrow(ProtocolError);
    expect(() => exit(0, 0, "KILL")).toThrow(ProtocolError);
    expect(() => exit(-1, 0, "kill; rm")).toThrow(ProtocolError);
    expect(() => exit(0, 8)).toThrow(ProtocolError);
    expect(() =>
      decodeAgentFrame({ type: FrameType.EXEC, flags: 0, stream: 1, payload: Buffer.alloc(0) }),
    ).toThrow(ProtocolError);
    expect(() =>
      decodeAgentFrame({ type: FrameType.DATA, flags: 1, stream: 0, payload: Buffer.from("x") }),
    ).toThrow(ProtocolError);
    expect(() => decodeAgentFrame({ type: FrameType.CREDIT, flags: 0, stream: 1, payload: u32(0) })).toThrow(
      ProtocolError,
    );
    expect(() => decodeFields(Buffer.from([1, 0, 0, 0, 9, 65]))).toThrow(ProtocolError);
    expect(
      decodeFields(
        encodeFields([
          [Field.ARG, "a"],
          [Field.ARG, ""],
        ]),
      ).map(([t, v]) => [t, v.toString()]),
    ).toEqual([
      [1, "a"],
      [1, ""],
    ]);
  });
});

// ---------------------------------------------------------------- raw frames to the real agent

class RawClient {
  private readonly decoder = new FrameDecoder();
  private readonly queue: AgentMessage[] = [];
  private waiter: (() => void) | undefined;
  closed = false;

  private constructor(readonly sock: Socket) {
    sock.on("data", (c: Buffer) => {
      for (const f of this.decoder.push(c)) this.queue.push(decodeAgentFrame(f));
      this.waiter?.();
    });
    sock.on("close", () => {
      this.closed = true;
      this.waiter?.();
    });
    sock.on("error", () => {});
  }

  static async open(path: string): Promise<RawClient> {
    const sock = connect(path);
    await new Promise((r, j) => sock.once("connect", r).once("error", j));
    return new RawClient(sock);
  }

  send(type: number, stream: number, payload?: Buffer, flags = 0): void {
    this.sock.write(encodeFrame(type, stream, payload, flags));
  }

  async next(ms = 3000): Promise<AgentMessage | "closed"> {
    const end = Date.now() + ms;
    while (!this.queue.length) {
      if (this.closed) return "closed";
      if (Date.now() > end) throw new Error("no frame from the agent");
      await new Promise<void>((r) => {
        this.waiter = r;
        setTimeout(r, 50);
      });
    }
    return this.queue.shift()!;
  }

  async auth(secret: Buffer): Promise<void> {
    const hn = randomBytes(32);
    this.send(FrameType.HELLO, 0, encodeHello(hn));
    const ch = await this.next();
    if (ch === "closed" || ch.type !== "challenge") throw new Error("no challenge");
    this.send(FrameType.AUTH, 0, hostProof(secret, ch.nonce, hn));
    const ok = await this.next();
    if (ok === "closed" || ok.type !== "authOk") throw new Error("auth failed");
    expect(ok.proof.equals(agentProof(secret, hn, ch.nonce))).toBe(true);
  }

  close(): void {
    this.sock.destroy();
  }
}

let agent: TestAgent;
beforeAll(async () => {
  agent = await startAgent();
});
afterAll(async () => {
  await agent?.stop();
});

describe("the agent, frame by frame", () => {
  it("skips stale bytes before HELLO and proves the secret back", async () => {
    const c = await RawClient.open(agent.socket);
    try {
      c.sock.write(
        Buffer.concat([
          randomBytes(3000),
          encodeFrame(FrameType.DATA, 5, Buffer.from("stale")).subarray(0, 9),
        ]),
      );
      await c.auth(agent.secret);
      c.send(FrameType.PING, 1);
      expect(await c.next()).toMatchObject({ type: "ok", stream: 1 });
    } finally {
      c.close();
    }
  });

  it("answers a repeated HELLO with the same challenge", async () => {
    const c = await RawClient.open(agent.socket);
    try {
      const hn = randomBytes(32);
      c.send(FrameType.HELLO, 0, encodeHello(hn));
      c.send(FrameType.HELLO, 0, encodeHello(hn));
      const a = await c.next();
      const b = await c.next();
      expect(a).toMatchObject({ type: "challenge" });
      expect((b as { nonce: Buffer }).nonce.equals((a as { nonce: Buffer }).nonce)).toBe(true);
    } finally {
      c.close();
    }
  });

  it("serves nothing before authentication and closes on a wrong proof", async () => {
    const c = await RawClient.open(agent.socket);
    try {
      const hn = randomBytes(32);
      c.send(FrameType.HELLO, 0, encodeHello(hn));
      await c.next();
      c.send(FrameType.PING, 1);
      expect(await c.next()).toMatchObject({ type: "error", stream: 0, code: "NOT_READY" });
      c.send(FrameType.HELLO, 0, encodeHello(hn));
      const ch = await c.next();
      if (ch === "closed" || ch.type !== "challenge") throw new Error("no challenge");
      c.send(FrameType.AUTH, 0, hostProof(randomBytes(32), ch.nonce, hn));
      expect(await c.next()).toMatchObject({ type: "error", stream: 0, code: "AUTH_FAILED" });
      expect(await c.next()).toBe("closed");
    } finally {
      c.close();
    }
  });

  it("validates paths and requests itself, with typed error frames", async () => {
    const c = await RawClient.open(agent.socket);
    try {
      await c.auth(agent.secret);
      let id = 1;
      for (const path of ["relative", "/a/../b", "/a/./b", "/a/", `/${"x".repeat(5000)}`]) {
        c.send(FrameType.GET, id, encodeGet({ path }));
        expect(await c.next()).toMatchObject({ type: "error", stream: id, code: "INVALID_PATH" });
        id++;
        c.send(FrameType.PUT, id, encodePut({ path }, 0o644, false));
        expect(await c.next()).toMatchObject({ type: "error", stream: id, code: "INVALID_PATH" });
        id++;
      }
      c.send(FrameType.GET, id, encodeFields([[Field.PATH, Buffer.from("/a\0b")]]));
      expect(await c.next()).toMatchObject({ type: "error", stream: id++, code: "INVALID_PATH" });
      c.send(FrameType.EXEC, id, encodeFields([[Field.CWD, "/"]]));
      expect(await c.next()).toMatchObject({ type: "error", stream: id++, code: "BAD_REQUEST" });
      c.send(
        FrameType.EXEC,
        id,
        encodeFields([
          [Field.ARG, "/bin/true"],
          [Field.ENV, "1X=y"],
        ]),
      );
      expect(await c.next()).toMatchObject({ type: "error", stream: id++, code: "BAD_REQUEST" });
      c.send(
        FrameType.EXEC,
        id,
        encodeFields([
          [Field.ARG, "/bin/true"],
          [99, "x"],
        ]),
      );
      expect(await c.next()).toMatchObject({ type: "error", stream: id++, code: "BAD_REQUEST" });
      c.send(
        FrameType.EXEC,
        id,
        encodeFields([
          [Field.ARG, "/bin/true"],
          [0x99, "optional, skipped"],
        ]),
      );
      c.send(FrameType.EOF, id);
      expect(await c.next()).toMatchObject({ type: "exit", stream: id++, exitCode: 0 });
    } finally {
      c.close();
    }
  });

  it("drops the session when the host sends beyond its credit", async () => {
    const c = await RawClient.open(agent.socket);
    try {
      await c.auth(agent.secret);
      c.send(FrameType.EXEC, 1, encodeExec({ argv: ["/bin/sh", "-c", "sleep 5"] }));
      const chunk = Buffer.alloc(MAX_PAYLOAD);
      for (let sent = 0; sent <= 2 * INITIAL_WINDOW; sent += chunk.length) c.send(FrameType.DATA, 1, chunk);
      const msgs: Array<AgentMessage | "closed"> = [];
      for (let m = await c.next(); m !== "closed"; m = await c.next()) msgs.push(m);
      expect(msgs.at(-1)).toMatchObject({ type: "error", stream: 0, code: "PROTOCOL" });
      expect(HEADER_SIZE).toBe(16);
    } finally {
      c.close();
    }
  });
});
