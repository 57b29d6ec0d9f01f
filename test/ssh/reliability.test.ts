import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { ConnectionLostError } from "../../src/errors.js";
import { EventCollector } from "../../src/ssh/events.js";
import { RetryPolicy } from "../../src/ssh/retry.js";
import { socks5Connect } from "../../src/ssh/socks.js";
import { SSHSupervisor } from "../../src/ssh/supervisor.js";
import { FaultProxy } from "../fixtures/fault-proxy.js";
import { leakedResources, resourceBaseline, useSshd } from "../fixtures/vitest-sshd.js";
import { echoServer, echoThrough, sha256, sshdOptions, states, until } from "./resilience-helpers.js";

const sshd = useSshd();

describe("reliability under real faults", () => {
  it("a drop in the middle of streamExec ends the stream with ConnectionLostError, then the next exec succeeds", async () => {
    const proxy = await FaultProxy.start({ port: sshd().port });
    const sup = await SSHSupervisor.start({
      ...sshdOptions(sshd(), proxy.port),
      retryPolicy: new RetryPolicy({ baseDelayMs: 100 }),
    });
    try {
      expect(await sup.waitConnected(10_000)).toBe(true);
      const stream = sup.streamExec(
        "i=0; while [ $i -lt 100 ]; do echo line$i; i=$((i+1)); sleep 0.05; done",
        {
          timeoutMs: 30_000,
        },
      );
      let lines = "";
      let exit: unknown;
      let error: unknown;
      const cut = setTimeout(() => proxy.cutAll(), 800);
      try {
        for await (const ev of stream) {
          if (ev.stream === "stdout") lines += ev.data.toString();
          if (ev.stream === "exit") exit = ev;
        }
      } catch (e) {
        error = e;
      }
      clearTimeout(cut);
      // Never a silent short output: no exit event, a typed error instead.
      expect(exit).toBeUndefined();
      expect(error).toBeInstanceOf(ConnectionLostError);
      expect(lines.length).toBeGreaterThan(0);
      expect(lines).not.toContain("line99");
      await until(() => sup.isConnected, 10_000, "reconnect");
      expect(sup.reconnectionCount).toBe(1);
      const r = await sup.exec("echo after");
      expect(r.stdout).toBe("after\n");
    } finally {
      await sup.close();
      await proxy.close();
    }
  });

  it("sshd killed and restarted: -L, -D and -R are replayed on the same ports and bytes flow again", async () => {
    const baseline = resourceBaseline();
    const events = new EventCollector();
    const echo = await echoServer();
    const sup = await SSHSupervisor.start({
      ...sshdOptions(sshd()),
      retryPolicy: new RetryPolicy({ baseDelayMs: 100, maxDelayMs: 400, maxRetries: 30 }),
      events,
    });
    try {
      expect(await sup.waitConnected(10_000)).toBe(true);
      const local = await sup.forwardLocal({ localPort: 0, remoteHost: "127.0.0.1", remotePort: echo.port });
      const dyn = await sup.forwardDynamic({ localPort: 0 });
      const rev = await sup.forwardRemote({ remotePort: 0, localHost: "127.0.0.1", localPort: echo.port });
      const ports = [local.localPort, dyn.localPort, rev.remotePort];
      const payload = randomBytes(1024 * 1024);
      expect(sha256(await echoThrough(local.localPort, payload))).toBe(sha256(payload));

      await sshd().stopProcess(); // kills sshd and every session it had
      await until(() => sup.state === "RECONNECTING", 5000, "RECONNECTING");
      expect(local.active).toBe(false);
      await new Promise((r) => setTimeout(r, 500)); // a few refused attempts
      await sshd().startAgain();
      await until(() => sup.isConnected && rev.active, 15_000, "reconnect and -R replay");

      expect([local.localPort, dyn.localPort, rev.remotePort]).toEqual(ports);
      expect(local.active && dyn.active && rev.active).toBe(true);
      expect(sha256(await echoThrough(local.localPort, payload))).toBe(sha256(payload));
      expect(sha256(await echoThrough(rev.remotePort, payload))).toBe(sha256(payload));
      const s = await socks5Connect({ proxyPort: dyn.localPort, host: "127.0.0.1", port: echo.port });
      const back = await new Promise<Buffer>((resolve) => {
        s.once("data", resolve);
        s.resume();
        s.write("via socks");
      });
      s.destroy();
      expect(back.toString()).toBe("via socks");
      expect(states(events.events)).toEqual(["CONNECTING", "CONNECTED", "RECONNECTING", "CONNECTED"]);
      expect(events.getByType("FORWARD").filter((e) => e.data.action === "replayed")).toHaveLength(3);
    } finally {
      if (!sshd().running) await sshd().startAgain();
      await sup.close();
      await echo.close();
    }
    // Forwards, keepalive timers, sockets and channels are all gone after close().
    expect(await leakedResources(baseline, 3000)).toEqual([]);
  });

  it("a command in flight while forwards carry traffic leaves nothing behind after close()", async () => {
    const baseline = resourceBaseline();
    const echo = await echoServer();
    const sup = await SSHSupervisor.start({
      ...sshdOptions(sshd()),
      keepalive: { intervalMs: 200, countMax: 3 },
    });
    expect(await sup.waitConnected(10_000)).toBe(true);
    const fwd = await sup.forwardLocal({ remoteHost: "127.0.0.1", remotePort: echo.port });
    const pending = echoThrough(fwd.localPort, randomBytes(64 * 1024 * 1024), 30_000).catch((e) => e);
    const running = sup.exec("sleep 30", { timeoutMs: 60_000 }).catch((e) => e);
    const stream = sup.streamExec("sleep 30", { timeoutMs: 60_000 });
    const drained = (async () => {
      try {
        for await (const _ of stream);
      } catch (e) {
        return e;
      }
    })();
    await new Promise((r) => setTimeout(r, 300));
    await sup.close();
    await Promise.all([pending, running, drained]);
    await echo.close();
    expect(await leakedResources(baseline, 3000)).toEqual([]);
  });
});
