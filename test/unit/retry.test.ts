import { describe, expect, it } from "vitest";
import {
  AgentError,
  AuthFailedError,
  ConnectionLostError,
  ConnectionRefusedError,
  ConnectionTimeoutError,
  HostKeyMismatchError,
  HostUnreachableError,
  KeyLoadError,
  NoMutualKexError,
  OperationAbortedError,
  ValidationError,
} from "../../src/errors.js";
import { classifyFailure, RetryPolicy } from "../../src/ssh/retry.js";

describe("RetryPolicy", () => {
  it("delays min(base * exp^attempt, max) without jitter", () => {
    const p = new RetryPolicy({ baseDelayMs: 100, maxDelayMs: 1000, exponentialBase: 3, jitter: false });
    expect([0, 1, 2, 3, 4].map((a) => p.delayMs(a))).toEqual([100, 300, 900, 1000, 1000]);
  });

  it("multiplies by a jitter factor in [1, 1.25] and never exceeds max", () => {
    const lo = new RetryPolicy({ baseDelayMs: 100, maxDelayMs: 1000, random: () => 0 });
    const hi = new RetryPolicy({ baseDelayMs: 100, maxDelayMs: 1000, random: () => 0.999999 });
    expect(lo.delayMs(0)).toBe(100);
    expect(hi.delayMs(0)).toBeCloseTo(125, 3);
    expect(hi.delayMs(2)).toBeCloseTo(500, 3);
    // 800 * 1.25 = 1000 → capped exactly at max; 1600 → max.
    expect(hi.delayMs(3)).toBeLessThanOrEqual(1000);
    expect(hi.delayMs(10)).toBe(1000);
    const real = new RetryPolicy({ baseDelayMs: 1000, maxDelayMs: 10_000 });
    for (let i = 0; i < 500; i++) {
      const d = real.delayMs(1);
      expect(d).toBeGreaterThanOrEqual(2000);
      expect(d).toBeLessThanOrEqual(2500);
    }
  });

  it("has documented defaults and validates options", () => {
    const p = new RetryPolicy();
    expect(p.toJSON()).toEqual({
      maxRetries: 5,
      baseDelayMs: 1000,
      maxDelayMs: 60_000,
      exponentialBase: 2,
      jitter: true,
    });
    expect(() => new RetryPolicy({ maxRetries: -1 })).toThrow(ValidationError);
    expect(() => new RetryPolicy({ maxRetries: 1.5 })).toThrow(ValidationError);
    expect(() => new RetryPolicy({ baseDelayMs: Number.NaN })).toThrow(ValidationError);
    expect(() => new RetryPolicy({ exponentialBase: 0.5 })).toThrow(ValidationError);
  });

  it("retries transient failures up to maxRetries and never permanent ones", () => {
    const p = new RetryPolicy({ maxRetries: 2 });
    const refused = new ConnectionRefusedError("x");
    expect(p.shouldRetry(refused, 0)).toBe(true);
    expect(p.shouldRetry(refused, 1)).toBe(true);
    expect(p.shouldRetry(refused, 2)).toBe(false);
    expect(p.shouldRetry(new AuthFailedError("x"), 0)).toBe(false);
    expect(RetryPolicy.none().shouldRetry(refused, 0)).toBe(false);
  });
});

describe("classifyFailure", () => {
  it("classifies by error class", () => {
    for (const e of [
      new ConnectionRefusedError("a"),
      new ConnectionTimeoutError("a"),
      new HostUnreachableError("a"),
      new ConnectionLostError("a"),
    ]) {
      expect(classifyFailure(e)).toBe("transient");
    }
    for (const e of [
      new AuthFailedError("a"),
      new HostKeyMismatchError("a", { actual: "SHA256:x" }),
      new NoMutualKexError("a", { ours: [], theirs: [] }),
      new KeyLoadError("a"),
      new AgentError("a"),
      new ValidationError("a"),
      new OperationAbortedError("a"),
    ]) {
      expect(classifyFailure(e)).toBe("permanent");
    }
  });

  it("uses errno codes for raw socket errors and ignores message text", () => {
    expect(classifyFailure(Object.assign(new Error("boom"), { code: "ECONNRESET" }))).toBe("transient");
    expect(classifyFailure(Object.assign(new Error("boom"), { code: "EHOSTUNREACH" }))).toBe("transient");
    expect(classifyFailure(new Error("connection refused"))).toBe("permanent");
    expect(classifyFailure(Object.assign(new Error("timeout"), { code: "EACCES" }))).toBe("permanent");
  });
});
