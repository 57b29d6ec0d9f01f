import { createHash, randomBytes } from "node:crypto";
import {
  lstatSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SshChannel } from "../../src/channel/ssh-channel.js";
import { SmolVMError, ValidationError } from "../../src/errors.js";
import { SSHClient } from "../../src/ssh/client.js";
import { useSshd } from "../fixtures/vitest-sshd.js";

const sshd = useSshd();
const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

describe("SshChannel against a real sshd", () => {
  let channel: SshChannel;
  let local: string;
  let remote: string;
  beforeAll(() => {
    const f = sshd();
    local = mkdtempSync(join(tmpdir(), "sshchan-local-"));
    // A directory the test user owns, standing in for the guest's filesystem.
    remote = `/tmp/smolvm-sshchan-${process.pid}`;
    channel = new SshChannel(
      new SSHClient({
        host: f.host,
        port: f.port,
        user: f.user,
        keyPath: f.clientKey.path,
        hostKey: { knownHostsPath: f.knownHostsPath },
      }),
      `${remote}/profile.d/smolvm_env.sh`,
    );
  });
  afterAll(async () => {
    await channel.run(`rm -rf ${remote}`, { shell: "raw" }).catch(() => {});
    await channel.close();
    rmSync(local, { recursive: true, force: true });
  });

  it("uploads and downloads 4 MiB exactly, creating parents and setting the mode", async () => {
    const data = randomBytes(4 * 1024 * 1024);
    writeFileSync(join(local, "up.bin"), data);
    await channel.putFile(join(local, "up.bin"), `${remote}/a/b/up.bin`, { mode: 0o600 });
    const r = await channel.run(
      `stat -c %a ${remote}/a/b/up.bin; sha256sum ${remote}/a/b/up.bin; ls -a ${remote}/a/b`,
    );
    expect(r.stdout).toBe(`600\n${sha(data)}  ${remote}/a/b/up.bin\n.\n..\nup.bin\n`);
    await channel.getFile(`${remote}/a/b/up.bin`, join(local, "down.bin"));
    expect(sha(readFileSync(join(local, "down.bin")))).toBe(sha(data));
    expect(statSync(join(local, "down.bin")).size).toBe(data.length);
  });

  it("downloads safely: replaces a symlink instead of writing through it, 0600, nothing partial, maxBytes", async () => {
    const data = randomBytes(300_000);
    writeFileSync(join(local, "src.bin"), data);
    await channel.putFile(join(local, "src.bin"), `${remote}/dl/src.bin`);
    // A symlink at the destination pointing at a file we must not touch.
    const victim = join(local, "victim.txt");
    writeFileSync(victim, "keep me");
    const dest = join(local, "dest.bin");
    symlinkSync(victim, dest);
    await channel.getFile(`${remote}/dl/src.bin`, dest);
    expect(readFileSync(victim, "utf8")).toBe("keep me");
    expect(lstatSync(dest).isSymbolicLink()).toBe(false);
    expect(sha(readFileSync(dest))).toBe(sha(data));
    expect(statSync(dest).mode & 0o777).toBe(0o600);
    // Over maxBytes: a typed error, the old destination intact, no temp file left behind.
    const e = await channel.getFile(`${remote}/dl/src.bin`, dest, { maxBytes: 100_000 }).catch((x) => x);
    expect(e).toBeInstanceOf(SmolVMError);
    expect(e.code).toBe("FILE_TOO_LARGE");
    expect(sha(readFileSync(dest))).toBe(sha(data));
    // A missing file: nothing created.
    await channel.getFile(`${remote}/dl/missing`, join(local, "never.bin")).catch(() => {});
    expect(readdirSync(local).filter((f) => f.includes(".smolvm-") || f === "never.bin")).toEqual([]);
    await expect(channel.getFile(`${remote}/dl/src.bin`, dest, { maxBytes: -1 })).rejects.toThrow(
      ValidationError,
    );
  });

  it("rejects relative and traversing guest paths before any I/O", async () => {
    await expect(channel.putFile(join(local, "x"), "relative/path")).rejects.toThrow(ValidationError);
    await expect(channel.getFile("/tmp/../etc/shadow", join(local, "y"))).rejects.toThrow(ValidationError);
    await expect(channel.getFile("/tmp/a\0b", join(local, "y"))).rejects.toThrow(ValidationError);
  });

  it("reports a missing guest file as a typed error", async () => {
    const e = await channel.getFile(`${remote}/does-not-exist`, join(local, "z")).catch((x) => x);
    expect(e).toBeInstanceOf(SmolVMError);
    expect(e.code).toBe("FILE_TRANSFER");
  });

  it("sets, lists and unsets env vars in a 0600 file that a login shell reads", async () => {
    await channel.setEnv({ API_KEY: "secret-123", MULTI: "a\nb 'c'" });
    await channel.setEnv({ OTHER: "x" });
    expect(await channel.listEnv()).toEqual({ API_KEY: "secret-123", MULTI: "a\nb 'c'", OTHER: "x" });
    const file = `${remote}/profile.d/smolvm_env.sh`;
    const r = await channel.run(`stat -c %a ${file}; . ${file}; printf '%s|%s' "$API_KEY" "$MULTI"`);
    expect(r.stdout).toBe("600\nsecret-123|a\nb 'c'");
    await channel.unsetEnv(["API_KEY", "MULTI"]);
    expect(await channel.listEnv()).toEqual({ OTHER: "x" });
    await expect(channel.setEnv({ "BAD NAME": "x" })).rejects.toThrow(ValidationError);
  });

  it("loses no update when setEnv calls run concurrently (each write has its own temp file)", async () => {
    const names = Array.from({ length: 8 }, (_, i) => `CONC_${i}`);
    await Promise.all(names.map((n) => channel.setEnv({ [n]: n.toLowerCase() })));
    const got = await channel.listEnv();
    for (const n of names) expect(got[n]).toBe(n.toLowerCase());
    const left = await channel.run(`ls -a ${remote}/profile.d`, { shell: "raw" });
    expect(left.stdout).toBe(".\n..\nsmolvm_env.sh\n");
    await channel.unsetEnv(names);
  });

  it("reads at most 1 MiB of an env file the guest pointed at /dev/zero", async () => {
    const file = `${remote}/profile.d/smolvm_env.sh`;
    await channel.run(`mkdir -p ${remote}/profile.d && ln -sf /dev/zero ${file}`, { shell: "raw" });
    try {
      const t0 = Date.now();
      const e = await channel.listEnv({ timeoutMs: 20_000 }).catch((x) => x);
      expect(e).toBeInstanceOf(SmolVMError);
      expect(e.code).toBe("ENV_FILE_TOO_LARGE");
      expect(Date.now() - t0).toBeLessThan(10_000);
    } finally {
      await channel.run(`rm -f ${file}`, { shell: "raw" });
    }
  });

  it("streams output in order and ends with the exit event", async () => {
    const events: string[] = [];
    for await (const ev of channel.stream(
      "for i in 1 2 3; do echo $i; sleep 0.05; done; echo e >&2; exit 4",
    )) {
      events.push(ev.stream === "exit" ? `exit:${ev.exitCode}` : `${ev.stream}:${ev.data.toString().trim()}`);
    }
    expect(events).toEqual(["stdout:1", "stdout:2", "stdout:3", "stderr:e", "exit:4"]);
  });

  it("passes stdin to a streamed command", async () => {
    const chunks: Buffer[] = [];
    for await (const ev of channel.stream("wc -c", { stdin: "12345" }))
      if (ev.stream === "stdout") chunks.push(ev.data);
    expect(Buffer.concat(chunks).toString().trim()).toBe("5");
  });
});
