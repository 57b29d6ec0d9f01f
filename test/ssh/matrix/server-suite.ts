/**
 * The semantic tests every SSH server in the matrix runs (test/fixtures/ssh-servers.ts): one
 * server per test file, shared through beforeAll. Where a server lacks a feature the test asserts
 * what we document for it (README "SSH server compatibility") instead of skipping.
 */
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import {
  AuthFailedError,
  ConnectionLostError,
  HostKeyMismatchError,
  OperationTimeoutError,
  SSHConnectionError,
} from "../../../src/errors.js";
import { SSHClient, type SSHClientOptions } from "../../../src/ssh/client.js";
import type { ConnectOptions } from "../../../src/ssh/connect-options.js";
import { SSHConnection } from "../../../src/ssh/connection.js";
import { EventCollector } from "../../../src/ssh/events.js";
import { forwardDynamic, forwardLocal, forwardRemote } from "../../../src/ssh/forward.js";
import { socks5Connect } from "../../../src/ssh/socks.js";
import { type MatrixServer, type ServerKind, startServer } from "../../fixtures/ssh-servers.js";
import { freePort } from "../../fixtures/sshd.js";
import { echoServer, echoThrough, sha256 } from "../resilience-helpers.js";

const run = promisify(execFile);

/** Test user processes whose command line contains `needle`. */
async function remoteProcs(needle: string): Promise<string> {
  return run("pgrep", ["-af", "-u", "smolvm-test", needle]).then(
    (r) => r.stdout.trim(),
    () => "",
  );
}

async function gone(needle: string, ms: number): Promise<string> {
  const until = performance.now() + ms;
  let left = await remoteProcs(needle);
  while (left && performance.now() < until) {
    await new Promise((r) => setTimeout(r, 100));
    left = await remoteProcs(needle);
  }
  return left;
}

