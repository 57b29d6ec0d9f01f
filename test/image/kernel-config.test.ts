/**
 * tiny's kernel config (kernel-build.ts): the fragment, the check that every option came out
 * enabled, the source patches, and the source package name. The build itself runs for real in
 * every image test.
 */
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { ImageBuildError } from "../../src/errors.js";
import { kernelSourcePackage } from "../../src/image/apt.js";
import {
  applySourcePatch,
  KERNEL_LOCALVERSION,
  KERNEL_OPTIONS,
  KERNEL_OPTIONS_OFF,
  KERNEL_SOURCE_PATCHES,
  kernelConfigFragment,
  kernelRecipe,
  loadBuiltKernel,
  missingKernelBuildPackages,
  missingKernelOptions,
} from "../../src/image/kernel-build.js";

describe("kernel config", () => {
  it("is a list of whole option names, none both on and off", () => {
    for (const o of [...KERNEL_OPTIONS, ...KERNEL_OPTIONS_OFF]) expect(o).toMatch(/^[A-Z0-9_]+$/);
    expect(new Set(KERNEL_OPTIONS).size).toBe(KERNEL_OPTIONS.length);
    expect(KERNEL_OPTIONS.filter((o) => KERNEL_OPTIONS_OFF.includes(o))).toEqual([]);
    // What the microvm, the agent and the files API cannot do without.
    for (const o of [
      "PVH",
      "VIRTIO_MMIO",
      "VIRTIO_CONSOLE",
      "VIRTIO_NET",
      "INOTIFY_USER",
      "UNIX98_PTYS",
      "VMGENID",
    ]) {
      expect(KERNEL_OPTIONS).toContain(o);
    }
    expect(KERNEL_OPTIONS_OFF).toContain("MODULES");
  });

  it("renders a fragment kconfig reads: =y, is not set, and the local version", () => {
    const lines = kernelConfigFragment().trim().split("\n");
    expect(lines).toContain("CONFIG_VIRTIO_NET=y");
    expect(lines).toContain("# CONFIG_MODULES is not set");
    expect(lines).toContain(`CONFIG_LOCALVERSION="${KERNEL_LOCALVERSION}"`);
    expect(lines).toHaveLength(KERNEL_OPTIONS.length + KERNEL_OPTIONS_OFF.length + 2);
  });

  it("names the options a resolved .config lacks", () => {
    const all = `${KERNEL_OPTIONS.map((o) => `CONFIG_${o}=y`).join("\n")}\n`;
    expect(missingKernelOptions(all)).toEqual([]);
    const without = all
      .replace("CONFIG_VIRTIO_NET=y\n", "# CONFIG_VIRTIO_NET is not set\n")
      .replace("CONFIG_PVH=y\n", "CONFIG_PVH=m\n");
    expect(missingKernelOptions(without)).toEqual(["PVH", "VIRTIO_NET"]);
  });

  it("patches the source where the code is found exactly once, and names the file when not", () => {
    const [tsc] = KERNEL_SOURCE_PATCHES;
    expect(tsc!.file).toBe("arch/x86/kernel/tsc.c");
    // The code as Debian's 6.1 source has it (the real build applies it to the whole file).
    const before =
      "\tif (early) {\n\t\tcpu_khz = x86_platform.calibrate_cpu();\n\t\tif (tsc_early_khz)\n\t\t\ttsc_khz = tsc_early_khz;\n\t\telse\n\t\t\ttsc_khz = x86_platform.calibrate_tsc();\n";
    expect(applySourcePatch(before, tsc!)).toBe(
      "\tif (early) {\n\t\tcpu_khz = x86_platform.calibrate_cpu();\n\t\tif (tsc_early_khz) {\n\t\t\ttsc_khz = tsc_early_khz;\n\t\t\tsetup_force_cpu_cap(X86_FEATURE_TSC_KNOWN_FREQ);\n\t\t} else\n\t\t\ttsc_khz = x86_platform.calibrate_tsc();\n",
    );
    // A changed patch changes the recipe, so the kernel's cache key and tiny's fingerprint.
    expect(kernelRecipe()).toContain(kernelConfigFragment());
    expect(kernelRecipe()).toContain(JSON.stringify(KERNEL_SOURCE_PATCHES));
    for (const text of ["int x;\n", before + before]) {
      let err: unknown;
      try {
        applySourcePatch(text, tsc!);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(ImageBuildError);
      expect((err as Error).message).toContain("arch/x86/kernel/tsc.c");
    }
  });

  it("maps a Debian kernel image package to its source package", () => {
    expect(kernelSourcePackage("linux-image-6.1.0-57-amd64")).toBe("linux-source-6.1");
    expect(kernelSourcePackage("linux-image-6.12.9-amd64")).toBe("linux-source-6.12");
    expect(kernelSourcePackage("linux-image-amd64")).toBeUndefined();
  });

  it("names the Debian packages a host lacks to compile the kernel", () => {
    // scripts/setup.sh installs them all on this host.
    expect(missingKernelBuildPackages()).toEqual([]);
    // Only /usr/sbin and /sbin are searched: none of the tools live there.
    const missing = missingKernelBuildPackages({ PATH: "/nonexistent" });
    expect(missing).toEqual(["gcc", "make", "flex", "bison", "bc", "xz-utils"]);
  });

  it("uses a cached kernel only while its bytes are the ones built", async () => {
    const dir = mkdtempSync(join(tmpdir(), "smolvm-kernel-cache-"));
    try {
      const bytes = Buffer.from("\x7fELF pretend kernel");
      const sha256 = createHash("sha256").update(bytes).digest("hex");
      writeFileSync(join(dir, "vmlinux"), bytes);
      writeFileSync(join(dir, "kernel.json"), JSON.stringify({ release: "6.1.192-smolvm", sha256 }));
      expect(await loadBuiltKernel(dir)).toEqual({
        vmlinux: join(dir, "vmlinux"),
        release: "6.1.192-smolvm",
      });
      writeFileSync(join(dir, "vmlinux"), Buffer.from("\x7fELF damaged kernel"));
      expect(await loadBuiltKernel(dir)).toBeUndefined();
      rmSync(join(dir, "vmlinux"));
      expect(await loadBuiltKernel(dir)).toBeUndefined();
      expect(await loadBuiltKernel(join(dir, "missing"))).toBeUndefined();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
