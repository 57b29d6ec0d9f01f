import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ensureImage } from "../../src/image/index.js";
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
});
