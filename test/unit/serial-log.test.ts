import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { printable } from "../../src/common/guest-text.js";
import { serialMilestones, tailFile } from "../../src/vm/serial-log.js";

describe("serial log", () => {
  it("extracts milestones, first occurrence wins, ignores lookalikes", () => {
    const log = [
      "[    0.000000] Linux version 6.1",
      "smolvm: 812 init-start",
      "smolvm: 905 modules-loaded",
      "  smolvm: 1 fake-indented",
      "smolvm: 999 init-start",
      "smolvm: 2210 sshd-started\r",
      "smolvm: notanumber x",
    ].join("\n");
    expect(serialMilestones(log)).toEqual({ "init-start": 812, "modules-loaded": 905, "sshd-started": 2210 });
  });

  it("tails a file and strips control sequences", async () => {
    const dir = mkdtempSync(join(tmpdir(), "serial-"));
    try {
      writeFileSync(join(dir, "log"), `${"x".repeat(5000)}\x1b[31mred\x1b[0m\x07end\n`);
      expect(await tailFile(join(dir, "log"), 20)).toBe("xxxredend\n");
      expect(await tailFile(join(dir, "missing"))).toBe("");
      expect(printable("a\x00b\x1b[2Jc")).toBe("abc");
    } finally {
      rmSync(dir, { recursive: true });
    }
  });
});
