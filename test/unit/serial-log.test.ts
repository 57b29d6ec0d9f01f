import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
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

describe("bounded serial log", () => {
  it("rotates past the cap, keeps the newest bytes, and reads at most the cap", async () => {
    const { readSerialLog, rotateSerialLog, rotatedPath } = await import("../../src/vm/serial-log.js");
    const { appendFileSync, openSync, closeSync, statSync, writeSync } = await import("node:fs");
    const dir = mkdtempSync(join(tmpdir(), "serial-"));
    try {
      const log = join(dir, "serial.log");
      // An appending writer, as QEMU's chardev with append=on.
      const fd = openSync(log, "a");
      writeSync(fd, Buffer.alloc(3000, "a"));
      await rotateSerialLog(log, 1000);
      expect(statSync(log).size).toBe(0);
      expect(readFileSync(rotatedPath(log), "utf8")).toBe("a".repeat(1000));
      writeSync(fd, "bbbb");
      closeSync(fd);
      expect(statSync(log).size).toBe(4); // the writer's next bytes land at the new start
      expect(await readSerialLog(log, 10)).toBe("aaaaaabbbb");
      appendFileSync(log, Buffer.alloc(5000, "c"));
      const text = await readSerialLog(log, 1000);
      expect(text).toBe("c".repeat(1000));
      expect(statSync(log).size + statSync(rotatedPath(log)).size).toBeLessThanOrEqual(1000);
    } finally {
      rmSync(dir, { recursive: true });
    }
  });
});
