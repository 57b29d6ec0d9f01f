/**
 * streamExec hardening: EXEC events (start and end, like exec) and bounded memory when the
 * consumer is slower than the command (the SSH window is not replenished while we are full).
 */
import { chmod, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
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
