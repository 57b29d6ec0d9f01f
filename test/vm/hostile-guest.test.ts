/**
 * A hostile guest, and the host's own leftovers, on real microVMs: a guest flooding its serial
 * console, an agent that fails authentication, stale pids in long-lived handles, concurrent
 * starts and exposes, and `prune` for what nobody owns.
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  renameSync,
  rmSync,
  statSync,
  utimesSync,
  writeFileSync,
} from "node:fs";
import { readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuthenticationError } from "../../src/errors.js";
import { qemuPidsWith } from "../../src/vm/prune.js";
import { rotatedPath } from "../../src/vm/serial-log.js";
import { SmolVM } from "../../src/vm/smolvm.js";
import { VmStore, vmFiles } from "../../src/vm/store.js";

/** An idle QEMU (no machine, paused) whose command line carries `dir`, like a VM's QEMU. */
function strayQemu(dir: string): ChildProcess {
  mkdirSync(dir, { recursive: true });
  const p = spawn(
    "qemu-system-x86_64",
    [
      "-M",
      "none",
      "-S",
      "-display",
      "none",
      "-monitor",
      "none",
      "-serial",
      "none",
      "-pidfile",
      join(dir, "qemu.pid"),
    ],
    { stdio: "ignore", detached: true },
  );
  p.unref();
  return p;
}

