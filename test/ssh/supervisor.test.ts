import { mkdtemp, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import {
  AuthFailedError,
  ConnectionLostError,
  ConnectionRefusedError,
  HostKeyMismatchError,
} from "../../src/errors.js";
import { createPasswordAuth } from "../../src/ssh/auth.js";
import { EventCollector, parseEventLog } from "../../src/ssh/events.js";
import { RetryPolicy } from "../../src/ssh/retry.js";
import { ConnectionState, SSHSupervisor } from "../../src/ssh/supervisor.js";
import { FaultProxy } from "../fixtures/fault-proxy.js";
import { freePort } from "../fixtures/sshd.js";
import { leakedResources, resourceBaseline, useSshd } from "../fixtures/vitest-sshd.js";
import { sshdOptions, states, until } from "./resilience-helpers.js";

const sshd = useSshd();

describe("SSHSupervisor", () => {
  it("connects, runs commands, reports states, and close() works twice leaving nothing behind", async () => {
    const baseline = resourceBaseline();
    const events = new EventCollector();
    const sup = await SSHSupervisor.start({ ...sshdOptions(sshd()), events });
    expect([ConnectionState.CONNECTING, ConnectionState.CONNECTED]).toContain(sup.state);
    expect(await sup.waitConnected(10_000)).toBe(true);
    expect(sup.state).toBe("CONNECTED");
    expect(sup.isConnected).toBe(true);
    const r = await sup.exec("echo hello; echo err >&2; exit 3");
    expect([r.stdout, r.stderr, r.exitCode]).toEqual(["hello\n", "err\n", 3]);
    expect(sup.reconnectionCount).toBe(0);
    await sup.close();
    await sup.close();
    expect(sup.state).toBe("CLOSED");
    expect(states(events.events)).toEqual(["CONNECTING", "CONNECTED", "CLOSED"]);
    expect(events.getByType("STATE_CHANGE")[0]!.data).toMatchObject({
      from: "DISCONNECTED",
      to: "CONNECTING",
    });
    expect(await leakedResources(baseline, 2000)).toEqual([]);
    await expect(sup.exec("true")).rejects.toThrow(/closed/);
  });

  it("wrong credentials go to FAILED at once, with no retry", async () => {
    const events = new EventCollector();
    const before = sshd().connectionCount();
    const t0 = performance.now();
    const sup = await SSHSupervisor.start({
      ...sshdOptions(sshd()),
      auth: createPasswordAuth("definitely-wrong"),
      retryPolicy: new RetryPolicy({ maxRetries: 5, baseDelayMs: 200 }),
      events,
    });
    expect(await sup.waitConnected(10_000)).toBe(false);
    expect(performance.now() - t0).toBeLessThan(5000);
    expect(sup.state).toBe("FAILED");
    expect(sup.lastError).toBeInstanceOf(AuthFailedError);
    // Exactly one TCP connection reached sshd: nothing was retried.
    await new Promise((r) => setTimeout(r, 300));
    expect(sshd().connectionCount() - before).toBe(1);
    expect(states(events.events)).toEqual(["CONNECTING", "FAILED"]);
    expect(events.getByType("STATE_CHANGE").at(-1)!.data).toMatchObject({
      failure: "permanent",
      attempts: 1,
    });
    await expect(sup.exec("true")).rejects.toThrow(/FAILED/);
    await sup.close();
    await sup.close();
    expect(sup.state).toBe("CLOSED");
  });

  it("retries transient failures with the policy's backoff, then FAILED", async () => {
    const port = await freePort(); // nothing listens: refused
    const events = new EventCollector();
    const t0 = performance.now();
    const sup = await SSHSupervisor.start({
      ...sshdOptions(sshd(), port),
      retryPolicy: new RetryPolicy({ maxRetries: 2, baseDelayMs: 150, jitter: false }),
      events,
    });
    expect(await sup.waitConnected(10_000)).toBe(false);
    const elapsed = performance.now() - t0;
    expect(sup.state).toBe("FAILED");
    expect(sup.lastError).toBeInstanceOf(ConnectionRefusedError);
    // 150 + 300 ms of backoff between three attempts.
    expect(elapsed).toBeGreaterThanOrEqual(440);
    expect(elapsed).toBeLessThan(3000);
    const retries = events.getByType("ERROR").filter((e) => e.data.phase === "connect");
    expect(retries.map((e) => e.data.retryInMs)).toEqual([150, 300]);
    expect(events.getByType("STATE_CHANGE").at(-1)!.data).toMatchObject({
      to: "FAILED",
      attempts: 3,
      failure: "transient",
    });
    await sup.close();
  });

  it("notices a drop on its own (no call in flight) and reconnects", async () => {
    const proxy = await FaultProxy.start({ port: sshd().port });
    const events = new EventCollector();
    const sup = await SSHSupervisor.start({
      ...sshdOptions(sshd(), proxy.port),
      retryPolicy: new RetryPolicy({ baseDelayMs: 100 }),
      events,
    });
    try {
      expect(await sup.waitConnected(10_000)).toBe(true);
      proxy.cutAll();
      // No exec here: the state machine alone must see the drop.
      await until(() => states(events.events).includes("RECONNECTING"), 3000, "RECONNECTING");
      await until(() => sup.isConnected && sup.reconnectionCount === 1, 10_000, "reconnect");
      expect(states(events.events)).toEqual(["CONNECTING", "CONNECTED", "RECONNECTING", "CONNECTED"]);
      expect(sup.lastDisconnectReason).toBeDefined();
      expect(events.getByType("DISCONNECT").length).toBeGreaterThanOrEqual(1);
      expect((await sup.exec("echo back")).stdout).toBe("back\n");
    } finally {
      await sup.close();
      await proxy.close();
    }
  });

  it("keepalive detects a blackholed link within interval x count + 1 s and emits KEEPALIVE events", async () => {
    const proxy = await FaultProxy.start({ port: sshd().port });
    const events = new EventCollector();
    const keepalive = { intervalMs: 400, countMax: 3 };
    const sup = await SSHSupervisor.start({
      ...sshdOptions(sshd(), proxy.port),
      connectTimeoutMs: 1500,
      keepalive,
      retryPolicy: new RetryPolicy({ baseDelayMs: 100, maxRetries: 50, maxDelayMs: 300 }),
      events,
    });
    try {
      expect(await sup.waitConnected(10_000)).toBe(true);
      await until(
        () => events.getByType("KEEPALIVE").some((e) => e.data.phase === "reply"),
        3000,
        "a keepalive reply",
      );
      const sent = events.getByType("KEEPALIVE").filter((e) => e.data.phase === "sent");
      expect(sent.length).toBeGreaterThanOrEqual(1);
      proxy.setMode({ kind: "blackhole" });
      const t0 = performance.now();
      await until(() => states(events.events).includes("RECONNECTING"), 10_000, "keepalive timeout");
      const detectMs = performance.now() - t0;
      expect(detectMs).toBeLessThanOrEqual(keepalive.intervalMs * keepalive.countMax + 1000);
      expect(detectMs).toBeGreaterThanOrEqual(keepalive.intervalMs * (keepalive.countMax - 1));
      const timeout = events.getByType("KEEPALIVE").find((e) => e.data.phase === "timeout");
      expect(timeout?.data).toMatchObject({ intervalMs: 400, countMax: 3 });
      expect(sup.lastDisconnectReason).toBe("keepalive_timeout");
      proxy.setMode({ kind: "pass" });
      await until(() => sup.isConnected, 10_000, "reconnect after the link heals");
      expect(sup.reconnectionCount).toBe(1);
    } finally {
      await sup.close();
      await proxy.close();
    }
  });

  it("never re-runs a command cut by a drop unless it is marked idempotent", async () => {
    const proxy = await FaultProxy.start({ port: sshd().port });
    const sup = await SSHSupervisor.start({
      ...sshdOptions(sshd(), proxy.port),
      retryPolicy: new RetryPolicy({ baseDelayMs: 100 }),
    });
    const file = `/tmp/smolvm-sup-${process.pid}-${Date.now()}`;
    try {
      expect(await sup.waitConnected(10_000)).toBe(true);
      const cut = setTimeout(() => proxy.cutAll(), 700);
      const err = await sup.exec(`echo run >> ${file}.a; sleep 2`, { timeoutMs: 15_000 }).catch((e) => e);
      clearTimeout(cut);
      expect(err).toBeInstanceOf(ConnectionLostError);
      await until(() => sup.isConnected, 10_000, "reconnect");
      await new Promise((r) => setTimeout(r, 2000)); // a re-run would have appended by now
      expect((await sup.exec(`cat ${file}.a`)).stdout).toBe("run\n");

      const cut2 = setTimeout(() => proxy.cutAll(), 700);
      const r = await sup.exec(`echo run >> ${file}.b; sleep 1.5; echo done`, {
        timeoutMs: 20_000,
        idempotent: true,
      });
      clearTimeout(cut2);
      expect(r.stdout).toBe("done\n");
      expect((await sup.exec(`cat ${file}.b`)).stdout).toBe("run\nrun\n");
      expect(sup.reconnectionCount).toBe(2);
    } finally {
      await sup.exec(`rm -f ${file}.a ${file}.b`).catch(() => {});
      await sup.close();
      await proxy.close();
    }
  });

  it("close() during RECONNECTING ends cleanly and leaves no timers or sockets", async () => {
    const baseline = resourceBaseline();
    const proxy = await FaultProxy.start({ port: sshd().port });
    const events = new EventCollector();
    const sup = await SSHSupervisor.start({
      ...sshdOptions(sshd(), proxy.port),
      retryPolicy: new RetryPolicy({ baseDelayMs: 5000, maxRetries: 10 }),
      events,
    });
    expect(await sup.waitConnected(10_000)).toBe(true);
    proxy.setMode({ kind: "drop" });
    proxy.cutAll();
    await until(() => sup.state === "RECONNECTING", 5000, "RECONNECTING");
    // Let the first attempt fail so the supervisor sits in its 5 s backoff.
    await until(
      () => events.getByType("ERROR").some((e) => e.data.phase === "reconnect"),
      5000,
      "a failed attempt",
    );
    const t0 = performance.now();
    await sup.close();
    expect(performance.now() - t0).toBeLessThan(1500);
    expect(sup.state).toBe("CLOSED");
    expect(await sup.waitConnected(100)).toBe(false);
    await proxy.close();
    expect(await leakedResources(baseline, 2000)).toEqual([]);
  });

  it("close() while the first connect is in flight ends cleanly", async () => {
    const baseline = resourceBaseline();
    const proxy = await FaultProxy.start({ port: sshd().port }, { kind: "blackhole" });
    const sup = await SSHSupervisor.start({ ...sshdOptions(sshd(), proxy.port), connectTimeoutMs: 20_000 });
    await new Promise((r) => setTimeout(r, 200));
    expect(sup.state).toBe("CONNECTING");
    const t0 = performance.now();
    await sup.close();
    expect(performance.now() - t0).toBeLessThan(1500);
    expect(sup.state).toBe("CLOSED");
    await proxy.close();
    expect(await leakedResources(baseline, 2000)).toEqual([]);
  });

  it("does not skip host-key checks by default: an unknown host key is a permanent failure", async () => {
    const { hostKey: _pinned, ...noHostKey } = sshdOptions(sshd());
    const sup = await SSHSupervisor.start({
      ...noHostKey,
      retryPolicy: new RetryPolicy({ baseDelayMs: 50 }),
    });
    expect(await sup.waitConnected(10_000)).toBe(false);
    expect(sup.state).toBe("FAILED");
    expect(sup.lastError).toBeInstanceOf(HostKeyMismatchError);
    expect((sup.lastError as HostKeyMismatchError).code).toBe("SSH_HOST_KEY_UNKNOWN");
    await sup.close();
  });

  it("the live event log (eventLogPath) never holds secrets, nested or in commands", async () => {
    const dir = await mkdtemp(join(tmpdir(), "smolvm-sup-log-"));
    try {
      const log = join(dir, "session.jsonl");
      const sup = await SSHSupervisor.start({
        ...sshdOptions(sshd()),
        auth: createPasswordAuth(sshd().password),
        eventLogPath: log,
      });
      expect(await sup.waitConnected(10_000)).toBe(true);
      await sup.exec("echo x # sshpass -p hunter2-cmd-secret ssh host");
      await sup.close();
      const text = await readFile(log, "utf8");
      const events = parseEventLog(text);
      expect(events.map((e) => e.type)).toEqual(
        expect.arrayContaining(["STATE_CHANGE", "CONNECT", "AUTH", "EXEC"]),
      );
      expect(events.every((e, i) => e.seq === i + 1 && e.v === 1 && typeof e.mono === "number")).toBe(true);
      expect(text).not.toContain(sshd().password);
      expect(text).not.toContain("hunter2-cmd-secret");
      expect((await stat(log)).mode & 0o777).toBe(0o600);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
