/**
 * Pure QEMU argv builder for a microvm guest. No I/O: everything the command line depends on is
 * in the spec, so it can be tested exhaustively.
 *
 * Process model (process.ts): no `-daemonize`. QEMU is spawned detached in its own session with
 * stdout/stderr going to a log file, so it outlives the creating process, keeps reporting late
 * failures (a vCPU that cannot run) somewhere we can read, and is reaped by us while we live (by
 * init afterwards). `-pidfile` still records the pid for other processes.
 */
import { validatePort } from "../common/port.js";
import { ValidationError } from "../errors.js";

export type Accel = "kvm" | "tcg";

export interface HostForward {
  hostPort: number;
  guestPort: number;
}

export interface VmLaunchSpec {
  /** Used for `-name` and the process title; also a marker for liveness checks. */
  name: string;
  qemuPath: string;
  accel: Accel;
  memoryMib: number;
  vcpus: number;
  kernelPath: string;
  initrdPath: string;
  /** Raw disk image attached as a virtio-blk-device (the guest sees /dev/vda). */
  rootfsPath?: string;
  /** Full kernel command line (must include console=ttyS0 to get a serial log). */
  kernelAppend: string;
  /**
   * TCG only: the guest's TSC frequency in kHz (the host's, see hostTscKhz()). microvm has no
   * HPET/PM timer, so without it a TCG guest cannot calibrate its TSC and stalls early in boot.
   */
  tscKhz?: number;
  qmpSocketPath: string;
  serialLogPath: string;
  pidfilePath: string;
  /** Host side of the SSH forward, bound on 127.0.0.1 only. */
  sshHostPort: number;
  extraHostForwards?: HostForward[];
  /** Unix socket (server) for the guest agent's virtio-serial port `org.smolvm.agent`. */
  agentSocketPath?: string;
  /** `-S`: vCPUs stay paused until QMP `cont`. */
  startPaused?: boolean;
  /**
   * Guest RAM in a file (memory-backend-file) instead of anonymous memory. `share: true` maps it
   * shared (a live VM whose RAM a snapshot copies; the migration stream then skips RAM with
   * x-ignore-shared); `share: false` maps it private, copy-on-write (a VM restored from a
   * snapshot: clones share the snapshot's pages until they write them).
   */
  memoryFile?: { path: string; share: boolean };
  /** `-incoming defer`: wait for QMP migrate-incoming (restoring a snapshot). */
  incomingDefer?: boolean;
  /**
   * The incoming stream holds device state only (QMP xen-save-devices-state: no configuration
   * section, no RAM; the RAM is all in memoryFile), so QEMU must not expect a configuration.
   */
  devicesOnlyState?: boolean;
  /**
   * The NIC asks the guest to announce itself after a restore (VIRTIO_NET_F_GUEST_ANNOUNCE).
   * Off since DEVICE_MODEL 2: the announce only refreshes switches that a user-mode NIC does not
   * have, and every clone paid for it with about 600 blocks of kernel code (netlink, ARP, MLD)
   * to translate before its identity. On for restores of snapshots taken with model 1.
   */
  guestAnnounce?: boolean;
  /** Adds a vhost-vsock-device; only when /dev/vhost-vsock is usable (see vhostVsockAvailable()). */
  vsock?: { guestCid: number };
}

export const AGENT_PORT_NAME = "org.smolvm.agent";
/** The memory-backend-file object's id (see VmLaunchSpec.memoryFile). */
export const MEMORY_BACKEND_ID = "mem0";
/** The user-mode network's id; QMP hostfwd_add/remove refer to it. */
export const NETDEV_ID = "n0";

/**
 * The version of the devices buildQemuArgv gives a VM, recorded with it (VmConfig.deviceModel)
 * and so with its snapshots: a device state only loads into the same devices. 2: no guest
 * announce (see VmLaunchSpec.guestAnnounce).
 */
export const DEVICE_MODEL = 2;

/** What a VM of device model `model` needs in its launch spec. */
export function deviceModelSpec(model: number | undefined): Pick<VmLaunchSpec, "guestAnnounce"> {
  return { guestAnnounce: (model ?? 1) < 2 };
}

/**
 * microvm with ACPI (the Debian kernel finds the virtio-mmio devices through it). No PIT, no PIC,
 * no option ROMs: less to emulate and probe. RTC stays so the guest has the wall-clock time
 * (TLS certificate checks in the guest need it). isa-serial is the console (ttyS0).
 */
