/**
 * `npm start` (scripts/start.ts) end to end on a real microVM: its exported main prints every
 * example's result and the timing table, never the secret, and leaves no VM behind; the script
 * itself, interrupted with SIGINT after boot, deletes its VM and exits 130.
 */
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { main } from "../../scripts/start.js";
import { SmolVM } from "../../src/vm/smolvm.js";

const ROOT = join(import.meta.dirname, "..", "..");

function qemuRunning(vmId: string): boolean {
  try {
    execFileSync("pgrep", ["-f", "--", `-name ${vmId}`], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

describe("npm start (scripts/start.ts)", () => {
  let dataDir: string;
  beforeAll(() => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-start-test-"));
  });
  afterAll(async () => {
    for (const r of await SmolVM.list({ dataDir }).catch(() => [])) {
      await (await SmolVM.fromId(r.id, { dataDir })).delete();
    }
    rmSync(dataDir, { recursive: true, force: true });
  });

  it("runs every example, prints the timings, hides the secret and deletes its VM", async () => {
    const lines: string[] = [];
    const summary = await main({ dataDir, log: (l) => lines.push(l), warmRuns: 5 });
    const text = lines.join("\n");
    expect(text).not.toContain("secret-123");

    expect(lines[0]).toMatch(/^image tiny: (cached|built in \d+\.\ds) \(\d+ ms\)$/);
    expect(lines[1]).toMatch(/^accelerator: (kvm|tcg) \(.+; (cached verdict|probed in \d+ ms)\)$/);
    lines.splice(1, 1);
    expect(lines[1]).toBe(
      `booted ${summary.vmId} in ${lines[1]!.match(/in (\d+) ms/)![1]} ms (accelerator ${summary.accel}, channel agent, cold)`,
    );
    expect(summary.accel).toMatch(/^(kvm|tcg)$/);
    expect(lines[2]).toMatch(new RegExp(`^uname -a: Linux ${summary.vmId} \\S+ .* x86_64 GNU/Linux$`));
    expect(lines[3]).toBe(
      "env var: API_KEY from setEnvVars reached the login shell (value matched, not shown)",
    );
    expect(lines[4]).toBe('file: /app/data/test.txt written and read back: "Hello World"');
    expect(lines[5]).toMatch(/^failing command: ls \/nonexistent -> exit code [1-9]\d*, ok false$/);
    expect(lines[6]).toMatch(/^upload: 16 MiB in \d+ ms, sha256 in the guest matches \([0-9a-f]{16}…\)$/);

    const row = (label: string) => lines.find((l) => l.startsWith(label));
    expect(summary.channel).toBe("agent");
    expect(row("boot to agent")).toMatch(new RegExp(`^boot to agent +${summary.bootToChannelMs} ms$`));
    for (const label of [
      "  QEMU start",
      "  kernel (to /init)",
      "  guest network up (guest clock)",
      "  rest (init, agent handshake)",
    ]) {
      expect(row(label)).toMatch(/ \d+ ms$/);
    }
    expect(row("first command")).toMatch(/ \d+ ms$/);
    expect(row("warm command p50 (5x true)")).toMatch(/ \d+\.\d ms$/);
    expect(row("create to first command, cold boot")).toMatch(/ \d+ ms$/);
    // The demo's own create (the first in this data dir) left the template.
    expect(row("create to first command, from the template")).toMatch(/ \d+ ms \(0\.\d\dx\)$/);
    expect(row("create to first command, from a warm pool")).toMatch(/ \d+ ms \(0\.\d\dx\)$/);
    expect(row("accelerator")).toMatch(new RegExp(`^accelerator +${summary.accel}\\b`));
    expect(summary.warmP50Ms).toBeGreaterThan(0);
    expect(summary.warmP50Ms).toBeLessThan(summary.firstCommandMs + 1_000);
    expect(lines.at(-1)).toBe(`deleted ${summary.vmId}`);

    expect(await SmolVM.list({ dataDir })).toEqual([]);
    expect(existsSync(join(dataDir, "vms", summary.vmId))).toBe(false);
    expect(qemuRunning(summary.vmId)).toBe(false);
  }, 240_000);

  it("deletes its VM and exits 130 when interrupted with SIGINT after boot", async () => {
    const child = spawn(join(ROOT, "node_modules", ".bin", "tsx"), [join(ROOT, "scripts", "start.ts")], {
      cwd: ROOT,
      env: { ...process.env, SMOLVM_DATA_DIR: dataDir },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stderr.on("data", (d) => (stderr += d));
    const booted = new Promise<string>((resolve, reject) => {
      child.stdout.on("data", (d) => {
        stdout += d;
        const m = stdout.match(/^booted (vm-[0-9a-f]{12}) /m);
        if (m) resolve(m[1]!);
      });
      child.on("exit", () => reject(new Error(`start.ts exited before booting:\n${stdout}\n${stderr}`)));
    });
    const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
    const vmId = await booted;
    expect(qemuRunning(vmId)).toBe(true);
    child.kill("SIGINT");
    expect(await exited).toBe(130);
    expect(stderr).toContain("SIGINT: stopping, deleting the VM");
    expect(stderr).toContain("npm start failed: interrupted");
    expect(stdout).toContain(`deleted ${vmId}\n`);
    expect(await SmolVM.list({ dataDir })).toEqual([]);
    expect(readdirSync(join(dataDir, "vms"))).toEqual([]);
    expect(qemuRunning(vmId)).toBe(false);
  }, 240_000);
});
