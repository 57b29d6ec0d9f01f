/** `smolvm doctor`: prints SmolVM.doctor()'s report; `--strict` fails when the default image cannot run. */
import type { Command } from "commander";
import { printable } from "../common/guest-text.js";
import { SmolVM } from "../vm/smolvm.js";

export function registerDoctorCommand(program: Command): void {
  program
    .command("doctor")
    .description("check this host: QEMU, the accelerator verdict and why, tools, data dir, images, VMs")
    .option("--json", "print the report as JSON")
    .option("--strict", "exit 1 when something the default image needs is missing")
    .option("--refresh", "probe the accelerator again instead of using the cached verdict")
    .action(async (o: { json?: boolean; strict?: boolean; refresh?: boolean }) => {
      const report = await SmolVM.doctor({ refresh: o.refresh });
      if (o.json) console.log(JSON.stringify(report, null, 2));
      else {
        console.log(
          `accelerator: ${report.accel.verdict} (${report.accel.reason}; probe ${report.accel.probeMs} ms)`,
        );
        for (const c of report.checks) {
          const mark = c.ok ? "ok  " : c.required ? "FAIL" : "warn";
          console.log(`${mark}  ${c.name}: ${printable(c.detail)}`);
        }
      }
      if (o.strict && !report.ok) process.exitCode = 1;
    });
}
