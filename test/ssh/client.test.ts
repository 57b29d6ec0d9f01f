import { execFile } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  OperationAbortedError,
  OperationTimeoutError,
  SSHConnectionError,
  ValidationError,
} from "../../src/errors.js";
import { SSHClient } from "../../src/ssh/client.js";
import { SSHConnection } from "../../src/ssh/connection.js";
import { EventCollector } from "../../src/ssh/events.js";
import { PROFILE_MARKER } from "../fixtures/sshd.js";
import { leakedResources, resourceBaseline, useSshd } from "../fixtures/vitest-sshd.js";

const run = promisify(execFile);
const sshd = useSshd({ maxSessions: 10 });

function clientFor(extra: Partial<ConstructorParameters<typeof SSHClient>[0]> = {}): SSHClient {
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

/** Processes of the test user whose command line matches `pattern`. */
async function remoteProcs(pattern: string): Promise<string> {
  return run("pgrep", ["-af", "-u", "smolvm-test", pattern]).then(
    (r) => r.stdout,
    () => "",
  );
}

describe("SSHClient against a real sshd", () => {
  let client: SSHClient;
  beforeAll(() => {
    client = clientFor();
  });
  afterAll(async () => {
    await client.close();
  });

  it("connects lazily, shares one connect between concurrent first calls, and reuses it", async () => {
    const before = sshd().connectionCount();
    expect(client.connected).toBe(false);
    const [a, b, c] = await Promise.all([client.run("echo a"), client.run("echo b"), client.run("echo c")]);
    expect([a.stdout, b.stdout, c.stdout]).toEqual(["a\n", "b\n", "c\n"]);
    expect(client.connected).toBe(true);
    await client.run("true");
    expect(sshd().connectionCount() - before).toBe(1);
  });

  it("reports exit codes, ok, output, durationMs and signals without throwing", async () => {
    const r = await client.run("echo ' out '; echo err >&2; exit 7");
    expect(r.exitCode).toBe(7);
    expect(r.ok).toBe(false);
    expect(r.stdout).toBe(" out \n");
    expect(r.stderr).toBe("err\n");
    expect(r.output).toBe("out");
    expect(r.signal).toBeNull();
    expect(r.durationMs).toBeGreaterThan(0);
    const k = await client.run("kill -TERM $$", { shell: "raw" });
    expect(k.exitCode).toBeNull();
    expect(k.signal).toBe("TERM");
    expect(k.ok).toBe(false);
  });

  it("login shell reads the profile; raw does not; env and cwd work in both", async () => {
    const login = await client.run(`echo "\${${PROFILE_MARKER}:-unset}"`);
    expect(login.stdout).toBe("loaded\n");
    const raw = await client.run(`echo "\${${PROFILE_MARKER}:-unset}"`, { shell: "raw" });
    expect(raw.stdout).toBe("unset\n");
    const secret = "s3cr3t 'quoted' $HOME `x`\nline2";
    for (const shell of ["login", "raw"] as const) {
      const r = await client.run('printf %s "$MY_VAR"; pwd', { shell, env: { MY_VAR: secret }, cwd: "/tmp" });
      expect(r.stdout).toBe(`${secret}/tmp\n`);
    }
    // env values never reach the server's argv: look at what sshd logged and at ps
    expect(sshd().log()).not.toContain("s3cr3t");
  });

  it("passes stdin exactly, then EOF", async () => {
    const r = await client.run("cat; echo done", { stdin: "line1\nline2" });
    expect(r.stdout).toBe("line1\nline2done\n");
    const e = await client.run("wc -c", { shell: "raw", env: { A: "1" }, stdin: Buffer.from([0, 1, 2]) });
    expect(e.stdout.trim()).toBe("3");
    const n = await client.run("cat", { timeoutMs: 5000 });
    expect(n.stdout).toBe("");
  });

  it("returns exact bytes with encoding buffer: all 256 values and 8 MiB of random data", async () => {
    const all = await client.run("printf \"$(printf '\\\\%03o' $(seq 0 255))\"", {
      encoding: "buffer",
      shell: "raw",
    });
    expect(Buffer.isBuffer(all.stdout)).toBe(true);
    expect(all.stdout.equals(Buffer.from(Array.from({ length: 256 }, (_, i) => i)))).toBe(true);
    const data = randomBytes(8 * 1024 * 1024);
    const echo = await client.run("cat", {
      stdin: data,
      encoding: "buffer",
      shell: "raw",
      timeoutMs: 30_000,
    });
    expect(echo.stdout.length).toBe(data.length);
    expect(createHash("sha256").update(echo.stdout).digest("hex")).toBe(
      createHash("sha256").update(data).digest("hex"),
    );
  });

  it("never mixes stdout and stderr and keeps order within each", async () => {
    const r = await client.run("i=0; while [ $i -lt 2000 ]; do echo o$i; echo e$i >&2; i=$((i+1)); done", {
      shell: "raw",
    });
    const out = r.stdout.trim().split("\n");
    const err = r.stderr.trim().split("\n");
    expect(out).toEqual(Array.from({ length: 2000 }, (_, i) => `o${i}`));
    expect(err).toEqual(Array.from({ length: 2000 }, (_, i) => `e${i}`));
  });

  it("streams to onStdout/onStderr and caps memory with maxOutputBytes while still reaping", async () => {
    let seen = 0;
    const r = await client.run("head -c 1000000 /dev/zero; echo end >&2; exit 3", {
      shell: "raw",
      maxOutputBytes: 1000,
      onStdout: (d) => {
        seen += d.length;
      },
    });
    expect(seen).toBe(1_000_000);
    expect(r.truncated).toBe(true);
    expect(r.stdout.length).toBe(1000);
    expect(r.exitCode).toBe(3);
  });

  it("200 concurrent runs against MaxSessions 10 all succeed with correct outputs", async () => {
    const rs = await Promise.all(
      Array.from({ length: 200 }, (_, i) => client.run(`echo ${i}; echo x${i} >&2`, { shell: "raw" })),
    );
    rs.forEach((r, i) => {
      expect(r.stdout).toBe(`${i}\n`);
      expect(r.stderr).toBe(`x${i}\n`);
      expect(r.exitCode).toBe(0);
    });
  });

  it("timeoutMs kills the whole remote process group and carries the partial output", async () => {
    const t0 = performance.now();
    const err = await client
      .run("echo started; echo warn >&2; sleep 3001 & sleep 3002; wait", { timeoutMs: 600 })
      .catch((e) => e);
    const took = performance.now() - t0;
    expect(err).toBeInstanceOf(OperationTimeoutError);
    expect(err).not.toBeInstanceOf(OperationAbortedError);
    expect(took).toBeGreaterThanOrEqual(590);
    expect(took).toBeLessThan(2000);
    expect(err.partial.stdout).toBe("started\n");
    expect(err.partial.stderr).toBe("warn\n");
    expect(await remoteProcs("sleep 300[12]")).toBe("");
    // the connection survives a timed-out command
    expect((await client.run("echo ok")).stdout).toBe("ok\n");
  });

  it("an AbortSignal kills the remote command the same way", async () => {
    const ac = new AbortController();
    const p = client.run("echo begun; sleep 3003 & sleep 3004; wait", { signal: ac.signal, shell: "raw" });
    setTimeout(() => ac.abort(), 300);
    const err = await p.catch((e) => e);
    expect(err).toBeInstanceOf(OperationAbortedError);
    expect(err.partial.stdout).toBe("begun\n");
    expect(await remoteProcs("sleep 300[34]")).toBe("");
    const pre = new AbortController();
    pre.abort();
    await expect(client.run("true", { signal: pre.signal })).rejects.toBeInstanceOf(OperationAbortedError);
  });

  it("rejects bad input with ValidationError before any I/O", async () => {
    await expect(client.run("")).rejects.toBeInstanceOf(ValidationError);
    await expect(client.run("echo \0")).rejects.toBeInstanceOf(ValidationError);
    await expect(client.run("true", { env: { "BAD-NAME": "x" } })).rejects.toBeInstanceOf(ValidationError);
    await expect(client.run("true", { timeoutMs: 0 })).rejects.toBeInstanceOf(ValidationError);
    await expect(client.run("true", { timeoutMs: -5 })).rejects.toBeInstanceOf(ValidationError);
    await expect(client.waitForSsh({ timeoutMs: 0 })).rejects.toBeInstanceOf(ValidationError);
    expect(() => new SSHClient({ host: "" })).toThrow(ValidationError);
    expect(() => new SSHClient({ host: "h", port: 70000 })).toThrow(ValidationError);
  });

  it("streamExec yields stdout/stderr events then exit, and takes stdin", async () => {
    const conn = await client.connection();
    const s = conn.streamExec("cat; echo e >&2; exit 4", { shell: "raw", stdin: true });
    s.write("hello ");
    s.write(Buffer.from("world"));
    s.end();
    const evs: string[] = [];
    let stdout = "";
    for await (const ev of s) {
      if (ev.stream === "exit") evs.push(`exit:${ev.exitCode}`);
      else evs.push(`${ev.stream}:${ev.data.toString()}`);
      if (ev.stream === "stdout") stdout += ev.data.toString();
    }
    // cat may echo the two writes as one chunk or two: the bytes and their order are what count.
    expect(stdout).toBe("hello world");
    expect(evs).toContain("stderr:e\n");
    expect(evs.at(-1)).toBe("exit:4");
    const c = conn.streamExec("echo x; sleep 3005", { shell: "raw" });
    for await (const ev of c) {
      expect(ev.stream).toBe("stdout");
      await c.cancel();
    }
    await new Promise((r) => setTimeout(r, 100));
    expect(await remoteProcs("sleep 3005")).toBe("");
  });
});

describe("SSHConnection lifecycle", () => {
  it("emits events, records timings and algorithms, closes idempotently and leaves no handles", async () => {
    const f = sshd();
    const baseline = resourceBaseline();
    const events = new EventCollector();
    const conn = await SSHConnection.connect({
      host: f.host,
      port: f.port,
      username: f.user,
      auth: { method: "privateKey", keyPath: f.clientKey.path },
      hostKey: { knownHostsPath: f.knownHostsPath },
      events,
    });
    expect(conn.timings.totalMs).toBeGreaterThan(0);
    expect(conn.negotiated).toBeDefined();
    expect(conn.serverVersion).toMatch(/^OpenSSH_/);
    const r = await conn.exec("printf abc", { env: { TOKEN: "hunter2-secret" } });
    expect(r.stdout).toBe("abc");
    let reason: unknown = "not called";
    conn.onClose((e) => {
      reason = e;
    });
    await conn.close();
    await conn.close();
    expect(conn.alive).toBe(false);
    expect(reason).toBeUndefined();
    const types = events.events.map((e) => e.type);
    expect(types).toEqual(["CONNECT", "AUTH", "EXEC", "EXEC", "DISCONNECT"]);
    const end = events.events[3]!.data;
    expect(end.exitCode).toBe(0);
    expect(end.bytesStdout).toBe(3);
    expect(JSON.stringify(events.events)).not.toContain("hunter2");
    expect(await leakedResources(baseline)).toEqual([]);
  });

  it("SSHClient close is idempotent, disposes, and later calls fail clearly", async () => {
    const baseline = resourceBaseline();
    const c = clientFor();
    await c.run("true");
    await c[Symbol.asyncDispose]();
    await c.close();
    expect(c.connected).toBe(false);
    await expect(c.run("true")).rejects.toBeInstanceOf(SSHConnectionError);
    expect(await leakedResources(baseline)).toEqual([]);
  });
});
