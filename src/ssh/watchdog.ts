/**
 * Application-level freeze detection: a command that prints nothing for `timeoutMs` is
 * reported (a PROGRESS_WARNING event and the onTimeout callback). SSH keepalive proves the
 * transport is alive; this proves the program on the other end is still doing something.
 */
import { OperationTimeoutError, ValidationError } from "../errors.js";
import type { EventSink } from "./events.js";

export interface ProgressWatchdogOptions {
  /** Silence that counts as a stall. */
  timeoutMs: number;
  /** Called on each stall with how long output has been silent. */
  onTimeout?: (idleMs: number) => void;
  /** Receives a PROGRESS_WARNING event per stall. */
  events?: EventSink;
  /** Extra fields for the event (for example the command). */
  context?: Record<string, unknown>;
  /** Warn again after each further `timeoutMs` of silence. Default false (once per stall). */
  repeat?: boolean;
}

export class ProgressWatchdog {
  readonly timeoutMs: number;
  /** Stalls reported so far. */
  stalls = 0;
  private timer: NodeJS.Timeout | undefined;
  private lastProgress = performance.now();
  private running = false;

  constructor(private readonly options: ProgressWatchdogOptions) {
    const t = options.timeoutMs;
    if (typeof t !== "number" || !Number.isFinite(t) || t <= 0) {
      throw new ValidationError(`ProgressWatchdog timeoutMs must be a positive number, got ${String(t)}.`);
    }
    this.timeoutMs = t;
  }

  get active(): boolean {
    return this.running;
  }

  /** Milliseconds since the last progress (or since start). */
  get idleMs(): number {
    return performance.now() - this.lastProgress;
  }

  start(): this {
    this.running = true;
    this.progress();
    return this;
  }

  /** Marks activity: the silence clock restarts. */
  progress(): void {
    this.lastProgress = performance.now();
    if (!this.running) return;
    if (this.timer) clearTimeout(this.timer);
    this.arm(this.timeoutMs);
  }

  private arm(ms: number): void {
    this.timer = setTimeout(() => this.fire(), ms);
  }

  private fire(): void {
    this.timer = undefined;
    if (!this.running) return;
    const idleMs = Math.round(this.idleMs);
    this.stalls++;
    this.options.events?.emit("PROGRESS_WARNING", {
      ...this.options.context,
      idleMs,
      timeoutMs: this.timeoutMs,
      stall: this.stalls,
    });
    try {
      this.options.onTimeout?.(idleMs);
    } finally {
      if (this.options.repeat && this.running) this.arm(this.timeoutMs);
    }
  }

  stop(): void {
    this.running = false;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  [Symbol.dispose](): void {
    this.stop();
  }
}

// ---------------------------------------------------------------- streamExec wiring

export interface WatchOptions {
  /** No output for this long raises PROGRESS_WARNING. */
  progressTimeoutMs: number;
  /** Also cancel the command and end the iteration with OperationTimeoutError. Default false. */
  abortOnStall?: boolean;
  events?: EventSink;
  /** Context for the event (for example `{ command }`). */
  context?: Record<string, unknown>;
}

interface StreamLike<E> extends AsyncIterable<E> {
  write?(data: string | Buffer): void;
  end?(): void;
  cancel(): Promise<void>;
}

/**
 * Wraps a streamExec stream with a ProgressWatchdog: every output chunk is progress; silence
 * gives PROGRESS_WARNING and, with abortOnStall, cancels the command and ends the iteration
 * with OperationTimeoutError (code PROGRESS_STALL) rather than hanging on a frozen program.
 */
export class WatchedStream<E extends { stream: string }> implements AsyncIterable<E> {
  readonly watchdog: ProgressWatchdog;
  private stalled: { idleMs: number } | undefined;

  constructor(
    private readonly inner: StreamLike<E>,
    private readonly options: WatchOptions,
  ) {
    this.watchdog = new ProgressWatchdog({
      timeoutMs: options.progressTimeoutMs,
      events: options.events,
      context: { ...options.context, abort: options.abortOnStall === true },
      repeat: !options.abortOnStall,
      onTimeout: (idleMs) => {
        if (!options.abortOnStall) return;
        this.stalled = { idleMs };
        void inner.cancel();
      },
    });
  }

  write(data: string | Buffer): void {
    this.inner.write?.(data);
  }

  end(): void {
    this.inner.end?.();
  }

  async cancel(): Promise<void> {
    this.watchdog.stop();
    await this.inner.cancel();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<E> {
    this.watchdog.start();
    try {
      for await (const ev of this.inner) {
        if (ev.stream !== "exit") this.watchdog.progress();
        yield ev;
      }
      if (this.stalled) {
        throw new OperationTimeoutError(
          `the command printed nothing for ${this.stalled.idleMs} ms (progressTimeoutMs ${this.options.progressTimeoutMs}) and was stopped: raise progressTimeoutMs if long silences are normal for it.`,
          {
            code: "PROGRESS_STALL",
            details: { idleMs: this.stalled.idleMs, progressTimeoutMs: this.options.progressTimeoutMs },
          },
        );
      }
    } finally {
      this.watchdog.stop();
    }
  }
}

export function watchStream<E extends { stream: string }>(
  stream: StreamLike<E>,
  options: WatchOptions,
): WatchedStream<E> {
  return new WatchedStream(stream, options);
}
