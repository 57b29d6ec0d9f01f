/**
 * The protocol constants are written twice, in C for the agent (agent/agent.h) and in
 * TypeScript for the host (src/channel/agent-protocol.ts). This parses the header's #defines and
 * enums and checks both sides name the same frame types, field tags, error codes and limits.
 */
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { describe, expect, it } from "vitest";
import {
  ErrorCode,
  Field,
  FrameType,
  HEADER_SIZE,
  INITIAL_WINDOW,
  MAGIC,
  MAX_PAYLOAD,
  PROTOCOL_VERSION,
} from "../../src/channel/agent-protocol.js";

const HEADER = readFileSync(resolve(import.meta.dirname, "../../agent/agent.h"), "utf8").replace(
  /\/\*[\s\S]*?\*\//g,
  "",
);

function cNumber(text: string): number {
  const t = text.trim().replace(/[uU]+$/, "");
  if (!/^(0x[0-9a-fA-F]+|\d+)$/.test(t)) throw new Error(`not a plain number: ${text}`);
  return Number(t);
}

/** `#define NAME value` for plain numeric values. */
function defines(): Map<string, number> {
  const out = new Map<string, number>();
  for (const m of HEADER.matchAll(/^#define\s+([A-Z_]+)\s+(0x[0-9a-fA-F]+u?|\d+u?)\s*$/gm)) {
    out.set(m[1]!, cNumber(m[2]!));
  }
  return out;
}

/** Every enumerator whose name starts with `prefix`, with C's implicit increments applied. */
function enumerators(prefix: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const body of HEADER.matchAll(/enum\s*\{([^}]*)\}/g)) {
    let next = 0;
    for (const item of body[1]!.split(",")) {
      const m = /^\s*([A-Z_0-9]+)\s*(?:=\s*([^,]+?))?\s*$/.exec(item);
      if (!m) continue;
      const value = m[2] !== undefined ? cNumber(m[2]) : next;
      next = value + 1;
      if (m[1]!.startsWith(prefix)) out.set(m[1]!.slice(prefix.length), value);
    }
  }
  return out;
}

/** C names that differ from the TypeScript ones. */
const FIELD_ALIASES: Record<string, string> = {
  TIMEOUT: "TIMEOUT_MS",
  UPTIME: "START_UPTIME",
  EXITCODE: "EXIT_CODE",
};

function renamed(m: Map<string, number>, aliases: Record<string, string> = {}): Record<string, number> {
  return Object.fromEntries([...m].map(([k, v]) => [aliases[k] ?? k, v]));
}

describe("agent protocol constants (agent/agent.h = src/channel/agent-protocol.ts)", () => {
  it("frame types", () => {
    expect(renamed(enumerators("T_"))).toEqual({ ...FrameType });
  });

  it("field tags", () => {
    expect(renamed(enumerators("F_"), FIELD_ALIASES)).toEqual({ ...Field });
  });

  it("error codes", () => {
    expect(renamed(enumerators("E_"))).toEqual({ ...ErrorCode });
  });

  it("version, magic, header size, frame limit and window", () => {
    const d = defines();
    expect({
      PROTO_VERSION: d.get("PROTO_VERSION"),
      MAGIC: d.get("MAGIC"),
      HDR: d.get("HDR"),
      MAX_PAYLOAD: d.get("MAX_PAYLOAD"),
      WINDOW: d.get("WINDOW"),
    }).toEqual({
      PROTO_VERSION: PROTOCOL_VERSION,
      MAGIC,
      HDR: HEADER_SIZE,
      MAX_PAYLOAD,
      WINDOW: INITIAL_WINDOW,
    });
  });

  it("parses C enums the way the compiler does (implicit increments)", () => {
    const e = enumerators("E_");
    expect(e.get("PROTOCOL")).toBe(1);
    expect(e.get("NOT_READY")).toBe(12);
    expect(enumerators("K_").get("ATTACH")).toBe(7);
  });
});
