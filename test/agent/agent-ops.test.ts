/**
 * The codec of agent-fs.ts and agent-procs.ts (file entries, process lists) and the capability
 * gate, without a VM: what an older agent or a hostile one can send must end in typed errors.
 */
import { describe, expect, it } from "vitest";
import { requireCapability } from "../../src/channel/agent-errors.js";
import { decodeEntry } from "../../src/channel/agent-fs.js";
import { decodeProcesses } from "../../src/channel/agent-procs.js";
import { encodeFields, Field, u32 } from "../../src/channel/agent-protocol.js";
import { CommandExecutionUnavailableError, ProtocolError } from "../../src/errors.js";
import { parseDuration, validateLabels, validateTtl } from "../../src/vm/ttl.js";

const u64 = (n: number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
};

describe("agent ops codec", () => {
  it("decodes a file entry and refuses incomplete or unknown ones", () => {
    const fields = encodeFields([
      [Field.PATH, "/a/link"],
      [Field.FTYPE, Buffer.from([2])],
      [Field.MODE, u32(0o777)],
      [Field.SIZE, u64(4)],
      [Field.MTIME, u64(1_700_000_000_000)],
      [Field.TARGET, "/etc"],
    ]);
    expect(decodeEntry(fields)).toEqual({
      name: "link",
      path: "/a/link",
      type: "symlink",
      size: 4,
      mode: 0o777,
      mtimeMs: 1_700_000_000_000,
      target: "/etc",
    });
    expect(() => decodeEntry(encodeFields([[Field.PATH, "/x"]]))).toThrow(ProtocolError);
    expect(() => decodeEntry(encodeFields([[Field.FTYPE, Buffer.from([9])]]), "/x")).toThrow(ProtocolError);
    expect(() => decodeEntry(encodeFields([[99, "?"]]), "/x")).toThrow(ProtocolError);
  });

  it("decodes the process table", () => {
    const p = encodeFields([
      [Field.PID, u32(42)],
      [Field.COMMAND, "sleep 1"],
      [Field.RUNNING, Buffer.from([0])],
      [Field.STARTED, u64(1000)],
      [Field.SIGNAME, "KILL"],
      [Field.PID, u32(43)],
      [Field.COMMAND, "true"],
      [Field.RUNNING, Buffer.from([1])],
    ]);
    expect(decodeProcesses(p)).toEqual([
      {
        pid: 42,
        command: "sleep 1",
        running: false,
        exitCode: null,
        signal: "KILL",
        startedAt: new Date(1000),
      },
      { pid: 43, command: "true", running: true, exitCode: null, signal: null, startedAt: new Date(0) },
    ]);
    expect(() => decodeProcesses(encodeFields([[Field.COMMAND, "x"]]))).toThrow(ProtocolError);
  });

  it("an agent without the capability gets a typed refusal with a remediation", () => {
    const old = { version: "0.0.9", capabilities: ["exec", "put", "get"], startUptimeS: 0 };
    try {
      requireCapability(old, "proc", "background processes");
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(CommandExecutionUnavailableError);
      expect((e as CommandExecutionUnavailableError).code).toBe("AGENT_UNSUPPORTED");
      expect((e as CommandExecutionUnavailableError).remediation).toMatch(/image build --force/);
    }
    expect(() => requireCapability({ ...old, capabilities: ["proc"] }, "proc", "x")).not.toThrow();
  });

  it("validates TTLs, labels and durations", () => {
    expect(parseDuration("10m")).toBe(600_000);
    expect(parseDuration("90s")).toBe(90_000);
    expect(parseDuration("1500")).toBe(1500);
    expect(() => parseDuration("ten")).toThrow(/duration/);
    expect(() => validateTtl(0)).toThrow(/ttlMs/);
    expect(() => validateTtl(Number.NaN)).toThrow(/ttlMs/);
    expect(() => validateLabels({ "bad key": "x" })).toThrow(/label key/);
    expect(() => validateLabels({ ok: "x".repeat(256) })).toThrow(/255/);
    expect(() => validateLabels({ "app.kubernetes.io/name": "web" })).not.toThrow();
  });
});
