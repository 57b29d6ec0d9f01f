/**
 * Reconnection policy: how long to wait before each attempt and which failures are worth
 * another attempt. Classification goes by error class (and errno codes for raw socket errors),
 * never by message text; retryWithPolicy is the loop that applies it (its only timer is the wait).
 */
import { sleep } from "../common/deadline.js";
import {
  AuthenticationError,
  ConnectionError,
  ConnectionLostError,
  ConnectionRefusedError,
  ConnectionTimeoutError,
  HostUnreachableError,
  OperationAbortedError,
  ValidationError,
} from "../errors.js";

export interface RetryPolicyOptions {
  /** Attempts after the first failure; 0 disables retrying. Default 5. */
  maxRetries?: number;
  /** Delay before the first retry. Default 1000. */
  baseDelayMs?: number;
  /** Upper bound for any delay, jitter included. Default 60 000. */
  maxDelayMs?: number;
  /** Growth factor per attempt. Default 2. */
  exponentialBase?: number;
  /** Multiply each delay by a random factor in [1, 1.25] (still capped at maxDelayMs). Default true. */
  jitter?: boolean;
  /** Source of randomness in [0, 1); injectable so tests can pin jitter. */
  random?: () => number;
}

export type FailureKind = "transient" | "permanent";

/** errno codes of socket-level failures that a later attempt may not hit. */
const TRANSIENT_ERRNO = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "ECONNABORTED",
  "EPIPE",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "EHOSTDOWN",
  "ENETUNREACH",
  "ENETDOWN",
  "ENETRESET",
  "EAI_AGAIN",
]);

/**
 * transient: refused, timeout, unreachable, connection lost (and any other transport error);
 * permanent: authentication in all its forms (auth failed, host key mismatch, no mutual kex, key
 * load, agent), bad input, caller aborts, and anything unrecognised (retrying an unknown error
 * in a loop hides bugs).
 */
export function classifyFailure(error: unknown): FailureKind {
  if (error instanceof AuthenticationError) return "permanent";
  if (error instanceof ValidationError) return "permanent";
  if (error instanceof OperationAbortedError) return "permanent";
  if (
    error instanceof ConnectionRefusedError ||
    error instanceof ConnectionTimeoutError ||
    error instanceof HostUnreachableError ||
    error instanceof ConnectionLostError ||
    error instanceof ConnectionError
  ) {
    return "transient";
  }
  const code = (error as { code?: unknown } | null)?.code;
  if (typeof code === "string" && TRANSIENT_ERRNO.has(code)) return "transient";
  return "permanent";
}

export class RetryPolicy {
  readonly maxRetries: number;
  readonly baseDelayMs: number;
  readonly maxDelayMs: number;
  readonly exponentialBase: number;
  readonly jitter: boolean;
  private readonly random: () => number;

  constructor(options: RetryPolicyOptions = {}) {
    this.maxRetries = options.maxRetries ?? 5;
    this.baseDelayMs = options.baseDelayMs ?? 1000;
    this.maxDelayMs = options.maxDelayMs ?? 60_000;
    this.exponentialBase = options.exponentialBase ?? 2;
    this.jitter = options.jitter ?? true;
    this.random = options.random ?? Math.random;
    const bad = (name: string, v: number, min: number) => {
      if (typeof v !== "number" || !Number.isFinite(v) || v < min) {
        throw new ValidationError(
          `RetryPolicy ${name} must be a finite number >= ${min}, got ${String(v)}.`,
          {
            details: { [name]: v },
          },
        );
      }
    };
    bad("maxRetries", this.maxRetries, 0);
    if (!Number.isInteger(this.maxRetries)) bad("maxRetries", Number.NaN, 0);
    bad("baseDelayMs", this.baseDelayMs, 0);
    bad("maxDelayMs", this.maxDelayMs, 0);
    bad("exponentialBase", this.exponentialBase, 1);
  }

  /** A policy that never retries. */
  static none(): RetryPolicy {
    return new RetryPolicy({ maxRetries: 0 });
  }

  /** The un-jittered delay for a 0-based retry attempt: min(base * exp^attempt, max). */
  baseDelayFor(attempt: number): number {
    return Math.min(this.baseDelayMs * this.exponentialBase ** Math.max(0, attempt), this.maxDelayMs);
  }

  /** The delay before 0-based retry `attempt`, jitter applied, never above maxDelayMs. */
  delayMs(attempt: number): number {
    const base = this.baseDelayFor(attempt);
    const factor = this.jitter ? 1 + 0.25 * this.random() : 1;
    return Math.min(base * factor, this.maxDelayMs);
  }

  /** Whether a failure on 0-based retry `attempt` deserves another attempt. */
  shouldRetry(error: unknown, attempt: number): boolean {
    return attempt < this.maxRetries && classifyFailure(error) === "transient";
  }

  toJSON(): Record<string, unknown> {
    return {
      maxRetries: this.maxRetries,
      baseDelayMs: this.baseDelayMs,
      maxDelayMs: this.maxDelayMs,
      exponentialBase: this.exponentialBase,
      jitter: this.jitter,
    };
  }
}

export interface RetryLoopOptions {
  /** Ends the loop: a pending wait rejects with its reason, and no attempt starts after it. */
  signal: AbortSignal;
  /** Called before waiting `delayMs` for retry `attempt` (0-based) after `error`. */
  onRetry?: (error: unknown, attempt: number, delayMs: number) => void;
  /** Called once when a failure ends the loop: permanent, or the retries are used up. */
  onGiveUp?: (error: unknown, attempts: number, kind: FailureKind) => void;
}

/**
 * The one reconnect loop of SSHClient and SSHSupervisor: runs `attempt` until it succeeds; a
 * failure is retried while `policy.shouldRetry` allows (transient, retries left), after
 * `policy.delayMs` (rounded), else rethrown. The signal bounds every wait.
 */
export async function retryWithPolicy<T>(
  policy: RetryPolicy,
  attempt: () => Promise<T>,
  options: RetryLoopOptions,
): Promise<T> {
  for (let n = 0; ; n++) {
    options.signal.throwIfAborted();
    try {
      return await attempt();
    } catch (e) {
      if (options.signal.aborted) throw e;
      if (!policy.shouldRetry(e, n)) {
        options.onGiveUp?.(e, n + 1, classifyFailure(e));
        throw e;
      }
      const delayMs = Math.round(policy.delayMs(n));
      options.onRetry?.(e, n, delayMs);
      await sleep(delayMs, options.signal);
    }
  }
}
