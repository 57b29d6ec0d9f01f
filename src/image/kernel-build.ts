/**
 * tiny's guest kernel, compiled on this host from Debian's linux-source package with a config
 * made for smolvm's microvm: everything it uses built in (no module to load at boot), and
 * nothing else. Under TCG every guest instruction path costs its translation the first time it
 * runs in a QEMU process, so a kernel with less in it boots faster (to /init in about 0.6 s of
 * its clock instead of Debian's 1.6 s) and a VM restored from a template reaches its first
 * command sooner.
 *
 * Built once per (source version, config, compiler) into `<cacheDir>/kernels/`, under a lock so
 * concurrent builders share one build; it takes a few minutes on two cores.
 */
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { appendFile, copyFile, mkdir, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import { HostDependencyError, ImageBuildError } from "../errors.js";
import { type AptPackage, extractDeb, fetchDeb } from "./apt.js";
import { exec, toolPath } from "./exec.js";
import { acquireLock, sweepDeadBuilds } from "./lock.js";
import { sha256File } from "./manifest.js";

/** Appended to the release (`uname -r`): tells our kernel from Debian's. */
export const KERNEL_LOCALVERSION = "-smolvm";

/**
 * Options set on top of `make tinyconfig`, grouped by what needs them. Each must come out `=y`
 * after `make olddefconfig`, or the build fails naming it (a newer source may rename one).
 */
export const KERNEL_OPTIONS: readonly string[] = [
  // the machine: x86-64 microvm (ACPI describes its virtio-mmio devices), PVH entry, TSC clock
  "64BIT SMP ACPI PCI PVH HYPERVISOR_GUEST PARAVIRT KVM_GUEST CPU_SUP_INTEL CPU_SUP_AMD X86_X2APIC",
  "HIGH_RES_TIMERS NO_HZ_IDLE JUMP_LABEL RTC_CLASS RTC_DRV_CMOS",
  // console, initramfs, executables
  "PRINTK TTY SERIAL_8250 SERIAL_8250_CONSOLE UNIX98_PTYS MAGIC_SYSRQ BLK_DEV_INITRD",
  "BINFMT_ELF BINFMT_SCRIPT ELF_CORE COREDUMP MULTIUSER",
  // what user programs and the agent call
  "FUTEX EPOLL SIGNALFD TIMERFD EVENTFD AIO IO_URING FILE_LOCKING INOTIFY_USER FHANDLE",
  "POSIX_TIMERS SYSVIPC POSIX_MQUEUE ADVISE_SYSCALLS MEMBARRIER RSEQ SECCOMP SECCOMP_FILTER",
  // file systems (debugfs only to tune fault-around at boot, see init-script.ts)
  "PROC_FS PROC_SYSCTL SYSFS DEVTMPFS TMPFS TMPFS_POSIX_ACL SHMEM BLOCK EXT4_FS DEBUG_FS",
  // network: the user-mode NIC, IPv4 and IPv6, vsock where the host has it
  "NET INET IPV6 UNIX PACKET NETDEVICES NET_CORE VSOCKETS VIRTIO_VSOCKETS",
  // virtio devices: NIC, agent port, entropy, disk; the VM generation id driver, for a QEMU whose
  // microvm describes the device (7.2's does not: clones are reseeded by injected entropy)
  "VIRTIO_MENU VIRTIO_MMIO VIRTIO_NET VIRTIO_CONSOLE HW_RANDOM HW_RANDOM_VIRTIO BLK_DEV VIRTIO_BLK",
  "VIRT_DRIVERS VMGENID",
].flatMap((group) => group.split(" "));

/** Options turned off: code the microvm never uses but that tinyconfig leaves on. */
export const KERNEL_OPTIONS_OFF: readonly string[] = [
  "ACPI_AC ACPI_BATTERY ACPI_FAN ACPI_THERMAL ACPI_TABLE_UPGRADE ACPI_LPIT ACPI_CPPC_LIB",
  "INPUT SERIO VT LOCALVERSION_AUTO MODULES",
].flatMap((group) => group.split(" "));

/** The config fragment appended to tinyconfig's .config (later assignments win in kconfig). */
export function kernelConfigFragment(): string {
  return [
    ...KERNEL_OPTIONS.map((o) => `CONFIG_${o}=y`),
    ...KERNEL_OPTIONS_OFF.map((o) => `# CONFIG_${o} is not set`),
    `CONFIG_LOCALVERSION="${KERNEL_LOCALVERSION}"`,
    "CONFIG_NR_CPUS=64",
    "",
  ].join("\n");
}

/** A change to one file of the kernel source: `find` must occur exactly once. */
export interface KernelSourcePatch {
  file: string;
  find: string;
  replace: string;
}

/**
 * Changes made to Debian's kernel source before it is configured. Each is small and says why;
 * a source where one no longer applies fails the build naming it.
 */
export const KERNEL_SOURCE_PATCHES: readonly KernelSourcePatch[] = [
  {
    // Under TCG the host passes its TSC rate (tsc_early_khz, see qemu.ts guestKernelAppend), and
    // the microvm has no HPET or PM timer to refine it against. Unpatched, the kernel still
    // schedules a "refinement" one second after its clocks start, which registers the TSC,
    // prints and switches clocksource under stop_machine: about 1.2 s into the boot, so just after
    // a template is captured, and then again in every VM restored from it (about 450 blocks of
    // kernel code to translate before the clone's first command). Known, the rate is final at
    // boot, as it is under KVM (kvmclock) or on CPUs that report it.
    file: "arch/x86/kernel/tsc.c",
    find: "\t\tif (tsc_early_khz)\n\t\t\ttsc_khz = tsc_early_khz;\n\t\telse\n",
    replace:
      "\t\tif (tsc_early_khz) {\n\t\t\ttsc_khz = tsc_early_khz;\n\t\t\tsetup_force_cpu_cap(X86_FEATURE_TSC_KNOWN_FREQ);\n\t\t} else\n",
  },
];

/** `text` (the content of `patch.file`) with `patch` applied; throws when it does not apply once. */
export function applySourcePatch(text: string, patch: KernelSourcePatch): string {
  const at = text.indexOf(patch.find);
  if (at < 0 || text.indexOf(patch.find, at + 1) >= 0) {
    throw new ImageBuildError(
      `the kernel source's ${patch.file} no longer has the code smolvm changes (${at < 0 ? "not found" : "found twice"}): this source version needs an update of KERNEL_SOURCE_PATCHES.`,
      { details: { file: patch.file } },
    );
  }
  return text.slice(0, at) + patch.replace + text.slice(at + patch.find.length);
}

/** KERNEL_OPTIONS that a resolved .config does not have as `=y`. */
export function missingKernelOptions(dotConfig: string): string[] {
  const set = new Set(
    dotConfig
      .split("\n")
      .filter((l) => l.endsWith("=y"))
      .map((l) => l.slice(7, -2)),
  );
  return KERNEL_OPTIONS.filter((o) => !set.has(o));
}

/** What the kernel build needs on the host: [command or header, Debian package]. */
const BUILD_TOOLS: readonly [string, string][] = [
  ["gcc", "gcc"],
  ["make", "make"],
  ["flex", "flex"],
  ["bison", "bison"],
  ["bc", "bc"],
  ["xz", "xz-utils"],
  ["/usr/include/gelf.h", "libelf-dev"],
];

/** Debian packages the kernel build needs and this host (with this PATH) lacks. */
export function missingKernelBuildPackages(env: NodeJS.ProcessEnv = process.env): string[] {
  // The PATH exec() will run them with.
  const path = toolPath(env).split(":").filter(Boolean);
  const has = (tool: string) =>
    tool.startsWith("/") ? existsSync(tool) : path.some((d) => existsSync(join(d, tool)));
  return [...new Set(BUILD_TOOLS.filter(([tool]) => !has(tool)).map(([, pkg]) => pkg))];
}

export interface BuiltKernel {
  /** The ELF kernel QEMU boots through its PVH entry point. */
  vmlinux: string;
  /** uname -r */
  release: string;
}

/**
 * What the kernel is made from, besides its source version and compiler: the config fragment and
 * the source patches. Both the kernel's cache key and tiny's image fingerprint include it, so a
 * change to either rebuilds both.
 */
export function kernelRecipe(): string {
  return `${kernelConfigFragment()}\n${JSON.stringify(KERNEL_SOURCE_PATCHES)}`;
}

/** The cache key: source version, recipe and compiler (a new gcc makes a new kernel). */
export async function kernelBuildKey(src: AptPackage, signal?: AbortSignal): Promise<string> {
  const gcc = (await exec("gcc", ["--version"], { signal })).stdout.toString("utf8").split("\n")[0];
  return createHash("sha256")
    .update(`${src.name}=${src.version}\n${gcc}\n${kernelRecipe()}`)
    .digest("hex")
    .slice(0, 16);
}

/**
 * The kernel for `src` (a linux-source package), built when not cached. `onStep` names each
 * phase; the compile is the long one. Aborting kills the whole make process group.
 */
export async function buildKernel(
  src: AptPackage,
  cacheDir: string,
  opts: { signal?: AbortSignal; onStep?: (step: string) => void } = {},
): Promise<BuiltKernel> {
  const { signal } = opts;
  const kernels = join(cacheDir, "kernels");
  const dir = join(
    kernels,
    `smolvm-${src.version.replace(/[^\w.+-]/g, "_")}-${await kernelBuildKey(src, signal)}`,
  );
  const cached = await loadBuiltKernel(dir, signal);
  if (cached) return cached;
  const missing = missingKernelBuildPackages();
  if (missing.length) {
    throw new HostDependencyError(
      `building the guest kernel needs ${missing.join(", ")}: install them (apt-get install ${missing.join(" ")}) and retry.`,
      { details: { packages: missing } },
    );
  }
  await mkdir(kernels, { recursive: true });
  const lock = await acquireLock(`${dir}.lock`, {
    signal,
    onWait: () => opts.onStep?.("waiting for another build of the guest kernel"),
  });
  try {
    const again = await loadBuiltKernel(dir, signal);
    if (again) return again;
    await sweepDeadBuilds(kernels); // build trees (about 2 GB) of builders that died
    await rm(dir, { recursive: true, force: true }); // damaged, if anything

    const work = join(kernels, `.build-kernel-${process.pid}-${Date.now()}`);
    try {
      opts.onStep?.("fetching the kernel source");
      const root = join(work, "pkg");
      await extractDeb(await fetchDeb(src, cacheDir, signal), root, signal);
      const usrSrc = join(root, "usr", "src");
      const tarball = (await readdir(usrSrc)).find((f) => /^linux-source-.*\.tar\.(xz|gz|bz2)$/.test(f));
      if (!tarball)
        throw new ImageBuildError(`${src.name} ${src.version} has no source tarball in /usr/src.`);
      opts.onStep?.("unpacking the kernel source");
      await exec("tar", ["-xf", join(usrSrc, tarball), "-C", work], { signal });
      await rm(root, { recursive: true, force: true });
      const tree = join(work, tarball.replace(/\.tar\.\w+$/, ""));
      const env = {
        ...process.env,
        // Reproducible: the same inputs give the same kernel on every host.
        KBUILD_BUILD_USER: "smolvm",
        KBUILD_BUILD_HOST: "smolvm",
        KBUILD_BUILD_TIMESTAMP: "1970-01-01",
      };
      for (const patch of KERNEL_SOURCE_PATCHES) {
        const file = join(tree, patch.file);
        await writeFile(file, applySourcePatch(await readFile(file, "utf8"), patch));
      }
      const make = (args: string[]) => exec("make", args, { cwd: tree, env, signal, processGroup: true });
      opts.onStep?.("configuring the kernel");
      await make(["tinyconfig"]);
      await appendFile(join(tree, ".config"), kernelConfigFragment());
      await make(["olddefconfig"]);
      const absent = missingKernelOptions(await readFile(join(tree, ".config"), "utf8"));
      if (absent.length) {
        throw new ImageBuildError(
          `the kernel source ${src.name} ${src.version} cannot enable ${absent.map((o) => `CONFIG_${o}`).join(", ")}.`,
          { details: { missing: absent } },
        );
      }
      opts.onStep?.(`compiling the kernel (once; a few minutes on ${availableParallelism()} cores)`);
      await make([`-j${availableParallelism()}`, "vmlinux"]);
      const release = (await make(["-s", "kernelrelease"])).stdout.toString("utf8").trim();
      const out = join(work, "out");
      await mkdir(out);
      await copyFile(join(tree, "vmlinux"), join(out, "vmlinux"));
      const sha256 = await sha256File(join(out, "vmlinux"), signal);
      await writeFile(
        join(out, "kernel.json"),
        JSON.stringify({ release, sha256, source: `${src.name}=${src.version}` }),
      );
      await rename(out, dir);
    } finally {
      await rm(work, { recursive: true, force: true });
    }
    const built = await loadBuiltKernel(dir, signal);
    if (!built) throw new ImageBuildError(`the guest kernel build left no kernel in ${dir}.`);
    return built;
  } finally {
    await lock.release();
  }
}

/**
 * The kernel cached in `dir`, or undefined when it is missing or its bytes are not the ones
 * built (a damaged cache is built again, never booted). Read only when an image is built.
 */
export async function loadBuiltKernel(dir: string, signal?: AbortSignal): Promise<BuiltKernel | undefined> {
  try {
    const meta = JSON.parse(await readFile(join(dir, "kernel.json"), "utf8")) as {
      release: string;
      sha256: string;
    };
    const vmlinux = join(dir, "vmlinux");
    if (typeof meta.release !== "string" || (await sha256File(vmlinux, signal)) !== meta.sha256)
      return undefined;
    return { vmlinux, release: meta.release };
  } catch (e) {
    if (signal?.aborted) throw e;
    return undefined;
  }
}
