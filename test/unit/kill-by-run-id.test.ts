import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { ValidationError } from "../../src/errors.js";
import { killByRunIdScript } from "../../src/ssh/exec-channel.js";

function pgrepCount(pattern: string): number {
  try {
    return Number(execFileSync("pgrep", ["-c", "-f", pattern]).toString());
  } catch {
    return 0;
  }
}

/** A PATH where grep, tr, cat and kill are busybox's, as in the tiny guest image. */
function busyboxPath(): string {
  const dir = mkdtempSync(join(tmpdir(), "bbpath-"));
  for (const tool of ["grep", "tr", "cat", "kill", "sh"]) symlinkSync("/bin/busybox", join(dir, tool));
  return dir;
}

describe("kill by run id (the fallback when sshd ignores signal requests)", () => {
  it.each(["host", "busybox"])(
    "kills tagged processes, their children that cleared env, and nothing else (%s tools)",
    async (tools) => {
      const bb = tools === "busybox" ? busyboxPath() : undefined;
      const id = "0123456789abcdef";
      const n = 7000 + Math.floor(Math.random() * 900); // unique sleep lengths to find our processes
      const mine = `sleep ${n}[0-3]`;
      const tagged = spawn("/bin/sh", ["-c", `sleep ${n}1 & env -i /bin/sleep ${n}2 & sleep ${n}3; wait`], {
        env: { PATH: process.env.PATH, SMOLVM_RUN_ID: id },
        detached: true, // its own process group, as sshd gives each session
        stdio: "ignore",
      });
      const bystander = spawn("/bin/sh", ["-c", `sleep ${n}0`], {
        env: { PATH: process.env.PATH },
        stdio: "ignore",
      });
      try {
        await new Promise((r) => setTimeout(r, 200));
        const tagged3 = `sleep ${n}[123]`;
        expect(pgrepCount(tagged3)).toBeGreaterThanOrEqual(3);
        execFileSync(bb ? join(bb, "sh") : "/bin/sh", ["-c", killByRunIdScript(id)], {
          env: { PATH: bb ?? process.env.PATH },
        });
        await new Promise((r) => setTimeout(r, 200));
        expect(pgrepCount(tagged3)).toBe(0);
        expect(pgrepCount(`sleep ${n}0`)).toBeGreaterThanOrEqual(1);
      } finally {
        tagged.kill("SIGKILL");
        bystander.kill("SIGKILL");
        try {
          process.kill(-tagged.pid!, "SIGKILL");
        } catch {}
        try {
          execFileSync("pkill", ["-KILL", "-f", mine]);
        } catch {}
        if (bb) rmSync(bb, { recursive: true, force: true });
      }
    },
  );

  it("accepts only a hex run id", () => {
    expect(() => killByRunIdScript("'; rm -rf / #")).toThrow(ValidationError);
  });
});
