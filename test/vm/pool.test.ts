/**
 * Warm pools on real microVMs: a pool builds its template when there is none, keeps warm
 * standbys (labelled, with a TTL), hands them out with the caller's name, env, labels, TTL and
 * their own identity, refills, and on close deletes what it still holds and nothing it gave out.
 */
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ValidationError, VMStateError } from "../../src/errors.js";
import { POOL_LABEL } from "../../src/vm/pool.js";
import { SmolVM, type SmolVMPool } from "../../src/vm/smolvm.js";
import { VmStore } from "../../src/vm/store.js";
import { pgrepF } from "../fixtures/pgrep.js";

function records(dataDir: string) {
  const store = VmStore.open(dataDir);
  try {
    return store.list();
  } finally {
    store.close();
  }
}

async function until(what: string, ok: () => boolean, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe("warm pools", () => {
  let dataDir: string;
  let pool: SmolVMPool;
  const handedOut: SmolVM[] = [];
  beforeAll(async () => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-pool-"));
    // No template yet in this data dir: the pool builds it first.
    pool = await SmolVM.pool({ dataDir, size: 1 });
  }, 240_000);
  afterAll(async () => {
    await pool?.close();
    for (const vm of handedOut) await vm.delete().catch(() => {});
    rmSync(dataDir, { recursive: true, force: true });
  });

  it("keeps a labelled standby with a TTL, and built the template it restores", () => {
    expect(pool.size).toBe(1);
    expect(pool.warm).toBe(1);
    const standbys = records(dataDir).filter((r) => r.labels[POOL_LABEL] === pool.id);
    expect(standbys).toHaveLength(1);
    expect(standbys[0]!.status).toBe("running");
    expect(standbys[0]!.expiresAt).toBeGreaterThan(Date.now());
    expect(standbys[0]!.config.restoredFrom?.kind).toBe("template");
  });

  it("hands out a VM that is the caller's: name, env, labels, TTL, hostname, own secret and entropy", async () => {
    const standby = records(dataDir).find((r) => r.labels[POOL_LABEL] === pool.id)!;
    const templateSecret = readFileSync(join(standby.vmDir, "agent_secret"));
    const t0 = performance.now();
    const vm = await pool.create({
      name: "pooled-a",
      env: { GREETING: "hi there" },
      labels: { team: "x" },
      ttlMs: 600_000,
    });
    handedOut.push(vm);
    const r = await vm.run('printf "%s|%s" "$GREETING" "$(hostname)"');
    const firstMs = performance.now() - t0;
    expect(r.stdout).toBe("hi there|pooled-a");
    expect(vm.id).toBe(standby.id);
    expect(vm.name).toBe("pooled-a");
    expect(vm.labels).toEqual({ team: "x" });
    expect(vm.bootTimings).toMatchObject({ source: "template", pooled: true, channel: "agent" });
    // A warm standby answers far below a restore (about 250 ms here) even on a loaded host.
    expect(firstMs).toBeLessThan(1_000);
    const rec = records(dataDir).find((x) => x.id === vm.id)!;
    expect(rec.expiresAt! - Date.now()).toBeGreaterThan(500_000);
    expect(readFileSync(join(rec.vmDir, "agent_secret")).equals(templateSecret)).toBe(false);

    // The pool refills; the next VM is another standby with its own random bytes.
    await until("the refill", () => pool.warm === 1, 30_000);
    const vm2 = await pool.create({ name: "pooled-b" });
    handedOut.push(vm2);
    const [a, b] = await Promise.all([vm, vm2].map((v) => v.run("head -c 16 /dev/urandom | od -An -tx1")));
    expect(a!.stdout.trim()).toMatch(/^[0-9a-f ]+$/);
    expect(a!.stdout).not.toBe(b!.stdout);
    expect((await vm2.run("hostname")).stdout.trim()).toBe("pooled-b");
  }, 120_000);

  it("a taken name is refused and the standby it would have used is not leaked", async () => {
    await until("the refill", () => pool.warm === 1, 30_000);
    const e = await pool.create({ name: "pooled-a" }).catch((x) => x);
    expect(e).toBeInstanceOf(ValidationError);
    expect(e.code).toBe("VM_NAME_TAKEN");
    const ids = new Set(records(dataDir).map((r) => r.id));
    // Only the two handed out and (after the refill) a standby: the refused one is gone.
    await until("the refill", () => pool.warm === 1, 30_000);
    expect(records(dataDir).filter((r) => !handedOut.some((v) => v.id === r.id))).toHaveLength(1);
    expect(ids.size).toBeLessThanOrEqual(3);
  }, 120_000);

  it("close deletes the standbys, keeps what it handed out, and refuses new creates", async () => {
    const standbyDirs = records(dataDir)
      .filter((r) => r.labels[POOL_LABEL] === pool.id)
      .map((r) => r.vmDir);
    expect(standbyDirs).toHaveLength(1);
    await pool.close();
    await pool.close(); // idempotent
    expect(records(dataDir).filter((r) => r.labels[POOL_LABEL] === pool.id)).toEqual([]);
    for (const dir of standbyDirs) expect(pgrepF(`${dir}/`)).toEqual([]);
    expect(pool.warm).toBe(0);
    for (const vm of handedOut) expect((await vm.run("echo up")).stdout).toBe("up\n");
    const e = await pool.create().catch((x) => x);
    expect(e).toBeInstanceOf(VMStateError);
    expect(e.code).toBe("POOL_CLOSED");
    for (const vm of handedOut.splice(0)) await vm.delete();
    expect(pgrepF(`${join(dataDir, "vms")}/`)).toEqual([]);
  }, 60_000);
});
