/**
 * Interactive login shell on a PTY (what `ssh host` with no command gives). The session is a
 * raw duplex for terminals (smolssh pipes the local TTY into it) and also an async iterable of
 * `{ stream, data }` then `{ stream: "exit" }`, so an AutomationEngine can drive it.
 */
import type { ClientChannel, PseudoTtyOptions } from "ssh2";
import { ConnectionLostError, OperationTimeoutError, SSHConnectionError } from "../errors.js";
import type { SessionHost } from "./session-host.js";

export interface ShellOptions {
  /** Default "xterm-256color" (or $TERM). */
  term?: string;
  rows?: number;
  cols?: number;
  /** Bound on opening the session. Default 15 000. */
  timeoutMs?: number;
}

type ShellEvent =
  | { stream: "stdout" | "stderr"; data: Buffer }
  | { stream: "exit"; exitCode: number | null; signal: string | null };

export class ShellSession implements AsyncIterable<ShellEvent>, AsyncDisposable {
  exitCode: number | null = null;
  signal: string | null = null;
  private readonly queue: ShellEvent[] = [];
  private wake: (() => void) | undefined;
  private ended = false;
  private failure: unknown;
  private readonly done: Promise<{ exitCode: number | null; signal: string | null }>;

  constructor(
    readonly channel: ClientChannel,
    conn: SessionHost,
  ) {
    channel.on("data", (d: Buffer) => this.push({ stream: "stdout", data: d }));
    channel.stderr.on("data", (d: Buffer) => this.push({ stream: "stderr", data: d }));
    channel.on("exit", (code: number | null, sig?: string) => {
      if (typeof code === "number") this.exitCode = code;
      else if (sig) this.signal = sig.replace(/^SIG/, "");
    });
    this.done = new Promise((resolve) => {
      channel.once("close", () => {
        if (this.exitCode === null && this.signal === null && !conn.alive) {
          this.failure = new ConnectionLostError(
            `SSH connection to ${conn.host}:${conn.port} was lost during the shell session.`,
          );
        } else this.push({ stream: "exit", exitCode: this.exitCode, signal: this.signal });
        this.ended = true;
        this.wake?.();
        resolve({ exitCode: this.exitCode, signal: this.signal });
      });
    });
  }

  private push(e: ShellEvent): void {
    this.queue.push(e);
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  write(data: string | Buffer): void {
    this.channel.write(data);
  }

  end(): void {
    this.channel.end();
  }

  /** Tells the remote PTY the terminal's new size. */
  resize(rows: number, cols: number): void {
    this.channel.setWindow(rows, cols, 0, 0);
  }

  /** Resolves when the shell exits (or the connection drops). */
  wait(): Promise<{ exitCode: number | null; signal: string | null }> {
    return this.done;
  }

  async cancel(): Promise<void> {
    this.channel.close();
    await Promise.race([this.done, new Promise((r) => setTimeout(r, 1000).unref())]);
  }

  async close(): Promise<void> {
    await this.cancel();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<ShellEvent> {
    for (;;) {
      const e = this.queue.shift();
      if (e) {
        yield e;
        continue;
      }
      if (this.ended) {
        if (this.failure) throw this.failure;
        return;
      }
      await new Promise<void>((r) => {
        this.wake = r;
      });
    }
  }
}

/** Opens an interactive login shell with a PTY. */
export function openShell(conn: SessionHost, options: ShellOptions = {}): Promise<ShellSession> {
  const pty: PseudoTtyOptions = {
    term: options.term ?? process.env.TERM ?? "xterm-256color",
    rows: options.rows ?? 24,
    cols: options.cols ?? 80,
  };
  const timeoutMs = options.timeoutMs ?? 15_000;
  return new Promise((resolve, reject) => {
    if (!conn.alive) {
      reject(new ConnectionLostError(`SSH connection to ${conn.host}:${conn.port} is closed.`));
      return;
    }
    let done = false;
    const t = setTimeout(() => {
      done = true;
      reject(
        new OperationTimeoutError(`opening a shell on ${conn.host}:${conn.port} took over ${timeoutMs} ms.`),
      );
    }, timeoutMs);
    try {
      conn.claimSession();
    } catch (e) {
      clearTimeout(t);
      reject(e);
      return;
    }
    conn.client.shell(pty, (err, ch) => {
      clearTimeout(t);
      if (done) {
        ch?.close();
        return;
      }
      done = true;
      if (err) {
        reject(
          new SSHConnectionError(`the server refused a shell on ${conn.host}:${conn.port}: see the cause.`, {
            cause: err,
          }),
        );
      } else resolve(new ShellSession(ch, conn));
    });
  });
}
