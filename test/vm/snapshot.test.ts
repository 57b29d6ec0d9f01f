/**
 * Snapshots, pause/resume, fork and templates on real microVMs: what a clone inherits (files,
 * running processes), what it must not (random bytes, host key, agent secret, hostname, a stale
 * clock), that the source is unaffected, and that nothing is left behind.
 */
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AgentChannel } from "../../src/channel/agent-channel.js";
import { connectUnix } from "../../src/channel/agent-transport.js";
import { AuthenticationError, VMNotFoundError, VMStateError } from "../../src/errors.js";
import { SSHClient } from "../../src/ssh/client.js";
import { SmolVM } from "../../src/vm/smolvm.js";
import { VmStore, vmFiles } from "../../src/vm/store.js";
import { pgrepF } from "../fixtures/pgrep.js";

const counter = async (vm: SmolVM) => Number((await vm.run("cat /tmp/counter")).output);

function record(dataDir: string, id: string) {
  const store = VmStore.open(dataDir);
  try {
    return store.get(id)!;
  } finally {
    store.close();
  }
}

/** Changes fields of a snapshot's (or template's) recorded config on disk, as another smolvm might have written it. */
function rewriteConfig(metaPath: string, change: Record<string, unknown>): void {
  const meta = JSON.parse(readFileSync(metaPath, "utf8"));
  writeFileSync(metaPath, JSON.stringify({ ...meta, config: { ...meta.config, ...change } }));
}

/** What deleting every VM must leave: no QEMU, no RAM file, no lease, no VM dir. */
function expectNothingLeft(dataDir: string, ids: string[]): void {
  expect(pgrepF(`${join(dataDir, "vms")}/`)).toEqual([]);
  for (const id of ids) expect(existsSync(`/dev/shm/smolvm-${id}.ram`)).toBe(false);
  const store = VmStore.open(dataDir);
  expect(store.leases()).toEqual([]);
  store.close();
  expect(readdirSync(join(dataDir, "vms"))).toEqual([]);
}

