import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ensureImage } from "../../src/image/index.js";
import { sha256File } from "../../src/image/manifest.js";
import { SmolVM } from "../../src/vm/smolvm.js";
import { VmStore } from "../../src/vm/store.js";
import { pgrepF } from "../fixtures/pgrep.js";

describe("debian image", () => {
  let dataDir: string;
  beforeAll(async () => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-debian-"));
    await ensureImage("debian", { dataDir });
  }, 600_000);
  afterAll(() => rmSync(dataDir, { recursive: true, force: true }));

  it("keeps files on its disk across stop() and start(); delete removes the disk", async () => {
    const vm = await SmolVM.create({ dataDir, image: "debian" });
    try {
      expect((await vm.run("cat /etc/debian_version")).exitCode).toBe(0);
      await vm.run("echo persisted-$((6*7)) > /root/keep.txt && sync");
      const vmDir = VmStore.open(dataDir).get(vm.id)!.vmDir;
      const overlay = join(vmDir, "rootfs.qcow2");
      expect(existsSync(overlay)).toBe(true);
      await vm.stop();
      expect(vm.status).toBe("stopped");
      await vm.start();
      expect((await vm.run("cat /root/keep.txt")).output).toBe("persisted-42");
      // The image's own rootfs was never written: a second VM starts clean.
      await using other = await SmolVM.create({ dataDir, image: "debian" });
      expect((await other.run("test -e /root/keep.txt; echo $?")).output).toBe("1");
      await vm.delete();
      expect(existsSync(vmDir)).toBe(false);
    } finally {
      await vm.delete();
    }
    expect(pgrepF(`${join(dataDir, "vms")}/`)).toEqual([]);
  }, 300_000);

  it("a snapshot captures the disk; its clones and the source each write only their own", async () => {
    const backingOf = (file: string) =>
      (
        JSON.parse(execFileSync("qemu-img", ["info", "-U", "--output=json", file], { encoding: "utf8" })) as {
          "backing-filename"?: string;
        }
      )["backing-filename"];
    await using src = await SmolVM.create({ dataDir, image: "debian" });
    await src.run("echo before > /root/shared.txt && sync");
    const snap = await src.snapshot({ name: "debian-disk" });
    const snapDisk = join(dataDir, "snapshots", snap.id, "disk.qcow2");
    const diskSum = await sha256File(snapDisk);
    await using a = await SmolVM.fromSnapshot(snap.id, { dataDir });
    await using b = await SmolVM.fromSnapshot("debian-disk", { dataDir });
    const store = VmStore.open(dataDir);
    const [srcDisk, aDisk, bDisk] = [src, a, b].map((vm) => join(store.get(vm.id)!.vmDir, "rootfs.qcow2"));
    store.close();
    for (const disk of [aDisk!, bDisk!]) expect(backingOf(disk)).toBe(snapDisk);
    for (const c of [a, b]) expect((await c.run("cat /root/shared.txt")).output).toBe("before");
    await a.run("echo a > /root/a.txt && echo a-was-here >> /root/shared.txt && sync");
    await b.run("echo b > /root/b.txt && sync");
    await src.run("echo after > /root/src.txt && sync");
    // Each VM's caches dropped, so what it reads next comes from its own disk.
    for (const vm of [src, a, b]) await vm.run("echo 3 > /proc/sys/vm/drop_caches");
    const seen = async (vm: SmolVM) =>
      (await vm.run("cat /root/shared.txt; ls /root | grep -E '^(a|b|src)\\.txt$' || true")).output;
    expect(await seen(src)).toBe("before\nsrc.txt");
    expect(await seen(a)).toBe("before\na-was-here\na.txt");
    expect(await seen(b)).toBe("before\nb.txt");
    expect(new Set([srcDisk, aDisk, bDisk]).size).toBe(3);
    expect(await sha256File(snapDisk)).toBe(diskSum);
    await a.delete();
    await b.delete();
    await SmolVM.deleteSnapshot(snap.id, { dataDir });
    expect(existsSync(join(dataDir, "snapshots", snap.id))).toBe(false);
  }, 300_000);
});
