/**
 * The guest agent and SSH side by side on one real microVM: the same exec semantics through
 * both channels, then what only the agent path has to prove (big files with bounded memory,
 * authentication, disconnects, a killed agent).
 */
import { createHash, randomBytes } from "node:crypto";
import { createReadStream, createWriteStream, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AgentChannel } from "../../src/channel/agent-channel.js";
import { connectUnix } from "../../src/channel/agent-transport.js";
import {
  AuthenticationError,
  ConnectionRefusedError,
  OperationTimeoutError,
  SSHConnectionError,
} from "../../src/errors.js";
import { SmolVM } from "../../src/vm/smolvm.js";
import { vmFiles } from "../../src/vm/store.js";

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

async function sha256File(path: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest("hex");
}

/** Writes `mib` MiB of random bytes chunk by chunk (never all in memory); returns the sha256. */
async function randomFile(path: string, mib: number): Promise<string> {
  const h = createHash("sha256");
  const out = createWriteStream(path);
  for (let i = 0; i < mib; i++) {
    const chunk = randomBytes(1024 * 1024);
    h.update(chunk);
    if (!out.write(chunk)) await new Promise<void>((r) => out.once("drain", () => r()));
  }
  await new Promise<void>((resolve, reject) => out.end((e?: Error | null) => (e ? reject(e) : resolve())));
  return h.digest("hex");
}

