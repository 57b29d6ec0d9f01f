// The shared pieces one module each owns: the port check, the connection-error base, a
// timeout's partial result, the two option spellings of SSHClient/SSHSupervisor, and the
// by-name exports of smolvm/ssh.
import { describe, expect, expectTypeOf, it } from "vitest";
import { CommandResult, emptyResult, type Runner, type RunOptions } from "../../src/command.js";
import { Deadline } from "../../src/common/deadline.js";
import { isPort, validatePort } from "../../src/common/port.js";
import {
  AuthFailedError,
  ConnectionError,
  ConnectionLostError,
  ConnectionRefusedError,
  OperationAbortedError,
  OperationTimeoutError,
  SSHConnectionError,
  ValidationError,
} from "../../src/errors.js";
import { SSHClient } from "../../src/ssh/client.js";
import { authFromOptions, keepaliveFromOptions, userFromOptions } from "../../src/ssh/client-options.js";
import * as ssh from "../../src/ssh/index.js";
import { RetryPolicy, retryWithPolicy } from "../../src/ssh/retry.js";

describe("port check", () => {
  it("accepts 1..65535 (0 only when asked) and names the option it refuses", () => {
    expect([1, 22, 65535].every((p) => isPort(p))).toBe(true);
    expect([0, -1, 65536, 1.5, Number.NaN, "22"].some((p) => isPort(p))).toBe(false);
    expect(isPort(0, { allowZero: true })).toBe(true);
    expect(validatePort("localPort", 0, { allowZero: true })).toBe(0);
    expect(() => validatePort("hostPort", 70000)).toThrow(ValidationError);
    expect(() => validatePort("hostPort", 70000)).toThrow(
      "hostPort must be an integer port in 1..65535, got 70000.",
    );
  });
});

describe("error tree", () => {
  it("SSH and agent connection errors share ConnectionError; the SSH names keep their classes", () => {
    const refused = new ConnectionRefusedError("x", { code: "AGENT_CONNECTION_REFUSED" });
    expect(refused).toBeInstanceOf(SSHConnectionError);
    expect(refused).toBeInstanceOf(ConnectionError);
    expect(refused.code).toBe("AGENT_CONNECTION_REFUSED");
    expect(new ConnectionLostError("y")).toBeInstanceOf(ConnectionError);
    expect(new ConnectionError("z").code).toBe("CONNECTION");
  });

  it("withPartial keeps class, code, message and details and attaches a CommandResult", () => {
    const d = new Deadline(1000, undefined, "SSH command");
    const partial = emptyResult(12, "buffer");
    const t = d.timeoutError().withPartial(partial);
    expect(t).toBeInstanceOf(OperationTimeoutError);
    expect(t).not.toBeInstanceOf(OperationAbortedError);
    expect(t.code).toBe("TIMEOUT");
    expect(t.partial).toBeInstanceOf(CommandResult);
    expect(t.partial?.stdout).toEqual(Buffer.alloc(0));
    const a = d.abortError().withPartial(emptyResult(3));
    expect(a).toBeInstanceOf(OperationAbortedError);
    expect(a.code).toBe("ABORTED");
    expect(a.partial?.ok).toBe(false);
    expect(a.partial?.output).toBe("");
    expect(a.message).toBe(d.abortError().message);
    d.dispose();
  });
});

describe("SSHClient / SSHSupervisor option spellings", () => {
  it("user or username; both must agree", () => {
    expect(userFromOptions({ user: "a" })).toBe("a");
    expect(userFromOptions({ username: "b" })).toBe("b");
    expect(() => userFromOptions({ user: "a", username: "b" })).toThrow(ValidationError);
    expect(new SSHClient({ host: "h", username: "alice" }).user).toBe("alice");
    expect(new SSHClient({ host: "h" }).user).toBe("root");
  });

  it("keepalive nested or flat, never both; interval 0 or false turns it off", () => {
    expect(keepaliveFromOptions({})).toBeUndefined();
    expect(keepaliveFromOptions({ keepalive: { intervalMs: 500 } })).toEqual({ intervalMs: 500 });
    expect(keepaliveFromOptions({ keepaliveIntervalMs: 500, keepaliveCountMax: 2 })).toEqual({
      intervalMs: 500,
      countMax: 2,
    });
    expect(keepaliveFromOptions({ keepaliveIntervalMs: 0 })).toBe(false);
    expect(keepaliveFromOptions({ keepalive: false })).toBe(false);
    expect(() => keepaliveFromOptions({ keepalive: { intervalMs: 1 }, keepaliveCountMax: 2 })).toThrow(
      ValidationError,
    );
    expect(() => new SSHClient({ host: "h", keepalive: { countMax: 0 } })).toThrow(ValidationError);
  });

  it("auth: explicit list wins, else key, agent, password (+ keyboard-interactive)", () => {
    const explicit = [{ method: "password" as const, password: "p" }];
    expect(authFromOptions({ auth: explicit, password: "q" })).toBe(explicit);
    expect(authFromOptions({})).toBeUndefined();
    expect((authFromOptions({ password: "q" }) as Array<{ method: string }>).map((a) => a.method)).toEqual([
      "password",
      "keyboardInteractive",
    ]);
  });
});

