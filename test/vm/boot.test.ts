/**
 * End to end: the real tiny image boots under the runtime (TCG here), its sshd answers on the
 * forwarded port with the host key we generated, and stopping leaves nothing behind. Prints the
 * boot timeline measured from the serial log.
 */

import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  buildVmConfigCpio,
  CONFIG_DIR,
  composeInitrd,
  ensureClientKey,
  ensureImage,
  generateHostKey,
  type ImageManifest,
  knownHostsLine,
  MILESTONES,
} from "../../src/image/index.js";
import { detectAccelerator, findQemu, hostTscKhz } from "../../src/vm/accel.js";
import { leasePort } from "../../src/vm/ports.js";
import { isQemuAlive, launchQemu, stopQemu } from "../../src/vm/process.js";
import { QmpClient } from "../../src/vm/qmp.js";
import { serialMilestones } from "../../src/vm/serial-log.js";
import { VmStore, vmFiles } from "../../src/vm/store.js";
import { pgrep } from "./helpers/paused-vm.js";

/** Reads the SSH identification line, retrying until the guest's sshd answers through the forward. */
async function sshBanner(port: number, deadline: number): Promise<string> {
  for (;;) {
    const line = await new Promise<string | undefined>((resolve) => {
      const s = connect({ host: "127.0.0.1", port });
      let buf = "";
      const t = setTimeout(() => {
        s.destroy();
        resolve(undefined);
      }, 2_000);
      s.on("data", (d) => {
        buf += d.toString("latin1");
        const nl = buf.indexOf("\n");
        if (nl >= 0) {
          clearTimeout(t);
          s.destroy();
          resolve(buf.slice(0, nl).trim());
        }
      });
      // user-mode networking accepts then closes while nothing listens in the guest.
      s.on("close", () => {
        clearTimeout(t);
        resolve(undefined);
      });
      s.on("error", () => {});
    });
    if (line) return line;
    if (Date.now() > deadline) throw new Error(`no SSH banner on 127.0.0.1:${port}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe("boot the tiny image", () => {
  let dataDir: string;
  let image: ImageManifest;
  beforeAll(async () => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-boot-"));
    image = await ensureImage("tiny", { dataDir });
  });
  afterAll(() => rmSync(dataDir, { recursive: true, force: true }));

  it("reaches sshd with the pinned host key and stops cleanly", async () => {
    const { accel } = await detectAccelerator({ dataDir, quiet: true });
    const store = VmStore.open(dataDir);
    const id = `boot${process.pid}`;
    const vmDir = join(dataDir, "vms", id);
    execFileSync("mkdir", ["-p", "-m", "700", vmDir]);
    const files = vmFiles(vmDir);
    store.insert({ id, name: id, image: "tiny", vmDir });
    const sshPort = await leasePort(store, id, "ssh");

    const client = await ensureClientKey(dataDir);
    const hostKey = await generateHostKey();
    const initrd = join(vmDir, "initrd");
    await composeInitrd(
      image.initrdPath,
      buildVmConfigCpio([
        { path: `${CONFIG_DIR}/ssh_host_ed25519_key`, mode: 0o600, data: hostKey.privateKeyPem },
        { path: `${CONFIG_DIR}/authorized_keys`, mode: 0o600, data: `${client.publicKey}\n` },
      ]),
      initrd,
    );

    const t0 = performance.now();
    const { pid } = await launchQemu(
      {
        name: id,
        qemuPath: findQemu(),
        accel,
        memoryMib: 512,
        vcpus: 1,
        kernelPath: image.kernelPath,
        initrdPath: initrd,
        kernelAppend: image.kernelCmdline,
        tscKhz: hostTscKhz(),
        qmpSocketPath: files.qmpSocket,
        serialLogPath: files.serialLog,
        pidfilePath: files.pidfile,
        sshHostPort: sshPort,
      },
      { timeoutMs: 15_000 },
    );
    const qemuStartMs = performance.now() - t0;
    store.update(id, { status: "running", pid, sshPort });
    try {
      // Host-side time at which each serial milestone first appeared.
      const seenAt: Record<string, number> = {};
      const poll = setInterval(() => {
        let log = "";
        try {
          log = readFileSync(files.serialLog, "utf8");
        } catch {}
        if (seenAt.firstSerial === undefined && log.length > 0) seenAt.firstSerial = performance.now() - t0;
        for (const m of MILESTONES) {
          if (seenAt[m] === undefined && new RegExp(`^smolvm: \\d+ ${m}\\s*$`, "m").test(log))
            seenAt[m] = performance.now() - t0;
        }
      }, 25);
      let banner: string;
      try {
        banner = await sshBanner(sshPort, Date.now() + 90_000);
      } finally {
        clearInterval(poll);
      }
      const bannerMs = performance.now() - t0;
      expect(banner).toMatch(/^SSH-2\.0-OpenSSH_/);

      // The guest presents exactly the host key we generated for it.
      const known = join(vmDir, "known_hosts");
      execFileSync("sh", [
        "-c",
        `printf '%s' "$1" > "$2"`,
        "sh",
        knownHostsLine("127.0.0.1", sshPort, hostKey.publicKey),
        known,
      ]);
      const out = execFileSync(
        "ssh",
        [
          "-o",
          "BatchMode=yes",
          "-o",
          "StrictHostKeyChecking=yes",
          "-o",
          `UserKnownHostsFile=${known}`,
          "-o",
          "ConnectTimeout=20",
          "-i",
          client.privateKeyPath,
          "-p",
          String(sshPort),
          "root@127.0.0.1",
          "echo ok-$(uname -r)",
        ],
        { encoding: "utf8", timeout: 60_000 },
      );
      expect(out.trim()).toBe(`ok-${image.kernelRelease}`);

      const serial = readFileSync(files.serialLog, "utf8");
      const guestMs = serialMilestones(serial);
      for (const m of ["init-start", "modules-loaded", "network-up", "sshd-started"]) {
        expect(guestMs[m], `milestone ${m} in the serial log`).toBeGreaterThan(0);
      }
      expect(guestMs["sshd-started"]!).toBeGreaterThanOrEqual(guestMs["init-start"]!);

      const timeline = {
        accel,
        qemuStartMs: Math.round(qemuStartMs),
        hostMsAtFirstSerial: Math.round(seenAt.firstSerial ?? -1),
        hostMsAtInitStart: Math.round(seenAt["init-start"] ?? -1),
        hostMsAtSshdStarted: Math.round(seenAt["sshd-started"] ?? -1),
        hostMsAtSshBanner: Math.round(bannerMs),
        guestUptimeMs: guestMs,
      };
      console.log(`boot timeline: ${JSON.stringify(timeline)}`);

      await using qmp = await QmpClient.connect(files.qmpSocket);
      expect(await qmp.queryStatus()).toMatchObject({ status: "running", running: true });
      await qmp.close();

      const t1 = performance.now();
      // tiny's init does not act on the ACPI power button (no acpid), so after a short grace the
      // stop escalates to QMP quit: still a clean QEMU exit (pidfile removed -> "stopped").
      const stopped = await stopQemu(
        { pid, qmpSocketPath: files.qmpSocket, marker: files.marker },
        { timeoutMs: 30_000, powerdownMs: 1_500 },
      );
      const stopMs = performance.now() - t1;
      console.log(`stop: ${stopped.method} in ${Math.round(stopMs)} ms`);
      expect(["powerdown", "quit"]).toContain(stopped.method);
      expect(stopMs).toBeLessThan(6_000);
      expect(isQemuAlive(pid, files.marker)).toBe(false);
      expect(store.reconcile()).toEqual([{ id, name: id, from: "running", to: "stopped", pid }]);
      expect(store.leases(id)).toEqual([]);
    } finally {
      await stopQemu({ pid, qmpSocketPath: files.qmpSocket, marker: files.marker }, { force: true });
      expect(pgrep(vmDir)).toEqual([]);
      store.close();
    }
  }, 180_000);
});
