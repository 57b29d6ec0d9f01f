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
  return new Promise((resolve) => {
    execFile(
      "node",
      ["--import", "tsx", CLI, ...args],
      { env: { ...process.env, SMOLVM_DATA_DIR: dataDir }, timeout: 180_000 },
      (err, stdout, stderr) =>
        resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

describe("smolvm CLI", () => {
  let dataDir: string;
  let id: string;
  beforeAll(async () => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-cli-"));
    const r = await smolvm(dataDir, "create", "--name", "cli-vm", "-e", "GREETING=hello there");
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

  it("names a missing VM clearly and exits non-zero", async () => {
    const r = await smolvm(dataDir, "run", "no-such-vm", "true");
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('no VM named or with id "no-such-vm"');
  });
});
