/**
 * The host's TSC frequency. A TCG guest's TSC ticks at the host's rate, and the guest needs to
 * be told it (tsc_early_khz): microvm has no timer it could calibrate against reliably.
 */
import { readFileSync } from "node:fs";

/** The CPU clock in kHz from /proc/cpuinfo text ("cpu MHz : 2445.424"). */
export function parseCpuMhzKhz(cpuinfo: string): number | undefined {
  const m = /^cpu MHz\s*:\s*([0-9.]+)/m.exec(cpuinfo);
  const khz = m ? Math.round(Number(m[1]) * 1000) : Number.NaN;
  return Number.isFinite(khz) && khz > 0 ? khz : undefined;
}

/** kHz from the kernel's own TSC measurement when it exports one, else /proc/cpuinfo. */
export function hostTscKhz(): number | undefined {
  try {
    const khz = Number(readFileSync("/sys/devices/system/cpu/cpu0/tsc_freq_khz", "utf8").trim());
    if (Number.isInteger(khz) && khz > 0) return khz;
  } catch {
    // not exported by this kernel: fall back to cpuinfo
  }
  try {
    return parseCpuMhzKhz(readFileSync("/proc/cpuinfo", "utf8"));
  } catch {
    return undefined;
  }
}
