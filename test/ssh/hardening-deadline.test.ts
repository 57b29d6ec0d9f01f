/**
 * Deadlines hold before a channel opens: a server that answers keepalives but never answers the
 * channel open or the exec request cannot keep run/exec/stream/env calls pending past their
 * deadline or signal, and every limiter slot comes back. The peer is a FAKE (an ssh2 Server that
 * ignores the requests on purpose): no real sshd can be made to leave an exec request unanswered
 * while keeping the connection alive.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SshChannel } from "../../src/channel/ssh-channel.js";
import { OperationAbortedError, OperationTimeoutError } from "../../src/errors.js";
import { SSHClient } from "../../src/ssh/client.js";
import type { SSHConnection } from "../../src/ssh/connection.js";
import { type HostileMode, type HostileServer, startHostileServer } from "../fixtures/hostile-sshd.js";

let fake: HostileServer;
beforeAll(async () => {
  fake = await startHostileServer("never-exec");
});
afterAll(async () => {
  await fake.close();
});

function clientOpts() {
  return {
    host: "127.0.0.1",
    port: fake.port,
    user: "anyone",
    password: "x",
    hostKey: { policy: "insecure" as const },
    keepaliveIntervalMs: 200,
  };
}

async function timed<T>(p: Promise<T>): Promise<{ error: unknown; ms: number }> {
  const t0 = performance.now();
  const error = await p.then(
    () => undefined,
    (e) => e,
  );
  return { error, ms: performance.now() - t0 };
}

/**
 * Every limiter slot comes back. An abandoned exec request may have started the command, so a
 * kill sweep (bounded at 5 s) runs for it and holds a slot until it ends too.
 */
async function slotsFree(conn: SSHConnection): Promise<number> {
  const until = performance.now() + 7000;
  while (conn.channelsInFlight !== 0 && performance.now() < until)
    await new Promise((r) => setTimeout(r, 50));
  return conn.channelsInFlight;
}

describe.each<HostileMode>(["never-exec", "never-open"])("a server that %s", (mode) => {
  beforeAll(() => {
    fake.mode = mode;
  });

  it("run, exec, streamExec, listEnv and setEnv end at their deadline or signal", async () => {
    await using client = new SSHClient(clientOpts());
    const conn = await client.connection();
    const opensBefore = fake.opens;
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 300);
    const env = new SshChannel(client, "/tmp/never-written");
    const stream = conn.streamExec("true", { timeoutMs: 700 });
    const [run, exec, streamed, list, set] = await Promise.all([
      timed(client.run("true", { timeoutMs: 1000 })),
      timed(conn.exec("true", { signal: ac.signal, timeoutMs: 60_000 })),
      timed(
        (async () => {
          for await (const _ of stream) {
            /* nothing arrives */
          }
        })(),
      ),
      timed(env.listEnv({ timeoutMs: 700 })),
      timed(env.setEnv({ K: "v" }, { timeoutMs: 700 })),
    ]);
    expect(run.error).toBeInstanceOf(OperationTimeoutError);
    expect(run.ms).toBeGreaterThanOrEqual(950);
    expect(run.ms).toBeLessThan(2500);
    expect((run.error as OperationTimeoutError).partial).toMatchObject({ exitCode: null, stdout: "" });
    expect(exec.error).toBeInstanceOf(OperationAbortedError);
    expect(exec.ms).toBeLessThan(2000);
    expect(streamed.error).toBeInstanceOf(OperationTimeoutError);
    expect(streamed.ms).toBeLessThan(2000);
    expect(list.error).toBeInstanceOf(OperationTimeoutError);
    expect(list.ms).toBeLessThan(2000);
    // setEnv reads first: that read is what hangs, and the call still ends on time.
    expect(set.error).toBeInstanceOf(OperationTimeoutError);
    expect(set.ms).toBeLessThan(2000);
    expect(fake.opens - opensBefore).toBeGreaterThanOrEqual(5);
    // The connection itself is healthy (keepalives answered): it is still the same one.
    expect(client.connected).toBe(true);
    expect(await slotsFree(conn)).toBe(0);
  });

  it("more calls than the limiter's slots all end at their deadline, and every slot comes back", async () => {
    await using client = new SSHClient(clientOpts());
    const conn = await client.connection();
    const results = await Promise.all(
      Array.from({ length: 80 }, () => timed(client.run("true", { timeoutMs: 800 }))),
    );
    for (const r of results) {
      expect(r.error).toBeInstanceOf(OperationTimeoutError);
      expect(r.ms).toBeLessThan(2500);
    }
    expect(await slotsFree(conn)).toBe(0);
  });
});