describe("snapshots and fork", () => {
  let dataDir: string;
  let source: SmolVM;
  beforeAll(async () => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-snap-"));
    source = await SmolVM.create({ dataDir, name: "source", template: false });
    await source.run(
      "echo from-source > /root/file.txt; (i=0; while :; do i=$((i + 1)); echo $i > /tmp/counter; sleep 0.05; done) >/dev/null 2>&1 &",
    );
    await new Promise((r) => setTimeout(r, 500));
  }, 240_000);
  afterAll(async () => {
    await source?.delete();
    rmSync(dataDir, { recursive: true, force: true });
  });

  it("pause freezes the guest, run() on it says to resume, resume continues", async () => {
    await source.pause();
    expect(source.status).toBe("paused");
    const before = Number(readFileSync(join(dataDir, "vms", source.id, "serial.log")).length);
    const e = await source.run("true").catch((x) => x);
    expect(e).toBeInstanceOf(VMStateError);
    expect(e.code).toBe("VM_PAUSED");
    expect(e.message).toMatch(/Resume it with vm\.resume\(\)/);
    await new Promise((r) => setTimeout(r, 600));
    await source.resume();
    expect(source.status).toBe("running");
    const c1 = await counter(source);
    await new Promise((r) => setTimeout(r, 600));
    const c2 = await counter(source);
    expect(c2).toBeGreaterThan(c1);
    expect(before).toBeGreaterThan(0);
  }, 60_000);

  it("a paused guest's counter does not move", async () => {
    const a = await counter(source);
    await source.pause();
    await new Promise((r) => setTimeout(r, 700));
    await source.resume();
    const b = await counter(source);
    // At most a step or two ran between the read and the pause, and after the resume.
    expect(b - a).toBeLessThan(5);
  }, 60_000);

  it("three clones from one snapshot each inherit files and processes but get their own identity", async () => {
    const t0 = performance.now();
    const snap = await source.snapshot({ name: "three" });
    expect(performance.now() - t0).toBeLessThan(10_000);
    expect(snap).toMatchObject({ name: "three", vmId: source.id, image: "tiny", memoryMib: 512, vcpus: 1 });
    expect(snap.id).toMatch(/^snap-[0-9a-f]{12}$/);
    expect(snap.sizeBytes).toBeGreaterThan(1 << 20);
    expect(await SmolVM.listSnapshots({ dataDir })).toEqual([snap]);
    const dir = join(dataDir, "snapshots", snap.id);
    for (const f of readdirSync(dir)) expect(existsSync(join(dir, f))).toBe(true);

    const clones = await Promise.all(
      ["c1", "c2", "c3"].map((name, i) =>
        SmolVM.fromSnapshot(i === 0 ? snap.id : "three", { dataDir, name, env: { WHO: name } }),
      ),
    );
    try {
      const seen = { random: new Set<string>(), keys: new Set<string>(), secrets: new Set<string>() };
      for (const [i, c] of clones.entries()) {
        expect(c.bootTimings?.source).toBe("snapshot");
        expect((await c.run("cat /root/file.txt")).output).toBe("from-source");
        const a = await counter(c);
        await new Promise((r) => setTimeout(r, 400));
        expect(await counter(c)).toBeGreaterThan(a); // the source's process runs on in the clone
        expect((await c.run("hostname")).output).toBe(`c${i + 1}`);
        expect((await c.run("echo $WHO")).output).toBe(`c${i + 1}`);
        const now = Number((await c.run("date +%s")).output);
        expect(Math.abs(now - Date.now() / 1000)).toBeLessThan(1.5);
        seen.random.add((await c.run("head -c 16 /dev/urandom | od -An -tx1")).output);
        seen.secrets.add(readFileSync(vmFiles(record(dataDir, c.id).vmDir).agentSecret).toString("hex"));
        seen.keys.add(record(dataDir, c.id).hostKeyFingerprint!);
        // Reachable over SSH with its own pinned host key.
        await c.waitForSsh({ timeoutMs: 30_000 });
        const r = record(dataDir, c.id);
        await using ssh = new SSHClient({
          host: "127.0.0.1",
          port: r.sshPort!,
          user: "root",
          keyPath: r.config.clientKeyPath,
          hostKey: { policy: "strict", fingerprint: r.hostKeyFingerprint! },
        });
        expect((await ssh.run("hostname", { timeoutMs: 20_000 })).output).toBe(`c${i + 1}`);
      }
      expect(seen.random.size).toBe(3);
      expect(seen.keys.size).toBe(3);
      expect(seen.keys.has(record(dataDir, source.id).hostKeyFingerprint!)).toBe(false);
      expect(seen.secrets.size).toBe(3);
      // The snapshot's secret no longer opens a clone's agent.
      const old = readFileSync(join(dir, "agent_secret"));
      const stale = new AgentChannel({
        connect: (signal) => connectUnix(vmFiles(record(dataDir, clones[0]!.id).vmDir).agentSocket, signal),
        secret: old,
        name: "a clone's agent with the snapshot's secret",
      });
      await clones[0]!.close(); // the agent port serves one host at a time
      const err = await stale.ping({ timeoutMs: 10_000 }).catch((x) => x);
      await stale.close();
      expect(err).toBeInstanceOf(AuthenticationError);

      // The source is unaffected.
      expect((await source.run("cat /root/file.txt; hostname")).output).toBe("from-source\nsource");

      // A snapshot in use cannot be deleted.
      const busy = await SmolVM.deleteSnapshot("three", { dataDir }).catch((x) => x);
      expect(busy).toBeInstanceOf(VMStateError);
      expect(busy.code).toBe("SNAPSHOT_IN_USE");
    } finally {
      for (const c of clones) await c.delete();
    }
    await SmolVM.deleteSnapshot("three", { dataDir });
    expect(existsSync(dir)).toBe(false);
    await expect(SmolVM.fromSnapshot("three", { dataDir })).rejects.toBeInstanceOf(VMNotFoundError);
    for (const c of clones) expect(existsSync(`/dev/shm/smolvm-${c.id}.ram`)).toBe(false);
  }, 240_000);

  it("fork gives running copies; the source keeps running; the fork's snapshot goes with the last copy", async () => {
    const t0 = performance.now();
    const kids = await source.fork({ count: 2 });
    const forkMs = performance.now() - t0;
    try {
      expect(kids).toHaveLength(2);
      expect(forkMs).toBeLessThan(30_000);
      for (const k of kids) expect((await k.run("cat /root/file.txt")).output).toBe("from-source");
      expect(new Set(kids.map((k) => k.id)).size).toBe(2);
      expect(await SmolVM.listSnapshots({ dataDir })).toEqual([]); // a fork's snapshot is not listed
      expect((await source.run("echo alive")).output).toBe("alive");
    } finally {
      for (const k of kids) await k.delete();
    }
    expect(readdirSync(join(dataDir, "snapshots"))).toEqual([]);
  }, 120_000);

  it("restores a snapshot with the devices it records (an older smolvm's keep their guest announce)", async () => {
    const snap = await source.snapshot({ name: "model-1" });
    const metaPath = join(dataDir, "snapshots", snap.id, "snapshot.json");
    expect(JSON.parse(readFileSync(metaPath, "utf8")).config.deviceModel).toBe(2);
    // As a snapshot from before device model 2 records it: no deviceModel at all.
    rewriteConfig(metaPath, { deviceModel: undefined });
    const clone = await SmolVM.fromSnapshot("model-1", { dataDir });
    try {
      const argv = readFileSync(`/proc/${record(dataDir, clone.id).pid}/cmdline`, "utf8").split("\0");
      expect(argv).toContain("virtio-net-device,netdev=n0");
      expect(record(dataDir, clone.id).config.deviceModel).toBeUndefined();
      expect((await clone.run("cat /root/file.txt")).output).toBe("from-source");
    } finally {
      await clone.delete();
    }
    await SmolVM.deleteSnapshot("model-1", { dataDir });
  }, 120_000);
});

