import { existsSync, statSync } from "node:fs";
import { afterEach, describe, expect, it } from "vitest";
import { OperationTimeoutError, SmolVMError, VMStateError } from "../../src/errors.js";
import { findQemu } from "../../src/vm/accel.js";
import { probeKvmFirmware } from "../../src/vm/accel-probe.js";
import { isQemuAlive, launchQemu, readPidfile, stopQemu } from "../../src/vm/process.js";
import { QmpClient } from "../../src/vm/qmp.js";
import { type PausedVmDir, pausedVmSpec, pgrep, tcpConnects } from "./helpers/paused-vm.js";

let vm: PausedVmDir | undefined;
let pid: number | undefined;

afterEach(async () => {
  if (vm) {
    if (pid)
      await stopQemu({ pid, qmpSocketPath: vm.spec.qmpSocketPath }, { force: true, timeoutMs: 10_000 });
    expect(pgrep(vm.dir)).toEqual([]);
    vm.cleanup();
  }
  vm = undefined;
  pid = undefined;
});

describe("launchQemu / stopQemu", () => {
  it("launches a paused VM whose QMP answers, records its pid and stops it with quit", async () => {
    vm = await pausedVmSpec({ agentSocketPath: undefined });
    const t0 = performance.now();
    const launched = await launchQemu(vm.spec, { timeoutMs: 15_000 });
    pid = launched.pid;
    const startMs = performance.now() - t0;
    expect(startMs).toBeLessThan(5_000);
    expect(await readPidfile(vm.spec.pidfilePath)).toBe(pid);
    expect(isQemuAlive(pid, vm.spec.qmpSocketPath)).toBe(true);
    expect(isQemuAlive(pid, "/not/our/vm")).toBe(false);
    expect(pgrep(vm.dir)).toEqual([pid]);
    // umask 077 applied to what QEMU creates.
    expect(statSync(vm.spec.qmpSocketPath).mode & 0o077).toBe(0);
    expect(statSync(vm.spec.serialLogPath).mode & 0o777).toBe(0o600);

    const r = await stopQemu({ pid, qmpSocketPath: vm.spec.qmpSocketPath }, { timeoutMs: 10_000 });
    // Paused guests cannot react to the power button: straight to quit.
    expect(r.method).toBe("quit");
    expect(isQemuAlive(pid, vm.spec.qmpSocketPath)).toBe(false);
    expect(existsSync(vm.spec.qmpSocketPath)).toBe(false);
    expect(await stopQemu({ pid, qmpSocketPath: vm.spec.qmpSocketPath })).toEqual({ method: "not-running" });
  });

  it("creates the agent socket 0600", async () => {
    vm = await pausedVmSpec();
    vm.spec.agentSocketPath = `${vm.dir}/agent.sock`;
    pid = (await launchQemu(vm.spec)).pid;
    expect(statSync(vm.spec.agentSocketPath).isSocket()).toBe(true);
    expect(statSync(vm.spec.agentSocketPath).mode & 0o777).toBe(0o600);
  });

  it("falls back to SIGKILL when the monitor is held by someone else", async () => {
    vm = await pausedVmSpec();
    pid = (await launchQemu(vm.spec)).pid;
    // QEMU serves one QMP client at a time: holding it makes quit impossible for the stopper.
    const holder = await QmpClient.connect(vm.spec.qmpSocketPath, { timeoutMs: 5_000 });
    try {
      const t0 = performance.now();
      const r = await stopQemu({ pid, qmpSocketPath: vm.spec.qmpSocketPath }, { timeoutMs: 10_000 });
      expect(r.method).toBe("kill");
      expect(performance.now() - t0).toBeLessThan(8_000);
      expect(isQemuAlive(pid, vm.spec.qmpSocketPath)).toBe(false);
    } finally {
      await holder.close();
    }
  });

  it("notices kill -9", async () => {
    vm = await pausedVmSpec();
    pid = (await launchQemu(vm.spec)).pid;
    process.kill(pid, "SIGKILL");
    const until = Date.now() + 3_000;
    while (isQemuAlive(pid, vm.spec.qmpSocketPath) && Date.now() < until)
      await new Promise((r) => setTimeout(r, 20));
    expect(isQemuAlive(pid, vm.spec.qmpSocketPath)).toBe(false);
    await expect(QmpClient.connect(vm.spec.qmpSocketPath, { timeoutMs: 2_000 })).rejects.toMatchObject({
      code: "QMP_UNAVAILABLE",
    });
  });

  it("reports an early exit with the tail of QEMU's stderr", async () => {
    vm = await pausedVmSpec();
    vm.spec.kernelPath = `${vm.dir}/missing-kernel`;
    const err = await launchQemu(vm.spec, { timeoutMs: 10_000 }).catch((e) => e);
    expect(err).toBeInstanceOf(SmolVMError);
    expect(err.code).toBe("QEMU_START_FAILED");
    expect(err.details.qemuLogTail).toContain("missing-kernel");
    expect(err.message).toContain("missing-kernel");
    expect(pgrep(vm.dir)).toEqual([]);
  });

  it("reports a missing QEMU binary as HostDependencyError", async () => {
    vm = await pausedVmSpec({ qemuPath: "/nonexistent/qemu-system-x86_64" });
    const err = await launchQemu(vm.spec, { timeoutMs: 5_000 }).catch((e) => e);
    expect(err).toBeInstanceOf(SmolVMError);
    expect(err.code).toBe("QEMU_START_FAILED");
    expect(err.details.qemuLogTail).toContain("/nonexistent/qemu-system-x86_64");
  });

  it("is bounded by timeoutMs and the signal", async () => {
    vm = await pausedVmSpec();
    const ac = new AbortController();
    ac.abort();
    await expect(launchQemu(vm.spec, { signal: ac.signal })).rejects.toBeInstanceOf(OperationTimeoutError);
    expect(pgrep(vm.dir)).toEqual([]);
  });

  it("forcing KVM where QEMU cannot even start it is VM_CRASHED, marked as KVM's", async () => {
    vm = await pausedVmSpec({ accel: "kvm", startPaused: false });
    const err = await launchQemu(vm.spec, { timeoutMs: 10_000 }).then(
      (l) => {
        pid = l.pid;
        return undefined;
      },
      (e) => e,
    );
    const firmware = await probeKvmFirmware(findQemu(), 5_000);
    if (firmware.ok) {
      // KVM starts guests here: QEMU comes up, and a guest KVM cannot run dies later, where the
      // crash watch catches it (host-truth.test.ts).
      expect(err).toBeUndefined();
      return;
    }
    expect(err).toBeInstanceOf(VMStateError);
    expect((err as VMStateError).code).toBe("VM_CRASHED");
    expect((err as VMStateError).details.crash).toMatchObject({ kvm: true });
    expect(err.message).toContain("SMOLVM_ACCEL=tcg");
    expect(pgrep(vm.dir)).toEqual([]);
  });
});

