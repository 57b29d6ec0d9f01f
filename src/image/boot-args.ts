/**
 * Kernel command line for booting an image. Under TCG the guest's PIT-based TSC calibration
 * fails at random when the host is busy (the vCPU thread is descheduled mid-measurement) and
 * the kernel then hangs right after "APIC: Switch to symmetric I/O mode setup". TCG's TSC is
 * the host's TSC, so we hand the guest the host's frequency (tsc_early_khz) and declare it
 * reliable (no clocksource watchdog demoting it to jiffies).
 */
import { readFileSync } from "node:fs";

/** The host CPU's clock in kHz from /proc/cpuinfo text ("cpu MHz : 2445.424"). */
export function parseCpuMhzKhz(cpuinfo: string): number | undefined {
  const m = /^cpu MHz\s*:\s*([0-9.]+)/m.exec(cpuinfo);
  const khz = m ? Math.round(Number(m[1]) * 1000) : Number.NaN;
  return Number.isFinite(khz) && khz > 0 ? khz : undefined;
}

export function hostTscKhz(): number | undefined {
  try {
    return parseCpuMhzKhz(readFileSync("/proc/cpuinfo", "utf8"));
  } catch {
    return undefined;
  }
}

/** `base` (the manifest's kernelCmdline) plus the TCG timer fix when `tcg`. */
export function kernelCmdline(
  base: string,
  opts: { tcg: boolean; tscKhz?: number; extra?: string[] },
): string {
  const parts = [base];
  if (opts.tcg) {
    const khz = opts.tscKhz ?? hostTscKhz();
    if (khz) parts.push(`tsc_early_khz=${khz}`);
    parts.push("tsc=reliable");
  }
  parts.push(...(opts.extra ?? []));
  return parts.join(" ");
}
