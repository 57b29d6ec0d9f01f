/**
 * teardownVmNetwork against a real cgroup and a real nftables table: a process still in the VM's
 * cgroup (as a stopped QEMU is while its last threads exit) delays the removal of the table and
 * cgroup until it is gone, and one that stays keeps the policy in force.
 */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterEach, describe, expect, it } from "vitest";
import {
  applyRulesetAsync,
  createCgroup,
  joinCgroup,
  removeCgroup,
  removeRuleset,
  removeRulesetAsync,
  renderRuleset,
  tableName,
  vmCgroup,
} from "../../src/vm/network/firewall.js";
import { teardownVmNetwork } from "../../src/vm/network/host.js";

const pexec = promisify(execFile);

async function hasTable(vmId: string): Promise<boolean> {
  const { stdout } = await pexec("nft", ["list", "tables"]);
  return stdout.split("\n").includes(`table inet ${tableName(vmId)}`);
}

describe("network teardown waits for the VM's cgroup to empty", () => {
  const cleanups: (() => void)[] = [];
  afterEach(() => {
    for (const c of cleanups.splice(0).reverse()) c();
  });

  /** A VM's cgroup and table, with `sleep seconds` inside the cgroup. */
  async function vmWithLingeringProcess(seconds: number) {
    const vmId = `teardown${process.pid}${Math.floor(Math.random() * 1e6)}`;
    const vmDir = mkdtempSync(join(tmpdir(), "smolvm-teardown-"));
    const cg = vmCgroup(vmId);
    createCgroup(cg);
    await pexec("nft", ["add", "table", "inet", tableName(vmId)]);
    const spawned = performance.now();
    const child: ChildProcess = spawn("sleep", [String(seconds)], { stdio: "ignore" });
    joinCgroup(cg, child.pid!);
    cleanups.push(() => {
      child.kill("SIGKILL");
      removeRuleset(vmId);
      removeCgroup(cg);
      rmSync(vmDir, { recursive: true, force: true });
    });
    return { vmId, vmDir, cg, spawned };
  }

  it("removes the table and cgroup once the last process has left, not before", async () => {
    const { vmId, vmDir, cg, spawned } = await vmWithLingeringProcess(0.4);
    const t0 = performance.now();
    await teardownVmNetwork(vmDir, vmId);
    const done = performance.now();
    // The sleep cannot have left before 400 ms after its spawn. (Node's "exit" event is no
    // clock for that: it may be handled after teardown already saw the cgroup empty.)
    expect(done - spawned).toBeGreaterThanOrEqual(400);
    expect(done - t0).toBeLessThan(2_000);
    expect(await hasTable(vmId)).toBe(false);
    expect(existsSync(cg.dir)).toBe(false);
  });

  it("removes the table without stopping the caller's event loop", async () => {
    const { vmId, vmDir, cg } = await vmWithLingeringProcess(0);
    // A running VM's table: its daemon's NAT chain and filter rules.
    await applyRulesetAsync(renderRuleset(vmId, cg, { tcp: 40001, dns: 40002 }, "public"));
    // nft takes 15-20 ms to delete a VM's table here: run synchronously, it stopped every other
    // VM's I/O in this process for that long (the loop's longest pause was 16-21 ms; now 3-5).
    // The longest the loop went without turning, from a 1 ms timer's ticks.
    let last = performance.now();
    let longest = 0;
    const tick = setInterval(() => {
      const now = performance.now();
      longest = Math.max(longest, now - last);
      last = now;
    }, 1);
    try {
      await teardownVmNetwork(vmDir, vmId);
      await new Promise((r) => setTimeout(r, 5)); // a block shows at the next tick
    } finally {
      clearInterval(tick);
    }
    expect(await hasTable(vmId)).toBe(false);
    expect(longest).toBeLessThan(12);
  });

  it("keeps the policy of a cgroup that does not empty, and gives up after its bound", async () => {
    const { vmId, vmDir, cg } = await vmWithLingeringProcess(30);
    const t0 = performance.now();
    await teardownVmNetwork(vmDir, vmId);
    const took = performance.now() - t0;
    expect(took).toBeGreaterThanOrEqual(4_900);
    expect(took).toBeLessThan(7_000);
    expect(await hasTable(vmId)).toBe(true);
    expect(existsSync(cg.dir)).toBe(true);
  }, 15_000);

  it("removing tables that are gone, many at once, settles quietly (nft exits before reading stdin)", async () => {
    // An nft that has exited closes its stdin pipe; a write to it then fails with EPIPE, which
    // used to surface as an uncaught exception (vitest fails the run on one).
    const uncaught: unknown[] = [];
    const onUncaught = (e: unknown) => uncaught.push(e);
    process.on("uncaughtException", onUncaught);
    try {
      const ids = Array.from({ length: 40 }, (_, i) => `gone${process.pid}x${i}`);
      await Promise.all(ids.map((id) => removeRulesetAsync(id)));
      await new Promise((r) => setTimeout(r, 50));
    } finally {
      process.off("uncaughtException", onUncaught);
    }
    expect(uncaught).toEqual([]);
  });
});
