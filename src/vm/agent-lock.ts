/**
 * QEMU's chardev socket serves one client at a time: a second connection to a VM's agent socket
 * is accepted by the kernel and then never answered. A lock file next to the socket says who
 * holds it, so another handle fails at once with the holder's pid (or, in auto mode, goes to SSH
 * at once) instead of waiting for its timeout. A lock whose process is gone is stale and taken
 * over.
 */
import { randomBytes } from "node:crypto";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { pidAlive } from "../common/pid.js";
import { ConnectionRefusedError } from "../errors.js";

/** Takes the lock or throws ConnectionRefusedError (code AGENT_BUSY); returns its release. */
export function acquireAgentLock(path: string, vmName: string): () => void {
  const token = `${process.pid} ${randomBytes(8).toString("hex")}\n`;
  for (let attempt = 0; ; attempt++) {
    try {
      writeFileSync(path, token, { flag: "wx", mode: 0o600 });
      return () => {
        try {
          if (readFileSync(path, "utf8") === token) rmSync(path, { force: true });
        } catch {
          // already gone
        }
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    }
    const holder = lockHolder(path);
    if ((holder === undefined || !pidAlive(holder)) && attempt === 0) {
      rmSync(path, { force: true }); // stale: its process is gone
      continue;
    }
    const who = holder === process.pid ? "another handle in this process" : `process ${holder ?? "unknown"}`;
    throw new ConnectionRefusedError(
      `the agent socket of VM ${vmName} is held by ${who}; it takes one host connection at a time: close that handle (vm.close()), or use commChannel "ssh" or "auto" here.`,
      { code: "AGENT_BUSY", details: { holderPid: holder } },
    );
  }
}

function lockHolder(path: string): number | undefined {
  try {
    const pid = Number.parseInt(readFileSync(path, "utf8"), 10);
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}
