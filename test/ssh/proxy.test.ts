import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { HostKeyMismatchError, ValidationError } from "../../src/errors.js";
import { createKeyAuth, createPasswordAuth } from "../../src/ssh/auth.js";
import { parseProxyJump, resolveSessionOptions } from "../../src/ssh/connect-options.js";
import { connectSession } from "../../src/ssh/connection.js";
import { EventCollector, parseEventLog } from "../../src/ssh/events.js";
import { EvidenceBundle, getEvidenceBundle } from "../../src/ssh/evidence.js";
import { leakedResources, resourceBaseline, useSshd } from "../fixtures/vitest-sshd.js";
import { until } from "./resilience-helpers.js";

const sshd = useSshd();
let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "smolvm-proxy-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const ed25519 = () => sshd().hostKeys.find((k) => k.type === "ssh-ed25519")!.fingerprint;
const WRONG_FP = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

describe("parseProxyJump", () => {
  it("parses OpenSSH -J syntax", () => {
    expect(parseProxyJump("bastion")).toEqual([{ host: "bastion" }]);
    expect(parseProxyJump("alice@b1:2222,ssh://bob@b2,[::1]:22,carol@[fe80::1]")).toEqual([
      { user: "alice", host: "b1", port: 2222 },
      { user: "bob", host: "b2" },
      { host: "::1", port: 22 },
      { user: "carol", host: "fe80::1" },
    ]);
    expect(parseProxyJump("none")).toEqual([]);
    expect(() => parseProxyJump("a:99999")).toThrow(ValidationError);
    expect(() => parseProxyJump("@host")).toThrow(ValidationError);
  });
});

describe("ProxyJump", () => {
  it("chains hops, each authenticated and host-key-verified with its own settings", async () => {
    const baseline = resourceBaseline();
    const before = sshd().connectionCount();
    const conn = await connectSession({
      host: "127.0.0.1",
      port: sshd().port,
      username: sshd().user,
      // The target: password + known_hosts file. The hop: key + pinned fingerprint.
      auth: createPasswordAuth(sshd().password),
      hostKey: { knownHostsPath: sshd().knownHostsPath },
      proxyJump: [
        {
          host: "127.0.0.1",
          port: sshd().port,
          username: sshd().user,
          auth: createKeyAuth(sshd().clientKey.path),
          hostKey: { fingerprint: ed25519() },
        },
      ],
    });
    const r = await conn.exec("echo via-jump");
    expect(r.stdout).toBe("via-jump\n");
    expect(sshd().connectionCount() - before).toBe(2);
    expect(sshd().log()).toMatch(/Accepted password for smolvm-test/);
    await conn.close();
    expect(await leakedResources(baseline, 2000)).toEqual([]);
  });

  it("rejects a hop or a target whose host key does not match, and closes the opened hops", async () => {
    const baseline = resourceBaseline();
    const hop = (fp: string) => ({
      host: "127.0.0.1",
      port: sshd().port,
      username: sshd().user,
      auth: createKeyAuth(sshd().clientKey.path),
      hostKey: { fingerprint: fp },
    });
    const base = {
      host: "127.0.0.1",
      port: sshd().port,
      username: sshd().user,
      auth: createKeyAuth(sshd().clientKey.path),
    };
    await expect(
      connectSession({ ...base, hostKey: { fingerprint: ed25519() }, proxyJump: [hop(WRONG_FP)] }),
    ).rejects.toBeInstanceOf(HostKeyMismatchError);
    await expect(
      connectSession({ ...base, hostKey: { fingerprint: WRONG_FP }, proxyJump: [hop(ed25519())] }),
    ).rejects.toBeInstanceOf(HostKeyMismatchError);
    expect(await leakedResources(baseline, 2000)).toEqual([]);
  });

  it("string hops take the target's credentials and known_hosts, never its pinned fingerprint", () => {
    const r = resolveSessionOptions({
      host: "target",
      username: "u",
      auth: createPasswordAuth("pw"),
      hostKey: { fingerprint: ed25519(), knownHostsPath: "/x/known_hosts" },
      proxyJump: "j1:2200,bob@j2",
    });
    expect(r.jumps.map((j) => [j.host, j.port, j.username])).toEqual([
      ["j1", 2200, "u"],
      ["j2", 22, "bob"],
    ]);
    expect(r.jumps[0]!.hostKey).toEqual({ knownHostsPath: "/x/known_hosts", fingerprint: undefined });
    expect(() =>
      resolveSessionOptions({ host: "h", username: "u", proxyJump: "j", proxyCommand: "nc %h %p" }),
    ).toThrow(ValidationError);
  });
});

