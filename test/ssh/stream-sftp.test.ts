import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SmolVMError, SSHConnectionError } from "../../src/errors.js";
import { AutomationEngine } from "../../src/ssh/automation.js";
import { SSHConnection } from "../../src/ssh/connection.js";
import { getFile, putFile } from "../../src/ssh/sftp.js";
import { openShell } from "../../src/ssh/shell.js";
import { useSshd } from "../fixtures/vitest-sshd.js";
import { sha256, sshdOptions } from "./resilience-helpers.js";

const sshd = useSshd();
let conn: SSHConnection;
let dir: string;
beforeAll(async () => {
  conn = await SSHConnection.connect(sshdOptions(sshd()));
  dir = await mkdtemp(join(tmpdir(), "smolvm-sftp-"));
});
afterAll(async () => {
  await conn?.close();
  await rm(dir, { recursive: true, force: true });
});

describe("SFTP putFile/getFile and interactive shell", () => {
  it("round-trips 8 MiB intact, with the requested mode", async () => {
    const data = randomBytes(8 * 1024 * 1024);
    const local = join(dir, "up.bin");
    await writeFile(local, data);
    const remote = `/tmp/smolvm-sftp-${process.pid}-${Date.now()}.bin`;
    await putFile(conn, local, remote, { mode: 0o600 });
    const r = await conn.exec(`stat -c %a ${remote}; sha256sum < ${remote}`);
    expect(r.stdout.split("\n")[0]).toBe("600");
    expect(r.stdout).toContain(sha256(data));
    await getFile(conn, remote, join(dir, "down.bin"));
    expect(sha256(await readFile(join(dir, "down.bin")))).toBe(sha256(data));
    await conn.exec(`rm -f ${remote}`);
    // A missing file is about the file, not the connection.
    const missing = await getFile(conn, "/nonexistent/file", join(dir, "x")).catch((e) => e);
    expect(missing).toBeInstanceOf(SmolVMError);
    expect(missing).not.toBeInstanceOf(SSHConnectionError);
    expect(missing.code).toBe("FILE_TRANSFER");
    expect(missing.details.sftpCode).toBe(2);
  });

  it("openShell gives a login shell on a PTY that an AutomationEngine can drive", async () => {
    const shell = await openShell(conn, { rows: 30, cols: 100 });
    const engine = new AutomationEngine(shell);
    await engine.send("stty size; echo marker-$((6*7)); exit 5");
    const r = await engine.expect(/marker-(\d+)/, { timeoutMs: 10_000 });
    expect(r.groups).toEqual(["42"]);
    expect(r.before).toContain("30 100");
    expect(await shell.wait()).toEqual({ exitCode: 5, signal: null });
    await engine.close();
  });
});