async function until(what: string, fn: () => boolean, ms = 10_000): Promise<void> {
  const t0 = Date.now();
  while (!fn()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe("hostile guest and orphans on a real microVM", () => {
  let dataDir: string;
  let vm: SmolVM;
  let marker: string;
  beforeAll(async () => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-hostile-"));
    vm = await SmolVM.create({ dataDir });
    marker = vmFiles(join(dataDir, "vms", vm.id)).marker;
  }, 240_000);
  afterAll(async () => {
    await vm?.delete().catch(() => {});
    for (const pid of qemuPidsWith(`${dataDir}/`)) process.kill(pid, "SIGKILL");
    rmSync(dataDir, { recursive: true, force: true });
  });

  it("keeps a bounded serial log however much the guest writes to its console", async () => {
    const log = vmFiles(join(dataDir, "vms", vm.id)).serialLog;
    // 3 MiB of console output with terminal escapes in it.
    const r = await vm.run(
      "i=0; while [ $i -lt 48 ]; do head -c 65536 /dev/zero | tr '\\0' 'x' > /dev/ttyS0; printf '\\033]0;pwned\\007\\033[2J' > /dev/ttyS0; i=$((i+1)); done; echo done",
      { shell: "raw", timeoutMs: 180_000 },
    );
    expect(r.stdout).toBe("done\n");
    const text = await vm.serialLog();
    expect(Buffer.byteLength(text)).toBeLessThanOrEqual(1 << 20);
    expect(text.endsWith("\x1b[2J")).toBe(true); // the newest bytes, raw: the SDK returns data as is
    const onDisk = statSync(log).size + (existsSync(rotatedPath(log)) ? statSync(rotatedPath(log)).size : 0);
    expect(onDisk).toBeLessThanOrEqual(2 << 20);
  }, 200_000);

  it("exposeLocal frees its lease when QMP is unreachable, and concurrent exposes all land", async () => {
    const store = VmStore.open(dataDir);
    try {
      const files = vmFiles(join(dataDir, "vms", vm.id));
      const before = store.leases(vm.id).length;
      renameSync(files.qmpSocket, `${files.qmpSocket}.away`);
      try {
        await expect(vm.exposeLocal(8080)).rejects.toThrow();
      } finally {
        renameSync(`${files.qmpSocket}.away`, files.qmpSocket);
      }
      expect(store.leases(vm.id)).toHaveLength(before);
      const other = await SmolVM.fromId(vm.id, { dataDir });
      try {
        // QEMU's monitor takes one client at a time: some of these fail to connect (EAGAIN).
        // Those must free their lease; those that succeed must all be in the record.
        const results = await Promise.allSettled(
          [8001, 8002, 8003, 8004, 8005, 8006].map((g, i) => (i % 2 ? other : vm).exposeLocal(g)),
        );
        const ok = results.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
        expect(ok.length).toBeGreaterThan(0);
        const rec = store.get(vm.id)!;
        expect(rec.ports.map((p) => p.hostPort).sort()).toEqual([...ok].sort());
        expect(store.leases(vm.id)).toHaveLength(before + ok.length);
        for (const p of ok) await vm.unexposeLocal(p);
        expect(store.get(vm.id)!.ports).toEqual([]);
        expect(store.leases(vm.id)).toHaveLength(before);
      } finally {
        await other.close();
      }
    } finally {
      store.close();
    }
  }, 60_000);

  it("two concurrent start() calls launch one QEMU; stop() from a handle with a stale pid stops the live one", async () => {
    const a = await SmolVM.fromId(vm.id, { dataDir });
    const b = await SmolVM.fromId(vm.id, { dataDir });
    try {
      await vm.stop();
      expect(qemuPidsWith(marker)).toEqual([]);
      await Promise.all([a.start({ timeoutMs: 180_000 }), b.start({ timeoutMs: 180_000 })]);
      expect(qemuPidsWith(marker)).toHaveLength(1);
      // `vm` still holds the pid from before its stop; another handle restarted the VM since.
      const stale = await SmolVM.fromId(vm.id, { dataDir });
      await a.stop();
      await b.start({ timeoutMs: 180_000 });
      const live = qemuPidsWith(marker);
      expect(live).toHaveLength(1);
      await stale.stop();
      expect(qemuPidsWith(marker)).toEqual([]);
      await stale.close();
      await vm.start({ timeoutMs: 180_000 });
      expect((await vm.run("echo back")).stdout).toBe("back\n");
    } finally {
      await a.close();
      await b.close();
    }
  }, 600_000);

  it("auto does not fall back to SSH when the agent fails authentication", async () => {
    await vm.close(); // the agent socket takes one host connection at a time
    const secretFile = vmFiles(join(dataDir, "vms", vm.id)).agentSecret;
    const real = await readFile(secretFile);
    writeFileSync(secretFile, randomBytes(32));
    try {
      const h = await SmolVM.fromId(vm.id, { dataDir });
      try {
        const e = await h.run("echo via-ssh", { timeoutMs: 30_000 }).catch((x) => x);
        expect(e).toBeInstanceOf(AuthenticationError);
      } finally {
        await h.close();
      }
    } finally {
      writeFileSync(secretFile, real);
    }
    expect((await vm.run("echo trusted")).stdout).toBe("trusted\n");
  }, 60_000);

  it("prune removes stopped and abandoned VMs and orphaned dirs, and kills QEMU no record owns", async () => {
    const vmsDir = join(dataDir, "vms");
    // An orphaned directory (no record) from long ago.
    const orphan = join(vmsDir, "vm-0000orphan00");
    mkdirSync(orphan, { recursive: true });
    writeFileSync(join(orphan, "serial.log"), "x");
    utimesSync(orphan, new Date(Date.now() - 3600_000), new Date(Date.now() - 3600_000));
    // A QEMU of this data dir that no record owns.
    const stray = strayQemu(join(vmsDir, "vm-0000stray000"));
    // What a creator killed between spawning QEMU and recording its pid leaves: a "creating"
    // record without pid whose creator is gone, and its QEMU running.
    const dead = spawnSync("true").pid!;
    const store = VmStore.open(dataDir);
    const abandonedDir = join(vmsDir, "vm-00abandoned0");
    store.insert({
      id: "vm-00abandoned0",
      name: "abandoned",
      image: "tiny",
      vmDir: abandonedDir,
      status: "creating",
      config: { creatorPid: dead },
    });
    const abandonedQemu = strayQemu(abandonedDir);
    await until("stray QEMUs", () => qemuPidsWith(`${vmsDir}/`).length >= 3);
    const running = await SmolVM.fromId(vm.id, { dataDir });
    try {
      const r1 = await SmolVM.prune({ dataDir });
      expect(r1.removedVms).toEqual(["vm-00abandoned0"]);
      expect(r1.removedDirs.sort()).toEqual(["vm-0000orphan00"]);
      expect(r1.killedPids.sort()).toEqual([stray.pid].sort());
      expect(qemuPidsWith(`${vmsDir}/`)).toEqual(qemuPidsWith(marker));
      expect(abandonedQemu.pid && qemuPidsWith(abandonedDir)).toEqual([]);
      expect(existsSync(orphan) || existsSync(abandonedDir)).toBe(false);
      // The running VM was left alone; once stopped, prune removes it.
      expect(running.status).toBe("running");
      await running.stop();
      const strayDir = join(vmsDir, "vm-0000stray000");
      utimesSync(strayDir, new Date(Date.now() - 3600_000), new Date(Date.now() - 3600_000));
      const r2 = await SmolVM.prune({ dataDir });
      expect(r2.removedVms).toEqual([vm.id]);
      // The stray's dir is removed too, once its QEMU is gone.
      expect(r2.removedDirs).toEqual(["vm-0000stray000"]);
      expect(store.list()).toEqual([]);
      expect(existsSync(join(vmsDir, vm.id))).toBe(false);
    } finally {
      await running.close();
      store.close();
    }
  }, 120_000);
});
