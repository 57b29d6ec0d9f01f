import { execFile } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import http from "node:http";
import net from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SSHConnection } from "../../src/ssh/connection.js";
import { EventCollector } from "../../src/ssh/events.js";
import { forwardLocal } from "../../src/ssh/forward.js";
import { RetryPolicy } from "../../src/ssh/retry.js";
import { SocksReplyError, socks5Connect } from "../../src/ssh/socks.js";
import { SocksReply } from "../../src/ssh/socks-codec.js";
import { SSHSupervisor } from "../../src/ssh/supervisor.js";
import { FaultProxy } from "../fixtures/fault-proxy.js";
import { freePort } from "../fixtures/sshd.js";
import { leakedResources, resourceBaseline, useSshd } from "../fixtures/vitest-sshd.js";
import { echoServer, echoThrough, sha256, sshdOptions, until } from "./resilience-helpers.js";

const sshd = useSshd();

/** Serves `size` random bytes to each connection and remembers their sha256. */
async function blobServer(size: number) {
  const blob = randomBytes(size);
  const srv = net.createServer((s) => {
    s.on("error", () => {});
    s.end(blob);
  });
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  return {
    port: (srv.address() as net.AddressInfo).port,
    hash: sha256(blob),
    close: () => new Promise<void>((r) => srv.close(() => r())),
  };
}

function download(port: number): Promise<{ hash: string; bytes: number }> {
  return new Promise((resolve, reject) => {
    const h = createHash("sha256");
    let bytes = 0;
    const s = net.connect({ host: "127.0.0.1", port });
    s.on("data", (d: Buffer) => {
      h.update(d);
      bytes += d.length;
    });
    s.on("end", () => resolve({ hash: h.digest("hex"), bytes }));
    s.on("error", reject);
  });
}

function curl(args: string[]): Promise<{ code: number; stdout: string }> {
  return new Promise((resolve) =>
    execFile("curl", ["-sS", "--max-time", "20", ...args], { maxBuffer: 1 << 24 }, (err, stdout) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? -1) : 0, stdout }),
    ),
  );
}

let sup: SSHSupervisor;
let events: EventCollector;
beforeAll(async () => {
  events = new EventCollector();
  sup = await SSHSupervisor.start({ ...sshdOptions(sshd()), events });
  expect(await sup.waitConnected(10_000)).toBe(true);
});
afterAll(async () => {
  await sup?.close();
});