describe("ProxyCommand", () => {
  it("connects through a command that floods stderr (stderr is drained)", async () => {
    const baseline = resourceBaseline();
    const conn = await connectSession({
      host: "127.0.0.1",
      port: sshd().port,
      username: sshd().user,
      auth: createKeyAuth(sshd().clientKey.path),
      hostKey: { fingerprint: ed25519() },
      connectTimeoutMs: 5000,
      // 1 MB on stderr before relaying: a pipe nobody reads would block the command at 64 KiB.
      proxyCommand: "head -c 1000000 /dev/zero | tr '\\0' x >&2; exec socat - TCP:127.0.0.1:%p",
    });
    expect((await conn.exec("echo via-command")).stdout).toBe("via-command\n");
    await conn.close();
    expect(await leakedResources(baseline, 2000)).toEqual([]);
  });

  it("propagates EOF: when the command exits, the connection ends and in-flight work fails typed", async () => {
    const conn = await connectSession({
      host: "127.0.0.1",
      port: sshd().port,
      username: sshd().user,
      auth: createKeyAuth(sshd().clientKey.path),
      hostKey: { fingerprint: ed25519() },
      proxyCommand: "timeout 1.5 socat - TCP:127.0.0.1:%p",
    });
    const t0 = performance.now();
    const err = await conn.exec("sleep 10", { timeoutMs: 20_000 }).catch((e) => e);
    expect(err?.name).toBe("ConnectionLostError");
    await until(() => !conn.alive, 2000, "connection end");
    expect(performance.now() - t0).toBeLessThan(4000);
    await conn.close();
  });
});

describe("OpenSSH config, event log and evidence", () => {
  it("connects to a config alias (HostName, Port, User, IdentityFile, known hosts, ProxyCommand) and logs events", async () => {
    const cfg = join(dir, "config");
    await writeFile(
      cfg,
      [
        "Host smol-alias",
        "  HostName 127.0.0.1",
        `  Port ${sshd().port}`,
        `  User ${sshd().user}`,
        `  IdentityFile ${sshd().clientKey.path}`,
        "  IdentitiesOnly yes",
        "  StrictHostKeyChecking yes",
        `  UserKnownHostsFile ${sshd().knownHostsPath}`,
        "Host smol-via-cmd",
        "  HostName 127.0.0.1",
        `  Port ${sshd().port}`,
        `  User ${sshd().user}`,
        `  IdentityFile ${sshd().clientKey.path}`,
        "  IdentitiesOnly yes",
        `  UserKnownHostsFile ${sshd().knownHostsPath}`,
        "  ProxyCommand socat - TCP:%h:%p",
        "",
      ].join("\n"),
      { mode: 0o600 },
    );
    const log = join(dir, "events.jsonl");
    const conn = await connectSession({ host: "smol-alias", sshConfig: cfg, eventLogPath: log });
    expect(conn.port).toBe(sshd().port);
    expect((await conn.exec("whoami")).stdout).toBe(`${sshd().user}\n`);
    const bundle = getEvidenceBundle(conn);
    expect(bundle.algorithms.kex).toBeTruthy();
    expect(bundle.hostInfo).toEqual({ host: "127.0.0.1", port: sshd().port, username: sshd().user });
    expect(bundle.events.map((e) => e.type)).toContain("CONNECT");
    await conn.close();
    const events = parseEventLog(await readFile(log, "utf8"));
    expect(events.map((e) => e.type)).toEqual(
      expect.arrayContaining(["CONNECT", "AUTH", "EXEC", "DISCONNECT"]),
    );
    const file = join(dir, "bundle.json");
    await getEvidenceBundle(conn).toFile(file, { redact: true });
    expect((await EvidenceBundle.fromFile(file)).hostInfo?.port).toBe(sshd().port);

    const viaCmd = await connectSession({
      host: "smol-via-cmd",
      sshConfig: cfg,
      events: new EventCollector(),
    });
    expect((await viaCmd.exec("echo ok")).stdout).toBe("ok\n");
    await viaCmd.close();
  });
});
