import { describe, expect, it } from "vitest";
import { ValidationError } from "../../src/errors.js";
import {
  AGENT_PORT_NAME,
  buildQemuArgv,
  DEVICE_MODEL,
  deviceModelSpec,
  MICROVM_MACHINE,
  type VmLaunchSpec,
} from "../../src/vm/qemu.js";

const base: VmLaunchSpec = {
  name: "vm-1",
  qemuPath: "/usr/bin/qemu-system-x86_64",
  accel: "tcg",
  memoryMib: 512,
  vcpus: 1,
  kernelPath: "/d/images/tiny/vmlinuz",
  initrdPath: "/d/vms/vm-1/initrd",
  kernelAppend: "console=ttyS0 quiet",
  qmpSocketPath: "/d/vms/vm-1/qmp.sock",
  serialLogPath: "/d/vms/vm-1/serial.log",
  pidfilePath: "/d/vms/vm-1/qemu.pid",
  sshHostPort: 40022,
};

/** The value following each occurrence of `flag`. */
function values(argv: string[], flag: string): string[] {
  const out: string[] = [];
  argv.forEach((a, i) => {
    if (a === flag) out.push(argv[i + 1]!);
  });
  return out;
}

describe("buildQemuArgv", () => {
  it("builds the exact minimal TCG command line", () => {
    expect(buildQemuArgv(base)).toEqual([
      "/usr/bin/qemu-system-x86_64",
      "-name",
      "vm-1,process=smolvm-vm-1",
      "-M",
      "microvm,acpi=on,x-option-roms=off,pit=off,pic=off,rtc=on,isa-serial=on",
      "-accel",
      "tcg",
      "-cpu",
      "max,-erms,-fsrm",
      "-m",
      "512M",
      "-smp",
      "1",
      "-nodefaults",
      "-no-user-config",
      "-display",
      "none",
      "-no-reboot",
      "-kernel",
      "/d/images/tiny/vmlinuz",
      "-initrd",
      "/d/vms/vm-1/initrd",
      "-append",
      "console=ttyS0 quiet tsc=reliable cryptomgr.notests",
      "-chardev",
      "file,id=serial0,path=/d/vms/vm-1/serial.log,append=on",
      "-serial",
      "chardev:serial0",
      "-qmp",
      "unix:/d/vms/vm-1/qmp.sock,server=on,wait=off",
      "-pidfile",
      "/d/vms/vm-1/qemu.pid",
      "-netdev",
      "user,id=n0,hostfwd=tcp:127.0.0.1:40022-:22",
      "-device",
      "virtio-net-device,netdev=n0,guest_announce=off",
      "-object",
      "rng-random,id=rng0,filename=/dev/urandom",
      "-device",
      "virtio-rng-device,rng=rng0",
    ]);
  });

  it("is pure: same spec, same argv, spec untouched", () => {
    const copy = structuredClone(base);
    expect(buildQemuArgv(base)).toEqual(buildQemuArgv(base));
    expect(base).toEqual(copy);
  });

  it("uses -cpu host on KVM and -cpu max without byte-wise string ops on TCG", () => {
    expect(values(buildQemuArgv({ ...base, accel: "kvm" }), "-cpu")).toEqual(["host"]);
    expect(values(buildQemuArgv({ ...base, accel: "kvm" }), "-accel")).toEqual(["kvm"]);
    expect(values(buildQemuArgv(base), "-cpu")).toEqual(["max,-erms,-fsrm"]);
  });

  it("has the fast-boot microvm machine and no -daemonize", () => {
    const argv = buildQemuArgv(base);
    expect(values(argv, "-M")).toEqual([MICROVM_MACHINE]);
    expect(argv).not.toContain("-daemonize");
    for (const f of ["-nodefaults", "-no-user-config", "-no-reboot"])
      expect(argv.filter((a) => a === f)).toHaveLength(1);
  });

  it("adds tsc_early_khz and tsc=reliable on TCG only, skips crypto self-tests, never twice", () => {
    expect(values(buildQemuArgv({ ...base, tscKhz: 2445000 }), "-append")).toEqual([
      "console=ttyS0 quiet tsc_early_khz=2445000 tsc=reliable cryptomgr.notests",
    ]);
    expect(values(buildQemuArgv({ ...base, accel: "kvm", tscKhz: 2445000 }), "-append")).toEqual([
      "console=ttyS0 quiet cryptomgr.notests",
    ]);
    expect(
      values(
        buildQemuArgv({
          ...base,
          kernelAppend: "console=ttyS0 tsc_early_khz=1000 tsc=unstable cryptomgr.notests",
          tscKhz: 2,
        }),
        "-append",
      ),
    ).toEqual(["console=ttyS0 tsc_early_khz=1000 tsc=unstable cryptomgr.notests"]);
  });

  it("sizes memory and vCPUs", () => {
    const argv = buildQemuArgv({ ...base, memoryMib: 2048, vcpus: 2 });
    expect(values(argv, "-m")).toEqual(["2048M"]);
    expect(values(argv, "-smp")).toEqual(["2"]);
  });

  it("forwards extra host ports on 127.0.0.1 only, SSH first", () => {
    const argv = buildQemuArgv({
      ...base,
      extraHostForwards: [
        { hostPort: 40080, guestPort: 80 },
        { hostPort: 40443, guestPort: 8443 },
      ],
    });
    expect(values(argv, "-netdev")).toEqual([
      "user,id=n0,hostfwd=tcp:127.0.0.1:40022-:22,hostfwd=tcp:127.0.0.1:40080-:80,hostfwd=tcp:127.0.0.1:40443-:8443",
    ]);
  });

  it("attaches the rootfs as a raw virtio-blk-device", () => {
    const argv = buildQemuArgv({ ...base, rootfsPath: "/d/vms/vm-1/rootfs.ext4" });
    expect(values(argv, "-drive")).toEqual([
      "file=/d/vms/vm-1/rootfs.ext4,if=none,id=rootfs,format=raw,discard=unmap",
    ]);
    expect(values(argv, "-device")).toContain("virtio-blk-device,drive=rootfs");
    expect(values(buildQemuArgv(base), "-drive")).toEqual([]);
    // a copy-on-write overlay (what VMs of the debian image boot from)
    expect(values(buildQemuArgv({ ...base, rootfsPath: "/d/vms/vm-1/rootfs.qcow2" }), "-drive")).toEqual([
      "file=/d/vms/vm-1/rootfs.qcow2,if=none,id=rootfs,format=qcow2,discard=unmap",
    ]);
  });

  it("adds the agent virtio-serial port backed by a server socket", () => {
    const argv = buildQemuArgv({ ...base, agentSocketPath: "/d/vms/vm-1/agent.sock" });
    expect(values(argv, "-chardev")).toEqual([
      "file,id=serial0,path=/d/vms/vm-1/serial.log,append=on",
      "socket,id=agent0,path=/d/vms/vm-1/agent.sock,server=on,wait=off",
    ]);
    expect(values(argv, "-device")).toEqual([
      "virtio-net-device,netdev=n0,guest_announce=off",
      "virtio-rng-device,rng=rng0",
      "virtio-serial-device,id=vser0,max_ports=2",
      `virtserialport,bus=vser0.0,nr=1,chardev=agent0,name=${AGENT_PORT_NAME}`,
    ]);
    expect(AGENT_PORT_NAME).toBe("org.smolvm.agent");
  });

  it("asks the guest to announce itself only for device model 1 (snapshots taken before model 2)", () => {
    expect(DEVICE_MODEL).toBe(2);
    expect(deviceModelSpec(undefined)).toEqual({ guestAnnounce: true });
    expect(deviceModelSpec(1)).toEqual({ guestAnnounce: true });
    expect(deviceModelSpec(DEVICE_MODEL)).toEqual({ guestAnnounce: false });
    expect(values(buildQemuArgv({ ...base, ...deviceModelSpec(1) }), "-device")[0]).toBe(
      "virtio-net-device,netdev=n0",
    );
    expect(values(buildQemuArgv({ ...base, ...deviceModelSpec(2) }), "-device")[0]).toBe(
      "virtio-net-device,netdev=n0,guest_announce=off",
    );
  });

  it("adds vhost-vsock only when asked, and -S for a paused start", () => {
    expect(values(buildQemuArgv({ ...base, vsock: { guestCid: 42 } }), "-device")).toContain(
      "vhost-vsock-device,guest-cid=42",
    );
    expect(buildQemuArgv(base).join(" ")).not.toContain("vsock");
    expect(buildQemuArgv({ ...base, startPaused: true })).toContain("-S");
    expect(buildQemuArgv(base)).not.toContain("-S");
  });

  it("escapes commas in paths the QEMU way", () => {
    const argv = buildQemuArgv({
      ...base,
      serialLogPath: "/d/a,b/serial.log",
      qmpSocketPath: "/d/a,b/q.sock",
    });
    expect(values(argv, "-chardev")).toEqual(["file,id=serial0,path=/d/a,,b/serial.log,append=on"]);
    expect(values(argv, "-qmp")).toEqual(["unix:/d/a,,b/q.sock,server=on,wait=off"]);
  });

  const bad: Array<[string, Partial<VmLaunchSpec>]> = [
    ["empty name", { name: "" }],
    ["name with a comma", { name: "a,b" }],
    ["name with a space", { name: "a b" }],
    ["name too long", { name: "a".repeat(65) }],
    ["accel", { accel: "hvf" as never }],
    ["memory too small", { memoryMib: 16 }],
    ["fractional memory", { memoryMib: 512.5 }],
    ["zero vcpus", { vcpus: 0 }],
    ["port 0", { sshHostPort: 0 }],
    ["port too big", { sshHostPort: 65536 }],
    ["relative kernel", { kernelPath: "vmlinuz" }],
    ["newline in path", { initrdPath: "/d/x\ny" }],
    ["NUL in append", { kernelAppend: "console=ttyS0\0x" }],
    ["bad tscKhz", { tscKhz: -1 }],
    ["duplicate host port", { extraHostForwards: [{ hostPort: 40022, guestPort: 80 }] }],
    ["bad guest port", { extraHostForwards: [{ hostPort: 40080, guestPort: 0 }] }],
    ["reserved vsock cid", { vsock: { guestCid: 2 } }],
    ["empty qemuPath", { qemuPath: "" }],
    ["relative rootfs", { rootfsPath: "rootfs.img" }],
  ];
  it.each(bad)("rejects %s with ValidationError", (_what, patch) => {
    expect(() => buildQemuArgv({ ...base, ...patch })).toThrow(ValidationError);
  });
});