describe("port forwarding through the supervisor", () => {
  it("-L moves 64 MiB intact (sha256) and reports FORWARD events", async () => {
    const blob = await blobServer(64 * 1024 * 1024);
    const fwd = await sup.forwardLocal({ localPort: 0, remoteHost: "127.0.0.1", remotePort: blob.port });
    try {
      expect(fwd.localPort).toBeGreaterThan(0);
      expect(fwd.active).toBe(true);
      const got = await download(fwd.localPort);
      expect(got.bytes).toBe(64 * 1024 * 1024);
      expect(got.hash).toBe(blob.hash);
      // Upload direction too, through the echo of a second target.
      const echo = await echoServer();
      const fwd2 = await sup.forwardLocal({ remoteHost: "127.0.0.1", remotePort: echo.port });
      const up = randomBytes(4 * 1024 * 1024);
      expect(sha256(await echoThrough(fwd2.localPort, up))).toBe(sha256(up));
      await fwd2.close();
      await echo.close();
    } finally {
      await fwd.close();
      await fwd.close();
      await blob.close();
    }
    expect(fwd.active).toBe(false);
    const fe = events.getByType("FORWARD").filter((e) => e.data.id === fwd.intent.id);
    expect(fe.map((e) => e.data.action)).toEqual(["open", "close"]);
    expect(fe[0]!.data).toMatchObject({ kind: "local", localPort: fwd.localPort });
  });

  it("-D serves curl --socks5-hostname to a local HTTP server, with optional auth", async () => {
    const body = randomBytes(200_000).toString("base64");
    const web = http.createServer((_q, res) => res.end(body));
    await new Promise<void>((r) => web.listen(0, "127.0.0.1", r));
    const webPort = (web.address() as net.AddressInfo).port;
    const socks = await sup.forwardDynamic({ localPort: 0 });
    const authed = await sup.forwardDynamic({ auth: { username: "u", password: "pw-123" } });
    try {
      expect(socks.localHost).toBe("127.0.0.1");
      const r = await curl([
        "--socks5-hostname",
        `127.0.0.1:${socks.localPort}`,
        `http://localhost:${webPort}/`,
      ]);
      expect(r).toEqual({ code: 0, stdout: body });
      const r4 = await curl(["--socks5", `127.0.0.1:${socks.localPort}`, `http://127.0.0.1:${webPort}/x`]);
      expect(r4.stdout).toBe(body);
      const a = await curl([
        "--socks5-hostname",
        `u:pw-123@127.0.0.1:${authed.localPort}`,
        `http://localhost:${webPort}/`,
      ]);
      expect(a).toEqual({ code: 0, stdout: body });
      const bad = await curl([
        "--socks5-hostname",
        `u:wrong@127.0.0.1:${authed.localPort}`,
        `http://localhost:${webPort}/`,
      ]);
      expect(bad.code).not.toBe(0);
      // The SSH channel open fails (nothing listens there): reply "connection refused", not success.
      const dead = await freePort();
      const err = await socks5Connect({ proxyPort: socks.localPort, host: "127.0.0.1", port: dead }).catch(
        (e) => e,
      );
      expect(err).toBeInstanceOf(SocksReplyError);
      expect(err.reply).toBe(SocksReply.CONNECTION_REFUSED);
    } finally {
      await socks.close();
      await authed.close();
      await new Promise<void>((r) => web.close(() => r()));
    }
  });

  it("-R round trip: the server's loopback listener reaches our local echo server", async () => {
    const echo = await echoServer();
    const rev = await sup.forwardRemote({ remotePort: 0, localHost: "127.0.0.1", localPort: echo.port });
    try {
      expect(rev.remotePort).toBeGreaterThan(0);
      expect(rev.remoteHost).toBe("127.0.0.1");
      expect(rev.active).toBe(true);
      // The sshd runs on this host, so its loopback is ours: connect to the port sshd bound.
      const payload = randomBytes(2 * 1024 * 1024);
      expect(sha256(await echoThrough(rev.remotePort, payload))).toBe(sha256(payload));
      // And from a command on the server side.
      const r = await sup.exec(
        `bash -c 'exec 3<>/dev/tcp/127.0.0.1/${rev.remotePort}; echo ping >&3; head -n1 <&3'`,
        { shell: "raw" },
      );
      expect([r.stdout, r.exitCode]).toEqual(["ping\n", 0]);
    } finally {
      await rev.close();
      await echo.close();
    }
    // After close the server no longer listens there.
    await expect(echoThrough(rev.remotePort, Buffer.from("x"), 2000)).rejects.toThrow();
  });

  it("a single-connection forward ends with its connection", async () => {
    const baseline = resourceBaseline();
    const echo = await echoServer();
    const conn = await SSHConnection.connect(sshdOptions(sshd()));
    const fwd = await forwardLocal(conn, { remoteHost: "127.0.0.1", remotePort: echo.port });
    expect((await echoThrough(fwd.localPort, Buffer.from("hello"))).toString()).toBe("hello");
    await conn.close();
    await until(() => fwd.isClosed, 2000, "forward closed with its connection");
    expect(fwd.active).toBe(false);
    await echo.close();
    expect(await leakedResources(baseline, 2000)).toEqual([]);
  });
});

describe("forward replay", () => {
  it("replays open forwards on the same ports after a reconnect and never replays closed ones", async () => {
    const proxy = await FaultProxy.start({ port: sshd().port });
    const ev = new EventCollector();
    const s = await SSHSupervisor.start({
      ...sshdOptions(sshd(), proxy.port),
      retryPolicy: new RetryPolicy({ baseDelayMs: 100 }),
      events: ev,
    });
    const echo = await echoServer();
    try {
      expect(await s.waitConnected(10_000)).toBe(true);
      const keep = await s.forwardLocal({ remoteHost: "127.0.0.1", remotePort: echo.port });
      const gone = await s.forwardLocal({ remoteHost: "127.0.0.1", remotePort: echo.port });
      const rev = await s.forwardRemote({ remotePort: 0, localPort: echo.port });
      const gonePort = gone.localPort;
      const revPort = rev.remotePort;
      await gone.close();
      expect(s.forwardManager.intents.map((i) => i.id)).toEqual([keep.intent.id, rev.intent.id]);
      proxy.cutAll();
      await until(() => s.reconnectionCount === 1 && s.isConnected, 10_000, "reconnect");
      await until(() => rev.active, 5000, "-R replayed");
      expect(keep.localPort).toBeGreaterThan(0);
      expect((await echoThrough(keep.localPort, Buffer.from("again"))).toString()).toBe("again");
      expect(rev.remotePort).toBe(revPort);
      expect((await echoThrough(rev.remotePort, Buffer.from("rev"))).toString()).toBe("rev");
      // The closed forward's port is not listening again.
      await expect(echoThrough(gonePort, Buffer.from("x"), 2000)).rejects.toThrow();
      const replayed = ev
        .getByType("FORWARD")
        .filter((e) => e.data.action === "replayed")
        .map((e) => e.data.id);
      expect(replayed.sort()).toEqual([keep.intent.id, rev.intent.id].sort());
      expect(replayed).not.toContain(gone.intent.id);
    } finally {
      await s.close();
      await echo.close();
      await proxy.close();
    }
  });
});
