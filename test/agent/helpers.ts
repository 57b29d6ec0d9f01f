/**
 * Runs the real guest agent on the host (built with the host's C compiler, cached) behind a
 * Unix socket in a temp dir, as the current user, with its env and milestones files in that dir.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { AgentChannel, type AgentChannelOptions } from "../../src/channel/agent-channel.js";
import { connectUnix } from "../../src/channel/agent-transport.js";
import { buildAgent } from "../../src/image/agent-build.js";

export interface TestAgent {
  dir: string;
  socket: string;
  secret: Buffer;
  envFile: string;
  milestones: string;
  proc: ChildProcess;
  channel(options?: Partial<AgentChannelOptions>): AgentChannel;
  /** Kills the agent (SIGKILL) and waits for it to exit. */
  kill(): Promise<void>;
  stop(): Promise<void>;
}

export async function agentBinary(): Promise<string> {
  return buildAgent({ cacheDir: join(tmpdir(), "smolvm-test-agent-cache") });
}

export async function startAgent(
  extraArgs: string[] = [],
  env: Record<string, string> = {},
): Promise<TestAgent> {
  const bin = await agentBinary();
  const dir = mkdtempSync(join(tmpdir(), "smolvm-agent-"));
  const socket = join(dir, "agent.sock");
  const secret = randomBytes(32);
  const secretFile = join(dir, "secret");
  writeFileSync(secretFile, secret, { mode: 0o600 });
  const envFile = join(dir, "profile.d", "smolvm_env.sh");
  const milestones = join(dir, "milestones");
  writeFileSync(milestones, "kernel 0.100\ninit 0.200\n");
  const proc = spawn(
    bin,
    [
      "--unix",
      socket,
      "--secret-file",
      secretFile,
      "--env-file",
      envFile,
      "--milestones",
      milestones,
      ...extraArgs,
    ],
    // SHELL=/bin/sh: login-mode commands exec "${SHELL:-/bin/sh}" -lc, as in the guest.
    { stdio: ["ignore", "ignore", "inherit"], env: { ...process.env, SHELL: "/bin/sh", ...env } },
  );
  const exited = new Promise<void>((r) => proc.once("exit", () => r()));
  for (let i = 0; i < 200 && !existsSync(socket); i++) await new Promise((r) => setTimeout(r, 10));
  if (!existsSync(socket)) throw new Error("agent did not create its socket");
  const kill = async () => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
    await exited;
  };
  return {
    dir,
    socket,
    secret,
    envFile,
    milestones,
    proc,
    channel: (options = {}) =>
      new AgentChannel({ connect: (signal) => connectUnix(socket, signal), secret, ...options }),
    kill,
    stop: async () => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
      const t = setTimeout(() => proc.kill("SIGKILL"), 2000);
      await exited;
      clearTimeout(t);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
