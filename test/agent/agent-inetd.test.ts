/**
 * `smolvm-agent --inetd`, the per-connection listener the guest init runs sshd under
 * (`sshd -i`), run on the host on a free loopback port with a shell script as its program.
 */
import { spawnSync } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { connect } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { freePort } from "../fixtures/sshd.js";
import { agentBinary } from "./helpers.js";

/** Sends `line`, returns everything the program wrote until it closed the connection. */
function converse(port: number, line: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect(port, "127.0.0.1");
    let out = "";
    s.on("data", (d) => (out += d));
    s.on("end", () => resolve(out));
    s.on("error", reject);
    s.write(`${line}\n`);
  });
}

/** The state letters of `pid`'s children (Z for one not reaped). */
function childStates(pid: number): string[] {
  return readdirSync("/proc")
    .filter((d) => /^\d+$/.test(d))
    .flatMap((d) => {
      try {
        const st = readFileSync(`/proc/${d}/stat`, "utf8");
        const f = st.slice(st.lastIndexOf(")") + 2).split(" ");
        return Number(f[1]) === pid ? [f[0]!] : [];
      } catch {
        return [];
      }
    });
}

describe("agent --inetd", () => {
  const listeners: number[] = [];
  afterEach(() => {
    for (const pid of listeners.splice(0)) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        /* gone */
      }
    }
  });

  it("returns once listening and runs its program per connection, on the connection", async () => {
    const bin = await agentBinary();
    const port = await freePort();
    const r = spawnSync(bin, ["--inetd", String(port), "/bin/sh", "-c", 'read -r x; echo "$$ got $x"'], {
      encoding: "utf8",
      timeout: 10_000,
    });
    expect(r.status).toBe(0);
    const pid = Number(r.stdout.trim());
    listeners.push(pid);
    expect(readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0")).toContain("--inetd");
    // Listening already: no retry needed. Two at once, each its own process.
    const [a, b] = await Promise.all([converse(port, "one"), converse(port, "two")]);
    const [pa, ta] = a.trim().split(" got ");
    const [pb, tb] = b.trim().split(" got ");
    expect([ta, tb]).toEqual(["one", "two"]);
    expect(pa).not.toBe(pb);
    // Finished programs are reaped, not left as zombies.
    const until = Date.now() + 5_000;
    while (childStates(pid).length > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    expect(childStates(pid)).toEqual([]);
  });

  it("fails with a reason when the port is taken, and refuses a bad command line", async () => {
    const bin = await agentBinary();
    const port = await freePort();
    const first = spawnSync(bin, ["--inetd", String(port), "/bin/true"], {
      encoding: "utf8",
      timeout: 10_000,
    });
    expect(first.status).toBe(0);
    listeners.push(Number(first.stdout.trim()));
    const taken = spawnSync(bin, ["--inetd", String(port), "/bin/true"], {
      encoding: "utf8",
      timeout: 10_000,
    });
    expect(taken.status).toBe(1);
    expect(taken.stderr).toBe(`smolvm-agent: cannot listen on port ${port}: Address already in use\n`);
    for (const args of [
      ["--inetd", "0", "/bin/true"],
      ["--inetd", "22x", "/bin/true"],
      ["--inetd", "80", "true"],
      ["--inetd", "80"],
    ]) {
      const bad = spawnSync(bin, args, { encoding: "utf8", timeout: 10_000 });
      expect(bad.status).toBe(2);
      expect(bad.stderr).toContain("usage: smolvm-agent --inetd PORT /ABSOLUTE/PROG");
    }
  });
});
