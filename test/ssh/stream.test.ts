import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { OperationTimeoutError } from "../../src/errors.js";
import { SSHConnection } from "../../src/ssh/connection.js";
import { EventCollector } from "../../src/ssh/events.js";
import { watchStream } from "../../src/ssh/watchdog.js";
import { useSshd } from "../fixtures/vitest-sshd.js";
import { sshdOptions } from "./resilience-helpers.js";

const sshd = useSshd();
let conn: SSHConnection;
let events: EventCollector;
beforeAll(async () => {
  events = new EventCollector();
  conn = await SSHConnection.connect({ ...sshdOptions(sshd()), events });
});
afterAll(async () => {
  await conn?.close();
});

const seqText = (n: number, prefix: string) => {
  let s = "";
  for (let i = 1; i <= n; i++) s += `${prefix}${i}\n`;
  return s;
};

describe("streamExec", () => {
  it("never drops stdout or stderr chunks when both streams arrive together", async () => {
    // Two writers at full speed on the two streams: chunks interleave on the wire.
    const n = 100_000;
    const cmd = `(i=0; awk 'BEGIN{for(i=1;i<=${n};i++) print "o" i}') & awk 'BEGIN{for(i=1;i<=${n};i++) print "e" i > "/dev/stderr"}'; wait`;
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let exit: { exitCode: number | null } | undefined;
    let switches = 0;
    let last = "";
    for await (const ev of conn.streamExec(cmd, { timeoutMs: 30_000 })) {
      if (ev.stream === "exit") exit = ev;
      else {
        (ev.stream === "stdout" ? out : err).push(ev.data);
        if (last && last !== ev.stream) switches++;
        last = ev.stream;
      }
    }
    expect(exit?.exitCode).toBe(0);
    expect(Buffer.concat(out).toString()).toBe(seqText(n, "o"));
    expect(Buffer.concat(err).toString()).toBe(seqText(n, "e"));
    expect(switches).toBeGreaterThan(0);
  });

  it("is binary-safe and ends with exactly one exit event", async () => {
    const evs: string[] = [];
    let bytes = 0;
    for await (const ev of conn.streamExec("head -c 3000000 /dev/zero | tr '\\0' '\\377'; exit 7")) {
      if (ev.stream === "stdout") {
        bytes += ev.data.length;
        expect(ev.data.every((b) => b === 0xff)).toBe(true);
      }
      evs.push(ev.stream);
    }
    expect(bytes).toBe(3_000_000);
    expect(evs.filter((s) => s === "exit")).toHaveLength(1);
    expect(evs.at(-1)).toBe("exit");
  });

  it("progress watchdog: silence gives PROGRESS_WARNING events but the output is complete", async () => {
    const before = events.getByType("PROGRESS_WARNING").length;
    let text = "";
    for await (const ev of watchStream(conn.streamExec("echo a; sleep 1.2; echo b"), {
      progressTimeoutMs: 400,
      events,
      context: { command: "echo a; sleep 1.2; echo b" },
    })) {
      if (ev.stream === "stdout") text += ev.data.toString();
    }
    expect(text).toBe("a\nb\n");
    const warns = events.getByType("PROGRESS_WARNING").slice(before);
    expect(warns.length).toBeGreaterThanOrEqual(2);
    expect(warns[0]!.data).toMatchObject({
      timeoutMs: 400,
      abort: false,
      command: "echo a; sleep 1.2; echo b",
    });
  });

  it("progress watchdog with abortOnStall stops a frozen command with a typed error", async () => {
    const marker = `sleep 30.${Math.floor(Math.random() * 1e6)}`;
    const t0 = performance.now();
    let text = "";
    const err = await (async () => {
      for await (const ev of watchStream(conn.streamExec(`echo started; ${marker}`, { timeoutMs: 60_000 }), {
        progressTimeoutMs: 500,
        abortOnStall: true,
        events,
      })) {
        if (ev.stream === "stdout") text += ev.data.toString();
      }
    })().catch((e) => e);
    expect(err).toBeInstanceOf(OperationTimeoutError);
    expect(err.code).toBe("PROGRESS_STALL");
    expect(text).toBe("started\n");
    expect(performance.now() - t0).toBeLessThan(3000);
    // The remote command was killed, not left running (checked on a connection of its own).
    await new Promise((r) => setTimeout(r, 300));
    const check = await SSHConnection.connect(sshdOptions(sshd()));
    const ps = await check.exec(`pgrep -f '[s]${marker.slice(1)}' || true`);
    await check.close();
    expect(ps.stdout.trim()).toBe("");
  });
});
