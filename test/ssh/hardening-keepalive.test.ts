/**
 * Keepalive is a property of every SSHConnection (and so of SSHClient and SSHSupervisor): on by
 * default, one mechanism (KeepaliveMonitor, never ssh2's timer), tunable from options or the
 * OpenSSH config file, unref'd, and gone after close().
 */
import { createHook } from "node:async_hooks";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { ConnectionLostError, ValidationError } from "../../src/errors.js";
import { SSHClient } from "../../src/ssh/client.js";
import { SSHConnection } from "../../src/ssh/connection.js";
import { EventCollector } from "../../src/ssh/events.js";
import { DEFAULT_KEEPALIVE } from "../../src/ssh/keepalive.js";
import { FaultProxy } from "../fixtures/fault-proxy.js";
import { leakedResources, resourceBaseline, useSshd } from "../fixtures/vitest-sshd.js";
import { sshdOptions, until } from "./resilience-helpers.js";

const sshd = useSshd();

type TimerInternals = NodeJS.Timeout & { _idleTimeout: number; _destroyed: boolean };

/** Every Timeout created while enabled, ref'd or not; `pending()` lists those not yet fired or cleared. */
function trackTimeouts() {
  const all: TimerInternals[] = [];
  const hook = createHook({
    init(_id, type, _trigger, resource) {
      if (type === "Timeout") all.push(resource as TimerInternals);
    },
  }).enable();
  return { pending: () => all.filter((t) => !t._destroyed), stop: () => hook.disable() };
}

function ssh2Interval(conn: SSHConnection): unknown {
  return (conn.client as unknown as { config: { keepaliveInterval?: number } }).config.keepaliveInterval;
}

