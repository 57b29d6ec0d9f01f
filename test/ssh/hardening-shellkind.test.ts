/**
 * shellKind per call: the exact command string on the wire, read back from a real sshd whose
 * ForceCommand prints what the client asked to execute (sshd passes it as SSH_ORIGINAL_COMMAND).
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ValidationError } from "../../src/errors.js";
import { SSHClient, type SSHClientOptions } from "../../src/ssh/client.js";
import { SSHConnection } from "../../src/ssh/connection.js";
import { useSshd } from "../fixtures/vitest-sshd.js";
import { sshdOptions } from "./resilience-helpers.js";

const sshd = useSshd({ extraConfig: ["ForceCommand printenv SSH_ORIGINAL_COMMAND"] });

const LOGIN_SH = /^SMOLVM_RUN_ID=[0-9a-f]{16} exec "\$\{SHELL:-\/bin\/sh\}" -lc 'echo hi'\n$/;
const PS_PREFIX = "powershell.exe -NoProfile -NonInteractive -EncodedCommand ";

/** The script inside a powershell wire command. */
function decodePowerShell(wire: string): string {
  expect(wire.startsWith(PS_PREFIX)).toBe(true);
  return Buffer.from(wire.slice(PS_PREFIX.length).trim(), "base64").toString("utf16le");
}

function clientOptions(extra: Partial<SSHClientOptions> = {}): SSHClientOptions {
  const o = sshdOptions(sshd());
  return {
    host: o.host,
    port: o.port,
    user: o.username,
    keyPath: sshd().clientKey.path,
    hostKey: o.hostKey,
    ...extra,
  };
}

let shClient: SSHClient;
let cmdClient: SSHClient;
beforeAll(() => {
  shClient = new SSHClient(clientOptions());
  cmdClient = new SSHClient(clientOptions({ shellKind: "cmd" }));
});
afterAll(async () => {
  await shClient?.close();
  await cmdClient?.close();
});

describe("shellKind per run", () => {
  it("SSHClient.run: the call's shellKind wins over the client's", async () => {
    expect((await shClient.run("echo hi")).stdout).toMatch(LOGIN_SH);
    expect((await shClient.run("echo hi", { shellKind: "cmd" })).stdout).toBe('cmd.exe /s /c "echo hi"\n');
    const ps = (await shClient.run("Write-Output 'hi'", { shellKind: "powershell" })).stdout;
    expect(decodePowerShell(ps)).toBe("Write-Output 'hi'");

    // The client's default applies when the call does not say; a call can go back to sh.
    expect((await cmdClient.run("echo hi")).stdout).toBe('cmd.exe /s /c "echo hi"\n');
    expect((await cmdClient.run("echo hi", { shellKind: "sh" })).stdout).toMatch(LOGIN_SH);
    expect((await cmdClient.run("dir", { shellKind: "cmd", cwd: "C:\\work" })).stdout).toBe(
      'cmd.exe /s /c "cd /d "C:\\work"&& dir"\n',
    );
    const psCwd = (await cmdClient.run("Get-Date", { shellKind: "powershell", cwd: "C:\\it's" })).stdout;
    expect(decodePowerShell(psCwd)).toBe("Set-Location -LiteralPath 'C:\\it''s';Get-Date");
    // raw sends the command verbatim whatever the kind.
    expect((await cmdClient.run("echo hi", { shell: "raw" })).stdout).toBe("echo hi\n");
  });

  it("SSHConnection.exec and streamExec take shellKind per call", async () => {
    const conn = await SSHConnection.connect(sshdOptions(sshd()));
    try {
      expect((await conn.exec("echo hi", { shellKind: "cmd" })).stdout).toBe('cmd.exe /s /c "echo hi"\n');
      expect((await conn.exec("echo hi")).stdout).toMatch(LOGIN_SH);
      let out = "";
      for await (const ev of conn.streamExec("Write-Output 'hi'", { shellKind: "powershell" })) {
        if (ev.stream === "stdout") out += ev.data.toString();
      }
      expect(decodePowerShell(out)).toBe("Write-Output 'hi'");
    } finally {
      await conn.close();
    }
  });

  it("rejects an unknown shellKind before anything is sent", async () => {
    const bad = { shellKind: "bash" } as never;
    await expect(shClient.run("echo hi", bad)).rejects.toThrow(ValidationError);
    const conn = await SSHConnection.connect(sshdOptions(sshd()));
    try {
      await expect(conn.exec("echo hi", bad)).rejects.toThrow(ValidationError);
      expect(() => conn.streamExec("echo hi", bad)).toThrow(ValidationError);
    } finally {
      await conn.close();
    }
    expect(() => new SSHClient(clientOptions(bad))).toThrow(ValidationError);
  });

  it("cmd: an env value or cwd cmd.exe cannot quote is refused before anything runs", async () => {
    for (const value of ['s3cr3t"&whoami&"', "50%PATH%", "a!b!", "line\r\nwhoami"]) {
      await expect(cmdClient.run("echo hi", { env: { K: value } })).rejects.toThrow(ValidationError);
    }
    await expect(cmdClient.run("dir", { cwd: 'C:\\x"&whoami&"' })).rejects.toThrow(ValidationError);
    const conn = await SSHConnection.connect(sshdOptions(sshd()));
    try {
      expect(() => conn.streamExec("echo hi", { shellKind: "cmd", env: { K: 's3cr3t"&whoami&"' } })).toThrow(
        ValidationError,
      );
    } finally {
      await conn.close();
    }
    // A value cmd.exe can carry goes through inside the quotes, & and all.
    expect((await cmdClient.run("echo hi", { env: { K: "a&b|c<d>e^f" } })).stdout).toBe(
      'cmd.exe /s /c "set "K=a&b|c<d>e^f"&& echo hi"\n',
    );
  });
});
