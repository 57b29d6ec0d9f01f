import { describe, expect, it } from "vitest";
import { ValidationError } from "../../src/errors.js";
import { EventCollector } from "../../src/ssh/events.js";
import { ProgressWatchdog } from "../../src/ssh/watchdog.js";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe("ProgressWatchdog", () => {
  it("emits PROGRESS_WARNING after timeoutMs of silence, and not while progress continues", async () => {
    const events = new EventCollector();
    const idle: number[] = [];
    const w = new ProgressWatchdog({
      timeoutMs: 150,
      events,
      context: { command: "make" },
      onTimeout: (ms) => idle.push(ms),
    });
    w.start();
    for (let i = 0; i < 6; i++) {
      await sleep(50);
      w.progress();
    }
    expect(w.stalls).toBe(0);
    await sleep(250);
    expect(w.stalls).toBe(1);
    expect(idle[0]).toBeGreaterThanOrEqual(145);
    const ev = events.getByType("PROGRESS_WARNING");
    expect(ev).toHaveLength(1);
    expect(ev[0]!.data).toMatchObject({ command: "make", timeoutMs: 150, stall: 1 });
    // Once per stall unless repeat is set.
    await sleep(200);
    expect(w.stalls).toBe(1);
    w.stop();
    expect(w.active).toBe(false);
  });

  it("repeats when asked and stops cleanly", async () => {
    const w = new ProgressWatchdog({ timeoutMs: 60, repeat: true }).start();
    await sleep(230);
    w.stop();
    const n = w.stalls;
    expect(n).toBeGreaterThanOrEqual(2);
    await sleep(150);
    expect(w.stalls).toBe(n);
    expect(process.getActiveResourcesInfo().filter((r) => r === "Timeout")).toHaveLength(0);
  });

  it("validates timeoutMs", () => {
    expect(() => new ProgressWatchdog({ timeoutMs: 0 })).toThrow(ValidationError);
  });
});
