import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { mkdtemp, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { ValidationError } from "../../src/errors.js";
import {
  AutomationEngine,
  type AutomationStream,
  EOF,
  ExpectPattern,
  TIMEOUT,
} from "../../src/ssh/automation.js";

type Ev = { stream: "stdout" | "stderr"; data: Buffer } | { stream: "exit"; exitCode: number | null };

const children: ChildProcessWithoutNullStreams[] = [];
afterEach(() => {
  for (const c of children.splice(0)) if (c.exitCode === null) c.kill("SIGKILL");
});

/** A real local process presented as an automation stream (same shape as streamExec). */
function proc(script: string): AutomationStream {
  const child = spawn("/bin/sh", ["-c", script]);
  children.push(child);
  const queue: Ev[] = [];
  let wake: (() => void) | undefined;
  let done = false;
  const push = (e: Ev) => {
    queue.push(e);
    wake?.();
  };
  child.stdout.on("data", (d: Buffer) => push({ stream: "stdout", data: d }));
  child.stderr.on("data", (d: Buffer) => push({ stream: "stderr", data: d }));
  child.on("close", (code) => {
    push({ stream: "exit", exitCode: code });
    done = true;
    wake?.();
  });
  return {
    async *[Symbol.asyncIterator]() {
      for (;;) {
        if (queue.length) {
          yield queue.shift()!;
          continue;
        }
        if (done) return;
        await new Promise<void>((r) => {
          wake = r;
        });
      }
    },
    write: (d) => new Promise<void>((r) => child.stdin.write(d, () => r())),
    cancel: () => {
      child.kill("SIGKILL");
    },
  };
}

describe("AutomationEngine", () => {
  it("consumes matched text so a second expect waits for a new prompt", async () => {
    // One prompt, then (only after input) a second one. A stale-buffer engine would match the
    // first "> " twice and send the answer before the program asked.
    const e = new AutomationEngine(
      proc('printf "name> "; read n; sleep 0.3; printf "hi %s\\nage> " "$n"; read a; echo "age=$a"'),
    );
    const r1 = await e.expect("> ", { timeoutMs: 5000 });
    expect(r1.matched).toBe(true);
    expect(r1.before).toBe("name");
    await e.send("bob");
    const t0 = performance.now();
    const r2 = await e.expect("> ", { timeoutMs: 5000 });
    expect(performance.now() - t0).toBeGreaterThanOrEqual(250);
    expect(r2.before).toBe("hi bob\nage");
    await e.send("42");
    const r3 = await e.expect(EOF, { timeoutMs: 5000 });
    expect(r3).toMatchObject({ matched: true, eof: true, before: "age=42\n", exitCode: 0 });
  });

  it("a second expect of an already-consumed prompt times out instead of matching it again", async () => {
    const e = new AutomationEngine(proc('printf "$ "; exec sleep 5'));
    expect((await e.expect("$ ", { timeoutMs: 5000 })).matched).toBe(true);
    const again = await e.expect("$ ", { timeoutMs: 300 });
    expect(again).toMatchObject({ matched: false, timedOut: true, index: -1 });
    await e.close();
  });

  it("picks the earliest match among alternatives, with regex groups", async () => {
    const e = new AutomationEngine(proc('echo "listening on port 8080 (ready)"'));
    const r = await e.expect([/port (\d+)/, "ready", new ExpectPattern("(?<w>lis\\w+)", { type: "regex" })], {
      timeoutMs: 5000,
    });
    expect(r.index).toBe(2);
    expect(r.namedGroups).toEqual({ w: "listening" });
    const r2 = await e.expect(["ready", /port (\d+)/], { timeoutMs: 5000 });
    expect(r2.index).toBe(1);
    expect(r2.groups).toEqual(["8080"]);
    expect(r2.match).toBe("port 8080");
    // Literal patterns are literal: regex metacharacters match themselves.
    expect((await e.expect("(ready)", { timeoutMs: 5000 })).matched).toBe(true);
  });

  it("treats EOF and TIMEOUT as matchable outcomes", async () => {
    const e = new AutomationEngine(proc("echo done; exit 3"));
    const r = await e.expect(["never", EOF], { timeoutMs: 5000 });
    expect(r).toMatchObject({
      matched: true,
      index: 1,
      pattern: EOF,
      eof: true,
      before: "done\n",
      exitCode: 3,
    });
    const e2 = new AutomationEngine(proc("exec sleep 5"));
    const t0 = performance.now();
    const r2 = await e2.expect(["never", TIMEOUT], { timeoutMs: 200 });
    expect(r2).toMatchObject({ matched: true, index: 1, pattern: TIMEOUT, timedOut: true });
    expect(performance.now() - t0).toBeLessThan(1500);
    // Not listed: the outcome is reported, not matched.
    const r3 = await e2.expect("never", { timeoutMs: 100 });
    expect(r3).toMatchObject({ matched: false, timedOut: true });
    await e2.close();
    expect(e2.isEof).toBe(true);
  });

  it("caps the buffer, keeping the newest output", async () => {
    const e = new AutomationEngine(proc("head -c 100000 /dev/zero | tr '\\0' a; echo END"), {
      maxBufferChars: 1000,
    });
    const r = await e.expect(EOF, { timeoutMs: 5000 });
    expect(r.before.length).toBeLessThanOrEqual(1000);
    expect(r.before.endsWith("aaaEND\n")).toBe(true);
    expect(e.discardedChars).toBe(100004 - r.before.length);
  });

  it("expectRespond and runSequence drive a dialogue; secret sends are redacted in the transcript", async () => {
    const dir = await mkdtemp(join(tmpdir(), "smolvm-auto-"));
    try {
      const e = new AutomationEngine(
        proc('printf "user: "; read u; printf "password: "; read p; echo "got $u/$p"; printf "$ "; read x'),
      );
      const results = await e.runSequence([
        { pattern: "user: ", response: "alice" },
        { pattern: "password: ", response: "hunter2-pw", secret: true, delayMs: 50 },
        { pattern: /got (\S+)/ },
        { pattern: "$ ", response: "exit" },
        { pattern: EOF },
      ]);
      expect(results.map((r) => r.matched)).toEqual([true, true, true, true, true]);
      expect(results[2]!.groups).toEqual(["alice/hunter2-pw"]);
      const dict = e.transcript.toDict();
      const text = JSON.stringify(dict);
      expect(text).not.toContain("hunter2-pw");
      const sends = dict.entries.filter((x) => x.kind === "send");
      expect(sends.map((s) => s.content)).toEqual(["alice\n", "[REDACTED]", "exit\n"]);
      expect(sends[1]!.secret).toBe(true);
      // The echoed secret in the recorded output is scrubbed too.
      expect(
        dict.entries.some((x) => x.kind === "output" && x.content.includes("got alice/[REDACTED]")),
      ).toBe(true);
      const file = join(dir, "t.jsonl");
      await e.transcript.toFile(file);
      const raw = await readFile(file, "utf8");
      expect(raw).not.toContain("hunter2-pw");
      expect(raw.trim().split("\n").length).toBe(dict.entries.length);
      expect((await stat(file)).mode & 0o777).toBe(0o600);
      await e.transcript.toFile(join(dir, "t.json"), { format: "json" });
      expect(JSON.parse(await readFile(join(dir, "t.json"), "utf8")).entries.length).toBe(
        dict.entries.length,
      );
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("expectRespond does not send when the pattern did not match", async () => {
    const e = new AutomationEngine(proc("exec sleep 5"));
    const r = await e.expectRespond("prompt", "answer", { timeoutMs: 100 });
    expect(r.matched).toBe(false);
    expect(e.transcript.entries.some((x) => x.kind === "send")).toBe(false);
    await e.close();
  });

  it("send(addNewline: false) writes exactly the text; concurrent expects are refused", async () => {
    const e = new AutomationEngine(proc("head -c 3; echo; echo ok"));
    await e.send("abc", { addNewline: false });
    const p = e.expect("ok", { timeoutMs: 5000 });
    await expect(e.expect("x", { timeoutMs: 100 })).rejects.toBeInstanceOf(ValidationError);
    const r = await p;
    expect(r.before).toBe("abc\n");
  });

  it("reports why the stream ended when it failed", async () => {
    const boom = new Error("link dropped");
    const stream: AutomationStream = {
      async *[Symbol.asyncIterator]() {
        yield { stream: "stdout" as const, data: Buffer.from("partial") };
        throw boom;
      },
    };
    const e = new AutomationEngine(stream);
    const r = await e.expect("never", { timeoutMs: 5000 });
    expect(r).toMatchObject({ matched: false, eof: true, before: "partial" });
    expect(r.error).toBe(boom);
    await expect(e.send("x")).rejects.toBeInstanceOf(ValidationError);
  });
});
