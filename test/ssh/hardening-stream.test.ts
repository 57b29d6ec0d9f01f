/**
 * streamExec hardening: EXEC events (start and end, like exec) and bounded memory when the
 * consumer is slower than the command (the SSH window is not replenished while we are full).
 */
import { createHash, randomBytes } from "node:crypto";
import { chmod, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { OperationTimeoutError } from "../../src/errors.js";
import { SSHConnection } from "../../src/ssh/connection.js";
import { EventCollector } from "../../src/ssh/events.js";
import { useSshd } from "../fixtures/vitest-sshd.js";
import { sshdOptions } from "./resilience-helpers.js";

const sshd = useSshd();
let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "smolvm-stream-"));
  // The sshd test user reads files from here.
  await chmod(dir, 0o755);
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const SECRET = "tok-9f2c61d0-never-logged";

async function drain(stream: AsyncIterable<unknown>): Promise<unknown> {
  try {
    for await (const _ of stream);
  } catch (e) {
    return e;
  }
  return undefined;
}

describe("streamExec EXEC events", () => {
  it("emits start and end with duration, exit code and byte counts, never env values", async () => {
    const logPath = join(dir, "events.jsonl");
    const events = new EventCollector({ logPath });
    const conn = await SSHConnection.connect({ ...sshdOptions(sshd()), events });
    try {
      for (const shell of ["login", "raw"] as const) {
        const before = events.events.length;
        const cmd = 'printf abc; printf "%s" "$TOKEN" >&2; exit 3';
        for await (const _ of conn.streamExec(cmd, { shell, env: { TOKEN: SECRET } }));
        const exec = events.events.slice(before).filter((e) => e.type === "EXEC");
        expect(exec.map((e) => e.data.phase)).toEqual(["start", "end"]);
        expect(exec[0]!.data).toMatchObject({
          phase: "start",
          command: cmd,
          host: "127.0.0.1",
          stream: true,
        });
        expect(exec[1]!.data).toMatchObject({
          phase: "end",
          command: cmd,
          stream: true,
          exitCode: 3,
          signal: null,
          bytesStdout: 3,
          bytesStderr: SECRET.length,
        });
        expect(exec[1]!.data.durationMs).toBeGreaterThan(0);
        expect(exec[1]!.data.durationMs).toBeLessThan(10_000);
      }
      // The value reached the command (stderr byte count) but no event carries it.
      expect(JSON.stringify(events.events)).not.toContain(SECRET);
    } finally {
      await conn.close();
      await events.close();
    }
    const log = await readFile(logPath, "utf8");
    expect(log.split("\n").filter((l) => l.includes('"EXEC"'))).toHaveLength(4);
    expect(log).not.toContain(SECRET);
  });

  it("reports an end for a signal, a cancel and a timeout too, exactly once each", async () => {
    const events = new EventCollector();
    const conn = await SSHConnection.connect({ ...sshdOptions(sshd()), events });
    const ends = () => events.getByType("EXEC").filter((e) => e.data.phase === "end");
    try {
      await drain(conn.streamExec("echo x; kill -TERM $$", { shell: "raw" }));
      expect(ends().at(-1)!.data).toMatchObject({ exitCode: null, signal: "TERM", bytesStdout: 2 });

      const s = conn.streamExec("echo started; sleep 30", { timeoutMs: 60_000 });
      for await (const ev of s) {
        if (ev.stream === "stdout") break; // return() cancels
      }
      expect(ends().at(-1)!.data).toMatchObject({ cancelled: true, exitCode: null, bytesStdout: 8 });

      const err = await drain(conn.streamExec("sleep 30", { timeoutMs: 300 }));
      expect(err).toBeInstanceOf(OperationTimeoutError);
      expect(ends().at(-1)!.data).toMatchObject({ error: "TIMEOUT", exitCode: null });

      await new Promise((r) => setTimeout(r, 200));
      const exec = events.getByType("EXEC");
      expect(exec.filter((e) => e.data.phase === "start")).toHaveLength(3);
      expect(ends()).toHaveLength(3);
    } finally {
      await conn.close();
    }
  });
});

// A full GC before each memory sample, so garbage does not pass for retained output.
setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;

