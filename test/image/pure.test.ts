import { execFileSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import { parseCpuMhzKhz } from "../../src/common/host-clock.js";
import { ImageBuildError } from "../../src/errors.js";
import {
  parseAptCacheShow,
  parseAptSources,
  parseExactDependency,
  parseKernelDependency,
} from "../../src/image/apt.js";
import { kernelCmdline } from "../../src/image/boot-args.js";
import { BUILDER_VERSION, canonicalJson, computeFingerprint } from "../../src/image/fingerprint.js";
import { parseLdd } from "../../src/image/host-libs.js";
import {
  MILESTONES,
  renderDebianStage1,
  renderDebianStage2,
  renderTinyInit,
} from "../../src/image/init-script.js";
import { knownHostsLine, publicKeyFingerprint } from "../../src/image/keys.js";
import { moduleDepends, moduleName, orderModules, parseModulesBuiltin } from "../../src/image/kmod.js";

describe("fingerprint", () => {
  it("is stable under key order and changes with any input", () => {
    const a = computeFingerprint({
      kernel: "linux-image-6.1.0-56-amd64=6.1.192-2",
      init: "#!/bin/sh\n",
      n: [1, 2],
    });
    const b = computeFingerprint({
      n: [1, 2],
      init: "#!/bin/sh\n",
      kernel: "linux-image-6.1.0-56-amd64=6.1.192-2",
    });
    expect(a).toBe(b);
    expect(a).toMatch(/^[0-9a-f]{64}$/);
    expect(
      computeFingerprint({ kernel: "linux-image-6.1.0-56-amd64=6.1.192-3", init: "#!/bin/sh\n", n: [1, 2] }),
    ).not.toBe(a);
    expect(
      computeFingerprint({ kernel: "linux-image-6.1.0-56-amd64=6.1.192-2", init: "#!/bin/sh \n", n: [1, 2] }),
    ).not.toBe(a);
    expect(
      computeFingerprint({ kernel: "linux-image-6.1.0-56-amd64=6.1.192-2", init: "#!/bin/sh\n", n: [2, 1] }),
    ).not.toBe(a);
    // The builder version is part of it.
    expect(computeFingerprint({ builderVersion: BUILDER_VERSION + 1, kernel: "x" })).not.toBe(
      computeFingerprint({ kernel: "x" }),
    );
  });

  it("renders canonical JSON", () => {
    expect(canonicalJson({ b: 1, a: [true, null, { d: "x", c: 2 }] })).toBe(
      '{"a":[true,null,{"c":2,"d":"x"}],"b":1}',
    );
  });
});

describe("apt parsing", () => {
  const show = `Package: linux-image-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Architecture: amd64
Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)
Size: 1488
SHA256: abc
Description: Linux for 64-bit PCs (meta-package)
 continued line

Package: busybox-static
Version: 1:1.35.0-4+deb12u1+b1
Architecture: amd64
Size: 928188

Package: busybox-static
Version: 1:1.35.0-4
`;
  it("takes the first (candidate) stanza per package", () => {
    const m = parseAptCacheShow(show);
    expect(m.get("busybox-static")).toMatchObject({ version: "1:1.35.0-4+deb12u1+b1", size: 928188 });
    expect(m.get("linux-image-amd64")).toMatchObject({ version: "6.1.192-2", sha256: "abc", size: 1488 });
    expect(parseExactDependency(m.get("linux-image-amd64")!.depends, /^linux-image-\d/)).toEqual({
      name: "linux-image-6.1.0-56-amd64",
      version: "6.1.192-2",
    });
  });
  it("finds the concrete kernel in apt-cache depends output", () => {
    expect(parseKernelDependency("linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n")).toBe(
      "linux-image-6.1.0-56-amd64",
    );
    expect(parseKernelDependency("linux-image-amd64\n  Depends: kmod\n")).toBeUndefined();
  });
  it("reads mirrors from one-line and deb822 sources", () => {
    expect(
      parseAptSources("deb [arch=amd64] http://ftp.example.org/debian/ bookworm main\n", "bookworm"),
    ).toEqual({
      mirror: "http://ftp.example.org/debian",
    });
    const deb822 = `Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
`;
    expect(parseAptSources(deb822, "bookworm")).toEqual({
      mirror: "http://deb.debian.org/debian",
      security: "http://deb.debian.org/debian-security",
    });
  });
});

describe("kernel modules", () => {
  const ko = (deps: string) =>
    Buffer.concat([
      Buffer.from("\x7fELF junk\0license=GPL\0"),
      Buffer.from(`depends=${deps}\0`),
      Buffer.from("name=x\0"),
    ]);
  it("reads depends= from modinfo strings", () => {
    expect(moduleDepends(ko("virtio,virtio_ring"))).toEqual(["virtio", "virtio_ring"]);
    expect(moduleDepends(ko(""))).toEqual([]);
    expect(moduleDepends(Buffer.from("no modinfo"))).toEqual([]);
  });
  it("orders dependencies first, drops built-ins, rejects missing non-optional modules", () => {
    const deps: Record<string, string[]> = {
      virtio_ring: [],
      virtio: [],
      virtio_mmio: ["virtio", "virtio_ring"],
      failover: [],
      net_failover: ["failover"],
      virtio_net: ["net_failover", "virtio", "virtio_ring"],
    };
    const order = orderModules(["virtio_net", "virtio_mmio"], (n) => deps[n], new Set(["virtio"]));
    expect(order).toEqual(["failover", "net_failover", "virtio_ring", "virtio_net", "virtio_mmio"]);
    expect(orderModules(["vsock"], (n) => deps[n], new Set(), new Set(["vsock"]))).toEqual([]);
    expect(() => orderModules(["vsock"], (n) => deps[n], new Set())).toThrow(ImageBuildError);
    expect(() => orderModules(["a"], (n) => ({ a: ["b"], b: ["a"] })[n], new Set())).toThrow(/cycle/);
  });
  it("parses modules.builtin and module file names", () => {
    expect([
      ...parseModulesBuiltin("kernel/net/unix/unix.ko\nkernel/drivers/tty/serial/8250/8250_dw.ko\n"),
    ]).toEqual(["unix", "8250_dw"]);
    expect(moduleName("/lib/modules/x/kernel/drivers/net/virtio-net.ko.zst")).toBe("virtio_net");
  });
});

describe("host helpers", () => {
  it("parses ldd output, interpreter included", () => {
    const out = `\tlinux-vdso.so.1 (0x00007ffd)
\tlibcrypto.so.3 => /lib/x86_64-linux-gnu/libcrypto.so.3 (0x00007f)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f)
`;
    expect(parseLdd(out)).toEqual([
      "/lib/x86_64-linux-gnu/libcrypto.so.3",
      "/lib/x86_64-linux-gnu/libc.so.6",
      "/lib64/ld-linux-x86-64.so.2",
    ]);
    expect(() => parseLdd("\tlibfoo.so.1 => not found\n")).toThrow(/libfoo/);
  });
  it("builds the TCG kernel command line from the host clock", () => {
    expect(parseCpuMhzKhz("processor\t: 0\ncpu MHz\t\t: 2445.424\n")).toBe(2445424);
    expect(parseCpuMhzKhz("no clock")).toBeUndefined();
    expect(kernelCmdline("console=ttyS0", { tcg: true, tscKhz: 1000 })).toBe(
      "console=ttyS0 tsc_early_khz=1000 tsc=reliable",
    );
    expect(kernelCmdline("console=ttyS0", { tcg: false, extra: ["x=1"] })).toBe("console=ttyS0 x=1");
  });
  it("computes OpenSSH fingerprints and known_hosts lines", () => {
    const pub = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test";
    expect(publicKeyFingerprint(pub)).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/);
    expect(knownHostsLine("127.0.0.1", 2222, pub)).toBe(
      "[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n",
    );
  });
});

