import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { OperationAbortedError, OperationTimeoutError, VMStateError } from "../../src/errors.js";
import { ensureImage, type ImageManifest } from "../../src/image/index.js";
import { detectAccelerator, recordAccelVerdict } from "../../src/vm/accel.js";
import { SmolVM, type SmolVMProgress } from "../../src/vm/smolvm.js";
import { VmStore } from "../../src/vm/store.js";
import { pgrepF } from "../fixtures/pgrep.js";

const FAKE_QEMU = join(__dirname, "../fixtures/fake-kvm-qemu.sh");

/** Runs `fn` with env vars set, restoring them afterwards. */
async function withEnv<T>(vars: Record<string, string>, fn: () => Promise<T>): Promise<T> {
  const before = Object.fromEntries(Object.keys(vars).map((k) => [k, process.env[k]]));
  Object.assign(process.env, vars);
  try {
    return await fn();
  } finally {
    for (const [k, v] of Object.entries(before)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

describe("SmolVM on a host whose KVM cannot run the guest", () => {
  let dataDir: string;
  let image: ImageManifest;
  beforeAll(async () => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-hosttruth-"));
    image = await ensureImage("tiny", { dataDir });
  }, 180_000);
  afterAll(async () => {
    for (const r of await SmolVM.list({ dataDir }).catch(() => [])) {
      await (await SmolVM.fromId(r.id, { dataDir })).delete().catch(() => {});
    }
    rmSync(dataDir, { recursive: true, force: true });
  });

  it("auto: a guest that crashes under KVM is booted again under TCG, said through onProgress", async () => {
    if (!existsSync("/dev/kvm")) return; // auto never tries KVM there
    const cacheDir = mkdtempSync(join(tmpdir(), "smolvm-hosttruth-cache-"));
    await withEnv({ SMOLVM_QEMU: FAKE_QEMU, SMOLVM_CACHE_DIR: cacheDir }, async () => {
      // As if the probe had passed (a guest can still die later): the verdict says KVM.
      await recordAccelVerdict({ accel: "kvm", reason: "seeded by the test" }, { image, dataDir });
      const events: SmolVMProgress[] = [];
      const t0 = performance.now();
      await using vm = await SmolVM.create({ dataDir, onProgress: (p) => events.push(p) });
      expect(performance.now() - t0).toBeLessThan(60_000);
      expect(vm.bootTimings?.accel).toBe("tcg");
      expect(vm.bootTimings?.accelReason).toMatch(/^a guest crashed under KVM \(KVM emulation failure/);
      const notices = events.filter((e) => e.kind === "accel");
      expect(notices).toHaveLength(1);
      expect(notices[0]).toMatchObject({ kind: "accel", accel: "tcg", done: true });
      expect(notices[0]!.step).toMatch(/^accelerator TCG: a guest crashed under KVM/);
      expect((await vm.run("echo ok")).output).toBe("ok");
      // The verdict was recorded: the next create goes straight to TCG.
      const v = await detectAccelerator({ image, dataDir });
      expect(v).toMatchObject({ accel: "tcg", cached: true });
      expect(v.reason).toMatch(/^a guest crashed under KVM/);
    });
    rmSync(cacheDir, { recursive: true, force: true });
    expect(pgrepF(`${join(dataDir, "vms")}/`)).toEqual([]);
  }, 120_000);

  it("forced KVM that stops the guest fails within 30 s with VM_CRASHED naming KVM, nothing left", async () => {
    await withEnv({ SMOLVM_QEMU: FAKE_QEMU }, async () => {
      const t0 = performance.now();
      const e = await SmolVM.create({ dataDir, accel: "kvm", name: "forced-fake" }).catch((x) => x);
      expect(e).toBeInstanceOf(VMStateError);
      expect(e.code).toBe("VM_CRASHED");
      expect(e.message).toMatch(/crashed: KVM emulation failure/);
      expect(e.message).toContain("KVM internal error");
      expect(e.message).toMatch(/use accel "auto" \(it falls back to TCG\) or "tcg"/);
      // The fake fails 0.3 s after start; the watch checks every 250 ms.
      expect(performance.now() - t0).toBeLessThan(30_000);
    });
    expect(await SmolVM.list({ dataDir })).toEqual([]);
    expect(pgrepF(`${join(dataDir, "vms")}/`)).toEqual([]);
  }, 60_000);

  it("forcing the real KVM follows this host's truth: boots where it works, VM_CRASHED naming KVM within 30 s where not", async () => {
    const verdict = await detectAccelerator({ image, dataDir });
    const t0 = performance.now();
    const r = await SmolVM.create({ dataDir, accel: "kvm", name: "forced-real" }).then(
      async (vm) => {
        const out = (await vm.run("echo up")).output;
        await vm.delete();
        return out;
      },
      (x) => x,
    );
    if (verdict.accel === "kvm") {
      expect(r).toBe("up");
    } else {
      expect(r).toBeInstanceOf(VMStateError);
      expect(r.code).toBe("VM_CRASHED");
      expect(r.message).toMatch(/KVM/);
      expect(performance.now() - t0).toBeLessThan(30_000);
    }
    expect(pgrepF(`${join(dataDir, "vms")}/`)).toEqual([]);
  }, 90_000);

  it("a guest that dies during a call ends the call with VM_CRASHED within 2 s", async () => {
    await using vm = await SmolVM.create({ dataDir });
    const pid = VmStore.open(dataDir).get(vm.id)!.pid!;
    const call = vm.run("sleep 60", { timeoutMs: 50_000 });
    await new Promise((r) => setTimeout(r, 300));
    const t0 = performance.now();
    process.kill(pid, "SIGKILL");
    const e = await call.catch((x) => x);
    expect(e).toBeInstanceOf(VMStateError);
    expect(e.code).toBe("VM_CRASHED");
    expect(performance.now() - t0).toBeLessThan(2_000);
    expect(vm.status).toBe("crashed");
  }, 120_000);

  it("an expired timeoutMs is a timeout naming its phase, an aborted signal an abort; nothing left", async () => {
    // Cold boots (about 1 s here): a template restore may well finish within these bounds.
    const e = await SmolVM.create({ dataDir, timeoutMs: 500, template: false }).catch((x) => x);
    expect(e).toBeInstanceOf(OperationTimeoutError);
    expect(e).not.toBeInstanceOf(OperationAbortedError);
    expect(e.message).toMatch(/^creating the VM did not finish within 500 ms \(while [a-z ]+\)/);
    expect(e.details.phase).toMatch(/^(starting QEMU|waiting for the agent|waiting for the guest network)$/);

    const ac = new AbortController();
    setTimeout(() => ac.abort(), 300);
    const a = await SmolVM.create({ dataDir, signal: ac.signal, template: false }).catch((x) => x);
    expect(a).toBeInstanceOf(OperationAbortedError);
    expect(a.message).toMatch(/^creating the VM was aborted by the caller's signal \(while [a-z ]+\)/);

    expect(await SmolVM.list({ dataDir })).toEqual([]);
    expect(pgrepF(`${join(dataDir, "vms")}/`)).toEqual([]);
  }, 60_000);

  it("an abort while the network daemon starts is an abort, not a crash (cold boot and restore)", async () => {
    // Ending the boot kills QEMU; the abort must still be what the caller gets.
    for (const template of [false, true]) {
      const ac = new AbortController();
      const poll = setInterval(() => {
        if (pgrepF(`network-daemon/daemon-.*${dataDir}/`).length > 0) ac.abort();
      }, 3);
      try {
        const e = await SmolVM.create({ dataDir, signal: ac.signal, template }).catch((x) => x);
        expect(ac.signal.aborted).toBe(true);
        expect(e).toBeInstanceOf(OperationAbortedError);
        expect(e.message).toMatch(/^creating the VM was aborted by the caller's signal/);
      } finally {
        clearInterval(poll);
      }
      expect(await SmolVM.list({ dataDir })).toEqual([]);
      expect(pgrepF(`${join(dataDir, "vms")}/`)).toEqual([]);
    }
  }, 60_000);
});
