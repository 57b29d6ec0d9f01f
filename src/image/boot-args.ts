/**
 * Kernel command line for booting an image. Under TCG the guest's PIT-based TSC calibration
 * fails at random when the host is busy (the vCPU thread is descheduled mid-measurement) and
 * the kernel then hangs right after "APIC: Switch to symmetric I/O mode setup". TCG's TSC is
 * the host's TSC, so we hand the guest the host's frequency (tsc_early_khz) and declare it
 * reliable (no clocksource watchdog demoting it to jiffies).
 */
import { hostTscKhz } from "../common/host-clock.js";

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