describe("smolvm/ssh exports", () => {
  it("exports by name what the README uses, not the internals", () => {
    for (const name of [
      "SSHClient",
      "SSHConnection",
      "SSHSupervisor",
      "connectSession",
      "getEvidenceBundle",
      "createKeyAuth",
      "RetryPolicy",
      "EventCollector",
      "AutomationEngine",
      "EOF",
      "TIMEOUT",
      "createHostKeyVerifier",
      "fingerprintOf",
      "resolveSshConfig",
      "parseSshConfig",
      "redact",
      "redactText",
      "EvidenceBundle",
      "SocksServer",
      "openShell",
      "watchStream",
      "ProgressWatchdog",
      "serverQuirks",
      "PER_COMMAND_CONNECTIONS",
      "forwardLocal",
      "forwardRemote",
      "forwardDynamic",
      "ConnectionError",
      "ConnectionRefusedError",
      "OperationTimeoutError",
      "CommandResult",
    ]) {
      expect(ssh, name).toHaveProperty(name);
    }
    for (const name of [
      "killByRunIdScript",
      "OutputCollector",
      "parseRequest",
      "encodeReply",
      "prepareAuth",
    ]) {
      expect(ssh, name).not.toHaveProperty(name);
    }
  });
});

describe("one reconnect loop (SSHClient and SSHSupervisor)", () => {
  const policy = new RetryPolicy({ maxRetries: 3, baseDelayMs: 1, maxDelayMs: 2, jitter: false });

  it("retries transient failures with the policy's delays, then succeeds", async () => {
    let calls = 0;
    const retries: Array<[number, number]> = [];
    const r = await retryWithPolicy(
      policy,
      async () => {
        if (++calls < 3) throw new ConnectionRefusedError("refused");
        return "up";
      },
      {
        signal: new AbortController().signal,
        onRetry: (_e, attempt, delayMs) => retries.push([attempt, delayMs]),
      },
    );
    expect(r).toBe("up");
    expect(retries).toEqual([
      [0, 1],
      [1, 2],
    ]);
  });

  it("gives up at once on a permanent failure and after maxRetries on transient ones", async () => {
    const gaveUp: Array<[number, string]> = [];
    const onGiveUp = (_e: unknown, attempts: number, kind: string) => gaveUp.push([attempts, kind]);
    const signal = new AbortController().signal;
    await expect(
      retryWithPolicy(policy, () => Promise.reject(new AuthFailedError("no")), { signal, onGiveUp }),
    ).rejects.toBeInstanceOf(AuthFailedError);
    await expect(
      retryWithPolicy(policy, () => Promise.reject(new ConnectionLostError("gone")), { signal, onGiveUp }),
    ).rejects.toBeInstanceOf(ConnectionLostError);
    expect(gaveUp).toEqual([
      [1, "permanent"],
      [4, "transient"],
    ]);
  });

  it("stops when the signal fires, without calling onGiveUp", async () => {
    const ac = new AbortController();
    const onGiveUp = () => {
      throw new Error("must not give up");
    };
    const slow = new RetryPolicy({ maxRetries: 5, baseDelayMs: 10_000, jitter: false });
    const p = retryWithPolicy(slow, () => Promise.reject(new ConnectionRefusedError("refused")), {
      signal: ac.signal,
      onGiveUp,
    });
    setTimeout(() => ac.abort(new Error("closed")), 20);
    await expect(p).rejects.toThrow("closed");
  });
});

describe("the runner contract", () => {
  it("types every runner's result by the encoding, also when the options hold callbacks", () => {
    // Compile-time checks (tsc runs over the tests); the runner itself is never called.
    const runner = {} as Runner;
    expectTypeOf<ReturnType<typeof use>>().toEqualTypeOf<
      Promise<[Buffer, string, string, string | Buffer]>
    >();
    async function use(o: RunOptions) {
      const b = (await runner.run("x", { encoding: "buffer", onStdout: (d) => d.length })).stdout;
      const s = (await runner.run("x", { shell: "raw", onStderr: (d) => d.length })).stdout;
      const d = (await runner.run("x")).stdout;
      const u = (await runner.run("x", o)).stdout;
      return [b, s, d, u] as [typeof b, typeof s, typeof d, typeof u];
    }
    expect(typeof use).toBe("function");
  });
});
