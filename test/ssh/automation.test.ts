import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AutomationEngine, EOF } from "../../src/ssh/automation.js";
import { SSHConnection } from "../../src/ssh/connection.js";
import { useSshd } from "../fixtures/vitest-sshd.js";
import { sshdOptions } from "./resilience-helpers.js";

const sshd = useSshd();
let conn: SSHConnection;
beforeAll(async () => {
  conn = await SSHConnection.connect(sshdOptions(sshd()));
});
afterAll(async () => {
  await conn?.close();
});

describe("AutomationEngine over a PTY exec", () => {
  it("drives an interactive login-style dialogue with echo off for the secret", async () => {
    const script =
      'printf "Username: "; read u; printf "Password: "; stty -echo; read p; stty echo; echo; ' +
      'if [ "$p" = "s3cr3t-pw" ]; then echo "welcome $u"; else echo denied; fi; printf "$ "; read cmd; echo "ran:$cmd"';
    const engine = new AutomationEngine(
      conn.streamExec(script, { pty: true, stdin: true, timeoutMs: 30_000 }),
    );
    const results = await engine.runSequence([
      { pattern: "Username: ", response: "alice", timeoutMs: 5000 },
      { pattern: "Password: ", response: "s3cr3t-pw", secret: true, timeoutMs: 5000 },
      { pattern: [/welcome (\w+)/, "denied"], timeoutMs: 5000 },
      { pattern: "$ ", response: "uptime", timeoutMs: 5000 },
      { pattern: /ran:(\w+)/, timeoutMs: 5000 },
      { pattern: EOF, timeoutMs: 5000 },
    ]);
    expect(results.map((r) => r.matched)).toEqual([true, true, true, true, true, true]);
    expect(results[2]!.index).toBe(0);
    expect(results[2]!.groups).toEqual(["alice"]);
    expect(results[4]!.groups).toEqual(["uptime"]);
    expect(results[5]!.exitCode).toBe(0);
    expect(JSON.stringify(engine.transcript.toDict())).not.toContain("s3cr3t-pw");
    await engine.close();
  });

  it("a second expect for the same prompt waits for a new one instead of matching the old", async () => {
    const engine = new AutomationEngine(
      conn.streamExec('printf "> "; read a; sleep 0.5; printf "> "; read b; echo "$a,$b"', {
        pty: true,
        stdin: true,
      }),
    );
    expect((await engine.expect("> ", { timeoutMs: 5000 })).matched).toBe(true);
    await engine.send("one");
    const t0 = performance.now();
    const second = await engine.expect("> ", { timeoutMs: 5000 });
    expect(second.matched).toBe(true);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(400);
    await engine.send("two");
    const r = await engine.expect(/(\w+),(\w+)/, { timeoutMs: 5000 });
    expect(r.groups).toEqual(["one", "two"]);
    await engine.close();
  });
});