export const MICROVM_MACHINE = "microvm,acpi=on,x-option-roms=off,pit=off,pic=off,rtc=on,isa-serial=on";
/**
 * TCG's CPU: everything it emulates except ERMS/FSRM. With them the guest kernel copies and
 * clears memory with `rep movsb`/`rep stosb`, which TCG runs one byte per iteration; without
 * them it uses `rep movsq` or unrolled 8-byte loops. Measured under TCG: the kernel unpacks the
 * initramfs about 40 % faster and boot to /init is about 0.5 s shorter.
 */
export const TCG_CPU = "max,-erms,-fsrm";

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** QEMU splits option values on ',' (',,' escapes it); reject what cannot be expressed safely. */
function checkPath(what: string, path: string): string {
  if (typeof path !== "string" || path.length === 0 || !path.startsWith("/")) {
    throw new ValidationError(`${what} must be an absolute path, got ${JSON.stringify(path)}.`, {
      details: { what },
    });
  }
  if (/[\0\n]/.test(path)) {
    throw new ValidationError(`${what} contains a NUL or newline; use a plain path.`, { details: { what } });
  }
  return path.replaceAll(",", ",,");
}

export function validateLaunchSpec(spec: VmLaunchSpec): void {
  if (!NAME_RE.test(spec.name)) {
    throw new ValidationError(
      `VM name ${JSON.stringify(spec.name)} is invalid: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.`,
      { details: { name: spec.name } },
    );
  }
  if (spec.accel !== "kvm" && spec.accel !== "tcg") {
    throw new ValidationError(`accel must be "kvm" or "tcg", got ${JSON.stringify(spec.accel)}.`);
  }
  if (!Number.isInteger(spec.memoryMib) || spec.memoryMib < 64 || spec.memoryMib > 1024 * 1024) {
    throw new ValidationError(`memoryMib must be an integer >= 64, got ${String(spec.memoryMib)}.`, {
      details: { memoryMib: spec.memoryMib },
    });
  }
  if (!Number.isInteger(spec.vcpus) || spec.vcpus < 1 || spec.vcpus > 255) {
    throw new ValidationError(`vcpus must be an integer in 1..255, got ${String(spec.vcpus)}.`, {
      details: { vcpus: spec.vcpus },
    });
  }
  if (typeof spec.qemuPath !== "string" || spec.qemuPath.length === 0) {
    throw new ValidationError("qemuPath must name the qemu-system-x86_64 binary.");
  }
  if (/[\0\n]/.test(spec.kernelAppend)) {
    throw new ValidationError("kernelAppend contains a NUL or newline.");
  }
  if (spec.tscKhz !== undefined && (!Number.isInteger(spec.tscKhz) || spec.tscKhz <= 0)) {
    throw new ValidationError(`tscKhz must be a positive integer, got ${String(spec.tscKhz)}.`);
  }
  validatePort("sshHostPort", spec.sshHostPort);
  const hostPorts = new Set([spec.sshHostPort]);
  for (const f of spec.extraHostForwards ?? []) {
    validatePort("extraHostForwards.hostPort", f.hostPort);
    validatePort("extraHostForwards.guestPort", f.guestPort);
    if (hostPorts.has(f.hostPort)) {
      throw new ValidationError(
        `host port ${f.hostPort} is forwarded twice; each forward needs its own port.`,
        {
          details: { hostPort: f.hostPort },
        },
      );
    }
    hostPorts.add(f.hostPort);
  }
  if (
    spec.vsock &&
    (!Number.isInteger(spec.vsock.guestCid) ||
      spec.vsock.guestCid < 3 ||
      spec.vsock.guestCid > 0xffffffff - 1)
  ) {
    throw new ValidationError(`vsock.guestCid must be an integer >= 3, got ${String(spec.vsock.guestCid)}.`);
  }
}

/** `-accel` and `-cpu` for an accelerator: the host's CPU under KVM, TCG_CPU under TCG. */
export function accelArgs(accel: Accel): string[] {
  return ["-accel", accel, "-cpu", accel === "kvm" ? "host" : TCG_CPU];
}

