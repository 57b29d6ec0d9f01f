/**
 * Which sshd re-reads its host key per connection (so a restored VM needs no sshd restart): the
 * release string decides, not the compat patterns every OpenSSH binary also carries.
 */
import { spawnSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import {
  sshdFileReadsHostKeyPerConnection,
  sshdReadsHostKeyPerConnection,
} from "../../src/image/sshd-facts.js";

const bin = (...parts: string[]) => Buffer.from(`\x7fELF\0${parts.join("\0")}\0`, "latin1");

describe("sshdReadsHostKeyPerConnection", () => {
  it("is true before OpenSSH 9.8 and false from 9.8 on", () => {
    expect(sshdReadsHostKeyPerConnection(bin("OpenSSH_9.2p1 Debian-2+deb12u10"))).toBe(true);
    expect(sshdReadsHostKeyPerConnection(bin("OpenSSH_8.4p1"))).toBe(true);
    expect(sshdReadsHostKeyPerConnection(bin("OpenSSH_9.7p1"))).toBe(true);
    expect(sshdReadsHostKeyPerConnection(bin("OpenSSH_9.8p1"))).toBe(false);
    expect(sshdReadsHostKeyPerConnection(bin("OpenSSH_10.0p2"))).toBe(false);
  });

  it("ignores compat patterns and is false when no release string is found", () => {
    expect(sshdReadsHostKeyPerConnection(bin("OpenSSH_2.*,OpenSSH_3.0*", "OpenSSH_10.0p1"))).toBe(false);
    expect(sshdReadsHostKeyPerConnection(bin("OpenSSH_2.*,OpenSSH_3.0*"))).toBe(false);
    expect(sshdReadsHostKeyPerConnection(Buffer.alloc(0))).toBe(false);
  });

  it("reads this host's sshd (the one the tiny image ships) as its own -V says, and a missing file as false", async () => {
    const v = spawnSync("/usr/sbin/sshd", ["-V"], { encoding: "utf8" });
    const m = /OpenSSH_(\d+)\.(\d+)/.exec(`${v.stdout}${v.stderr}`);
    expect(m).not.toBeNull();
    const expected = Number(m![1]) < 9 || (Number(m![1]) === 9 && Number(m![2]) < 8);
    expect(await sshdFileReadsHostKeyPerConnection("/usr/sbin/sshd")).toBe(expected);
    expect(await sshdFileReadsHostKeyPerConnection("/nonexistent/sshd")).toBe(false);
  });
});
