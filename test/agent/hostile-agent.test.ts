/**
 * A hostile guest on the agent channel: output after a call ended, output without end, and
 * guest text in errors. Where the real agent (ours) cannot misbehave, a fake agent on an
 * in-process stream stands in for a guest root that replaced it: it authenticates correctly,
 * then ignores CANCEL and sends as much as its credit allows.
 */
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AgentChannel } from "../../src/channel/agent-channel.js";
import {
  encodeFrame,
  FrameDecoder,
  FrameType,
  INITIAL_WINDOW,
  u16,
  u32,
} from "../../src/channel/agent-protocol.js";
import { OperationAbortedError, OperationTimeoutError, SmolVMError } from "../../src/errors.js";
import { DEFAULT_MAX_OUTPUT_BYTES } from "../../src/index.js";
import { FloodingAgent, floodingChannel } from "./fake-agents.js";
import { startAgent, type TestAgent } from "./helpers.js";

const settle = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe("a finished call takes no more output (fake agent that ignores CANCEL)", () => {
  it("run(): after the deadline no callback fires and the agent is held to a bounded drain", async () => {
    const { ch, peers } = floodingChannel();
    try {
      let calls = 0;
      let afterEnd = 0;
      let ended = false;
      const e = await ch
        .run("yes", {
          timeoutMs: 300,
          maxOutputBytes: 1 << 20,
          onStdout: () => {
            calls++;
            if (ended) afterEnd++;
          },
        })
        .catch((x) => x);
      ended = true;
      expect(e).toBeInstanceOf(OperationTimeoutError);
      expect(calls).toBeGreaterThan(0);
      const agent = peers[0]!;
      const sentAtEnd = agent.sent;
      await settle(1000);
      expect(agent.cancels).toBe(1);
      expect(afterEnd).toBe(0);
      // One window plus the bounded drain (4 windows), however long the agent keeps going.
      expect(agent.sent - sentAtEnd).toBeLessThanOrEqual(5 * INITIAL_WINDOW);
      // The channel still serves other calls on the same connection.
      const s = await ch.run("again", { timeoutMs: 200 }).catch((x) => x);
      expect(s).toBeInstanceOf(OperationTimeoutError);
      expect(peers).toHaveLength(1);
    } finally {
      await ch.close();
    }
  });

  it("run(): an abort signal ends the call the same way", async () => {
    const { ch, peers } = floodingChannel();
    try {
      const ac = new AbortController();
      let afterEnd = 0;
      let ended = false;
      const p = ch.run("yes", {
        signal: ac.signal,
        maxOutputBytes: 0,
        onStdout: () => {
          if (ended) afterEnd++;
        },
      });
      setTimeout(() => ac.abort(), 200);
      expect(await p.catch((x) => x)).toBeInstanceOf(OperationAbortedError);
      ended = true;
      const sentAtEnd = peers[0]!.sent;
      await settle(1000);
      expect(afterEnd).toBe(0);
      expect(peers[0]!.sent - sentAtEnd).toBeLessThanOrEqual(5 * INITIAL_WINDOW);
    } finally {
      await ch.close();
    }
  });

  it("stream(): after cancel() nothing more is queued or granted", async () => {
    const { ch, peers } = floodingChannel();
    try {
      const s = ch.stream("yes", { timeoutMs: 10_000 });
      let got = 0;
      for await (const ev of s) {
        if (ev.stream === "stdout") got += ev.data.length;
        if (got > 1 << 20) break; // break → return() → cancel()
      }
      const sentAtEnd = peers[0]!.sent;
      await settle(1000);
      expect(peers[0]!.cancels).toBe(1);
      expect(peers[0]!.sent - sentAtEnd).toBeLessThanOrEqual(5 * INITIAL_WINDOW);
    } finally {
      await ch.close();
    }
  });
});

