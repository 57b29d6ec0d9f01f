import { execFile, spawn } from "node:child_process";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AgentError, AuthFailedError, KeyLoadError } from "../../src/errors.js";
import { discoverKeys, getDefaultKeyPaths, loadPrivateKey } from "../../src/ssh/auth.js";
import { SSHClient } from "../../src/ssh/client.js";
import { useSshd } from "../fixtures/vitest-sshd.js";

const run = promisify(execFile);
const sshd = useSshd({ keyboardInteractive: true });

describe("SSH authentication methods", () => {
  let tmp: string;
  beforeAll(async () => {
    tmp = await fs.mkdtemp(path.join(os.tmpdir(), "smolvm-ssh-auth-"));
  });
  afterAll(async () => {
    await fs.rm(tmp, { recursive: true, force: true });
  });

  function client(extra: Partial<ConstructorParameters<typeof SSHClient>[0]>): SSHClient {
    const f = sshd();
    return new SSHClient({
      host: f.host,
      port: f.port,
      user: f.user,
      hostKey: { knownHostsPath: f.knownHostsPath },
      ...extra,
    });
  }

  it("encrypted key with passphrase works; a wrong passphrase is KeyLoadError naming the path only", async () => {
    const f = sshd();
    const enc = await f.makeClientKey("id_enc", { passphrase: "correct horse" });
    await f.authorize(enc.publicKey);
    const ok = client({ keyPath: enc.path, passphrase: "correct horse" });
    expect((await ok.run("echo enc")).stdout).toBe("enc\n");
    await ok.close();
    const bad = client({ keyPath: enc.path, passphrase: "battery staple" });
    const err = await bad.run("true").catch((e) => e);
    expect(err).toBeInstanceOf(KeyLoadError);
    expect(err.message).toContain(enc.path);
    expect(err.message).not.toContain("battery");
    await bad.close();
    expect(() => loadPrivateKey(enc.path)).toThrow(/encrypted/);
    expect(() => loadPrivateKey(path.join(tmp, "missing"))).toThrow(KeyLoadError);
    await fs.writeFile(path.join(tmp, "garbage"), "not a key");
    expect(() => loadPrivateKey(path.join(tmp, "garbage"))).toThrow(KeyLoadError);
  });

  it("password auth works", async () => {
    const c = client({ password: sshd().password });
    expect((await c.run("id -un")).stdout).toBe("smolvm-test\n");
    await c.close();
  });

  it("keyboard-interactive answers the server's prompts", async () => {
    const f = sshd();
    const prompts: string[] = [];
    const c = client({
      auth: {
        method: "keyboardInteractive",
        handler: (ps) => {
          prompts.push(...ps.map((p) => p.prompt));
          return ps.map(() => f.password);
        },
      },
    });
    expect((await c.run("echo kbd")).stdout).toBe("kbd\n");
    expect(prompts.length).toBeGreaterThan(0);
    await c.close();
  });

  it("tries an ordered list of methods on ONE connection", async () => {
    const f = sshd();
    const stranger = await f.makeClientKey("id_stranger");
    const before = f.connectionCount();
    const c = client({
      auth: [
        { method: "privateKey", keyPath: stranger.path },
        { method: "password", password: "nope" },
        { method: "privateKey", keyPath: f.clientKey.path },
      ],
    });
    expect((await c.run("echo ordered")).stdout).toBe("ordered\n");
    await c.close();
    await new Promise((r) => setTimeout(r, 50));
    expect(f.connectionCount() - before).toBe(1);
    expect(f.log()).toContain("Failed password for smolvm-test");
    const none = client({ auth: [{ method: "password", password: "x" }] });
    const err = await none.run("true").catch((e) => e);
    expect(err).toBeInstanceOf(AuthFailedError);
    expect(err.details.tried).toEqual(["password"]);
    await none.close();
  });

  it("uses default keys from HOME when no method is given", async () => {
    const f = sshd();
    const home = path.join(tmp, "home");
    await fs.mkdir(path.join(home, ".ssh"), { recursive: true });
    await fs.copyFile(f.clientKey.path, path.join(home, ".ssh", "id_ed25519"));
    await fs.chmod(path.join(home, ".ssh", "id_ed25519"), 0o600);
    expect(getDefaultKeyPaths(home)).toEqual(
      ["id_ed25519", "id_ecdsa", "id_rsa"].map((n) => path.join(home, ".ssh", n)),
    );
    expect(discoverKeys(home)).toEqual([path.join(home, ".ssh", "id_ed25519")]);
    const saved = { HOME: process.env.HOME, SSH_AUTH_SOCK: process.env.SSH_AUTH_SOCK };
    process.env.HOME = home;
    delete process.env.SSH_AUTH_SOCK;
    try {
      const c = client({});
      expect((await c.run("echo default")).stdout).toBe("default\n");
      await c.close();
    } finally {
      process.env.HOME = saved.HOME;
      if (saved.SSH_AUTH_SOCK !== undefined) process.env.SSH_AUTH_SOCK = saved.SSH_AUTH_SOCK;
    }
  });

  it("authenticates through a real ssh-agent, and reports a missing agent as AgentError", async () => {
    const f = sshd();
    const sock = path.join(tmp, "agent.sock");
    const agent = spawn("ssh-agent", ["-D", "-a", sock], { stdio: "ignore" });
    try {
      for (let i = 0; i < 100; i++) {
        if (
          await fs.stat(sock).then(
            () => true,
            () => false,
          )
        )
          break;
        await new Promise((r) => setTimeout(r, 20));
      }
      await run("ssh-add", [f.clientKey.path], { env: { ...process.env, SSH_AUTH_SOCK: sock } });
      const c = client({ agent: sock });
      expect((await c.run("echo agent")).stdout).toBe("agent\n");
      await c.close();
    } finally {
      agent.kill("SIGTERM");
      await new Promise((r) => agent.once("exit", r));
    }
    const gone = client({ agent: path.join(tmp, "no-agent.sock") });
    await expect(gone.run("true")).rejects.toBeInstanceOf(AgentError);
    await gone.close();
  });
});
