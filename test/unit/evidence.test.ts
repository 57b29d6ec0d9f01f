import { chmodSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AuthFailedError, ConnectionLostError, ValidationError } from "../../src/errors.js";
import { EventCollector } from "../../src/ssh/events.js";
import { algorithmsFromHandshake, EvidenceBundle } from "../../src/ssh/evidence.js";
import { REDACTED } from "../../src/ssh/redact.js";

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "smolvm-evidence-"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function sample(): EvidenceBundle {
  // An unredacted collector, so the bundle's own redaction is what is tested.
  const c = new EventCollector({ sessionId: "sess-1", redact: false });
  c.emit("CONNECT", { host: "db.internal", port: 2222 });
  c.emit("AUTH", { method: "password", password: "hunter2", ok: true });
  c.emit("EXEC", { command: "mysql -u root -ps3cret -e 'select 1'", exitCode: 0, durationMs: 12 });
  c.emit("DISCONNECT", { reason: "closed by client" });
  const cause = new Error("read ECONNRESET");
  return new EvidenceBundle({
    events: c.events,
    transcript: [
      { type: "send", content: "SELECT 1;", secret: false },
      { type: "recv", content: "Password: " },
    ],
    algorithms: algorithmsFromHandshake({
      kex: "curve25519-sha256",
      serverHostKey: "ssh-ed25519",
      cs: { cipher: "chacha20-poly1305@openssh.com", mac: "", compress: "none" },
      sc: { cipher: "chacha20-poly1305@openssh.com", mac: "", compress: "none" },
    }),
    timing: { connectMs: 5.5, authMs: 3.25, disconnectAt: 1_700_000_000_000 },
    hostInfo: { host: "db.internal", port: 2222, username: "alice" },
    disconnectReason: "connection lost",
    errorContext: new ConnectionLostError("connection to db.internal:2222 lost (token=abc123)", {
      cause,
      details: { password: "pw", attempt: 2 },
    }),
    createdAt: 1_700_000_000_500,
  });
}

describe("EvidenceBundle", () => {
  it("maps ssh2 handshake data", () => {
    expect(
      algorithmsFromHandshake({
        kex: "k",
        serverHostKey: "h",
        cs: { cipher: "aes128-ctr", mac: "hmac-sha2-256", compress: "none" },
        sc: { cipher: "aes256-ctr", mac: "hmac-sha2-256", compress: "zlib" },
      }),
    ).toEqual({
      kex: "k",
      serverHostKey: "h",
      cipher: "aes128-ctr/aes256-ctr",
      mac: "hmac-sha2-256",
      compress: "none/zlib",
    });
    expect(algorithmsFromHandshake(undefined)).toEqual({});
  });

  it("toJSON is redacted and JSON-safe, with the error's cause chain", () => {
    const b = sample();
    const j = JSON.parse(JSON.stringify(b));
    const text = JSON.stringify(j);
    expect(text).not.toContain("hunter2");
    expect(text).not.toContain("s3cret");
    expect(text).not.toContain("abc123");
    expect(j.v).toBe(1);
    expect(j.sessionId).toBe("sess-1");
    expect(j.events.map((e: { seq: number }) => e.seq)).toEqual([1, 2, 3, 4]);
    expect(j.events[1].data.password).toBe(REDACTED);
    expect(j.algorithms).toEqual({
      kex: "curve25519-sha256",
      serverHostKey: "ssh-ed25519",
      cipher: "chacha20-poly1305@openssh.com",
      compress: "none",
    });
    expect(j.errorContext).toMatchObject({
      name: "ConnectionLostError",
      code: "SSH_CONNECTION_LOST",
      details: { password: REDACTED, attempt: 2 },
      cause: { name: "Error", message: "read ECONNRESET" },
    });
    expect(j.transcript).toEqual([
      { type: "send", content: "SELECT 1;", secret: false },
      { type: "recv", content: "Password: " },
    ]);
    // Host and user stay unless asked.
    expect(j.hostInfo).toEqual({ host: "db.internal", port: 2222, username: "alice" });
    expect(b.toObject({ redact: false }).events[1]!.data.password).toBe("hunter2");
  });

  it("round-trips through JSON and JSONL files, written 0600 and atomically", async () => {
    const b = sample();
    for (const format of ["json", "jsonl"] as const) {
      const p = join(dir, `bundle.${format}`);
      writeFileSync(p, "old");
      chmodSync(p, 0o644);
      await b.toFile(p, { format });
      expect(statSync(p).mode & 0o777).toBe(0o600);
      const text = readFileSync(p, "utf8");
      expect(text).not.toContain("hunter2");
      if (format === "jsonl") {
        const lines = text
          .trim()
          .split("\n")
          .map((l) => JSON.parse(l));
        expect(lines.map((l) => l.kind)).toEqual(["bundle", "event", "event", "event", "event"]);
      } else {
        expect(JSON.parse(text).events).toHaveLength(4);
      }
      const back = await EvidenceBundle.fromFile(p);
      expect(back.toObject({ redact: false })).toEqual(b.toObject());
      expect(back.timing).toEqual({ connectMs: 5.5, authMs: 3.25, disconnectAt: 1_700_000_000_000 });
      expect(back.disconnectReason).toBe("connection lost");
      expect(back.events[2]!.type).toBe("EXEC");
    }
    // No temp files are left behind.
    expect(readdirSync(dir).filter((f) => f.endsWith(".tmp"))).toEqual([]);
  });

  it("redact: false writes the raw data; hostUser hides host and user everywhere", async () => {
    const b = sample();
    const raw = join(dir, "raw.json");
    await b.toFile(raw, { redact: false });
    expect(readFileSync(raw, "utf8")).toContain("hunter2");
    const anon = join(dir, "anon.json");
    await b.toFile(anon, { hostUser: true });
    const text = readFileSync(anon, "utf8");
    expect(text).not.toContain("db.internal");
    expect(text).not.toContain("alice");
    expect(text).not.toContain("hunter2");
    expect(JSON.parse(text).hostInfo).toEqual({ host: REDACTED, port: 2222, username: REDACTED });
  });

  it("a plain options object with nothing in it is a valid bundle", async () => {
    const p = join(dir, "empty.jsonl");
    await new EvidenceBundle({}).toFile(p, { format: "jsonl" });
    const back = await EvidenceBundle.fromFile(p);
    expect(back.events).toEqual([]);
    expect(back.hostInfo).toBeUndefined();
    const e = new EvidenceBundle({ errorContext: new AuthFailedError("denied") });
    expect(e.toJSON().errorContext).toMatchObject({ name: "AuthFailedError", code: "SSH_AUTH_FAILED" });
  });

  it("rejects files that are not bundles with ValidationError", async () => {
    const cases = [
      "not json at all\n",
      '{"v":2,"events":[]}',
      '{"kind":"event"}\n',
      '{"kind":"bundle","v":1}\nnope\n',
    ];
    for (const [i, text] of cases.entries()) {
      const p = join(dir, `bad${i}`);
      writeFileSync(p, text);
      await expect(EvidenceBundle.fromFile(p), text).rejects.toBeInstanceOf(ValidationError);
    }
    await expect(
      new EvidenceBundle().toFile(join(dir, "x"), { format: "xml" as never }),
    ).rejects.toBeInstanceOf(ValidationError);
  });
});