describe("output is bounded by default (the real agent, a command printing 70 MB)", () => {
  let agent: TestAgent;
  beforeAll(async () => {
    agent = await startAgent();
  });
  afterAll(async () => {
    await agent?.stop();
  });

  it("keeps DEFAULT_MAX_OUTPUT_BYTES, sets truncated, and still reaps the command", async () => {
    expect(DEFAULT_MAX_OUTPUT_BYTES).toBe(64 * 1024 * 1024);
    await using ch = agent.channel();
    const r = await ch.run("head -c 70000000 /dev/zero; echo done >&2; exit 3", {
      shell: "raw",
      encoding: "buffer",
      timeoutMs: 120_000,
    });
    expect(r.truncated).toBe(true);
    expect(r.exitCode).toBe(3);
    expect(r.stdout.length + r.stderr.length).toBe(DEFAULT_MAX_OUTPUT_BYTES);
  }, 150_000);

  it("downloads safely: replaces a symlink instead of writing through it, 0600, nothing partial, maxBytes", async () => {
    await using ch = agent.channel();
    const { lstatSync, readdirSync, readFileSync, statSync, symlinkSync, writeFileSync } = await import(
      "node:fs"
    );
    const { join } = await import("node:path");
    const src = join(agent.dir, "src.bin");
    const data = randomBytes(300_000);
    writeFileSync(src, data);
    const out = join(agent.dir, "out");
    const { mkdirSync } = await import("node:fs");
    mkdirSync(out);
    const victim = join(out, "victim.txt");
    writeFileSync(victim, "keep me");
    const dest = join(out, "dest.bin");
    symlinkSync(victim, dest);
    await ch.getFile(src, dest);
    expect(readFileSync(victim, "utf8")).toBe("keep me");
    expect(lstatSync(dest).isSymbolicLink()).toBe(false);
    expect(readFileSync(dest).equals(data)).toBe(true);
    expect(statSync(dest).mode & 0o777).toBe(0o600);
    const e = await ch.getFile(src, dest, { maxBytes: 100_000 }).catch((x) => x);
    expect(e).toBeInstanceOf(SmolVMError);
    expect(e.code).toBe("FILE_TOO_LARGE");
    expect(readFileSync(dest).equals(data)).toBe(true);
    await ch.getFile(join(agent.dir, "missing"), join(out, "never.bin")).catch(() => {});
    expect(readdirSync(out).sort()).toEqual(["dest.bin", "victim.txt"]);
    // The channel is still usable after the refused download.
    expect((await ch.run("echo ok", { shell: "raw" })).stdout).toBe("ok\n");
  });

  it("reads at most 1 MiB of an env file the guest made huge", async () => {
    await using ch = agent.channel();
    const { mkdirSync, writeFileSync } = await import("node:fs");
    const { dirname } = await import("node:path");
    mkdirSync(dirname(agent.envFile), { recursive: true });
    writeFileSync(agent.envFile, Buffer.alloc(3 << 20, 0x23));
    const e = await ch.listEnv({ timeoutMs: 20_000 }).catch((x) => x);
    expect(e).toBeInstanceOf(SmolVMError);
    expect((e as SmolVMError).code).toBe("ENV_FILE_TOO_LARGE");
  });
});

describe("guest text in errors", () => {
  it("quotes at most a few hundred bytes of an agent error message, without control sequences", async () => {
    // Fake agent (the real one never sends such text): answers EXEC with an ERROR carrying
    // terminal escapes.
    const secret = randomBytes(32);
    class EscapingAgent extends FloodingAgent {
      override _write(chunk: Buffer, enc: BufferEncoding, cb: (err?: Error | null) => void): void {
        const d = new FrameDecoder();
        for (const f of d.push(chunk)) {
          if (f.type === FrameType.EXEC) {
            const msg = Buffer.from(`\x1b]0;pwned\x07\x1b[2J${"x".repeat(900)}`);
            this.push(encodeFrame(FrameType.ERROR, f.stream, Buffer.concat([u16(7), u32(2), msg])));
            cb();
            return;
          }
        }
        super._write(chunk, enc, cb);
      }
    }
    const ch = new AgentChannel({ connect: async () => new EscapingAgent(secret), secret });
    try {
      const e = (await ch.run("x", { timeoutMs: 5000 }).catch((x) => x)) as SmolVMError;
      expect(e).toBeInstanceOf(SmolVMError);
      expect(e.code).toBe("GUEST_SPAWN_FAILED");
      expect(e.message).not.toMatch(/[\x00-\x08\x0b-\x1f\x7f]/);
      expect(e.message).not.toContain("pwned");
      expect(e.message.length).toBeLessThan(500);
    } finally {
      await ch.close();
    }
  });
});
