/** The agent build: static, cached by fingerprint, rebuilt when a source changes. */
import { execFileSync } from "node:child_process";
import { cpSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { HostDependencyError } from "../../src/errors.js";
import { agentSourceDir, buildAgent, PREBUILT_DIR, writePrebuiltAgent } from "../../src/image/agent-build.js";

function hasInterpreter(elf: Buffer): boolean {
  const phoff = Number(elf.readBigUInt64LE(0x20));
  const size = elf.readUInt16LE(0x36);
  const count = elf.readUInt16LE(0x38);
  for (let i = 0; i < count; i++) if (elf.readUInt32LE(phoff + i * size) === 3) return true;
  return false;
}

const dir = mkdtempSync(join(tmpdir(), "smolvm-agent-build-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("buildAgent", () => {
  it("builds a static binary once and reuses it until a source changes", async () => {
    const src = join(dir, "src");
    cpSync(agentSourceDir(), src, { recursive: true, filter: (p) => !p.endsWith("smolvm-agent") });
    const cacheDir = join(dir, "cache");
    const first = await buildAgent({ sourceDir: src, cacheDir });
    // No PT_INTERP program header: statically linked, runs in any guest.
    expect(hasInterpreter(readFileSync(first))).toBe(false);
    expect(hasInterpreter(readFileSync("/bin/sh"))).toBe(true);
    expect(execFileSync(first, ["--self-test"]).toString()).toBe("ok\n");
    expect(execFileSync(first, ["--version"]).toString()).toBe("smolvm-agent 0.1.0 protocol 1\n");
    const mtime = statSync(first).mtimeMs;
    expect(await buildAgent({ sourceDir: src, cacheDir })).toBe(first);
    expect(statSync(first).mtimeMs).toBe(mtime);
    writeFileSync(join(src, "agent.c"), `${readFileSync(join(src, "agent.c"), "utf8")}\n/* changed */\n`);
    const second = await buildAgent({ sourceDir: src, cacheDir });
    expect(second).not.toBe(first);
  });

  it("uses the packaged prebuilt agent without a compiler, only while it matches the sources", async () => {
    const src = join(dir, "packaged");
    cpSync(agentSourceDir(), src, {
      recursive: true,
      filter: (p) => !p.endsWith("smolvm-agent") && !p.includes("prebuilt"),
    });
    // What `npm pack` runs (scripts/prebuild-agent.ts).
    const bin = await writePrebuiltAgent({ sourceDir: src, cacheDir: join(dir, "pack-cache") });
    expect(bin).toBe(join(src, PREBUILT_DIR, "smolvm-agent"));
    expect(hasInterpreter(readFileSync(bin))).toBe(false);
    expect(statSync(bin).mode & 0o777).toBe(0o755);
    // A host with no compiler at all gets the prebuilt binary.
    const noCc = { sourceDir: src, cacheDir: join(dir, "user-cache"), cc: "/nonexistent/cc" };
    const got = await buildAgent(noCc);
    expect(got).toBe(bin);
    expect(execFileSync(got, ["--self-test"]).toString()).toBe("ok\n");
    // Opting out, or a host-only build, compiles (and so needs the compiler).
    await expect(buildAgent({ ...noCc, prebuilt: false })).rejects.toBeInstanceOf(HostDependencyError);
    await expect(buildAgent({ ...noCc, static: false })).rejects.toBeInstanceOf(HostDependencyError);
    // Sources changed since packing: the stale binary is never used.
    writeFileSync(join(src, "agent.c"), `${readFileSync(join(src, "agent.c"), "utf8")}\n/* patched */\n`);
    await expect(buildAgent(noCc)).rejects.toBeInstanceOf(HostDependencyError);
  });

  it("says what to install when the compiler is missing", async () => {
    const err = await buildAgent({ cc: "/nonexistent/cc", cacheDir: join(dir, "c2") }).catch((e) => e);
    expect(err).toBeInstanceOf(HostDependencyError);
    expect(err.message).toContain("apt-get install gcc");
  });
});
