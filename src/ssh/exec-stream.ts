/**
 * A streamed command (SSHConnection.streamExec): output events as they arrive, then one exit
 * event; stdin on request; backpressure that pauses the channel (and so the remote writer) while
 * the consumer is behind; cancel() kills the command remotely.
 */
import type { ClientChannel } from "ssh2";
import { DEFAULT_RUN_TIMEOUT_MS, type RunOptions, type ShellKind } from "../command.js";
import { Deadline } from "../common/deadline.js";
import { ValidationError } from "../errors.js";
import { roundMs } from "./events.js";
import { type ExecChannel, taggedCommand } from "./exec-channel.js";
import type { ExecHost } from "./session-host.js";

export interface StreamExecOptions
  extends Omit<RunOptions, "encoding" | "onStdout" | "onStderr" | "maxOutputBytes" | "stdin"> {
  /** No output for this long emits PROGRESS_WARNING (and, with abortOnStall, stops the command). */
  progressTimeoutMs?: number;
  abortOnStall?: boolean;
  shellKind?: ShellKind;
  /** Allocate a pseudo-terminal (stdout and stderr then arrive merged as stdout). */
  pty?: boolean;
  /** Keep stdin open for write()/end(); otherwise EOF is sent at once. */
  stdin?: boolean;
}

export type StreamExecEvent =
  | { stream: "stdout" | "stderr"; data: Buffer }
  | { stream: "exit"; exitCode: number | null; signal: string | null };

/**
 * Output queued for a slow consumer above this pauses the channel: ssh2 then stops granting the
 * server window, so the remote command blocks on write instead of our memory growing. Reading
 * resumes once the queue is below the low-water mark.
 */
export const STREAM_HIGH_WATER_BYTES = 1024 * 1024;
export const STREAM_LOW_WATER_BYTES = 256 * 1024;

/** A streamed command: async-iterate its events; write()/end() feed stdin; cancel() kills it. */
export class ExecStream implements AsyncIterable<StreamExecEvent> {
  private readonly queue: StreamExecEvent[] = [];
  private queuedBytes = 0;
  private paused = false;
  private waiting: ((v: IteratorResult<StreamExecEvent>) => void) | undefined;
  private waitingReject: ((e: unknown) => void) | undefined;
  private error: unknown;
  private done = false;
  private channel: ClientChannel | undefined;
  private exec: ExecChannel | undefined;
  private readonly conn: ExecHost;
  private readonly pendingStdin: Array<Buffer | null> = [];
  private readonly deadline: Deadline;
  private readonly opened: Promise<void>;
  private readonly command: string;
  private readonly startedAt = performance.now();
  private bytesStdout = 0;
  private bytesStderr = 0;
  private endReported = false;

  constructor(
    conn: ExecHost,
    command: string,
    private readonly options: StreamExecOptions,
  ) {
    this.deadline = new Deadline(options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS, options.signal, "SSH command");
    const { wrapped, runId } = taggedCommand(command, options);
    this.conn = conn;
    this.command = command;
    conn.events?.emit("EXEC", { phase: "start", command, host: conn.host, stream: true });
    this.opened = conn.openExec(wrapped.command, this.deadline.signal, options.pty, runId).then(
      (st) => {
        const ch = st.channel;
        this.channel = ch;
        this.exec = st;
        if (this.done) {
          conn.terminate(st);
          return;
        }
        ch.on("data", (d: Buffer) => {
          this.bytesStdout += d.length;
          this.push({ stream: "stdout", data: d });
        });
        ch.stderr.on("data", (d: Buffer) => {
          this.bytesStderr += d.length;
          this.push({ stream: "stderr", data: d });
        });
        const onClose = () => {
          // 'close' follows stdout's end; stderr may still hold output if we paused it.
          if (!ch.stderr.readableEnded && !ch.stderr.destroyed && !this.done) {
            ch.stderr.once("end", onClose);
            return;
          }
          const { exitCode, signal } = st;
          this.deadline.signal.removeEventListener("abort", this.onAbort);
          if (exitCode === null && signal === null && !conn.alive && !this.done) {
            this.fail(conn.lostError("while the command ran (it may or may not have finished)"));
            return;
          }
          this.push({ stream: "exit", exitCode, signal });
          this.reportEnd({ exitCode, signal });
          this.finish();
        };
        if (st.closed) setImmediate(onClose);
        else st.onClose = onClose;
        this.deadline.signal.addEventListener("abort", this.onAbort, { once: true });
        if (wrapped.stdinPrefix) ch.write(wrapped.stdinPrefix);
        if (!options.stdin) ch.end();
        else {
          for (const p of this.pendingStdin.splice(0)) {
            if (p === null) ch.end();
            else ch.write(p);
          }
        }
      },
      (e) => this.fail(e),
    );
    this.opened.catch(() => {});
  }