describe("init scripts", () => {
  const mods = ["virtio_ring", "virtio", "virtio_mmio", "virtio_net"];
  it("parse under busybox sh and dash", () => {
    for (const [shell, script] of [
      ["busybox", renderTinyInit()],
      ["busybox", renderDebianStage1(mods)],
      ["dash", renderDebianStage2()],
      ["busybox", renderDebianStage2()],
    ] as const) {
      const args = shell === "busybox" ? ["sh", "-n"] : ["-n"];
      execFileSync(shell, args, { input: script });
    }
  });
  it("load modules in the given order", () => {
    const stage1 = renderDebianStage1(mods);
    const loads = [...stage1.matchAll(/insmod \/lib\/modules\/smolvm\/(\w+)\.ko/g)].map((m) => m[1]);
    expect(loads).toEqual(mods);
    expect(stage1.indexOf("insmod")).toBeLessThan(stage1.indexOf("milestone modules-loaded"));
  });
  it("tiny's init loads no module (its kernel has them built in) and carries the boot contract", () => {
    const init = renderTinyInit();
    expect(init).not.toContain("insmod");
    // In MILESTONES order.
    const at = MILESTONES.map((m) => init.indexOf(`milestone ${m}`));
    expect(at.every((i) => i > 0)).toBe(true);
    expect([...at].sort((a, b) => a - b)).toEqual(at);
    expect(init).toContain("/sbin/smolvm-agent");
    expect(init).toContain("/dev/virtio-ports/org.smolvm.agent");
    expect(init.indexOf("smolvm-agent")).toBeLessThan(init.indexOf("ip link set eth0 up"));
    expect(init).toContain("ip addr add 10.0.2.15/24 dev eth0");
    expect(init).toContain("ip route add default via 10.0.2.2");
    expect(init).toContain("nameserver 10.0.2.3");
    expect(init).not.toMatch(/BEGIN OPENSSH PRIVATE KEY/);
  });
  it("runs its milestone function and prints milliseconds since boot", () => {
    const fn = /milestone\(\) \{[\s\S]*?\n\}/.exec(renderTinyInit())![0];
    const out = execFileSync("busybox", ["sh", "-c", `${fn}\nmilestone test-point`]).toString();
    const m = /^smolvm: (\d+) test-point\n$/.exec(out);
    expect(m).not.toBeNull();
    const uptimeMs = Number(execFileSync("cat", ["/proc/uptime"]).toString().split(".")[0]) * 1000;
    expect(Math.abs(Number(m![1]) - uptimeMs)).toBeLessThan(2000);
  });
});