describe("templates", () => {
  let dataDir: string;
  beforeAll(() => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-tmpl-"));
  });
  afterAll(() => rmSync(dataDir, { recursive: true, force: true }));

  it("concurrent first creates build one template; later creates restore it", async () => {
    const vms = await Promise.all([1, 2, 3].map(() => SmolVM.create({ dataDir })));
    const ids = vms.map((v) => v.id);
    try {
      const sources = vms.map((v) => v.bootTimings!.source).sort();
      expect(sources).toEqual(["cold", "template", "template"]);
      expect(readdirSync(join(dataDir, "templates")).filter((n) => !n.includes("."))).toHaveLength(1);
      for (const v of vms) expect((await v.run("echo ok")).output).toBe("ok");
      await using again = await SmolVM.create({ dataDir });
      ids.push(again.id);
      expect(again.bootTimings?.source).toBe("template");
      await using cold = await SmolVM.create({ dataDir, template: false });
      ids.push(cold.id);
      expect(cold.bootTimings?.source).toBe("cold");
    } finally {
      for (const v of vms) await v.delete();
    }
    expectNothingLeft(dataDir, ids);
  }, 300_000);

  it("a template that no longer matches its image, or is damaged, is rebuilt, never used", async () => {
    const [tdir] = readdirSync(join(dataDir, "templates")).filter((n) => !n.includes("."));
    const metaPath = join(dataDir, "templates", tdir!, "snapshot.json");
    const meta = JSON.parse(readFileSync(metaPath, "utf8"));
    rewriteConfig(metaPath, { imageFingerprint: "0".repeat(64) });
    await using a = await SmolVM.create({ dataDir });
    expect(a.bootTimings?.source).toBe("cold");
    expect(JSON.parse(readFileSync(metaPath, "utf8")).config.imageFingerprint).toBe(
      meta.config.imageFingerprint,
    );
    // One left by an older smolvm, whose devices were not these: rebuilt with this version's.
    rewriteConfig(metaPath, { deviceModel: undefined });
    await using old = await SmolVM.create({ dataDir });
    expect(old.bootTimings?.source).toBe("cold");
    expect(JSON.parse(readFileSync(metaPath, "utf8")).config.deviceModel).toBe(2);
    rmSync(join(dataDir, "templates", tdir!, "state"));
    await using b = await SmolVM.create({ dataDir });
    expect(b.bootTimings?.source).toBe("cold");
    await using c = await SmolVM.create({ dataDir });
    expect(c.bootTimings?.source).toBe("template");
  }, 300_000);
});

