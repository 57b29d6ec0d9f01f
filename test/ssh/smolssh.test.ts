import { type ChildProcess, spawn } from "node:child_process";
import { mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  buildPlan,
  parseDestination,
  parseDynamicSpec,
  parseForwardSpec,
} from "../../src/cli/smolssh-options.js";
import { ValidationError } from "../../src/errors.js";
import { parseEventLog } from "../../src/ssh/events.js";
import { EvidenceBundle } from "../../src/ssh/evidence.js";
import { freePort } from "../fixtures/sshd.js";
import { useSshd } from "../fixtures/vitest-sshd.js";
import { echoServer, echoThrough } from "./resilience-helpers.js";

const sshd = useSshd();
const ROOT = new URL("../..", import.meta.url).pathname;
let dir: string;
let emptyConfig: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "smolssh-"));
  emptyConfig = join(dir, "empty_config");
  await writeFile(emptyConfig, "", { mode: 0o600 });
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function smolssh(args: string[], opts: { stdin?: string; env?: NodeJS.ProcessEnv } = {}) {
  const child = spawn(process.execPath, ["--import", "tsx", "src/cli/smolssh.ts", ...args], {
    cwd: ROOT,
    env: { ...process.env, ...opts.env },
    stdio: ["pipe", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (d) => {
    stdout += d;
  });
  child.stderr.on("data", (d) => {
    stderr += d;
  });
  if (opts.stdin !== undefined) child.stdin.end(opts.stdin);
  else child.stdin.end();
  const done = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) =>
    child.on("close", (code) => resolve({ code, stdout, stderr })),
  );
  return { child, done, out: () => stdout };
}

const base = () => [
  "-F",
  emptyConfig,
  "-p",
  String(sshd().port),
  "-i",
  sshd().clientKey.path,
  "-o",
  `UserKnownHostsFile=${sshd().knownHostsPath}`,
];

describe("smolssh argument parsing", () => {
  it("parses destinations and forward specs like OpenSSH", () => {
    expect(parseDestination("alice@host")).toEqual({ user: "alice", host: "host" });
    expect(parseDestination("a@b@host")).toEqual({ user: "a@b", host: "host" });
    expect(parseDestination("ssh://bob@[::1]:22")).toEqual({ user: "bob", host: "::1" });
    expect(parseForwardSpec("8080:db:5432", "-L")).toEqual({ port: 8080, host: "db", hostPort: 5432 });
    expect(parseForwardSpec("0.0.0.0:8080:[::1]:80", "-L")).toEqual({
      bindHost: "0.0.0.0",
      port: 8080,
      host: "::1",
      hostPort: 80,
    });
    expect(parseDynamicSpec("1080")).toEqual({ port: 1080 });
    expect(parseDynamicSpec("127.0.0.1:0")).toEqual({ bindHost: "127.0.0.1", port: 0 });
    expect(() => parseForwardSpec("8080:db", "-L")).toThrow(ValidationError);
    const plan = buildPlan("u@h", ["ls", "-la"], {
      port: "2222",
      option: ["StrictHostKeyChecking=accept-new", "ServerAliveInterval=5", "Bogus=1"],
    });
    expect(plan.command).toBe("ls -la");
    expect(plan.connect).toMatchObject({
      host: "h",
      username: "u",
      port: 2222,
      hostKey: { policy: "accept-new" },
    });
    expect(plan.connect.keepalive).toEqual({ intervalMs: 5000, countMax: 3 });
    expect(plan.warnings).toEqual(["-o bogus is not supported and was ignored."]);
  });
});

describe("smolssh against a real sshd", () => {
  it("runs a command: output, stderr, stdin and the remote exit status", async () => {
    const r = await smolssh([...base(), `${sshd().user}@127.0.0.1`, "echo out; echo err >&2; exit 7"]).done;
    expect(r).toEqual({ code: 7, stdout: "out\n", stderr: "err\n" });
    const piped = await smolssh([...base(), `${sshd().user}@127.0.0.1`, "tr", "a-z", "A-Z"], {
      stdin: "hello\n",
    }).done;
    expect(piped).toMatchObject({ code: 0, stdout: "HELLO\n" });
  });

  it("exits 255 on connection errors and writes a redacted evidence bundle on failure", async () => {
    const evidence = join(dir, "evidence.json");
    const dead = await freePort();
    const r = await smolssh([
      ...base(),
      "-p",
      String(dead),
      "--evidence",
      evidence,
      `${sshd().user}@127.0.0.1`,
      "true",
    ]).done;
    expect(r.code).toBe(255);
    expect(r.stderr).toMatch(/refused/);
    const b = await EvidenceBundle.fromFile(evidence);
    expect((b.errorContext as { code?: string }).code).toBe("SSH_CONNECTION_REFUSED");
    expect((await stat(evidence)).mode & 0o777).toBe(0o600);
  });

  it("refuses an unknown host key by default (no silent trust)", async () => {
    const emptyKnown = join(dir, "known_hosts_empty");
    await writeFile(emptyKnown, "");
    const r = await smolssh([
      "-F",
      emptyConfig,
      "-p",
      String(sshd().port),
      "-i",
      sshd().clientKey.path,
      "-o",
      `UserKnownHostsFile=${emptyKnown}`,
      `${sshd().user}@127.0.0.1`,
      "echo should-not-run",
    ]).done;
    expect(r.code).toBe(255);
    expect(r.stdout).toBe("");
    expect(r.stderr).toMatch(/not known/);
  });

  it("writes --events as JSONL while the session runs", async () => {
    const log = join(dir, "events.jsonl");
    const r = await smolssh([...base(), "--events", log, `${sshd().user}@127.0.0.1`, "echo hi"]).done;
    expect(r.code).toBe(0);
    const types = parseEventLog(await readFile(log, "utf8")).map((e) => e.type);
    expect(types).toEqual(expect.arrayContaining(["CONNECT", "AUTH", "EXEC", "DISCONNECT"]));
  });

  it("-N -L forwards a port until signalled", async () => {
    const echo = await echoServer();
    const localPort = await freePort();
    const p = smolssh([
      ...base(),
      "-N",
      "-L",
      `${localPort}:127.0.0.1:${echo.port}`,
      `${sshd().user}@127.0.0.1`,
    ]);
    let child: ChildProcess | undefined = p.child;
    try {
      let back: Buffer | undefined;
      const deadline = Date.now() + 15_000;
      while (!back && Date.now() < deadline) {
        back = await echoThrough(localPort, Buffer.from("through -L"), 2000).catch(() => undefined);
        if (!back) await new Promise((r) => setTimeout(r, 200));
      }
      expect(back?.toString()).toBe("through -L");
      p.child.kill("SIGTERM");
      expect((await p.done).code).toBe(0);
      child = undefined;
    } finally {
      child?.kill("SIGKILL");
      await echo.close();
    }
  });
});
