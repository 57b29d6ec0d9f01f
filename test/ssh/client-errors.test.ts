import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  AuthFailedError,
  ConnectionRefusedError,
  ConnectionTimeoutError,
  HostKeyMismatchError,
  NoMutualKexError,
} from "../../src/errors.js";
import { SSHClient } from "../../src/ssh/client.js";
import { SSHConnection } from "../../src/ssh/connection.js";
import { FaultProxy } from "../fixtures/fault-proxy.js";
import { freePort } from "../fixtures/sshd.js";
import { useSshd } from "../fixtures/vitest-sshd.js";

const sshd = useSshd();

describe("SSHClient connection failures and recovery", () => {
  let proxy: FaultProxy;
  let tmp: string;
  beforeAll(async () => {
    proxy = await FaultProxy.start({ port: sshd().port });
    tmp = await fs.mkdtemp(path.join(os.tmpdir(), "smolvm-ssh-err-"));
  });
  afterAll(async () => {
    await proxy.close();
    await fs.rm(tmp, { recursive: true, force: true });
  });

  function client(extra: Partial<ConstructorParameters<typeof SSHClient>[0]> = {}): SSHClient {
    const f = sshd();
    return new SSHClient({
      host: f.host,
      port: f.port,
      user: f.user,
      keyPath: f.clientKey.path,
      hostKey: { knownHostsPath: f.knownHostsPath },
      ...extra,
    });
  }

  it("a closed port fails with ConnectionRefusedError in under 200 ms", async () => {
    const c = client({ port: await freePort() });
    const t0 = performance.now();
    const err = await c.run("true").catch((e) => e);
    expect(err).toBeInstanceOf(ConnectionRefusedError);
    expect(err.message).toContain("refused");
    expect(performance.now() - t0).toBeLessThan(200);
    await c.close();
  });

  it("a blackholed port fails with ConnectionTimeoutError at connectTimeoutMs", async () => {
    proxy.setMode({ kind: "blackhole" });
    const c = client({ port: proxy.port, connectTimeoutMs: 500, hostKey: { policy: "insecure" } });
    const t0 = performance.now();
    const err = await c.run("true").catch((e) => e);
    const took = performance.now() - t0;
    proxy.setMode({ kind: "pass" });
    expect(err).toBeInstanceOf(ConnectionTimeoutError);
    expect(took).toBeGreaterThanOrEqual(490);
    expect(took).toBeLessThan(900);
    await c.close();
  });

  it("a wrong password is AuthFailedError, fast, not a timeout", async () => {
    const c = client({ keyPath: undefined, password: "wrong-password", connectTimeoutMs: 5000 });
    const t0 = performance.now();
    const err = await c.run("true").catch((e) => e);
    expect(err).toBeInstanceOf(AuthFailedError);
    expect(err.message).not.toContain("wrong-password");
    expect(JSON.stringify(err.details)).not.toContain("wrong-password");
    expect(performance.now() - t0).toBeLessThan(3000);
    await c.close();
  });

  it("a changed host key is HostKeyMismatchError with both fingerprints; a pinned fingerprint wins", async () => {
    const f = sshd();
    const other = await f.makeClientKey("other_host_key");
    const kh = path.join(tmp, "known_hosts_changed");
    const [type, b64] = other.publicKey.split(" ");
    await fs.writeFile(kh, `[${f.host}]:${f.port} ${type} ${b64}\n`, { mode: 0o600 });
    const c = client({ hostKey: { knownHostsPath: kh } });
    const err = await c.run("true").catch((e) => e);
    expect(err).toBeInstanceOf(HostKeyMismatchError);
    expect(err.actualFingerprint).toBe(f.hostKeyFingerprints[0]);
    expect(err.expectedFingerprint).toMatch(/^SHA256:/);
    expect(err.expectedFingerprint).not.toBe(err.actualFingerprint);
    await c.close();
    const pinned = client({ hostKey: { knownHostsPath: kh, fingerprint: f.hostKeyFingerprints[0]! } });
    expect((await pinned.run("echo pinned")).stdout).toBe("pinned\n");
    await pinned.close();
  });

  it("no common key exchange is NoMutualKexError naming both lists", async () => {
    const f = sshd();
    const err = await SSHConnection.connect({
      host: f.host,
      port: f.port,
      username: f.user,
      auth: { method: "privateKey", keyPath: f.clientKey.path },
      hostKey: { knownHostsPath: f.knownHostsPath },
      algorithms: { kex: ["diffie-hellman-group1-sha1"] },
    }).catch((e) => e);
    expect(err).toBeInstanceOf(NoMutualKexError);
    expect(err.ours).toEqual(["diffie-hellman-group1-sha1"]);
    expect(err.theirs).toContain("curve25519-sha256");
  });

  it("reconnects transparently after the server restarts, and after the network drops", async () => {
    const f = sshd();
    const c = client();
    expect((await c.run("echo one")).stdout).toBe("one\n");
    await f.restart();
    await new Promise((r) => setTimeout(r, 50));
    expect(c.connected).toBe(false);
    expect((await c.run("echo two")).stdout).toBe("two\n");
    expect(c.connected).toBe(true);
    await c.close();

    const viaProxy = client({ port: proxy.port, hostKey: { fingerprint: f.hostKeyFingerprints[0]! } });
    expect((await viaProxy.run("echo three")).stdout).toBe("three\n");
    proxy.cutAll();
    await new Promise((r) => setTimeout(r, 50));
    expect((await viaProxy.run("echo four")).stdout).toBe("four\n");
    await viaProxy.close();
  });

  it("waitForSsh returns within 300 ms of sshd becoming ready and keeps that connection", async () => {
    const f = sshd();
    await f.stopProcess();
    const c = client();
    const before = f.connectionCount();
    const waiting = c.waitForSsh({ timeoutMs: 10_000 });
    await new Promise((r) => setTimeout(r, 400));
    const t0 = performance.now();
    await f.startAgain();
    const readyAt = performance.now();
    await waiting;
    expect(performance.now() - readyAt).toBeLessThan(300);
    expect(performance.now() - t0).toBeGreaterThan(0);
    expect(c.connected).toBe(true);
    const probes = f.connectionCount() - before;
    await c.run("true");
    expect(f.connectionCount() - before).toBe(probes);
    await c.close();
    const never = client({ port: await freePort() });
    const t1 = performance.now();
    await expect(never.waitForSsh({ timeoutMs: 400 })).rejects.toMatchObject({ code: "TIMEOUT" });
    expect(performance.now() - t1).toBeLessThan(700);
    await never.close();
  });
});
