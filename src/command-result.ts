/**
 * CommandResult: what running a command returns, on every channel. Its own module (no imports)
 * so errors.ts can type `OperationTimeoutError.partial` with it without an import cycle.
 */

export class CommandResult<T extends string | Buffer = string> {
  constructor(
    readonly exitCode: number | null,
    readonly stdout: T,
    readonly stderr: T,
    readonly durationMs: number,
    /** Signal name without "SIG" (e.g. "KILL") when the command was killed by a signal. */
    readonly signal: string | null = null,
    readonly truncated = false,
  ) {}

  get ok(): boolean {
    return this.exitCode === 0;
  }

  /** stdout as a trimmed string (the common "what did it print" case). */
  get output(): string {
    return (typeof this.stdout === "string" ? this.stdout : this.stdout.toString("utf8")).trim();
  }

  toJSON(): Record<string, unknown> {
    const text = (v: T) => (typeof v === "string" ? v : v.toString("base64"));
    return {
      exitCode: this.exitCode,
      signal: this.signal,
      stdout: text(this.stdout),
      stderr: text(this.stderr),
      durationMs: this.durationMs,
      truncated: this.truncated,
    };
  }
}

/** A CommandResult in either encoding: what a timeout's `partial` holds. */
export type AnyCommandResult = CommandResult<string> | CommandResult<Buffer>;
