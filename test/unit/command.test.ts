import { execFileSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import {
  CommandResult,
  OutputCollector,
  quoteSh,
  validateRunOptions,
  wrapCommand,
} from "../../src/command.js";
import { ValidationError } from "../../src/errors.js";

/** Runs a wrapped command through a real local /bin/sh, the way sshd would. */
function viaSh(cmd: string, opts: Parameters<typeof wrapCommand>[1] = {}, stdin = ""): string {
  const w = wrapCommand(cmd, opts);
  const input = Buffer.concat([w.stdinPrefix ?? Buffer.alloc(0), Buffer.from(stdin)]);
  return execFileSync("/bin/sh", ["-c", w.command], {
    input,
    env: { SHELL: "/bin/sh", PATH: process.env.PATH },
  }).toString();
}

describe("command wrapping", () => {
  it("quotes any string for sh", () => {
    for (const s of ["", "a b", "it's", "$(rm -rf /)", "`x`", '"q"', "a\nb", "\\"]) {
      expect(execFileSync("/bin/sh", ["-c", `printf %s ${quoteSh(s)}`]).toString()).toBe(s);
    }
  });

  it("raw without env or cwd is verbatim", () => {
    expect(wrapCommand("echo hi", { shell: "raw" })).toEqual({
      command: "echo hi",
      stdinPrefix: undefined,
      script: "echo hi",
    });
  });

  it("login wraps with the login shell", () => {
    expect(wrapCommand("echo 'x'").command).toBe(`exec "\${SHELL:-/bin/sh}" -lc 'echo '"'"'x'"'"''`);
    // What a channel that starts the login shell itself (the agent) hands it.
    expect(wrapCommand("echo 'x'").script).toBe("echo 'x'");
    expect(wrapCommand("pwd", { cwd: "/tmp" }).script).toBe("cd -- '/tmp' || exit 1;\npwd");
    expect(viaSh("echo 'x' \"$0\"")).toBe("x /bin/sh\n");
  });

  it("delivers env through stdin, keeps the caller's stdin intact, and never puts values in the command", () => {
    const env = { A: "secret value", B: "it's\nmulti\nline", C: "$(touch /tmp/pwned)" };
    for (const shell of ["login", "raw"] as const) {
      const w = wrapCommand('printf "%s|%s|%s|" "$A" "$B" "$C"; cat', { shell, env });
      for (const v of Object.values(env)) expect(w.command).not.toContain(v);
      expect(viaSh('printf "%s|%s|%s|" "$A" "$B" "$C"; cat', { shell, env }, "user-stdin\n")).toBe(
        `secret value|it's\nmulti\nline|$(touch /tmp/pwned)|user-stdin\n`,
      );
    }
  });

  it("changes directory, and fails with exit 1 when it cannot", () => {
    expect(viaSh("pwd", { cwd: "/tmp" })).toBe("/tmp\n");
    const w = wrapCommand("pwd", { cwd: "/nonexistent-dir", shell: "raw" });
    let status = 0;
    try {
      execFileSync("/bin/sh", ["-c", w.command], { stdio: "pipe" });
    } catch (e: any) {
      status = e.status;
    }
    expect(status).toBe(1);
  });

  it("encodes powershell as UTF-16LE base64 and wraps cmd", () => {
    const w = wrapCommand("Write-Output 'é'", { shellKind: "powershell" });
    const b64 = w.command.split(" ").at(-1)!;
    expect(Buffer.from(b64, "base64").toString("utf16le")).toBe("Write-Output 'é'");
    expect(w.command.startsWith("powershell.exe -NoProfile")).toBe(true);
    expect(wrapCommand("dir C:\\", { shellKind: "cmd" }).command).toBe('cmd.exe /s /c "dir C:\\"');
    expect(wrapCommand("dir", { shellKind: "cmd", shell: "raw" }).command).toBe("dir");
  });
});

describe("validation", () => {
  it.each([
    ["", {}],
    ["   ", {}],
    ["echo \0", {}],
    ["echo", { timeoutMs: 0 }],
    ["echo", { timeoutMs: -5 }],
    ["echo", { timeoutMs: Number.NaN }],
    ["echo", { env: { "1BAD": "x" } }],
    ["echo", { env: { "A-B": "x" } }],
    ["echo", { env: { OK: "nul\0" } }],
    ["echo", { cwd: "" }],
    ["echo", { shell: "bash" }],
  ])("rejects %j %j", (cmd, opts) => {
    expect(() => validateRunOptions(cmd, opts as any)).toThrow(ValidationError);
  });

  it("never echoes an env value in the error", () => {
    try {
      validateRunOptions("x", { env: { GOOD: "hunter2\0" } });
    } catch (e) {
      expect(String((e as Error).message)).not.toContain("hunter2");
    }
  });
});

describe("OutputCollector and CommandResult", () => {
  it("caps memory, sets truncated, keeps stream order and exact bytes", () => {
    const seen: Buffer[] = [];
    const c = new OutputCollector(5, (d) => seen.push(d));
    c.push("stdout", Buffer.from([0, 1, 2]));
    c.push("stderr", Buffer.from("ab"));
    c.push("stdout", Buffer.from([3, 4]));
    const r = c.result(0, null, 1, "buffer") as CommandResult<Buffer>;
    expect([...r.stdout]).toEqual([0, 1, 2]);
    expect(r.stderr.toString()).toBe("ab");
    expect(r.truncated).toBe(true);
    expect(Buffer.concat(seen)).toEqual(Buffer.from([0, 1, 2, 3, 4]));
    expect(c.bytesStdout).toBe(5);
  });

  it("has ok and output", () => {
    expect(new CommandResult(0, " hi \n", "", 1).output).toBe("hi");
    expect(new CommandResult(3, "", "", 1).ok).toBe(false);
    expect(new CommandResult(null, "", "", 1, "KILL").ok).toBe(false);
  });

  it("supports await using (disposable syntax compiles for Node 20)", async () => {
    let closed = 0;
    {
      await using _r = { [Symbol.asyncDispose]: async () => void closed++ };
    }
    expect(closed).toBe(1);
  });
});