export function serverSuite(kind: ServerKind): void {
  let server: MatrixServer;
  let client: SSHClient;
  let dir: string;

  const clientOptions = (extra: Partial<SSHClientOptions> = {}): SSHClientOptions => ({
    host: server.host,
    port: server.port,
    user: server.user,
    keyPath: server.clientKey.path,
    hostKey: { knownHostsPath: server.knownHostsPath },
    ...extra,
  });
  const connectOptions = (extra: Partial<ConnectOptions> = {}): ConnectOptions => ({
    host: server.host,
    port: server.port,
    username: server.user,
    auth: { method: "privateKey", keyPath: server.clientKey.path },
    hostKey: { knownHostsPath: server.knownHostsPath },
    ...extra,
  });

  beforeAll(async () => {
    server = await startServer(kind);
    client = new SSHClient(clientOptions());
    dir = await mkdtemp(join(tmpdir(), `smolvm-matrix-${kind}-`));
  });
  afterAll(async () => {
    await client?.close();
    await server?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });
  afterEach((ctx) => {
    if (ctx.task.result?.state === "fail" && server) {
      console.error(`--- ${kind} log tail ---\n${server.logTail(30)}\n---`);
    }
  });

  describe(`${kind}`, () => {
    it("reports exit codes, stdout and stderr; env and cwd reach the command", async () => {
      const r = await client.run("echo out; echo err >&2; exit 7");
      expect(r).toMatchObject({ exitCode: 7, stdout: "out\n", stderr: "err\n", ok: false });
      expect((await client.run("true")).ok).toBe(true);
      const e = await client.run('printf %s "$FOO"; pwd', { env: { FOO: "a b'c\"$x" }, cwd: "/tmp" });
      expect(e.stdout).toBe("a b'c\"$x/tmp\n");
    });

    it("carries stdin and stdout byte-exactly", async () => {
      const all = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
      const blob = Buffer.concat([all, randomBytes(512 * 1024), all]);
      const r = await client.run("cat", { stdin: blob, encoding: "buffer" });
      expect(r.exitCode).toBe(0);
      expect(r.stdout.length).toBe(blob.length);
      expect(sha256(r.stdout)).toBe(sha256(blob));
    });

    it("keeps each stream in order, and stdout/stderr in the order they were written", async () => {
      const r = await client.run("i=1; while [ $i -le 300 ]; do echo o$i; echo e$i >&2; i=$((i+1)); done");
      const want = (p: string) => Array.from({ length: 300 }, (_, i) => `${p}${i + 1}\n`).join("");
      expect(r.stdout).toBe(want("o"));
      expect(r.stderr).toBe(want("e"));
      const conn = await client.connection();
      const order: string[] = [];
      for await (const ev of conn.streamExec("echo a; sleep 0.3; echo b >&2; sleep 0.3; echo c")) {
        if (ev.stream === "exit") order.push(`exit:${ev.exitCode}`);
        else order.push(`${ev.stream}:${ev.data.toString().trim()}`);
      }
      expect(order).toEqual(["stdout:a", "stderr:b", "stdout:c", "exit:0"]);
    });

    it("a timeout kills the remote command and its background children, with the partial output", async () => {
      const tag = `${Math.floor(Math.random() * 1e6)}`;
      const err = await client
        .run(`echo partial; sleep 38.${tag} & sleep 37.${tag}; wait`, { timeoutMs: 1500 })
        .catch((e) => e);
      expect(err).toBeInstanceOf(OperationTimeoutError);
      expect(err.partial.stdout).toBe("partial\n");
      expect(await gone(`sleep 3[78].${tag}`, 6000)).toBe("");
      // The client is still usable afterwards.
      expect((await client.run("echo ok")).stdout).toBe("ok\n");
    });

    it("runs 200 concurrent commands with correct outputs", async () => {
      const rs = await Promise.all(
        Array.from({ length: 200 }, (_, i) => client.run(`echo ${i}`, { timeoutMs: 60_000 })),
      );
      rs.forEach((r, i) => {
        expect(r.exitCode).toBe(0);
        expect(r.stdout).toBe(`${i}\n`);
      });
    });

    it("reconnects after the server restarts", async () => {
      expect((await client.run("echo before")).stdout).toBe("before\n");
      await server.restart();
      expect((await client.run("echo after", { timeoutMs: 20_000 })).stdout).toBe("after\n");
    });

    it("a connection lost under load: unstarted calls run on a new one, started ones fail and never run twice", async () => {
      const log = `/tmp/smolvm-matrix-${kind}-${process.pid}-load.txt`;
      await client.run(`rm -f ${log}`);
      // More calls than run at once (the server's or our limiter's limit), so some wait.
      const n = Math.min(server.features.concurrentSessions, 64) + 8;
      const settled = Promise.allSettled(
        Array.from({ length: n }, (_, i) =>
          client.run(`echo ${i} >> ${log}; sleep 0.4; echo done${i}`, { timeoutMs: 60_000 }),
        ),
      );
      // Restart once the first commands are running (their lines are in the log; the server
      // runs on this host, so its /tmp is ours).
      const until = performance.now() + 10_000;
      while (!existsSync(log) && performance.now() < until) await new Promise((r) => setTimeout(r, 10));
      await server.restart();
      const rs = await settled;
      const ran = (await readFile(log, "utf8")).split("\n").filter(Boolean);
      await rm(log, { force: true });
      const counts = new Map<string, number>();
      for (const i of ran) counts.set(i, (counts.get(i) ?? 0) + 1);
      let ok = 0;
      let lost = 0;
      rs.forEach((r, i) => {
        // Never re-run: each command's line is in the log at most once.
        expect(counts.get(String(i)) ?? 0).toBeLessThanOrEqual(1);
        if (r.status === "fulfilled") {
          ok++;
          expect(r.value.stdout).toBe(`done${i}\n`);
          expect(counts.get(String(i))).toBe(1);
        } else {
          lost++;
          expect(r.reason).toBeInstanceOf(ConnectionLostError);
          expect(r.reason.details.commandStarted).toBe(true);
        }
      });
      expect(lost).toBeGreaterThanOrEqual(1);
      expect(ok).toBeGreaterThanOrEqual(1);
      expect(ok + lost).toBe(n);
    });

    it("pins the host key: the right fingerprint connects, a wrong one or a wrong known_hosts is refused", async () => {
      const pinned = new SSHClient(clientOptions({ hostKey: { fingerprint: server.hostKeyFingerprint } }));
      try {
        expect((await pinned.run("echo pinned")).stdout).toBe("pinned\n");
      } finally {
        await pinned.close();
      }
      const wrong = new SSHClient(
        clientOptions({ hostKey: { fingerprint: "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" } }),
      );
      await expect(wrong.run("true")).rejects.toBeInstanceOf(HostKeyMismatchError);
      await wrong.close();
      const kh = join(dir, "known_hosts_wrong");
      await writeFile(
        kh,
        `[${server.host}]:${server.port} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n`,
      );
      const stale = new SSHClient(clientOptions({ hostKey: { knownHostsPath: kh } }));
      await expect(stale.run("true")).rejects.toBeInstanceOf(HostKeyMismatchError);
      await stale.close();
    });

    it("authenticates with the methods the server offers, and fails typed otherwise", async () => {
      const pw = new SSHClient(clientOptions({ keyPath: undefined, password: server.password }));
      try {
        if (server.features.password) expect((await pw.run("echo pw")).stdout).toBe("pw\n");
        else await expect(pw.run("true")).rejects.toBeInstanceOf(AuthFailedError);
      } finally {
        await pw.close();
      }
      const bad = new SSHClient(clientOptions({ keyPath: undefined, password: "not-the-password" }));
      await expect(bad.run("true")).rejects.toBeInstanceOf(AuthFailedError);
      await bad.close();
    });

    it("keeps the connection through keepalives while a command runs (TCP keepalive where unanswered)", async () => {
      const events = new EventCollector();
      const c = new SSHClient(clientOptions({ keepaliveIntervalMs: 100, keepaliveCountMax: 3, events }));
      try {
        const r = await c.run("sleep 1.2; echo alive");
        expect(r.stdout).toBe("alive\n");
      } finally {
        await c.close();
      }
      const phases = events.getByType("KEEPALIVE").map((e) => e.data.phase);
      if (server.features.keepaliveReplies) {
        expect(phases.filter((p) => p === "sent").length).toBeGreaterThanOrEqual(5);
        expect(phases).not.toContain("tcp_fallback");
      } else {
        expect(phases).toContain("tcp_fallback");
        expect(phases).not.toContain("sent");
      }
    });

    it("-L forwards where the server allows it, else the forwarded socket closes and the refusal is reported", async () => {
      const echo = await echoServer();
      const events = new EventCollector();
      const conn = await SSHConnection.connect(connectOptions());
      try {
        const fwd = await forwardLocal(
          conn,
          { remoteHost: "127.0.0.1", remotePort: echo.port },
          { events, channelOpenTimeoutMs: 3000 },
        );
        const payload = randomBytes(256 * 1024);
        if (server.features.localForward) {
          expect(sha256(await echoThrough(fwd.localPort, payload))).toBe(sha256(payload));
        } else {
          await expect(echoThrough(fwd.localPort, payload, 5000)).rejects.toThrow(
            /closed after 0\/|ECONNRESET/,
          );
          expect(events.getByType("FORWARD").some((e) => e.data.action === "channel_error")).toBe(true);
        }
        await fwd.close();
      } finally {
        await conn.close();
        await echo.close();
      }
    });

    it("-D forwards through SOCKS5 where the server allows direct-tcpip, else the SOCKS reply says so", async () => {
      const echo = await echoServer();
      const conn = await SSHConnection.connect(connectOptions());
      try {
        const socks = await forwardDynamic(conn, {}, { channelOpenTimeoutMs: 3000 });
        const attempt = socks5Connect({
          proxyHost: "127.0.0.1",
          proxyPort: socks.localPort,
          host: "127.0.0.1",
          port: echo.port,
          timeoutMs: 5000,
        });
        if (server.features.localForward) {
          const s = await attempt;
          const got = await new Promise<string>((resolve) => {
            s.once("data", (d: Buffer) => resolve(d.toString()));
            s.resume();
            s.write("socks-hello");
          });
          expect(got).toBe("socks-hello");
          s.destroy();
        } else {
          await expect(attempt).rejects.toThrow();
        }
        await socks.close();
      } finally {
        await conn.close();
        await echo.close();
      }
    });

    it("-R forwards where the server allows it, else it fails with SSHConnectionError", async () => {
      const echo = await echoServer();
      const conn = await SSHConnection.connect(connectOptions());
      try {
        const rev = forwardRemote(
          conn,
          { remotePort: 0, localHost: "127.0.0.1", localPort: echo.port },
          { channelOpenTimeoutMs: 3000 },
        );
        if (server.features.remoteForward) {
          const h = await rev;
          expect(h.remotePort).toBeGreaterThan(0);
          const payload = randomBytes(64 * 1024);
          if (server.features.remoteForwardPortZero) {
            expect(sha256(await echoThrough(h.remotePort, payload))).toBe(sha256(payload));
          } else {
            // asyncssh binds a port for a port-0 request but never forwards its connections: it
            // closes each one, with a reset when our unsent bytes are still in its socket.
            await expect(echoThrough(h.remotePort, payload, 5000)).rejects.toThrow(
              /closed after 0\/|ECONNRESET|EPIPE/,
            );
          }
          await h.close();
          // An explicit port is forwarded by every server that allows -R.
          const fixed = await forwardRemote(
            conn,
            { remotePort: await freePort(), localHost: "127.0.0.1", localPort: echo.port },
            { channelOpenTimeoutMs: 3000 },
          );
          expect(sha256(await echoThrough(fixed.remotePort, payload))).toBe(sha256(payload));
          await fixed.close();
        } else {
          await expect(rev).rejects.toBeInstanceOf(SSHConnectionError);
        }
      } finally {
        await conn.close();
        await echo.close();
      }
    });

    it("transfers files over SFTP byte-exactly (a connection per session where the server needs it)", async () => {
      const src = join(dir, "up.bin");
      const back = join(dir, "down.bin");
      const blob = randomBytes(1024 * 1024 + 7);
      await writeFile(src, blob);
      const remote = `/tmp/smolvm-matrix-${kind}-${process.pid}.bin`;
      // client.connection() hands out a connection that can still open a session.
      await (await client.connection()).putFile(src, remote);
      await (await client.connection()).getFile(remote, back);
      expect(sha256(await readFile(back))).toBe(sha256(blob));
      await client.run(`rm -f ${remote}`);
      if (server.features.sessionsPerConnection === 1) {
        // Asking one of its connections for a second session is refused before anything is sent.
        const conn = await SSHConnection.connect(connectOptions());
        try {
          await conn.putFile(src, remote);
          const err = await conn.getFile(remote, back).catch((e) => e);
          expect(err).toBeInstanceOf(ConnectionLostError);
          expect(err.details).toMatchObject({ commandStarted: false, reason: "sessions_per_connection" });
        } finally {
          await conn.close();
        }
        await client.run(`rm -f ${remote}`);
      }
    });
  });
}
