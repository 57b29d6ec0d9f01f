/**
 * The `debian` image: a debootstrap minbase bookworm root filesystem (openssh-server, python3,
 * curl, ca-certificates, iproute2) packed into a sparse ext4 image with `mkfs.ext4 -d` (no
 * loop mounts), booted with the same Debian kernel and a busybox initramfs that loads
 * virtio_blk + ext4, mounts /dev/vda and switch_roots into /sbin/smolvm-init.
 *
 * debootstrap itself needs root (it chroots to run maintainer scripts); building this image
 * is therefore on demand only (`smolvm image build debian`). The VM must boot a per-VM
 * copy-on-write view of rootfs.ext4 (e.g. a qcow2 overlay), never the image file itself.
 */
import { chmod, copyFile, mkdir, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { HostDependencyError } from "../errors.js";
import { type AptPackage, parseAptSources, resolveImagePackages } from "./apt.js";
import { writeCpio } from "./cpio.js";
import { exec } from "./exec.js";
import { FileMemo } from "./file-memo.js";
import { computeFingerprint } from "./fingerprint.js";
import { renderDebianStage1, renderDebianStage2, SSHD_CONFIG } from "./init-script.js";
import { pickKernel } from "./kernel.js";
import { type BuiltArtifacts, busyboxEntries, guestAgent, initramfsEntries } from "./tiny.js";

export const DEBIAN_SUITE = "bookworm";
export const DEBIAN_PACKAGES = ["openssh-server", "python3", "curl", "ca-certificates", "iproute2"] as const;
/** Debian's kernel modules the image loads, in this order (dependencies are added first automatically). */
export const NET_MODULES = [
  "virtio_ring",
  "virtio",
  "virtio_mmio",
  "failover",
  "net_failover",
  "virtio_net",
  "virtio_console",
] as const;
/** For the guest agent over vsock; loaded when the kernel ships them. */
export const VSOCK_MODULES = [
  "vsock",
  "vmw_vsock_virtio_transport_common",
  "vmw_vsock_virtio_transport",
] as const;

/** virtio_blk + ext4; crc32c_generic because ext4's metadata checksums ask the crypto API for crc32c. */
export const DISK_MODULES = ["virtio_blk", "crc32c_generic", "ext4"] as const;
export const ROOTFS_SIZE = "2G";

export interface DebianPlan {
  fingerprint: string;
  agentPath?: string;
  kernel: AptPackage;
  busybox: AptPackage;
  mirror: string;
  security?: string;
  packages: Record<string, string>;
}

async function hostAptSources(): Promise<string> {
  let text = "";
  try {
    text += await readFile("/etc/apt/sources.list", "utf8");
  } catch {
    /* optional */
  }
  try {
    for (const f of (await readdir("/etc/apt/sources.list.d")).sort()) {
      if (f.endsWith(".list") || f.endsWith(".sources")) {
        text += `\n\n${await readFile(join("/etc/apt/sources.list.d", f), "utf8")}\n\n`;
      }
    }
  } catch {
    /* optional */
  }
  return text;
}

export function renderSourcesList(mirror: string, security: string | undefined): string {
  return (
    `deb ${mirror} ${DEBIAN_SUITE} main\n` +
    `deb ${mirror} ${DEBIAN_SUITE}-updates main\n` +
    (security ? `deb ${security} ${DEBIAN_SUITE}-security main\n` : "")
  );
}

export async function planDebian(cacheDir: string, signal?: AbortSignal): Promise<DebianPlan> {
  const { kernel, pkgs } = await resolveImagePackages(["busybox-static"], cacheDir, signal);
  const { mirror, security } = parseAptSources(await hostAptSources(), DEBIAN_SUITE);
  if (!mirror) {
    throw new HostDependencyError(
      `no Debian ${DEBIAN_SUITE} mirror found in /etc/apt/sources.list(.d): add one (e.g. http://deb.debian.org/debian).`,
    );
  }
  let debootstrap = "unknown";
  try {
    debootstrap = (
      await exec("dpkg-query", ["-W", "-f", "${Version}", "debootstrap"], { signal })
    ).stdout.toString("utf8");
  } catch {
    /* reported when it is run */
  }
  const busybox = pkgs.get("busybox-static")!;
  const agentPath = await guestAgent(cacheDir, signal);
  const memo = await FileMemo.open(cacheDir);
  const agentSha = agentPath ? await memo.sha256(agentPath) : null;
  await memo.save();
  const fingerprint = computeFingerprint({
    image: "debian",
    agent: agentSha,
    kernel: `${kernel.name}=${kernel.version}`,
    busybox: `${busybox.name}=${busybox.version}`,
    debootstrap,
    suite: DEBIAN_SUITE,
    mirror,
    security: security ?? null,
    packages: [...DEBIAN_PACKAGES],
    modules: [...NET_MODULES, ...DISK_MODULES],
    optionalModules: [...VSOCK_MODULES],
    stage1: renderDebianStage1([...NET_MODULES, ...DISK_MODULES]),
    stage2: renderDebianStage2(),
    sshdConfig: SSHD_CONFIG,
    size: ROOTFS_SIZE,
  });
  return {
    fingerprint,
    agentPath,
    kernel,
    busybox,
    mirror,
    security,
    packages: { [kernel.name]: kernel.version, [busybox.name]: busybox.version, debootstrap },
  };
}

export async function buildDebianInto(
  plan: DebianPlan,
  outDir: string,
  cacheDir: string,
  step: (name: string, detail?: boolean) => void,
  signal?: AbortSignal,
): Promise<BuiltArtifacts> {
  if (process.getuid?.() !== 0) {
    throw new HostDependencyError(
      "building the debian image runs debootstrap, which needs root: run `sudo smolvm image build debian` (or use the tiny image).",
    );
  }
  step("fetching and unpacking the kernel");
  const kernel = await pickKernel(
    plan.kernel,
    [...NET_MODULES, ...DISK_MODULES],
    VSOCK_MODULES,
    cacheDir,
    signal,
  );
  step("fetching busybox");
  const busybox = await busyboxEntries(plan.busybox, cacheDir, signal);
  step("writing the initramfs");
  const entries = await initramfsEntries({
    init: renderDebianStage1(kernel.modules),
    modules: kernel.modules,
    kernelModulesDir: join(kernel.dir, "modules"),
    busybox,
    withSsh: false,
    signal,
  });
  await writeFile(join(outDir, "initrd.cpio"), writeCpio(entries));
  await copyFile(kernel.vmlinux, join(outDir, "vmlinux"));

  const tree = join(outDir, "rootfs-tree");
  try {
    step("debootstrap (minutes)");
    await exec(
      "debootstrap",
      ["--variant=minbase", `--include=${DEBIAN_PACKAGES.join(",")}`, DEBIAN_SUITE, tree, plan.mirror],
      {
        signal,
        onLine: (l) => {
          if (/^I: (Retrieving|Extracting|Unpacking|Configuring|Installing)/.test(l))
            step(`debootstrap: ${l.slice(3, 60)}`, true);
        },
      },
    );
    step("configuring the root filesystem");
    // No secrets in the image: the package's freshly generated host keys go; each VM gets its own.
    for (const f of await readdir(join(tree, "etc/ssh"))) {
      if (f.startsWith("ssh_host_")) await rm(join(tree, "etc/ssh", f), { force: true });
    }
    await writeFile(join(tree, "etc/ssh/sshd_config"), SSHD_CONFIG);
    await writeFile(join(tree, "etc/machine-id"), "");
    await rm(join(tree, "etc/hostname"), { force: true });
    await writeFile(join(tree, "etc/apt/sources.list"), renderSourcesList(plan.mirror, plan.security));
    await mkdir(join(tree, "root/.ssh"), { recursive: true, mode: 0o700 });
    await mkdir(join(tree, "etc/profile.d"), { recursive: true });
    await writeFile(join(tree, "sbin/smolvm-init"), renderDebianStage2(), { mode: 0o755 });
    if (plan.agentPath) await copyFile(plan.agentPath, join(tree, "sbin/smolvm-agent"));
    if (plan.agentPath) await chmod(join(tree, "sbin/smolvm-agent"), 0o755);
    await chmod(join(tree, "sbin/smolvm-init"), 0o755);
    await exec("chroot", [tree, "apt-get", "clean"], { signal });
    step("packing rootfs.ext4");
    await exec(
      "mkfs.ext4",
      [
        "-q",
        "-F",
        "-L",
        "smolvm-root",
        "-E",
        "root_owner=0:0",
        "-d",
        tree,
        join(outDir, "rootfs.ext4"),
        ROOTFS_SIZE,
      ],
      { signal },
    );
  } finally {
    await rm(tree, { recursive: true, force: true });
  }
  return {
    kernelRelease: kernel.release,
    agent: Boolean(plan.agentPath),
    packages: plan.packages,
    modules: kernel.modules,
  };
}
