/**
 * The SmolVM facade's own contract, on records without a running QEMU (no boot needed): the
 * typed VmRecord.config (a damaged record is VM_RECORD_DAMAGED naming the field), ownership
 * (what dispose does, for fromId's default and { owned: true }), and refreshStatus().
 */
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import Database from "better-sqlite3";
import { afterEach, describe, expect, it } from "vitest";
import { VMStateError } from "../../src/errors.js";
import { SmolVM } from "../../src/vm/smolvm.js";
import { VmStore } from "../../src/vm/store.js";
import { launchConfig } from "../../src/vm/vm-config.js";

const dirs: string[] = [];
function dataDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "smolvm-facade-"));
  dirs.push(dir);
  return dir;
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** A stopped VM's record (and its directory), as create() leaves one after stop(). */
function stoppedVm(dir: string, id: string): string {
  const vmDir = join(dir, "vms", id);
  mkdirSync(vmDir, { recursive: true, mode: 0o700 });
  const store = VmStore.open(dir);
  store.insert({
    id,
    name: id,
    image: "tiny",
    vmDir,
    status: "stopped",
    config: { memoryMib: 512, vcpus: 1, accel: "tcg", capabilities: { ssh: true, agent: true } },
  });
  store.close();
  return vmDir;
}

function setRawConfig(dir: string, id: string, json: string): void {
  const raw = new Database(join(dir, "state.db"));
  raw.prepare("UPDATE vms SET config = ? WHERE id = ?").run(json, id);
  raw.close();
}

describe("VmRecord.config", () => {
  it("reads back typed, keeping keys a newer smolvm may have written", () => {
    const dir = dataDir();
    stoppedVm(dir, "vm-typed");
    setRawConfig(dir, "vm-typed", JSON.stringify({ memoryMib: 256, network: "none", future: [1] }));
    using store = VmStore.open(dir);
    const r = store.require("vm-typed");
    expect(r.config.memoryMib).toBe(256);
    expect(r.config.network).toBe("none");
    expect(r.config).toEqual({ memoryMib: 256, network: "none", future: [1] });
  });

  it("is a VMStateError VM_RECORD_DAMAGED naming the field when a stored value has the wrong type", () => {
    const dir = dataDir();
    stoppedVm(dir, "vm-bad");
    setRawConfig(dir, "vm-bad", JSON.stringify({ memoryMib: "512" }));
    using store = VmStore.open(dir);
    let e: unknown;
    try {
      store.get("vm-bad");
    } catch (x) {
      e = x;
    }
    expect(e).toBeInstanceOf(VMStateError);
    expect(e).toMatchObject({ code: "VM_RECORD_DAMAGED" });
    expect(String((e as Error).message)).toBe(
      'the stored config of VM vm-bad (in the state database) is damaged: config.memoryMib should be an integer, got "512". Delete that VM (`smolvm rm`, or remove its row and directory) and create it again.',
    );
    setRawConfig(dir, "vm-bad", "{not json");
    expect(() => store.get("vm-bad")).toThrow(/config is not valid JSON/);
    setRawConfig(dir, "vm-bad", JSON.stringify({ restoredFrom: { kind: "cloud", id: "x", dir: "/d" } }));
    expect(() => store.get("vm-bad")).toThrow(/config\.restoredFrom should be/);
    setRawConfig(dir, "vm-bad", "[]");
    expect(() => store.get("vm-bad")).toThrow(/config is an array, not an object/);
  });

  it("reaches SmolVM.fromId as the same typed error", async () => {
    const dir = dataDir();
    stoppedVm(dir, "vm-bad2");
    setRawConfig(dir, "vm-bad2", JSON.stringify({ capabilities: { ssh: "yes" } }));
    await expect(SmolVM.fromId("vm-bad2", { dataDir: dir })).rejects.toMatchObject({
      name: "VMStateError",
      code: "VM_RECORD_DAMAGED",
    });
  });

  it("names what a launch needs and the record lacks", () => {
    expect(() => launchConfig({ memoryMib: 512, vcpus: 1 }, "VM vm-x")).toThrow(
      "the stored config of VM vm-x is damaged: config lacks accel, kernelPath, kernelCmdline, hostPublicKey (the VM was never fully created).",
    );
  });
});

describe("ownership", () => {
  it("a handle from fromId borrows by default: dispose closes it and the VM stays", async () => {
    const dir = dataDir();
    const vmDir = stoppedVm(dir, "vm-borrowed");
    {
      await using vm = await SmolVM.fromId("vm-borrowed", { dataDir: dir });
      expect(vm.owned).toBe(false);
    }
    expect((await SmolVM.list({ dataDir: dir })).map((v) => v.id)).toEqual(["vm-borrowed"]);
    expect(existsSync(vmDir)).toBe(true);
  });

  it("fromId({ owned: true }) makes dispose delete the VM", async () => {
    const dir = dataDir();
    stoppedVm(dir, "vm-owned");
    {
      await using vm = await SmolVM.fromId("vm-owned", { dataDir: dir, owned: true });
      expect(vm.owned).toBe(true);
    }
    expect(await SmolVM.list({ dataDir: dir })).toEqual([]);
  });
});

describe("refreshStatus", () => {
  it("re-reads the store and records a running VM whose QEMU is gone as crashed", async () => {
    const dir = dataDir();
    stoppedVm(dir, "vm-gone");
    await using vm = await SmolVM.fromId("vm-gone", { dataDir: dir });
    expect(vm.refreshStatus()).toBe("stopped");
    {
      // Another process marks it running with a pid that is not its QEMU.
      using store = VmStore.open(dir);
      store.update("vm-gone", { status: "running", pid: process.pid });
    }
    expect(vm.refreshStatus()).toBe("crashed");
    expect(vm.status).toBe("crashed");
    using store = VmStore.open(dir);
    expect(store.require("vm-gone")).toMatchObject({ status: "crashed", pid: null });
  });
});
