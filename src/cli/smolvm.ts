#!/usr/bin/env node
/** The `smolvm` command: sandboxes and images. Errors print their message and exit non-zero. */
import { Command } from "commander";
import { printable } from "../common/guest-text.js";
import { SmolVMError } from "../errors.js";
import { registerDoctorCommand } from "./doctor.js";
import { registerImageCommands } from "./image.js";
import { registerSnapshotCommands } from "./snapshot-commands.js";
import { registerVmCommands } from "./vm-commands.js";

const program = new Command("smolvm")
  .description("Disposable Linux microVMs for running untrusted code")
  .showHelpAfterError();
registerVmCommands(program);
registerImageCommands(program);
registerDoctorCommand(program);
registerSnapshotCommands(program);

program.parseAsync(process.argv).catch((e: unknown) => {
  if (e instanceof SmolVMError) {
    // Messages may quote guest text: never let it drive the terminal.
    process.stderr.write(`smolvm: ${printable(e.message)}\n`);
    process.exitCode = e.code === "VALIDATION" ? 2 : 1;
  } else {
    process.stderr.write(`smolvm: unexpected error: ${(e as Error)?.stack ?? String(e)}\n`);
    process.exitCode = 70;
  }
});