/** The kernel command line QEMU passes: the image's, plus what the accelerator needs. */
export function guestKernelAppend(kernelAppend: string, accel: Accel, tscKhz?: number): string {
  let append = kernelAppend.trim();
  if (accel === "tcg" && tscKhz !== undefined && !/(^|\s)tsc_early_khz=/.test(append)) {
    append = `${append} tsc_early_khz=${tscKhz}`.trim();
  }
  // TCG: without this the clocksource watchdog can demote the TSC on a busy host and the boot stalls.
  if (accel === "tcg" && !/(^|\s)tsc=/.test(append)) append = `${append} tsc=reliable`.trim();
  // The crypto self-tests the kernel runs at every boot take about 0.7 s of a 2 s boot under TCG
  // (measured with initcall_debug); they check the host's own kernel build, not the sandbox.
  if (!/(^|\s)cryptomgr\.notests/.test(append)) append = `${append} cryptomgr.notests`.trim();
  return append;
}

export function buildQemuArgv(spec: VmLaunchSpec): string[] {
  validateLaunchSpec(spec);
  const qmp = checkPath("qmpSocketPath", spec.qmpSocketPath);
  const serial = checkPath("serialLogPath", spec.serialLogPath);
  const pidfile = checkPath("pidfilePath", spec.pidfilePath);
  const kernel = checkPath("kernelPath", spec.kernelPath);
  const initrd = checkPath("initrdPath", spec.initrdPath);

  const append = guestKernelAppend(spec.kernelAppend, spec.accel, spec.tscKhz);

  const fwds = [{ hostPort: spec.sshHostPort, guestPort: 22 }, ...(spec.extraHostForwards ?? [])];
  const netdev = [
    `user`,
    `id=${NETDEV_ID}`,
    ...fwds.map((f) => `hostfwd=tcp:127.0.0.1:${f.hostPort}-:${f.guestPort}`),
  ];

  const argv = [
    spec.qemuPath,
    "-name",
    `${spec.name.replaceAll(",", ",,")},process=smolvm-${spec.name}`.slice(0, 200),
    "-M",
    spec.memoryFile ? `${MICROVM_MACHINE},memory-backend=${MEMORY_BACKEND_ID}` : MICROVM_MACHINE,
    ...accelArgs(spec.accel),
    "-m",
    `${spec.memoryMib}M`,
    "-smp",
    String(spec.vcpus),
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-no-reboot",
    "-kernel",
    kernel,
    "-initrd",
    initrd,
    "-append",
    append,
    "-chardev",
    // append: the host rotates the log by truncating it (serial-log.ts), QEMU keeps writing at the end.
    `file,id=serial0,path=${serial},append=on`,
    "-serial",
    "chardev:serial0",
    "-qmp",
    `unix:${qmp},server=on,wait=off`,
    "-pidfile",
    pidfile,
    "-netdev",
    netdev.join(","),
    "-device",
    `virtio-net-device,netdev=${NETDEV_ID}${spec.guestAnnounce ? "" : ",guest_announce=off"}`,
    "-object",
    "rng-random,id=rng0,filename=/dev/urandom",
    "-device",
    "virtio-rng-device,rng=rng0",
  ];

  if (spec.rootfsPath !== undefined) {
    const rootfs = checkPath("rootfsPath", spec.rootfsPath);
    argv.push(
      "-drive",
      `file=${rootfs},if=none,id=rootfs,format=${rootfs.endsWith(".qcow2") ? "qcow2" : "raw"},discard=unmap`,
      "-device",
      "virtio-blk-device,drive=rootfs",
    );
  }
  if (spec.agentSocketPath !== undefined) {
    const agent = checkPath("agentSocketPath", spec.agentSocketPath);
    argv.push(
      "-chardev",
      `socket,id=agent0,path=${agent},server=on,wait=off`,
      "-device",
      "virtio-serial-device,id=vser0,max_ports=2",
      "-device",
      `virtserialport,bus=vser0.0,nr=1,chardev=agent0,name=${AGENT_PORT_NAME}`,
    );
  }
  if (spec.memoryFile) {
    const mem = checkPath("memoryFile.path", spec.memoryFile.path);
    argv.push(
      "-object",
      `memory-backend-file,id=${MEMORY_BACKEND_ID},size=${spec.memoryMib}M,mem-path=${mem},share=${spec.memoryFile.share ? "on" : "off"}`,
    );
  }
  if (spec.incomingDefer) argv.push("-incoming", "defer");
  if (spec.devicesOnlyState) argv.push("-global", "migration.send-configuration=off");
  if (spec.startPaused) argv.push("-S");
  if (spec.vsock !== undefined) {
    argv.push("-device", `vhost-vsock-device,guest-cid=${spec.vsock.guestCid}`);
  }
  return argv;
}