describe("snapshots and forks of a VM restored from the template (the default create)", () => {
  let dataDir: string;
  beforeAll(() => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-snap-restored-"));
  });
  afterAll(() => rmSync(dataDir, { recursive: true, force: true }));

  /** Private memory of a VM's QEMU (anonymous + shmem), MiB: shared snapshot pages not counted. */
  const privateMib = (id: string) => {
    const status = readFileSync(`/proc/${record(dataDir, id).pid}/status`, "utf8");
    const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, "m").exec(status)?.[1] ?? 0);
    return (kb("RssAnon") + kb("RssShmem")) / 1024;
  };

  it("captures only device state plus the guest's written pages; clones and grandclones keep files and processes", async () => {
    const ids: string[] = [];
    await (await SmolVM.create({ dataDir })).delete(); // leaves the template
    const source = await SmolVM.create({ dataDir, name: "restored" });
    ids.push(source.id);
    try {
      expect(source.bootTimings?.source).toBe("template");
      await source.run(
        "echo restored-source > /root/file.txt; (i=0; while :; do i=$((i + 1)); echo $i > /tmp/counter; sleep 0.05; done) >/dev/null 2>&1 &",
      );
      await new Promise((r) => setTimeout(r, 300));

      const snap = await source.snapshot({ name: "of-restored" });
      const meta = JSON.parse(readFileSync(join(dataDir, "snapshots", snap.id, "snapshot.json"), "utf8"));
      expect(meta.stateFormat).toBe("devices");
      expect(meta.pauseMs).toBeLessThan(300);
      // Device state only: the RAM is in the memory file, not in the state.
      expect(readFileSync(join(dataDir, "snapshots", snap.id, "state")).length).toBeLessThan(1 << 20);

      const t0 = performance.now();
      const kids = await source.fork({ count: 2 });
      ids.push(...kids.map((k) => k.id));
      expect(performance.now() - t0).toBeLessThan(3_000);
      const [grandchild] = await kids[0]!.fork();
      ids.push(grandchild!.id);
      const clone = await SmolVM.fromSnapshot("of-restored", { dataDir, name: "from-restored" });
      ids.push(clone.id);
      for (const vm of [...kids, grandchild!, clone]) {
        // A device-only state says "running": only -S keeps the guest stopped until smolvm's
        // `cont`, after the VM's closed nftables table is in.
        const argv = readFileSync(`/proc/${record(dataDir, vm.id).pid}/cmdline`, "utf8").split("\0");
        expect(argv).toContain("-S");
        expect(argv).toContain("migration.send-configuration=off");
        // The devices the snapshot was taken with (DEVICE_MODEL 2: no guest announce).
        expect(argv).toContain("virtio-net-device,netdev=n0,guest_announce=off");
        expect(record(dataDir, vm.id).config.deviceModel).toBe(2);
        expect((await vm.run("cat /root/file.txt")).output).toBe("restored-source");
        const a = await counter(vm);
        await new Promise((r) => setTimeout(r, 300));
        expect(await counter(vm)).toBeGreaterThan(a);
        // Mapping the snapshot's pages, not a copy of the guest's RAM of its own.
        expect(privateMib(vm.id)).toBeLessThan(100);
      }
      expect((await clone.run("hostname")).output).toBe("from-restored");
      expect((await source.run("cat /root/file.txt")).output).toBe("restored-source");
      for (const vm of [grandchild!, ...kids, clone]) await vm.delete();
      await SmolVM.deleteSnapshot("of-restored", { dataDir });
      expect(readdirSync(join(dataDir, "snapshots"))).toEqual([]);
    } finally {
      await source.delete();
    }
    expectNothingLeft(dataDir, ids);
  }, 240_000);
});
