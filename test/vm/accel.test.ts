import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { ValidationError } from "../../src/errors.js";
import { ensureImage, type ImageManifest } from "../../src/image/index.js";
import { detectAccelerator, findQemu, hostTscKhz, vhostVsockAvailable } from "../../src/vm/accel.js";
import { pgrepF } from "../fixtures/pgrep.js";

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

const FAKE_QEMU = join(__dirname, "../fixtures/fake-kvm-qemu.sh");

describe("detectAccelerator", () => {
  let dataDir: string;
  let image: ImageManifest;
  beforeAll(async () => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-accel-img-"));
    image = await ensureImage("tiny", { dataDir });
  }, 180_000);
  afterAll(() => rmSync(dataDir, { recursive: true, force: true }));

  it("decides by booting the image's kernel, caches the verdict host-wide and never prints", async () => {
    const cacheDir = tmpData();
    const writes: string[] = [];
    vi.spyOn(process.stderr, "write").mockImplementation((s: string | Uint8Array) => {
      writes.push(String(s));
      return true;
    });
    const t0 = performance.now();
    const v = await detectAccelerator({ dataDir, image, cacheDir, env: { PATH: process.env.PATH } });
    const took = performance.now() - t0;
    expect(v.accel === "kvm" || v.accel === "tcg").toBe(true);
    expect(writes).toEqual([]);
    if (!existsSync("/dev/kvm")) {
      expect(v).toEqual({ accel: "tcg", reason: "/dev/kvm is missing", probeMs: 0 });
      return;
    }
    // firmware probe (<= 5 s) + kernel probe under KVM (<= 10 s) + possibly TCG's (<= 10 s)
    expect(took).toBeLessThan(27_000);
    expect(v.probeMs).toBeGreaterThan(0);
    if (v.accel === "kvm") expect(v.reason).toMatch(/^the guest kernel reached \/init under KVM in \d+ ms$/);
    else expect(v.reason).toMatch(/KVM|probe firmware|TCG is faster/);
    const cachePath = join(cacheDir, "accel.json");
    const cache = JSON.parse(readFileSync(cachePath, "utf8"));
    expect(cache).toHaveLength(1);
    expect(cache[0]).toMatchObject({ accel: v.accel, reason: v.reason, probeMs: v.probeMs });
    expect(cache[0].key).toContain("|QEMU emulator version ");
    expect(cache[0].key).toContain(image.artifacts.kernel.sha256);
    expect(statSync(cachePath).mode & 0o777).toBe(0o600);

    // Second call: from the cache, fast, same verdict.
    const t1 = performance.now();
    expect(await detectAccelerator({ dataDir, image, cacheDir })).toEqual({ ...v, cached: true });
    expect(performance.now() - t1).toBeLessThan(1_000);
  }, 60_000);

  it("a KVM that runs the firmware but stops the real kernel means TCG, said with its cause", async () => {
    if (!existsSync("/dev/kvm")) return; // auto goes to TCG before any probe there (tested above)
    const cacheDir = tmpData();
    const t0 = performance.now();
    const v = await detectAccelerator({ image, cacheDir, qemuPath: FAKE_QEMU, refresh: true });
    expect(v.accel).toBe("tcg");
    expect(v.reason).toBe(
      "KVM cannot run the guest kernel (KVM emulation failure: the guest kernel stopped under KVM)",
    );
    // The fake prints its failure 0.3 s after start: the probe stops there, not at its 10 s bound.
    expect(performance.now() - t0).toBeLessThan(5_000);
    expect(pgrepF(FAKE_QEMU)).toEqual([]);
    // refresh re-probes and overwrites; the cache holds one entry per key.
    await detectAccelerator({ image, cacheDir, qemuPath: FAKE_QEMU, refresh: true });
    expect(JSON.parse(readFileSync(join(cacheDir, "accel.json"), "utf8"))).toHaveLength(1);
  }, 30_000);

  it("honours force and SMOLVM_ACCEL, the option winning", async () => {
    const dataDir = tmpData();
    expect(await detectAccelerator({ dataDir, force: "tcg" })).toEqual({
      accel: "tcg",
      reason: "forced by the caller",
      probeMs: 0,
    });
    expect(await detectAccelerator({ dataDir, force: "kvm" })).toEqual({
      accel: "kvm",
      reason: "forced by the caller",
      probeMs: 0,
    });
    expect(await detectAccelerator({ dataDir, env: { SMOLVM_ACCEL: "tcg" } })).toEqual({
      accel: "tcg",
      reason: "forced by SMOLVM_ACCEL",
      probeMs: 0,
    });
    expect(await detectAccelerator({ dataDir, force: "tcg", env: { SMOLVM_ACCEL: "kvm" } })).toMatchObject({
      accel: "tcg",
    });
    // Forcing never probes: no image built, no cache written.
    expect(existsSync(join(dataDir, "accel.json"))).toBe(false);
    expect(existsSync(join(dataDir, "images"))).toBe(false);
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