describe("keepalive on every SSHConnection", () => {
  it("is on by default (15 s x 3) through SSHConnection and SSHClient, off with false / 0", async () => {
    expect(DEFAULT_KEEPALIVE).toEqual({ intervalMs: 15_000, countMax: 3 });
    const conn = await SSHConnection.connect(sshdOptions(sshd()));
    try {
      expect(conn.keepaliveMonitor?.active).toBe(true);
      expect(conn.keepaliveMonitor?.config).toEqual({ intervalMs: 15_000, countMax: 3 });
      // One mechanism: ssh2's own keepalive timer stays off.
      expect(ssh2Interval(conn)).toBe(0);
    } finally {
      await conn.close();
    }
    expect(conn.keepaliveMonitor?.active).toBe(false);

    const off = await SSHConnection.connect({ ...sshdOptions(sshd()), keepalive: false });
    expect(off.keepaliveMonitor).toBeUndefined();
    await off.close();

    const tuned = await SSHConnection.connect({ ...sshdOptions(sshd()), keepalive: { countMax: 5 } });
    expect(tuned.keepaliveMonitor?.config).toEqual({ intervalMs: 15_000, countMax: 5 });
    await tuned.close();

    const o = sshdOptions(sshd());
    const base = {
      host: o.host,
      port: o.port,
      user: o.username,
      keyPath: sshd().clientKey.path,
      hostKey: o.hostKey,
    };
    const client = new SSHClient(base);
    expect((await client.connection()).keepaliveMonitor?.config).toEqual({ intervalMs: 15_000, countMax: 3 });
    await client.close();
    const quiet = new SSHClient({ ...base, keepaliveIntervalMs: 0 });
    expect((await quiet.connection()).keepaliveMonitor).toBeUndefined();
    await quiet.close();
    const fast = new SSHClient({ ...base, keepaliveIntervalMs: 2000, keepaliveCountMax: 2 });
    expect((await fast.connection()).keepaliveMonitor?.config).toEqual({ intervalMs: 2000, countMax: 2 });
    await fast.close();

    await expect(
      SSHConnection.connect({ ...sshdOptions(sshd()), keepalive: { intervalMs: -1 } }),
    ).rejects.toThrow(ValidationError);
  });

  it("takes ServerAliveInterval/CountMax from the config file (0 turns it off)", async () => {
    const dir = await mkdtemp(join(tmpdir(), "smolvm-ka-"));
    try {
      const cfg = join(dir, "config");
      await writeFile(cfg, "Host *\n  ServerAliveInterval 2\n  ServerAliveCountMax 4\n");
      const conn = await SSHConnection.connect({ ...sshdOptions(sshd()), sshConfig: cfg });
      expect(conn.keepaliveMonitor?.config).toEqual({ intervalMs: 2000, countMax: 4 });
      expect(ssh2Interval(conn)).toBe(0);
      await conn.close();

      await writeFile(cfg, "Host *\n  ServerAliveInterval 0\n");
      const off = await SSHConnection.connect({ ...sshdOptions(sshd()), sshConfig: cfg });
      expect(off.keepaliveMonitor).toBeUndefined();
      await off.close();

      // Explicit options win over the file, as on OpenSSH's command line.
      await writeFile(cfg, "Host *\n  ServerAliveInterval 2\n");
      const explicit = await SSHConnection.connect({
        ...sshdOptions(sshd()),
        sshConfig: cfg,
        keepalive: { intervalMs: 700, countMax: 2 },
      });
      expect(explicit.keepaliveMonitor?.config).toEqual({ intervalMs: 700, countMax: 2 });
      await explicit.close();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("closes a blackholed connection with ConnectionLostError within interval x count + 1 s", async () => {
    const proxy = await FaultProxy.start({ port: sshd().port });
    const events = new EventCollector();
    const keepalive = { intervalMs: 300, countMax: 3 };
    const conn = await SSHConnection.connect({ ...sshdOptions(sshd(), proxy.port), keepalive, events });
    try {
      await until(
        () => events.getByType("KEEPALIVE").some((e) => e.data.phase === "reply"),
        3000,
        "a keepalive reply",
      );
      expect(events.getByType("KEEPALIVE").some((e) => e.data.phase === "sent")).toBe(true);
      let closeReason: unknown;
      conn.onClose((r) => {
        closeReason = r;
      });
      const running = conn.exec("sleep 30", { timeoutMs: 60_000 }).catch((e) => e);
      const stream = conn.streamExec("sleep 30", { timeoutMs: 60_000 });
      const streamed = (async () => {
        try {
          for await (const _ of stream);
        } catch (e) {
          return e;
        }
      })();
      await new Promise((r) => setTimeout(r, 100));
      proxy.setMode({ kind: "blackhole" });
      const t0 = performance.now();
      const err = await running;
      const detectMs = performance.now() - t0;
      expect(err).toBeInstanceOf(ConnectionLostError);
      expect(detectMs).toBeLessThanOrEqual(keepalive.intervalMs * keepalive.countMax + 1000);
      expect(detectMs).toBeGreaterThanOrEqual(keepalive.intervalMs * (keepalive.countMax - 1));
      expect(await streamed).toBeInstanceOf(ConnectionLostError);
      expect(conn.alive).toBe(false);
      expect(closeReason).toBeInstanceOf(ConnectionLostError);
      expect((closeReason as ConnectionLostError).details).toMatchObject({
        reason: "keepalive_timeout",
        intervalMs: 300,
        countMax: 3,
      });
      const timeout = events.getByType("KEEPALIVE").filter((e) => e.data.phase === "timeout");
      expect(timeout).toHaveLength(1);
      expect(timeout[0]!.data).toMatchObject({ intervalMs: 300, countMax: 3 });
      const disconnect = events.getByType("DISCONNECT");
      expect(disconnect).toHaveLength(1);
      expect(disconnect[0]!.data.reason).toBe("keepalive_timeout");
      expect(disconnect[0]!.seq).toBeGreaterThan(timeout[0]!.seq);
      expect(conn.keepaliveMonitor?.active).toBe(false);
    } finally {
      await conn.close();
      await proxy.close();
    }
  });

  it("SSHClient: a blackholed link fails the running command, the next run reconnects", async () => {
    const proxy = await FaultProxy.start({ port: sshd().port });
    const o = sshdOptions(sshd(), proxy.port);
    const client = new SSHClient({
      host: o.host,
      port: o.port,
      user: o.username,
      keyPath: sshd().clientKey.path,
      hostKey: o.hostKey,
      connectTimeoutMs: 3000,
      keepaliveIntervalMs: 250,
      keepaliveCountMax: 2,
    });
    try {
      expect((await client.run("echo one")).stdout).toBe("one\n");
      const running = client.run("sleep 30", { timeoutMs: 60_000 }).catch((e) => e);
      await new Promise((r) => setTimeout(r, 100));
      proxy.setMode({ kind: "blackhole" });
      const t0 = performance.now();
      expect(await running).toBeInstanceOf(ConnectionLostError);
      expect(performance.now() - t0).toBeLessThanOrEqual(250 * 2 + 1000);
      expect(client.connected).toBe(false);
      proxy.setMode({ kind: "pass" });
      expect((await client.run("echo two")).stdout).toBe("two\n");
      expect(proxy.accepted).toBe(2);
    } finally {
      await client.close();
      await proxy.close();
    }
  });

  it("timers are unref'd and cleared on close: no handles survive", async () => {
    const baseline = resourceBaseline();
    const timers = trackTimeouts();
    try {
      const events = new EventCollector();
      const conn = await SSHConnection.connect({
        ...sshdOptions(sshd()),
        keepalive: { intervalMs: 137, countMax: 3 },
        events,
      });
      await until(
        () => events.getByType("KEEPALIVE").filter((e) => e.data.phase === "reply").length >= 2,
        3000,
        "two keepalive replies",
      );
      const keepaliveTimers = timers.pending().filter((t) => t._idleTimeout <= 137);
      expect(keepaliveTimers.length).toBe(1);
      // Unref'd: the keepalive alone never keeps the process alive.
      expect(keepaliveTimers[0]!.hasRef()).toBe(false);
      await conn.close();
      await conn.close();
      const eventsAtClose = events.events.length;
      // Cleared by close() itself, not left to expire (a live monitor would tick every 137 ms).
      expect(timers.pending().map((t) => t._idleTimeout)).toEqual([]);
      await new Promise((r) => setTimeout(r, 600));
      expect(events.events.slice(eventsAtClose).map((e) => e.type)).toEqual([]);
      expect(await leakedResources(baseline, 2000)).toEqual([]);
    } finally {
      timers.stop();
    }
  });
});
