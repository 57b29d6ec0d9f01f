/** The agent socket lock: one holder, stale locks taken over, clear errors naming the holder. */
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { ConnectionRefusedError } from "../../src/errors.js";
import { acquireAgentLock } from "../../src/vm/agent-lock.js";

const dir = mkdtempSync(join(tmpdir(), "smolvm-agent-lock-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("acquireAgentLock", () => {
  it("has one holder; the lock file is 0600 and goes away on release", () => {
    const path = join(dir, "a.lock");
    const release = acquireAgentLock(path, "vm1");
    expect(statSync(path).mode & 0o777).toBe(0o600);
    expect(readFileSync(path, "utf8")).toMatch(new RegExp(`^${process.pid} [0-9a-f]{16}\\n$`));
    const e = (() => {
      try {
        acquireAgentLock(path, "vm1");
      } catch (x) {
        return x as ConnectionRefusedError;
      }
    })();
    expect(e).toBeInstanceOf(ConnectionRefusedError);
    expect(e!.code).toBe("AGENT_BUSY");
    expect(e!.message).toContain("held by another handle in this process");
    release();
    expect(existsSync(path)).toBe(false);
    acquireAgentLock(path, "vm1")();
  });

  it("names a live holder process, and takes over the lock of a dead one", async () => {
    const path = join(dir, "b.lock");
    const child = spawn("sleep", ["30"], { stdio: "ignore" });
    await new Promise((r) => child.once("spawn", r));
    try {
      writeFileSync(path, `${child.pid} 0123456789abcdef\n`);
      expect(() => acquireAgentLock(path, "vm2")).toThrow(`held by process ${child.pid}`);
    } finally {
      child.kill("SIGKILL");
      await new Promise((r) => child.once("exit", r));
    }
    // The holder is gone: its lock is stale.
    const release = acquireAgentLock(path, "vm2");
    expect(readFileSync(path, "utf8").startsWith(`${process.pid} `)).toBe(true);
    release();
  });

  it("a release only removes its own lock", () => {
    const path = join(dir, "c.lock");
    const release = acquireAgentLock(path, "vm3");
    writeFileSync(path, "1 someone-else\n"); // pid 1 is alive: another holder took over
    release();
    expect(readFileSync(path, "utf8")).toBe("1 someone-else\n");
  });
});