describe("streamExec backpressure", () => {
  it("a slow consumer of 64 MiB keeps memory bounded and gets every byte", async () => {
    const size = 64 * 1024 * 1024;
    const file = join(dir, "payload.bin");
    const payload = randomBytes(size);
    await writeFile(file, payload, { mode: 0o644 });
    const want = createHash("sha256").update(payload).digest("hex");
    const conn = await SSHConnection.connect(sshdOptions(sshd()));
    try {
      gc();
      const base = process.memoryUsage();
      let peakExternal = 0;
      let peakHeap = 0;
      let peakRss = 0;
      let peakBuffered = 0;
      let n = 0;
      let bytes = 0;
      let exitCode: number | null | undefined;
      const hash = createHash("sha256");
      const stream = conn.streamExec(`head -c ${size} ${file}`, { shell: "raw", timeoutMs: 120_000 });
      const t0 = performance.now();
      for await (const ev of stream) {
        if (ev.stream === "exit") {
          exitCode = ev.exitCode;
          continue;
        }
        expect(ev.stream).toBe("stdout");
        hash.update(ev.data);
        bytes += ev.data.length;
        peakBuffered = Math.max(peakBuffered, stream.bufferedBytes);
        // The consumer is far slower than loopback SSH: ~1 ms per chunk of at most 32 KiB.
        await new Promise((r) => setTimeout(r, 1));
        if (++n % 128 === 0) {
          gc();
          const m = process.memoryUsage();
          peakExternal = Math.max(peakExternal, m.arrayBuffers - base.arrayBuffers);
          peakHeap = Math.max(peakHeap, m.heapUsed - base.heapUsed);
          peakRss = Math.max(peakRss, m.rss - base.rss);
        }
      }
      const ms = performance.now() - t0;
      expect(exitCode).toBe(0);
      expect(bytes).toBe(size);
      expect(hash.digest("hex")).toBe(want);
      // Our queue stays under the 1 MiB high-water mark + one packet; ssh2 adds its readable
      // buffers (2 MiB each) and one SSH window. Unbounded, this run peaks near 90 MiB.
      expect(peakBuffered).toBeLessThanOrEqual(1024 * 1024 + 64 * 1024);
      expect(peakExternal).toBeLessThan(24 * 1024 * 1024);
      expect(peakHeap).toBeLessThan(24 * 1024 * 1024);
      expect(peakRss).toBeLessThan(40 * 1024 * 1024);
      console.log(
        `64 MiB slow stream: ${Math.round(ms)} ms, ${n} chunks, peak queued ${peakBuffered} B, ` +
          `peak external +${(peakExternal / 1048576).toFixed(1)} MiB, heap +${(peakHeap / 1048576).toFixed(1)} MiB, rss +${(peakRss / 1048576).toFixed(1)} MiB`,
      );
    } finally {
      await conn.close();
      await rm(file, { force: true });
    }
  }, 120_000);

  it("a paused stderr is drained before the exit event (nothing lost at close)", async () => {
    const size = 6 * 1024 * 1024;
    const file = join(dir, "stderr.bin");
    const payload = randomBytes(size);
    await writeFile(file, payload, { mode: 0o644 });
    const conn = await SSHConnection.connect(sshdOptions(sshd()));
    try {
      for (const cmd of [
        `head -c ${size} ${file} >&2; printf done`,
        `printf start; head -c ${size} ${file} >&2`,
      ]) {
        const err: Buffer[] = [];
        let out = "";
        const order: string[] = [];
        for await (const ev of conn.streamExec(cmd, { shell: "raw", timeoutMs: 60_000 })) {
          if (order.at(-1) !== ev.stream) order.push(ev.stream);
          if (ev.stream === "stderr") err.push(ev.data);
          else if (ev.stream === "stdout") out += ev.data.toString();
          await new Promise((r) => setTimeout(r, 1));
        }
        expect(order.at(-1)).toBe("exit");
        expect(order.filter((o) => o === "exit")).toHaveLength(1);
        expect(out).toBe(cmd.startsWith("printf") ? "start" : "done");
        expect(Buffer.concat(err).equals(payload)).toBe(true);
      }
    } finally {
      await conn.close();
      await rm(file, { force: true });
    }
  }, 60_000);
});
