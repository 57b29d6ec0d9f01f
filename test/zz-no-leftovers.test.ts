/**
 * The suite's last file: nothing the suite started is still running. Every QEMU, sshd or other
 * server a test starts lives under the suite's temp root (test/global-setup.ts), so a process
 * whose command line names that root is a leak of some earlier test.
 */
import { describe, expect, it } from "vitest";
import { NETWORK_BEFORE_ENV, networkTraces, processesUnder, SUITE_ROOT_ENV } from "./global-setup.js";

describe("after the whole suite", () => {
  it("leaves no QEMU, sshd or other process of its own running", async () => {
    const root = process.env[SUITE_ROOT_ENV];
    expect(root, "the global set-up names the suite's temp root").toBeTruthy();
    // A VM deleted by the previous file may take a moment to be reaped.
    let left = processesUnder(root!);
    for (let i = 0; i < 20 && left.length > 0; i++) {
      await new Promise((r) => setTimeout(r, 100));
      left = processesUnder(root!);
    }
    expect(left.map((p) => p.args.slice(0, 200))).toEqual([]);
  });

  it("leaves no nftables table or cgroup of a VM it made", async () => {
    const before = new Set<string>(JSON.parse(process.env[NETWORK_BEFORE_ENV] ?? "[]"));
    const added = () => networkTraces().filter((t) => !before.has(t));
    let left = added();
    for (let i = 0; i < 20 && left.length > 0; i++) {
      await new Promise((r) => setTimeout(r, 100));
      left = added();
    }
    expect(left).toEqual([]);
  });
});
