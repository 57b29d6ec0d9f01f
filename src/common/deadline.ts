/**
 * Bounded waiting. A Deadline turns `timeoutMs` + `signal` into one AbortSignal and one error,
 * so every public async call is cancellable the same way.
 */
import type { AnyCommandResult } from "../command-result.js";
import { OperationAbortedError, OperationTimeoutError } from "../errors.js";

export class Deadline {
  readonly signal: AbortSignal;
  readonly startedAt = performance.now();
  private readonly controller = new AbortController();
  private readonly timer: NodeJS.Timeout | undefined;
  private readonly onAbort: () => void;
  /**
   * What is running now ("waiting for the agent", "building the image", ...): a timeout or abort
   * names it, so the error says where the time went.
   */
  phase: string | undefined;

  constructor(
    readonly timeoutMs: number | undefined,
    private readonly parent?: AbortSignal,
    private readonly what = "operation",
  ) {
    this.signal = this.controller.signal;
    if (timeoutMs !== undefined && Number.isFinite(timeoutMs)) {
      this.timer = setTimeout(() => this.controller.abort(this.timeoutError()), timeoutMs);
      this.timer.unref?.();
    }
    this.onAbort = () => this.controller.abort(this.abortError());
    if (parent?.aborted) this.onAbort();
    else parent?.addEventListener("abort", this.onAbort, { once: true });
  }

  get elapsedMs(): number {
    return performance.now() - this.startedAt;
  }

  /** Milliseconds left, or Infinity when there is no timeout. */
  get remainingMs(): number {
    if (this.timeoutMs === undefined) return Number.POSITIVE_INFINITY;
    return Math.max(0, this.timeoutMs - this.elapsedMs);
  }

  /**
   * The budget for the next bounded step: min(capMs, what is left). Throws this deadline's
   * timeout (or abort) when nothing is left, so an expired deadline never reaches a callee as a
   * `timeoutMs` of 0 (which callees reject as invalid).
   */
  remaining(capMs = Number.POSITIVE_INFINITY): number {
    this.throwIfExpired();
    const left = this.remainingMs;
    if (left < 1) this.expire();
    return Math.min(capMs, left);
  }

  /** Ends the deadline now, as its timer would, and throws its timeout error. */
  expire(): never {
    if (!this.signal.aborted) this.controller.abort(this.timeoutError());
    throw this.signal.reason;
  }

  get expired(): boolean {
    return this.signal.aborted;
  }

  /** The error this deadline ended with (timeout or abort), or undefined while alive. */
  get reason(): OperationTimeoutError | undefined {
    return this.signal.aborted ? (this.signal.reason as OperationTimeoutError) : undefined;
  }

  throwIfExpired(): void {
    if (this.signal.aborted) throw this.signal.reason;
  }

  /** This deadline's timeout error, with a command's partial result when there is one. */
  timeoutError(partial?: AnyCommandResult): OperationTimeoutError {
    return new OperationTimeoutError(
      `${this.what} did not finish within ${this.timeoutMs} ms${this.while()}: raise timeoutMs if it needs longer.`,
      { details: { timeoutMs: this.timeoutMs, phase: this.phase }, partial },
    );
  }

  /** This deadline's abort error (see timeoutError for `partial`). */
  abortError(partial?: AnyCommandResult): OperationAbortedError {
    return new OperationAbortedError(`${this.what} was aborted by the caller's signal${this.while()}.`, {
      details: { phase: this.phase },
      partial,
    });
  }

  private while(): string {
    return this.phase ? ` (while ${this.phase})` : "";
  }

  /** Races a promise against the deadline. */
  race<T>(promise: Promise<T>): Promise<T> {
    if (this.signal.aborted) return Promise.reject(this.signal.reason);
    return new Promise<T>((resolve, reject) => {
      const onAbort = () => reject(this.signal.reason);
      this.signal.addEventListener("abort", onAbort, { once: true });
      promise.then(
        (v) => {
          this.signal.removeEventListener("abort", onAbort);
          resolve(v);
        },
        (e) => {
          this.signal.removeEventListener("abort", onAbort);
          reject(e);
        },
      );
    });
  }

  dispose(): void {
    if (this.timer) clearTimeout(this.timer);
    this.parent?.removeEventListener("abort", this.onAbort);
  }
}

/** Sleeps, waking early (with the signal's reason) when the signal fires. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
