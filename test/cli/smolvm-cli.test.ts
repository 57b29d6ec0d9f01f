/**
 * The `smolvm` command end to end on a real microVM: the verbs are thin, so this checks that
 * they reach the SDK, print what they should and pass exit codes through.
 */
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const CLI = join(__dirname, "../../src/cli/smolvm.ts");

function smolvm(
  dataDir: string,
  ...args: string[]
): Promise<{ code: number; stdout: string; stderr: string }> {
  return smolvmIn(dataDir, undefined, ...args);
}

/** Runs the CLI with `input` on its stdin (stdin is empty when undefined). */
function smolvmIn(
  dataDir: string,
  input: string | undefined,
  ...args: string[]
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = execFile(
      "node",
      ["--import", "tsx", CLI, ...args],
      { env: { ...process.env, SMOLVM_DATA_DIR: dataDir }, timeout: 180_000 },
      (err, stdout, stderr) =>
        resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
    child.stdin?.end(input ?? "");
  });
}

describe("smolvm CLI", () => {
  let dataDir: string;
  let id: string;
  beforeAll(async () => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-cli-"));
    const r = await smolvm(
      dataDir,
      "create",
      "--name",
      "cli-vm",
      "-e",
      "GREETING=hello there",
      "--label",
      "team=cli",
      "--ttl",
      "2h",
    );
    expect(r.code, r.stderr).toBe(0);
    id = r.stdout.trim();
  }, 240_000);
  afterAll(async () => {
    await smolvm(dataDir, "rm", id);
    rmSync(dataDir, { recursive: true, force: true });
  });

  it("creates, lists, runs with exit codes, and manages env vars and files", async () => {
    expect(id).toMatch(/^vm-[0-9a-f]{12}$/);
    const list = await smolvm(dataDir, "list");
    expect(list.stdout).toMatch(new RegExp(`${id}\\s+cli-vm\\s+running\\s+tiny\\s+\\d+`));

    const ok = await smolvm(dataDir, "run", "cli-vm", "echo $GREETING; echo oops >&2");
    expect([ok.code, ok.stdout, ok.stderr]).toEqual([0, "hello there\n", "oops\n"]);
    const fail = await smolvm(dataDir, "run", "cli-vm", "exit 3");
    expect(fail.code).toBe(3);

    expect((await smolvm(dataDir, "env", "set", "cli-vm", "TOKEN=abc=def")).code).toBe(0);
    expect((await smolvm(dataDir, "env", "list", "cli-vm")).stdout).toBe(
      "GREETING=hello there\nTOKEN=abc=def\n",
    );
    expect((await smolvm(dataDir, "env", "unset", "cli-vm", "TOKEN")).code).toBe(0);
    const bad = await smolvm(dataDir, "env", "set", "cli-vm", "1BAD=x");
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain("invalid");

    const local = mkdtempSync(join(tmpdir(), "smolvm-cli-files-"));
    try {
      writeFileSync(join(local, "in.txt"), "round trip\n");
      expect(
        (await smolvm(dataDir, "file", "upload", "cli-vm", join(local, "in.txt"), "/root/in.txt")).code,
      ).toBe(0);
      expect(
        (await smolvm(dataDir, "file", "download", "cli-vm", "/root/in.txt", join(local, "out.txt"))).code,
      ).toBe(0);
      expect(readFileSync(join(local, "out.txt"), "utf8")).toBe("round trip\n");
    } finally {
      rmSync(local, { recursive: true, force: true });
    }
    expect((await smolvm(dataDir, "logs", "cli-vm")).stdout).toContain("sshd-started");
  });

  it("sandbox verbs: list --label, run --detach, ps, attach, kill, fs, shell", async () => {
    const labelled = await smolvm(dataDir, "list", "--label", "team=cli", "--json");
    const vms = JSON.parse(labelled.stdout) as Array<{ id: string; labels: object; expiresAt: number }>;
    expect(vms.map((v) => v.id)).toEqual([id]);
    expect(vms[0]!.labels).toEqual({ team: "cli" });
    expect(Math.abs(vms[0]!.expiresAt - (Date.now() + 2 * 3600_000))).toBeLessThan(300_000);
    expect((await smolvm(dataDir, "list", "--label", "team=other")).stdout).toBe("no VMs\n");

    const started = await smolvm(
      dataDir,
      "run",
      "--detach",
      "cli-vm",
      "--",
      "echo from-bg; sleep 0.2; echo end; exit 5",
    );
    expect(started.code, started.stderr).toBe(0);
    const pid = Number(started.stdout.trim());
    expect(pid).toBeGreaterThan(1);
    const attached = await smolvm(dataDir, "attach", "cli-vm", String(pid));
    expect([attached.code, attached.stdout]).toEqual([5, "from-bg\nend\n"]);
    const ps = JSON.parse((await smolvm(dataDir, "ps", "cli-vm", "--json")).stdout) as Array<{
      pid: number;
      exitCode: number;
    }>;
    expect(ps.find((p) => p.pid === pid)?.exitCode).toBe(5);
    const sleeper = Number(
      (await smolvm(dataDir, "run", "--detach", "cli-vm", "--", "sleep 300")).stdout.trim(),
    );
    expect((await smolvm(dataDir, "kill", "cli-vm", String(sleeper), "--signal", "TERM")).code).toBe(0);
    expect((await smolvm(dataDir, "ps", "cli-vm")).stdout).toMatch(new RegExp(`${sleeper}\\s+killed TERM`));

    expect((await smolvm(dataDir, "fs", "mkdir", "-p", "cli-vm", "/fs/a/b")).code).toBe(0);
    await smolvm(dataDir, "run", "cli-vm", "printf 'abc' > /fs/a/f.txt");
    expect((await smolvm(dataDir, "fs", "ls", "cli-vm", "/fs", "--depth", "3")).stdout).toMatch(
      /file\s+0644\s+3 \/fs\/a\/f.txt/,
    );
    expect(JSON.parse((await smolvm(dataDir, "fs", "stat", "cli-vm", "/fs/a")).stdout)).toMatchObject({
      type: "dir",
    });
    expect((await smolvm(dataDir, "fs", "mv", "cli-vm", "/fs/a/f.txt", "/fs/g.txt")).code).toBe(0);
    expect((await smolvm(dataDir, "fs", "cat", "cli-vm", "/fs/g.txt")).stdout).toBe("abc");
    expect((await smolvm(dataDir, "fs", "rm", "-r", "cli-vm", "/fs")).code).toBe(0);
    const gone = await smolvm(dataDir, "fs", "cat", "cli-vm", "/fs/g.txt");
    expect(gone.code).toBe(1);

    const shell = await new Promise<{ code: number; stdout: string }>((resolve) => {
      const child = execFile(
        "node",
        ["--import", "tsx", CLI, "shell", "cli-vm"],
        { env: { ...process.env, SMOLVM_DATA_DIR: dataDir }, timeout: 60_000 },
        (err, stdout) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout }),
      );
      child.stdin!.end("echo in-shell-$((6*7)); exit 4\n");
    });
    expect(shell.code).toBe(4);
    expect(shell.stdout).toContain("in-shell-42");
  }, 120_000);
  it("takes secrets from an env file or stdin (never argv), and prints guest text without control sequences", async () => {
    const local = mkdtempSync(join(tmpdir(), "smolvm-cli-env-"));
    try {
      const file = join(local, "secrets.env");
      writeFileSync(file, "# comment\nexport DB_PASS='p@ss word'\nAPI_TOKEN=\"line1\\nline2\"\n\n");
      expect((await smolvm(dataDir, "env", "set", "cli-vm", "--env-file", file)).code).toBe(0);
      expect(
        (await smolvmIn(dataDir, "s3cr3t-from-stdin\n", "env", "set", "cli-vm", "STDIN_SECRET")).code,
      ).toBe(0);
      expect((await smolvmIn(dataDir, "A=1\nB=two\n", "env", "set", "cli-vm", "--env-stdin")).code).toBe(0);
      // A guest-controlled value with terminal escapes in it.
      expect(
        (
          await smolvm(
            dataDir,
            "run",
            "cli-vm",
            "--raw",
            `printf "export EVIL='a\\033]0;pwned\\007\\033[2Jb'\\n" >> /etc/profile.d/smolvm_env.sh`,
          )
        ).code,
      ).toBe(0);
      const list = await smolvm(dataDir, "env", "list", "cli-vm");
      expect(list.code, list.stderr).toBe(0);
      expect(list.stdout).toContain("DB_PASS=p@ss word\n");
      expect(list.stdout).toContain("API_TOKEN=line1\nline2\n");
      expect(list.stdout).toContain("STDIN_SECRET=s3cr3t-from-stdin\n");
      expect(list.stdout).toMatch(/^A=1$/m);
      expect(list.stdout).toMatch(/^B=two$/m);
      expect(list.stdout).toContain("EVIL=ab\n");
      expect(list.stdout).not.toContain("\x1b");
      const json = JSON.parse((await smolvm(dataDir, "env", "list", "cli-vm", "--json")).stdout);
      expect(json.EVIL).toBe("a\x1b]0;pwned\x07\x1b[2Jb");
      const run = await smolvm(dataDir, "run", "cli-vm", 'printf "%s|%s" "$STDIN_SECRET" "$DB_PASS"');
      expect(run.stdout).toBe("s3cr3t-from-stdin|p@ss word");
      // The console log as `smolvm logs` prints it: no escape sequences from the guest.
      await smolvm(
        dataDir,
        "run",
        "cli-vm",
        "--raw",
        "printf '\\033]0;pwned\\007\\033[31mred-marker\\n' > /dev/ttyS0",
      );
      const logs = await smolvm(dataDir, "logs", "cli-vm");
      expect(logs.stdout).toContain("red-marker");
      expect(logs.stdout).not.toContain("\x1b");
      await smolvm(
        dataDir,
        "env",
        "unset",
        "cli-vm",
        "DB_PASS",
        "API_TOKEN",
        "STDIN_SECRET",
        "A",
        "B",
        "EVIL",
      );
    } finally {
      rmSync(local, { recursive: true, force: true });
    }
  });

  it("pause, resume, snapshot create|list|rm, create --from-snapshot and fork", async () => {
    expect((await smolvm(dataDir, "pause", "cli-vm")).code).toBe(0);
    const listed = JSON.parse((await smolvm(dataDir, "list", "--json")).stdout) as Array<{ status: string }>;
    expect(listed.map((v) => v.status)).toEqual(["paused"]);
    const frozen = await smolvm(dataDir, "run", "cli-vm", "true");
    expect(frozen.code).toBe(1);
    expect(frozen.stderr).toContain("is paused. Resume it with vm.resume() (or `smolvm resume cli-vm`)");
    expect((await smolvm(dataDir, "resume", "cli-vm")).code).toBe(0);
    expect((await smolvm(dataDir, "run", "cli-vm", "echo from-source > /root/snap.txt")).code).toBe(0);

    const taken = await smolvm(dataDir, "snapshot", "create", "cli-vm", "--name", "cli-snap", "--json");
    expect(taken.code, taken.stderr).toBe(0);
    const snap = JSON.parse(taken.stdout) as Record<string, unknown>;
    expect(Object.keys(snap).sort()).toEqual(
      ["createdAt", "id", "image", "memoryMib", "name", "sizeBytes", "vcpus", "vmId"].sort(),
    );
    expect([snap.name, snap.vmId, snap.image]).toEqual(["cli-snap", id, "tiny"]);
    const all = JSON.parse((await smolvm(dataDir, "snapshot", "list", "--json")).stdout) as Array<{
      id: string;
    }>;
    expect(all.map((s) => s.id)).toEqual([snap.id]);
    expect((await smolvm(dataDir, "snapshot", "list")).stdout).toContain(`${snap.id}  cli-snap`);

    const made = await smolvm(dataDir, "create", "--from-snapshot", "cli-snap", "--name", "cli-clone");
    expect(made.code, made.stderr).toBe(0);
    const clone = made.stdout.trim();
    try {
      expect((await smolvm(dataDir, "run", "cli-clone", "cat /root/snap.txt")).stdout).toBe("from-source\n");
      const inUse = await smolvm(dataDir, "snapshot", "rm", "cli-snap");
      expect(inUse.code).toBe(1);
      expect(inUse.stderr).toContain(
        `snapshot ${snap.id} is still used by cli-clone: delete those VMs first`,
      );
    } finally {
      await smolvm(dataDir, "rm", clone);
    }
    expect((await smolvm(dataDir, "snapshot", "rm", "cli-snap")).code).toBe(0);
    expect((await smolvm(dataDir, "snapshot", "list")).stdout).toBe("no snapshots\n");

    const forked = await smolvm(dataDir, "fork", "cli-vm", "--count", "2", "--json");
    expect(forked.code, forked.stderr).toBe(0);
    const kids = (JSON.parse(forked.stdout) as Array<{ id: string }>).map((k) => k.id);
    try {
      expect(kids).toHaveLength(2);
      for (const kid of kids) {
        expect((await smolvm(dataDir, "run", kid, "cat /root/snap.txt")).stdout).toBe("from-source\n");
      }
    } finally {
      await smolvm(dataDir, "rm", ...kids);
    }
    const left = JSON.parse((await smolvm(dataDir, "list", "--json")).stdout) as Array<{ id: string }>;
    expect(left.map((v) => v.id)).toEqual([id]);
    expect((await smolvm(dataDir, "run", "cli-vm", "cat /root/snap.txt")).stdout).toBe("from-source\n");
  }, 240_000);

  it("prune leaves a running VM alone", async () => {
    const r = await smolvm(dataDir, "prune");
    expect([r.code, r.stdout]).toEqual([0, "nothing to prune\n"]);
    expect((await smolvm(dataDir, "list")).stdout).toContain("cli-vm");
  });

  it("names a missing VM clearly and exits non-zero", async () => {
    const r = await smolvm(dataDir, "run", "no-such-vm", "true");
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('no VM named or with id "no-such-vm"');
  });
});