  private readonly onAbort = () => {
    if (this.exec) this.conn.terminate(this.exec);
    this.fail(this.deadline.reason);
  };

  private push(ev: StreamExecEvent): void {
    if (this.done) return;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = undefined;
      this.waitingReject = undefined;
      w({ value: ev, done: false });
      return;
    }
    this.queue.push(ev);
    if (ev.stream === "exit") return;
    this.queuedBytes += ev.data.length;
    if (!this.paused && this.queuedBytes > STREAM_HIGH_WATER_BYTES) this.setFlow(false);
  }

  private shift(): StreamExecEvent | undefined {
    const ev = this.queue.shift();
    if (ev && ev.stream !== "exit") {
      this.queuedBytes -= ev.data.length;
      if (this.paused && this.queuedBytes <= STREAM_LOW_WATER_BYTES) this.setFlow(true);
    }
    return ev;
  }

  /** Pauses or resumes reading both output streams of the channel. */
  private setFlow(on: boolean): void {
    this.paused = !on;
    const ch = this.channel;
    if (!ch) return;
    if (on) {
      ch.resume();
      ch.stderr.resume();
    } else {
      ch.pause();
      ch.stderr.pause();
    }
  }

  /** One EXEC end event per stream, however it ended (byte counts, never data or env). */
  private reportEnd(outcome: Record<string, unknown>): void {
    if (this.endReported) return;
    this.endReported = true;
    this.conn.events?.emit("EXEC", {
      phase: "end",
      command: this.command,
      stream: true,
      exitCode: null,
      signal: null,
      ...outcome,
      durationMs: roundMs(performance.now() - this.startedAt),
      bytesStdout: this.bytesStdout,
      bytesStderr: this.bytesStderr,
    });
  }

  private finish(): void {
    this.done = true;
    this.deadline.dispose();
    // Nothing more is delivered: let the channel drain so it can close and free its slot.
    if (this.paused) this.setFlow(true);
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = undefined;
      w({ value: undefined, done: true });
    }
  }

  private fail(e: unknown): void {
    if (this.done) return;
    this.reportEnd({ error: (e as { code?: string } | null)?.code ?? (e as Error | null)?.name ?? "error" });
    this.error = e;
    this.done = true;
    this.deadline.dispose();
    if (this.paused) this.setFlow(true);
    if (this.waitingReject) {
      const r = this.waitingReject;
      this.waiting = undefined;
      this.waitingReject = undefined;
      r(e);
    }
  }

  /** Output received but not yet taken by the consumer (bounded by the high-water mark). */
  get bufferedBytes(): number {
    return this.queuedBytes;
  }

  /** Writes to the command's stdin (needs `stdin: true`). */
  write(data: string | Buffer): void {
    if (!this.options.stdin) throw new ValidationError("streamExec was started without stdin: true.");
    const b = typeof data === "string" ? Buffer.from(data) : data;
    if (this.channel) this.channel.write(b);
    else this.pendingStdin.push(b);
  }

  /** Sends EOF on stdin. */
  end(): void {
    if (this.channel) this.channel.end();
    else this.pendingStdin.push(null);
  }

  /** Kills the remote command and ends the iteration. */
  async cancel(): Promise<void> {
    if (this.done) return;
    if (this.exec) this.conn.terminate(this.exec);
    this.queue.length = 0;
    this.queuedBytes = 0;
    this.reportEnd({ cancelled: true });
    this.finish();
    // A channel that opens after this point is terminated by the open handler (done is set).
    await this.opened.catch(() => {});
  }

  [Symbol.asyncIterator](): AsyncIterator<StreamExecEvent> {
    return {
      next: () => {
        const ev = this.shift();
        if (ev) return Promise.resolve({ value: ev, done: false });
        if (this.error !== undefined) return Promise.reject(this.error);
        if (this.done) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve, reject) => {
          this.waiting = resolve;
          this.waitingReject = reject;
        });
      },
      return: async () => {
        await this.cancel();
        return { value: undefined, done: true };
      },
    };
  }
}