describe("hostfwd through QMP on a live QEMU", () => {
  it("adds and removes a host forward, status/stop/cont round-trip", async () => {
    vm = await pausedVmSpec();
    pid = (await launchQemu(vm.spec)).pid;
    await using qmp = await QmpClient.connect(vm.spec.qmpSocketPath, { timeoutMs: 5_000 });
    expect(await qmp.queryStatus()).toMatchObject({ status: "prelaunch", running: false });
    await qmp.cont();
    expect(await qmp.queryStatus()).toMatchObject({ status: "running", running: true });
    await qmp.stop();
    expect((await qmp.waitForEvent("STOP", { timeoutMs: 2_000 })).event).toBe("STOP");
    expect(await qmp.queryStatus()).toMatchObject({ status: "paused", running: false });

    // The SSH forward from the command line listens already.
    expect(await tcpConnects(vm.spec.sshHostPort)).toBe(true);
    const { freePort } = await import("./helpers/paused-vm.js");
    const port = await freePort();
    expect(await tcpConnects(port)).toBe(false);
    await qmp.hostfwdAdd(port, 8080);
    expect(await tcpConnects(port)).toBe(true);
    await qmp.hostfwdRemove(port);
    expect(await tcpConnects(port)).toBe(false);
    await expect(qmp.hostfwdRemove(port)).rejects.toMatchObject({
      code: "QMP_COMMAND",
      errorClass: "HostfwdNotFound",
    });
    // The port QEMU already forwards cannot be added twice.
    await expect(qmp.hostfwdAdd(vm.spec.sshHostPort, 22)).rejects.toMatchObject({
      errorClass: "HostfwdFailed",
    });
    await qmp.quit();
  });
});
