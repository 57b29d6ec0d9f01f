import { execFile } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import Database from "better-sqlite3";
import { afterEach, describe, expect, it } from "vitest";
import { ValidationError, VMNotFoundError } from "../../src/errors.js";
import { launchQemu, stopQemu } from "../../src/vm/process.js";
import { VmStore, vmFiles } from "../../src/vm/store.js";
import { pausedVmSpec, pgrep } from "./helpers/paused-vm.js";

const dirs: string[] = [];
const stores: VmStore[] = [];
function open(): { dir: string; store: VmStore } {
  const dir = mkdtempSync(join(tmpdir(), "smolvm-store-"));
  dirs.push(dir);
  const store = VmStore.open(dir);
  stores.push(store);
  return { dir, store };
}
afterEach(() => {
  for (const s of stores.splice(0)) s.close();
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

describe("VmStore", () => {
  it("creates a versioned WAL database", () => {
    const { dir, store } = open();
    expect(store.path).toBe(join(dir, "state.db"));
    expect(store.schemaVersion).toBe(2);
    const raw = new Database(join(dir, "state.db"), { readonly: true });
    expect(raw.pragma("journal_mode", { simple: true })).toBe("wal");
    const tables = raw
      .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
      .pluck()
      .all();
    raw.close();
    expect(tables).toEqual(["port_leases", "vms"]);
    // Re-opening an up-to-date database is a no-op.
    const again = VmStore.open(dir);
    expect(again.schemaVersion).toBe(2);
    again.close();
    again.close();
  });

  it("migrates a version 1 database: labels and expiry persist", () => {
    const dir = mkdtempSync(join(tmpdir(), "smolvm-store-v1-"));
    dirs.push(dir);
    const raw = new Database(join(dir, "state.db"));
    raw.exec(`CREATE TABLE vms (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, status TEXT NOT NULL,
      image TEXT NOT NULL, config TEXT NOT NULL DEFAULT '{}', pid INTEGER, ssh_port INTEGER,
      ports TEXT NOT NULL DEFAULT '[]', channel TEXT, vm_dir TEXT NOT NULL, host_key_fingerprint TEXT,
      created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
      CREATE TABLE port_leases (port INTEGER PRIMARY KEY, vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
      purpose TEXT NOT NULL, created_at TEXT NOT NULL);
      INSERT INTO vms (id, name, status, image, vm_dir, created_at, updated_at)
        VALUES ('old', 'old', 'stopped', 'tiny', '/x', 't', 't');`);
    raw.pragma("user_version = 1");
    raw.close();
    const store = VmStore.open(dir);
    stores.push(store);
    expect(store.schemaVersion).toBe(2);
    expect(store.get("old")).toMatchObject({ labels: {}, expiresAt: null });
    store.insert({ id: "new", name: "new", image: "tiny", vmDir: "/y", labels: { a: "b" }, expiresAt: 123 });
    expect(store.get("new")).toMatchObject({ labels: { a: "b" }, expiresAt: 123 });
    expect(store.expiring().map((v) => v.id)).toEqual(["new"]);
    store.update("new", { expiresAt: null, labels: { c: "d" } });
    expect(store.get("new")).toMatchObject({ labels: { c: "d" }, expiresAt: null });
    expect(store.expiring()).toEqual([]);
  });

  it("refuses a database from a newer smolvm", () => {
    const { dir, store } = open();
    store.close();
    const raw = new Database(join(dir, "state.db"));
    raw.pragma("user_version = 99");
    raw.close();
    expect(() => VmStore.open(dir)).toThrow(expect.objectContaining({ code: "STATE_DB_TOO_NEW" }));
  });

  it("inserts, gets by id or name, lists, updates and deletes", () => {
    const { store } = open();
    const a = store.insert({
      id: "id-a",
      name: "alpha",
      image: "tiny",
      vmDir: "/d/vms/id-a",
      config: { memoryMib: 512 },
    });
    expect(a).toMatchObject({
      id: "id-a",
      name: "alpha",
      status: "creating",
      image: "tiny",
      config: { memoryMib: 512 },
      pid: null,
      sshPort: null,
      ports: [],
      channel: null,
      vmDir: "/d/vms/id-a",
      hostKeyFingerprint: null,
    });
    expect(a.createdAt).toBe(a.updatedAt);
    store.insert({ id: "id-b", name: "beta", image: "debian", vmDir: "/d/vms/id-b", status: "stopped" });
    expect(store.get("alpha")?.id).toBe("id-a");
    expect(store.get("id-b")?.name).toBe("beta");
    expect(store.get("nope")).toBeUndefined();
    expect(() => store.require("nope")).toThrow(VMNotFoundError);
    expect(store.list().map((v) => v.id)).toEqual(["id-a", "id-b"]);

    const u = store.update("id-a", {
      status: "running",
      pid: 4242,
      sshPort: 40022,
      ports: [{ hostPort: 40080, guestPort: 80 }],
      channel: "ssh",
      hostKeyFingerprint: "SHA256:abc",
    });
    expect(u).toMatchObject({
      status: "running",
      pid: 4242,
      sshPort: 40022,
      channel: "ssh",
      hostKeyFingerprint: "SHA256:abc",
    });
    expect(u.ports).toEqual([{ hostPort: 40080, guestPort: 80 }]);
    expect(u.config).toEqual({ memoryMib: 512 });
    expect(store.update("id-a", { pid: null }).pid).toBeNull();
    expect(() => store.update("gone", { status: "stopped" })).toThrow(VMNotFoundError);
    expect(() => store.update("id-a", { status: "weird" as never })).toThrow(ValidationError);

    expect(store.delete("id-a")).toBe(true);
    expect(store.delete("id-a")).toBe(false);
    expect(store.list().map((v) => v.id)).toEqual(["id-b"]);
  });

  it("refuses duplicate names with a ValidationError", () => {
    const { store } = open();
    store.insert({ id: "1", name: "same", image: "tiny", vmDir: "/d/1" });
    expect(() => store.insert({ id: "2", name: "same", image: "tiny", vmDir: "/d/2" })).toThrow(
      expect.objectContaining({ code: "VM_NAME_TAKEN" }),
    );
  });

  it("leases ports exclusively and frees them with the VM", () => {
    const { store } = open();
    store.insert({ id: "a", name: "a", image: "tiny", vmDir: "/d/a" });
    store.insert({ id: "b", name: "b", image: "tiny", vmDir: "/d/b" });
    expect(store.tryLeasePort(40001, "a", "ssh")).toBe(true);
    expect(store.tryLeasePort(40001, "b", "ssh")).toBe(false);
    expect(store.tryLeasePort(40002, "a", "forward:80")).toBe(true);
    expect(() => store.tryLeasePort(40003, "zzz", "ssh")).toThrow(VMNotFoundError);
    expect(store.leases("a").map((l) => [l.port, l.purpose])).toEqual([
      [40001, "ssh"],
      [40002, "forward:80"],
    ]);
    expect(store.releaseLeases("a", 40002)).toBe(1);
    store.delete("a");
    expect(store.leases()).toEqual([]);
  });

  it("reconcile marks a kill -9'd QEMU crashed and frees its leases", async () => {
    const { store } = open();
    const vm = await pausedVmSpec();
    const f = vmFiles(vm.dir);
    Object.assign(vm.spec, {
      qmpSocketPath: f.qmpSocket,
      pidfilePath: f.pidfile,
      serialLogPath: f.serialLog,
    });
    try {
      const { pid } = await launchQemu(vm.spec);
      store.insert({ id: "k", name: "k", image: "tiny", vmDir: vm.dir, status: "running", pid });
      store.tryLeasePort(vm.spec.sshHostPort, "k", "ssh");
      expect(store.reconcile()).toEqual([]);
      process.kill(pid, "SIGKILL");
      const until = Date.now() + 3_000;
      let changes = store.reconcile();
      while (changes.length === 0 && Date.now() < until) {
        await new Promise((r) => setTimeout(r, 20));
        changes = store.reconcile();
      }
      expect(changes).toEqual([{ id: "k", name: "k", from: "running", to: "crashed", pid }]);
      expect(store.get("k")).toMatchObject({ status: "crashed", pid: null });
      expect(store.leases("k")).toEqual([]);
      expect(store.reconcile()).toEqual([]);
      await stopQemu({ pid, qmpSocketPath: f.qmpSocket });
      expect(pgrep(vm.dir)).toEqual([]);
    } finally {
      vm.cleanup();
    }
  });

  it("reconcile: a clean exit (no pidfile left) is stopped; a recycled pid is not ours", () => {
    const { dir, store } = open();
    mkdirSync(join(dir, "vm1"));
    mkdirSync(join(dir, "vm2"));
    writeFileSync(join(dir, "vm2", "qemu.pid"), "1\n");
    // pid 1 exists but is not our QEMU.
    store.insert({ id: "v1", name: "v1", image: "tiny", vmDir: join(dir, "vm1"), status: "running", pid: 1 });
    store.insert({ id: "v2", name: "v2", image: "tiny", vmDir: join(dir, "vm2"), status: "running", pid: 1 });
    store.insert({ id: "v3", name: "v3", image: "tiny", vmDir: join(dir, "vm3"), status: "stopped" });
    expect(store.reconcile().map((c) => [c.id, c.to])).toEqual([
      ["v1", "stopped"],
      ["v2", "crashed"],
    ]);
    expect(statSync(join(dir, "state.db")).isFile()).toBe(true);
  });

  it("stays consistent with 4 processes writing at once", async () => {
    const { dir, store } = open();
    const N = 40;
    const run = (w: number) =>
      new Promise<{ worker: string; ports: number[]; errors: string[] }>((resolve, reject) => {
        execFile(
          process.execPath,
          [
            "--import",
            "tsx",
            join(import.meta.dirname, "helpers", "store-worker.ts"),
            dir,
            String(w),
            String(N),
          ],
          { timeout: 60_000 },
          (err, stdout, stderr) =>
            err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(JSON.parse(stdout)),
        );
      });
    const t0 = performance.now();
    const results = await Promise.all([0, 1, 2, 3].map(run));
    const ms = performance.now() - t0;
    expect(results.flatMap((r) => r.errors)).toEqual([]);
    const vms = store.list();
    expect(vms).toHaveLength(4 * N);
    for (const v of vms) {
      const i = Number(v.id.split("-")[1]);
      expect(v).toMatchObject({
        status: "stopped",
        pid: null,
        config: { round: i },
        ports: [{ hostPort: i + 1, guestPort: 80 }],
      });
    }
    const leased = results.flatMap((r) => r.ports);
    expect(new Set(leased).size).toBe(4 * N);
    expect(store.leases()).toHaveLength(4 * N);
    expect(ms).toBeLessThan(30_000);
  });
});
