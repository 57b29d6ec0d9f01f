import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it, vi } from "vitest";
import { ValidationError } from "../../src/errors.js";
import { detectAccelerator, findQemu, hostTscKhz, vhostVsockAvailable } from "../../src/vm/accel.js";

const dirs: string[] = [];
function tmpData(): string {
  const d = mkdtempSync(join(tmpdir(), "smolvm-accel-"));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  vi.restoreAllMocks();
});

describe("detectAccelerator", () => {
  it("auto-detects by really running a guest, caches the verdict and says so once", async () => {
    const dataDir = tmpData();
    const writes: string[] = [];
    vi.spyOn(process.stderr, "write").mockImplementation((s: string | Uint8Array) => {
      writes.push(String(s));
      return true;
    });
    const t0 = performance.now();
    const v = await detectAccelerator({ dataDir, env: { PATH: process.env.PATH } });
    const probeMs = performance.now() - t0;
    expect(v.accel === "kvm" || v.accel === "tcg").toBe(true);
    expect(v.reason.length).toBeGreaterThan(5);
    if (existsSync("/dev/kvm") && v.accel === "tcg") {
      // This machine: /dev/kvm is there but cannot run a guest with -cpu host.
      expect(v.reason).toMatch(/probe guest/);
      expect(
        writes.filter((w) => w.startsWith("smolvm: /dev/kvm is present but cannot run guests (")),
      ).toHaveLength(1);
      expect(writes.join("")).toMatch(/; using TCG software emulation \(slower\)\n$/);
    }
    expect(probeMs).toBeLessThan(6_000);
    const cache = JSON.parse(readFileSync(join(dataDir, "accel.json"), "utf8"));
    if (existsSync("/dev/kvm")) {
      expect(cache).toHaveLength(1);
      expect(cache[0]).toMatchObject({ accel: v.accel, reason: v.reason });
      expect(cache[0].key).toMatch(/\|QEMU emulator version /);
      expect(statSync(join(dataDir, "accel.json")).mode & 0o777).toBe(0o600);
    }

    // Second call: from the cache (fast), same verdict, no second notice.
    const t1 = performance.now();
    expect(await detectAccelerator({ dataDir, env: { PATH: process.env.PATH } })).toEqual(v);
    expect(performance.now() - t1).toBeLessThan(1_000);
    expect(writes.filter((w) => w.includes("cannot run guests"))).toHaveLength(writes.length > 0 ? 1 : 0);
  });

  it("honours force and SMOLVM_ACCEL, the option winning", async () => {
    const dataDir = tmpData();
    expect(await detectAccelerator({ dataDir, force: "tcg" })).toEqual({
      accel: "tcg",
      reason: "forced by the caller",
    });
    expect(await detectAccelerator({ dataDir, force: "kvm" })).toEqual({
      accel: "kvm",
      reason: "forced by the caller",
    });
    expect(await detectAccelerator({ dataDir, env: { SMOLVM_ACCEL: "tcg" } })).toEqual({
      accel: "tcg",
      reason: "forced by SMOLVM_ACCEL",
    });
    expect(await detectAccelerator({ dataDir, force: "tcg", env: { SMOLVM_ACCEL: "kvm" } })).toMatchObject({
      accel: "tcg",
    });
    // Forcing never probes: no cache written.
    expect(existsSync(join(dataDir, "accel.json"))).toBe(false);
  });

  it("rejects a bad SMOLVM_ACCEL with ValidationError", async () => {
    await expect(
      detectAccelerator({ dataDir: tmpData(), env: { SMOLVM_ACCEL: "hvf" } }),
    ).rejects.toBeInstanceOf(ValidationError);
  });
});

describe("host facts", () => {
  it("finds QEMU on PATH and reports a missing one", () => {
    expect(findQemu({ PATH: process.env.PATH })).toMatch(/\/qemu-system-x86_64$/);
    expect(() => findQemu({ PATH: "/nonexistent" })).toThrow(/qemu-system-x86_64 was not found/);
    expect(() => findQemu({ SMOLVM_QEMU: "/nonexistent/qemu" })).toThrow(/SMOLVM_QEMU/);
  });

  it("reads the host TSC frequency", () => {
    const khz = hostTscKhz();
    expect(khz).toBeGreaterThan(100_000);
    expect(khz).toBeLessThan(10_000_000);
  });

  it("reports vhost-vsock availability from the device node", async () => {
    expect(await vhostVsockAvailable()).toBe(existsSync("/dev/vhost-vsock"));
  });
});
