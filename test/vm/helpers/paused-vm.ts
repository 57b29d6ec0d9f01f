/**
 * A real QEMU process that boots nothing: a 4 KiB zero "kernel" and an empty initrd, vCPUs paused
 * (-S). Enough for QMP, hostfwd and process-supervision tests without a guest image.
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { VmLaunchSpec } from "../../../src/vm/qemu.js";

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

/**
 * The smallest file QEMU's x86 loader accepts as a Linux bzImage with an initrd: a boot protocol
 * 2.15 setup header and zeros. It is never executed (the VM stays paused).
 */
function fakeBzImage(): Buffer {
  const b = Buffer.alloc(8192);
  b.writeUInt8(4, 0x1f1); // setup_sects
  b.write("HdrS", 0x202, "latin1");
  b.writeUInt16LE(0x020f, 0x206); // boot protocol version
  b.writeUInt8(0x01, 0x211); // loadflags: LOADED_HIGH
  b.writeUInt32LE(0x7fffffff, 0x22c); // initrd_addr_max
  return b;
}

export interface PausedVmDir {
  dir: string;
  spec: VmLaunchSpec;
  cleanup(): void;
}

export async function pausedVmSpec(patch: Partial<VmLaunchSpec> = {}): Promise<PausedVmDir> {
  const dir = mkdtempSync(join(tmpdir(), "smolvm-vmtest-"));
  writeFileSync(join(dir, "kernel"), fakeBzImage());
  writeFileSync(join(dir, "initrd"), "");
  const spec: VmLaunchSpec = {
    name: `t${process.pid}-${Math.random().toString(36).slice(2, 8)}`,
    qemuPath: "qemu-system-x86_64",
    accel: "tcg",
    memoryMib: 64,
    vcpus: 1,
    kernelPath: join(dir, "kernel"),
    initrdPath: join(dir, "initrd"),
    kernelAppend: "console=ttyS0",
    qmpSocketPath: join(dir, "qmp.sock"),
    serialLogPath: join(dir, "serial.log"),
    pidfilePath: join(dir, "qemu.pid"),
    sshHostPort: await freePort(),
    startPaused: true,
    ...patch,
  };
  return { dir, spec, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Pids of processes whose command line mentions `needle` (e.g. a unique VM dir). */
export function pgrep(needle: string): number[] {
  try {
    return execFileSync("pgrep", ["-f", needle], { encoding: "utf8" })
      .split("\n")
      .filter(Boolean)
      .map(Number)
      .filter((p) => p !== process.pid);
  } catch {
    return [];
  }
}

export function tcpConnects(port: number, timeoutMs = 1000): Promise<boolean> {
  return import("node:net").then(
    ({ connect }) =>
      new Promise((resolve) => {
        const s = connect({ host: "127.0.0.1", port });
        const t = setTimeout(() => {
          s.destroy();
          resolve(false);
        }, timeoutMs);
        s.once("connect", () => {
          clearTimeout(t);
          s.destroy();
          resolve(true);
        });
        s.once("error", () => {
          clearTimeout(t);
          resolve(false);
        });
      }),
  );
}
