/**
 * Host and user names reach ProxyCommand's `/bin/sh -c` only when the shell cannot read them
 * as code (OpenSSH CVE-2023-51385): a host named `x$(touch FILE)` is refused and FILE is never
 * created, whether the name comes from the call or from an ssh_config HostName / User.
 */
import { existsSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ValidationError } from "../../src/errors.js";
import { resolveSshConfig } from "../../src/ssh/config.js";
import { resolveSessionOptions } from "../../src/ssh/connect-options.js";
import { connectSession } from "../../src/ssh/connection.js";

let dir: string;
let marker: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "smolvm-inject-"));
  marker = join(dir, "p");
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function expectNotRun(p: Promise<unknown>): Promise<void> {
  await expect(p).rejects.toThrow(ValidationError);
  // Give a command that did start time to run before looking for its effect.
  await new Promise((r) => setTimeout(r, 300));
  expect(existsSync(marker)).toBe(false);
}

describe("ProxyCommand tokens", () => {
  it("refuses a host or user with shell syntax given to the call, and runs nothing", async () => {
    const common = { port: 22, proxyCommand: "nc %h %p", hostKey: { policy: "insecure" as const } };
    await expectNotRun(connectSession({ ...common, host: `x$(touch ${marker})`, username: "u" }));
    await expectNotRun(connectSession({ ...common, host: `x;touch ${marker}`, username: "u" }));
    await expectNotRun(
      connectSession({
        ...common,
        host: "h",
        username: `u\`touch ${marker}\``,
        proxyCommand: "nc %h %p # %r",
      }),
    );
    await expectNotRun(connectSession({ ...common, host: "-oProxyCommand=touch", username: "u" }));
  });

  it("refuses such names from ssh_config HostName and User", async () => {
    const cfg = join(dir, "config");
    await writeFile(
      cfg,
      [
        "Host evil",
        `  HostName x$(touch ${marker})`,
        "  ProxyCommand nc %h %p",
        "Host eviluser",
        "  HostName ok.example",
        `  User u';touch ${marker};'`,
        "  ProxyCommand nc %h %p %r",
      ].join("\n"),
    );
    expect(() => resolveSshConfig("evil", { configPath: cfg, systemConfigPath: false })).toThrow(
      ValidationError,
    );
    await expectNotRun(connectSession({ host: "evil", sshConfig: cfg }));
    await expectNotRun(connectSession({ host: "eviluser", sshConfig: cfg }));
  });

  it("still substitutes ordinary names, IPv6 addresses and %% as before", () => {
    const r = resolveSessionOptions({
      host: "fe80::1%eth0",
      port: 2222,
      username: "deploy.user-1",
      proxyCommand: "nc %h %p # %r 100%%",
    });
    expect(r.proxyCommand).toBe("nc fe80::1%eth0 2222 # deploy.user-1 100%");
  });

  it("expands a config ProxyCommand once: a %% there stays a single %", async () => {
    const cfg = join(dir, "config2");
    await writeFile(cfg, ["Host h", "  HostName example.test", "  ProxyCommand printf 100%%h %h"].join("\n"));
    const r = resolveSessionOptions({ host: "h", username: "u", sshConfig: cfg });
    expect(r.proxyCommand).toBe("printf 100%h example.test");
  });
});