describe("agent and SSH channels on one microVM", () => {
  let dataDir: string;
  let local: string;
  let agentVm: SmolVM;
  let sshVm: SmolVM;
  beforeAll(async () => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-channels-"));
    local = mkdtempSync(join(tmpdir(), "smolvm-channels-local-"));
    agentVm = await SmolVM.create({ dataDir, memoryMib: 1024 });
    sshVm = await SmolVM.fromId(agentVm.id, { dataDir, commChannel: "ssh" });
    await sshVm.waitForSsh({ timeoutMs: 60_000 });
  }, 240_000);
  afterAll(async () => {
    await sshVm?.close();
    await agentVm?.delete();
    rmSync(dataDir, { recursive: true, force: true });
    rmSync(local, { recursive: true, force: true });
  });

  it("uses the agent by default on an image that has it", () => {
    expect(agentVm.bootTimings!.channel).toBe("agent");
  });

  describe.each(["agent", "ssh"] as const)("exec semantics over %s", (kind) => {
    const vm = () => (kind === "agent" ? agentVm : sshVm);

    it("exit codes, separate stdout/stderr, signals", async () => {
      const r = await vm().run("echo out; echo err >&2; exit 7");
      expect([r.exitCode, r.stdout, r.stderr, r.ok]).toEqual([7, "out\n", "err\n", false]);
      const k = await vm().run("kill -TERM $$", { shell: "raw" });
      expect(k.exitCode).toBe(null);
      expect(k.signal).toBe("TERM");
    });

    it("starts commands the way sshd does: the user's shell, home and login variables", async () => {
      for (const shell of ["login", "raw"] as const) {
        const r = await vm().run('echo "$HOME|$USER|$LOGNAME|$SHELL"; pwd', { shell });
        expect(r.stdout).toBe("/root|root|root|/bin/sh\n/root\n");
      }
      const path = await vm().run('echo "$PATH"', { shell: "raw" });
      expect(path.stdout).toBe("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n");
    });

    it("is binary-exact and takes stdin", async () => {
      const all = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
      const echoed = await vm().run("cat", { stdin: all, encoding: "buffer" });
      expect(echoed.stdout.equals(all)).toBe(true);
      const big = randomBytes(2 * 1024 * 1024);
      const r = await vm().run("sha256sum", { stdin: big, shell: "raw" });
      expect(r.stdout.split(" ")[0]).toBe(sha(big));
    });

    it("streams output in order, then the exit event", async () => {
      const seen: string[] = [];
      for await (const ev of vm().stream(
        "for i in 1 2 3; do echo $i; sleep 0.05; done; echo e >&2; exit 2",
      )) {
        seen.push(ev.stream === "exit" ? `exit:${ev.exitCode}` : `${ev.stream}:${ev.data.toString().trim()}`);
      }
      expect(seen).toEqual(["stdout:1", "stdout:2", "stdout:3", "stderr:e", "exit:2"]);
    });

    it("applies env in login mode only, and cwd in both", async () => {
      await vm().setEnvVars({ [`CH_${kind.toUpperCase()}`]: "yes" });
      expect((await vm().run(`echo $CH_${kind.toUpperCase()}`)).output).toBe("yes");
      expect((await vm().run(`echo "[$CH_${kind.toUpperCase()}]"`, { shell: "raw" })).output).toBe("[]");
      expect((await vm().run("pwd", { cwd: "/tmp", shell: "raw" })).output).toBe("/tmp");
      expect((await vm().run('echo "$X"', { env: { X: "per-call" } })).output).toBe("per-call");
    });

    it("times out, leaves no process behind, and keeps the partial output", async () => {
      const marker = kind === "agent" ? 4101 : 4102;
      const e = await vm()
        .run(`echo begun; sleep ${marker} & sleep ${marker}; wait`, { timeoutMs: 1_000 })
        .catch((x) => x);
      expect(e).toBeInstanceOf(OperationTimeoutError);
      expect(e.partial.stdout).toBe("begun\n");
      await new Promise((r) => setTimeout(r, 300));
      const left = await sshVm.run(`ps -o args | grep -c '^sleep ${marker}' || true`, { shell: "raw" });
      expect(left.output).toBe("0");
    });

    it("runs 50 commands at once with correct outputs", async () => {
      const rs = await Promise.all(
        Array.from({ length: 50 }, (_, i) => vm().run(`echo ${i}`, { shell: "raw" })),
      );
      expect(rs.map((r) => r.stdout)).toEqual(Array.from({ length: 50 }, (_, i) => `${i}\n`));
    });
  });

  it("moves 256 MiB over the agent both ways with sha256 and bounded host memory", async () => {
    const up = join(local, "up.bin");
    const want = await randomFile(up, 256);
    const rss0 = process.memoryUsage().rss;
    let peak = rss0;
    const sampler = setInterval(() => {
      peak = Math.max(peak, process.memoryUsage().rss);
    }, 20);
    try {
      await agentVm.uploadFile(up, "/root/big.bin", { timeoutMs: 300_000 });
      expect(
        (await agentVm.run("sha256sum /root/big.bin", { timeoutMs: 120_000 })).output.split(" ")[0],
      ).toBe(want);
      await agentVm.downloadFile("/root/big.bin", join(local, "down.bin"), { timeoutMs: 300_000 });
    } finally {
      clearInterval(sampler);
      rmSync(up, { force: true });
    }
    expect(await sha256File(join(local, "down.bin"))).toBe(want);
    // The file is 256 MiB; streaming must keep the host's growth to a small fraction of it.
    expect(peak - rss0).toBeLessThan(96 * 1024 * 1024);
    await agentVm.run("rm -f /root/big.bin");
  }, 300_000);

  it("refuses a wrong secret, and serves a fresh session after the host disconnects", async () => {
    const socket = vmFiles(join(dataDir, "vms", agentVm.id)).agentSocket;
    // The virtio-serial socket takes one host connection at a time: release ours first.
    await agentVm.close();
    const wrong = new AgentChannel({ connect: (s) => connectUnix(socket, s), secret: randomBytes(32) });
    const e = await wrong.run("true", { timeoutMs: 10_000 }).catch((x) => x);
    await wrong.close();
    expect(e).toBeInstanceOf(AuthenticationError);
    expect(e.message).not.toMatch(/[0-9a-f]{64}/);

    // A command left running when the host disconnects is killed; the next session works.
    const stream = agentVm.stream("sleep 4103");
    const it = stream[Symbol.asyncIterator]();
    const first = it.next();
    first.catch(() => {}); // close() rejects it, and waits for the socket to close before returning
    await new Promise((r) => setTimeout(r, 500));
    await agentVm.close();
    await first.catch(() => {});
    await new Promise((r) => setTimeout(r, 500));
    expect((await sshVm.run("ps -o args | grep -c '^sleep 4103' || true", { shell: "raw" })).output).toBe(
      "0",
    );
    expect((await agentVm.run("echo again")).stdout).toBe("again\n");
  });

  it('takes the seed\'s commChannel "vsock" as the network-free agent channel', async () => {
    // The virtio-serial socket takes one host connection at a time: release the first handle's.
    await agentVm.close();
    const vsock = await SmolVM.fromId(agentVm.id, { dataDir, commChannel: "vsock" });
    try {
      // The shell's parent is the agent (over SSH it would be sshd).
      const r = await vsock.run("uname -s; cat /proc/$PPID/comm", { shell: "raw" });
      expect(r.stdout).toBe("Linux\nsmolvm-agent\n");
      const viaSsh = await sshVm.run("cat /proc/$PPID/comm", { shell: "raw" });
      expect(viaSsh.stdout).toMatch(/^sshd/);
    } finally {
      await vsock.close();
    }
  });

  it("tells a second handle at once that the agent socket is held", async () => {
    expect((await agentVm.run("echo first")).stdout).toBe("first\n"); // agentVm holds the socket
    const strict = await SmolVM.fromId(agentVm.id, { dataDir, commChannel: "agent" });
    const t0 = performance.now();
    const e = await strict.run("true", { timeoutMs: 20_000 }).catch((x) => x);
    expect(performance.now() - t0).toBeLessThan(1_000);
    expect(e).toBeInstanceOf(ConnectionRefusedError);
    expect(e.code).toBe("AGENT_BUSY");
    expect(e.message).toContain("held by another handle in this process");
    await strict.close();
    // auto goes to SSH without its 2 s agent probe
    const auto = await SmolVM.fromId(agentVm.id, { dataDir });
    const t1 = performance.now();
    expect((await auto.run("cat /proc/$PPID/comm", { shell: "raw" })).stdout).toMatch(/^sshd/);
    expect(performance.now() - t1).toBeLessThan(1_900);
    await auto.close();
    // Released on close: the next handle gets the agent.
    await agentVm.close();
    const next = await SmolVM.fromId(agentVm.id, { dataDir, commChannel: "agent" });
    expect((await next.run("cat /proc/$PPID/comm", { shell: "raw" })).stdout).toBe("smolvm-agent\n");
    await next.close();
  });

  it("reports a killed agent clearly when asked for by name; auto and SSH keep working", async () => {
    // The control agent only: the same binary also listens for sshd (--inetd), which must live on.
    const agents = `for p in $(pidof smolvm-agent); do tr '\\0' ' ' < /proc/$p/cmdline | grep -q -- --serial && echo $p; done`;
    const killed = await sshVm.run(`kill -KILL $(${agents}); sleep 0.2; [ -z "$(${agents})" ] && echo gone`, {
      shell: "raw",
    });
    expect(killed.stdout).toBe("gone\n");
    await agentVm.close();
    const strict = await SmolVM.fromId(agentVm.id, { dataDir, commChannel: "agent" });
    const t0 = performance.now();
    const e = await strict.run("true", { timeoutMs: 15_000 }).catch((x) => x);
    await strict.close();
    expect(performance.now() - t0).toBeLessThan(15_500);
    expect(e instanceof SSHConnectionError || e instanceof OperationTimeoutError).toBe(true);
    expect(e.message).toMatch(/agent/);
    // auto notices the agent is gone and goes over SSH instead
    expect((await agentVm.run("echo via-auto")).stdout).toBe("via-auto\n");
    expect((await sshVm.run("echo ssh-still-works")).stdout).toBe("ssh-still-works\n");
  });
});
