/**
 * Probes behind the accelerator verdict (accel.ts). Two of them, cheapest first:
 * - a 16-byte real-mode firmware under KVM: fails at once where /dev/kvm opens but cannot run
 *   any guest (PVM hosts abort in kvm_buf_set_msrs);
 * - the image's own kernel and initramfs, until its /init prints its first milestone. Nested
 *   hosts run the firmware fine and then stop the real kernel with a KVM "emulation failure"
 *   (a `lock cmpxchg16b` in the slab allocator): only this boot says "KVM works".
 * Each is bounded, and QEMU is always killed before the probe returns.
 */
import { spawn } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { printable } from "../common/guest-text.js";
import { type Accel, accelArgs, guestKernelAppend, MICROVM_MACHINE } from "./qemu.js";

export interface ProbeResult {
  ok: boolean;
  /** Spawn until the guest showed it ran (or until the probe gave up). */
  ms: number;
  /** Why it failed, in words a user can act on. */
  reason?: string;
}

export interface KernelProbeSpec {
  qemuPath: string;
  accel: Accel;
  kernelPath: string;
  initrdPath: string;
  /** The image's kernel command line (the runtime's additions are applied here too). */
  kernelAppend: string;
  tscKhz?: number;
  timeoutMs: number;
  signal?: AbortSignal;
}

/** What tiny's and debian's /init print first (see init-script.ts). */
const INIT_MARKER = /smolvm: \d+ init-start/;
/** QEMU's words when KVM stops a guest it cannot run (the VM is left in `internal-error`). */
export const KVM_FAILURE_TEXT = /KVM internal error|emulation failure|kvm run failed/i;
const PROBE_EXIT_CODE = (0x2a << 1) | 1;

/** Real-mode firmware at the reset vector: `mov al,0x2a; out 0xf4,al; hlt; jmp $-1`. */
function probeFirmware(): Buffer {
  const fw = Buffer.alloc(65536, 0xf4);
  Buffer.from([0xb0, 0x2a, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd]).copy(fw, fw.length - 16);
  return fw;
}

type Verdict = Omit<ProbeResult, "ms">;

interface Watched {
  /** Resolves with a verdict; the caller's `decide` sees every chunk of stdout and stderr. */
  result: Promise<ProbeResult>;
}

/**
 * Runs QEMU until `decide` returns a verdict, the process exits, the timeout passes or the signal
 * fires; then kills it. `decide` gets the accumulated stdout and stderr (each capped at 64 KiB).
 */
function watchQemu(
  argv: string[],
  timeoutMs: number,
  signal: AbortSignal | undefined,
  decide: (out: string, err: string) => Verdict | undefined,
  onExit: (code: number | null, sig: NodeJS.Signals | null, err: string) => Verdict,
): Watched {
  const t0 = performance.now();
  const ms = () => Math.round(performance.now() - t0);
  const result = new Promise<ProbeResult>((resolve) => {
    const child = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    let settled = false;
    const finish = (r: Verdict) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      resolve({ ...r, ms: ms() });
    };
    const check = () => {
      const r = decide(out, err);
      if (r) finish(r);
    };
    const cap = (s: string) => (s.length > 65536 ? s.slice(-65536) : s);
    child.stdout.on("data", (d: Buffer) => {
      out = cap(out + d.toString("latin1"));
      check();
    });
    child.stderr.on("data", (d: Buffer) => {
      err = cap(err + d.toString("latin1"));
      check();
    });
    child.once("error", (e) => finish({ ok: false, reason: `cannot run ${argv[0]}: ${e.message}` }));
    child.once("exit", (code, sig) => {
      // Let the pipes drain: a marker printed just before exit still counts.
      setImmediate(() => {
        check();
        finish(onExit(code, sig, err));
      });
    });
    const timer = setTimeout(
      () => finish({ ok: false, reason: `the probe guest did not get there within ${timeoutMs} ms` }),
      timeoutMs,
    );
    const onAbort = () => finish({ ok: false, reason: "the probe was aborted" });
    if (signal?.aborted) onAbort();
    else signal?.addEventListener("abort", onAbort, { once: true });
  });
  return { result };
}

/** The last meaningful line QEMU wrote to stderr, short and printable. */
function lastLine(err: string): string {
  const line = printable(err).trim().split("\n").filter(Boolean).pop() ?? "";
  return line.slice(0, 160);
}

/** Runs the 16-byte firmware under KVM: ok when it reaches its exit port. */
export async function probeKvmFirmware(qemuPath: string, timeoutMs: number): Promise<ProbeResult> {
  const dir = await mkdtemp(join(tmpdir(), "smolvm-kvmprobe-"));
  try {
    const fw = join(dir, "probe.bin");
    await writeFile(fw, probeFirmware());
    const argv = [
      qemuPath,
      ...["-M", "microvm,x-option-roms=off,isa-serial=off,rtc=off", ...accelArgs("kvm"), "-m", "16M"],
      ...["-nodefaults", "-no-user-config", "-display", "none", "-bios", fw],
      ...["-device", "isa-debug-exit,iobase=0xf4,iosize=1"],
    ];
    return await watchQemu(
      argv,
      timeoutMs,
      undefined,
      () => undefined,
      (code, sig, err) =>
        code === PROBE_EXIT_CODE
          ? { ok: true }
          : {
              ok: false,
              reason: `the KVM probe firmware failed (${sig ?? `exit ${code}`}${lastLine(err) ? `: ${lastLine(err)}` : ""})`,
            },
    ).result;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Boots the image's kernel and initramfs until /init's first milestone. */
export function probeKernelBoot(spec: KernelProbeSpec): Promise<ProbeResult> {
  const argv = [
    spec.qemuPath,
    ...["-M", MICROVM_MACHINE, ...accelArgs(spec.accel), "-m", "512M", "-smp", "1"],
    ...["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"],
    ...["-kernel", spec.kernelPath, "-initrd", spec.initrdPath],
    ...["-append", guestKernelAppend(spec.kernelAppend, spec.accel, spec.tscKhz)],
    ...["-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0"],
  ];
  const accel = spec.accel.toUpperCase();
  return watchQemu(
    argv,
    spec.timeoutMs,
    spec.signal,
    (out, err) => {
      if (INIT_MARKER.test(out)) return { ok: true };
      if (KVM_FAILURE_TEXT.test(err)) {
        return { ok: false, reason: `KVM emulation failure: the guest kernel stopped under ${accel}` };
      }
      return undefined;
    },
    (code, sig, err) => ({
      ok: false,
      reason: `QEMU under ${accel} exited before the kernel reached /init (${sig ?? `exit ${code}`}${lastLine(err) ? `: ${lastLine(err)}` : ""})`,
    }),
  ).result.then((r) => (r.ok ? r : { ...r, reason: r.reason?.replace("the probe guest", "the kernel") }));
}
