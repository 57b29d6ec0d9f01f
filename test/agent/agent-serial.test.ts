/**
 * The --serial transport on a real character device: a PTY (raw mode) that socat bridges to a
 * Unix socket, standing in for the virtio-serial port QEMU bridges to its host socket. Covers
 * resync past stale bytes and the "host gone" state without busy-looping.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { AgentChannel } from "../../src/channel/agent-channel.js";
import { agentBinary } from "./helpers.js";

const dir = mkdtempSync(join(tmpdir(), "smolvm-agent-serial-"));
const procs: ChildProcess[] = [];
afterAll(async () => {
  for (const p of procs) {
    if (p.exitCode === null && p.signalCode === null) {
      p.kill("SIGKILL");
      await new Promise((r) => p.once("exit", r));
    }
  }
  rmSync(dir, { recursive: true, force: true });
});

async function waitFor(cond: () => boolean, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error("condition not reached");
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe("serial transport", () => {
  it("resyncs past stale bytes, serves, and idles without spinning when the host goes away", async () => {
    const bin = await agentBinary();
    const secret = randomBytes(32);
    writeFileSync(join(dir, "secret"), secret, { mode: 0o600 });
    const socat = spawn(
      "socat",
      [`UNIX-LISTEN:${join(dir, "host.sock")}`, `PTY,link=${join(dir, "port")},raw,echo=0`],
      {
        stdio: "ignore",
      },
    );
    procs.push(socat);
    await waitFor(() => existsSync(join(dir, "host.sock")), 5000);
    const sock: Socket = connect(join(dir, "host.sock"));
    await new Promise((r) => sock.once("connect", r));
    await waitFor(() => existsSync(join(dir, "port")), 5000);
    // Bytes of an old session, including a partial header, wait in the port before the agent reads.
    sock.write(Buffer.concat([Buffer.from("stale bytes "), Buffer.from("SMAG\x01\x10", "latin1")]));
    const agent = spawn(bin, ["--serial", join(dir, "port"), "--secret-file", join(dir, "secret")], {
      stdio: "ignore",
      env: { ...process.env, SHELL: "/bin/sh" },
    });
    procs.push(agent);
    const ch = new AgentChannel({ connect: async () => sock, secret, connectTimeoutMs: 5000 });
    const r = await ch.run("echo over serial; head -c 2000000 /dev/zero | wc -c", { shell: "raw" });
    expect(r.stdout).toBe("over serial\n2000000\n");
    await ch.close(); // socat exits and the PTY master closes: the agent sees a hung-up port
    await new Promise((r) => setTimeout(r, 300));
    const ticks = () => Number(readFileSync(`/proc/${agent.pid}/stat`, "utf8").split(" ")[13]);
    const before = ticks();
    await new Promise((r) => setTimeout(r, 1000));
    expect(agent.exitCode).toBeNull();
    expect(ticks() - before).toBeLessThanOrEqual(2); // clock ticks of user CPU in 1 s: not spinning
  });
});
