import { spawnSync } from "node:child_process";
import { chmodSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuthFailedError, ValidationError } from "../../src/errors.js";
import { EVENT_TYPES, EventCollector, jsonSafe, parseEventLog } from "../../src/ssh/events.js";
import { REDACTED } from "../../src/ssh/redact.js";

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "smolvm-events-"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("EventCollector", () => {
  it("stamps every event with v, sessionId, increasing seq, ts and monotonic mono", () => {
    const c = new EventCollector({ sessionId: "s-1" });
    const before = Date.now();
    const evs = EVENT_TYPES.map((t, i) => c.emit(t, { i }));
    expect(evs.map((e) => e.seq)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9]);
    for (const e of evs) {
      expect(e.v).toBe(1);
      expect(e.sessionId).toBe("s-1");
      expect(e.ts).toBeGreaterThanOrEqual(before);
      expect(e.ts).toBeLessThanOrEqual(Date.now());
    }
    for (let i = 1; i < evs.length; i++) expect(evs[i]!.mono).toBeGreaterThanOrEqual(evs[i - 1]!.mono);
    expect(c.events).toEqual(evs);
    expect(c.getByType("EXEC")).toEqual([evs[2]]);
    expect(new EventCollector().sessionId).toMatch(/^[0-9a-f-]{36}$/);
  });

  it("writes each event to the JSONL log as it happens, 0600, redacted", async () => {
    const logPath = join(dir, "sub", "live.jsonl");
    const c = new EventCollector({ logPath, sessionId: "live" });
    c.emit("AUTH", { method: "password", password: "hunter2", nested: [{ token: "t0k" }] });
    // Read by another process before close: the line is already on disk.
    const seen = spawnSync("cat", [logPath], { encoding: "utf8" }).stdout;
    expect(seen.trim().split("\n")).toHaveLength(1);
    expect(seen).not.toContain("hunter2");
    expect(seen).not.toContain("t0k");
    c.emit("EXEC", { command: "sshpass -p hunter2 ssh h" });
    await c.close();
    await c.close();
    expect(statSync(logPath).mode & 0o777).toBe(0o600);
    const text = readFileSync(logPath, "utf8");
    expect(text).not.toContain("hunter2");
    const lines = parseEventLog(text);
    expect(lines.map((e) => [e.seq, e.type, e.sessionId])).toEqual([
      [1, "AUTH", "live"],
      [2, "EXEC", "live"],
    ]);
    expect(lines[0]!.data).toEqual({ method: "password", password: REDACTED, nested: [{ token: REDACTED }] });
    expect(lines[1]!.data).toEqual({ command: `sshpass -p ${REDACTED} ssh h` });
    // Memory is redacted too.
    expect(c.events[0]!.data.password).toBe(REDACTED);
    // After close events stay in memory only.
    c.emit("DISCONNECT", { reason: "closed" });
    expect(readFileSync(logPath, "utf8")).toBe(text);
    expect(c.events).toHaveLength(3);
  });

  it("appends to an existing log and tightens its mode to 0600", async () => {
    const logPath = join(dir, "existing.jsonl");
    writeFileSync(logPath, '{"old":true}\n');
    chmodSync(logPath, 0o644);
    const c = new EventCollector({ logPath });
    c.emit("CONNECT", { host: "h" });
    await c.close();
    expect(statSync(logPath).mode & 0o777).toBe(0o600);
    const lines = readFileSync(logPath, "utf8").trim().split("\n");
    expect(lines[0]).toBe('{"old":true}');
    expect(JSON.parse(lines[1]!).type).toBe("CONNECT");
  });

  it("redact: false keeps values verbatim", async () => {
    const c = new EventCollector({ redact: false });
    expect(c.emit("AUTH", { password: "p" }).data).toEqual({ password: "p" });
  });

  it("keeps at most maxEvents in memory while the log keeps everything", async () => {
    const logPath = join(dir, "ring.jsonl");
    const c = new EventCollector({ logPath, maxEvents: 3 });
    for (let i = 0; i < 10; i++) c.emit("KEEPALIVE", { i });
    expect(c.events.map((e) => e.data.i)).toEqual([7, 8, 9]);
    expect(c.events.map((e) => e.seq)).toEqual([8, 9, 10]);
    expect(c.dropped).toBe(7);
    await c.close();
    expect(parseEventLog(readFileSync(logPath, "utf8"))).toHaveLength(10);
    expect(() => new EventCollector({ maxEvents: 0 })).toThrow(RangeError);
  });

  it("notifies listeners, survives a throwing one, and unsubscribes", () => {
    const c = new EventCollector();
    const got: number[] = [];
    c.on(() => {
      throw new Error("bad listener");
    });
    const off = c.on((e) => got.push(e.seq));
    c.emit("ERROR", {});
    off();
    c.emit("ERROR", {});
    expect(got).toEqual([1]);
  });

  it("serialises Buffers, errors, bigints and cycles without throwing", async () => {
    const logPath = join(dir, "odd.jsonl");
    const c = new EventCollector({ logPath });
    const cyc: Record<string, unknown> = { a: 1 };
    cyc.self = cyc;
    const e = c.emit("ERROR", {
      error: new AuthFailedError("denied", { details: { user: "u" } }),
      chunk: Buffer.from("secret bytes"),
      big: 10n,
      nan: Number.NaN,
      cyc,
      fn: () => 1,
    });
    await c.close();
    const line = parseEventLog(readFileSync(logPath, "utf8"))[0]!;
    expect(line.data).toEqual(e.data);
    expect(line.data).toEqual({
      error: { name: "AuthFailedError", message: "denied", code: "SSH_AUTH_FAILED", details: { user: "u" } },
      chunk: { type: "Buffer", bytes: 12 },
      big: "10",
      nan: "NaN",
      cyc: { a: 1, self: "[Circular]" },
    });
    expect(jsonSafe([undefined, 1])).toEqual([null, 1]);
  });

  it("refuses a FIFO as log path instead of blocking", () => {
    const fifo = join(dir, "fifo");
    spawnSync("mkfifo", [fifo]);
    const t0 = performance.now();
    expect(() => new EventCollector({ logPath: fifo })).toThrow(ValidationError);
    expect(performance.now() - t0).toBeLessThan(1000);
  });

  it("parseEventLog skips a torn final line", () => {
    const c = new EventCollector({ sessionId: "x" });
    const ok = JSON.stringify(c.emit("CONNECT", {}));
    expect(parseEventLog(`${ok}\n${ok.slice(0, 20)}`)).toHaveLength(1);
  });
});
