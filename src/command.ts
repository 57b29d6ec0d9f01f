/**
 * What a command is and what running one returns, shared by every channel (SSH, guest agent):
 * validation, shell wrapping (login/raw × sh/powershell/cmd), env/cwd delivery, the bounded
 * output collector and CommandResult. Pure: no I/O here.
 */
import { type AnyCommandResult, CommandResult } from "./command-result.js";
import { ValidationError } from "./errors.js";

export { type AnyCommandResult, CommandResult } from "./command-result.js";

export type ShellMode = "login" | "raw";
export type ShellKind = "sh" | "powershell" | "cmd";
export const SHELL_KINDS: readonly ShellKind[] = ["sh", "powershell", "cmd"];

/** Options a runner that may face a non-POSIX server (the SSH classes) adds to RunOptions. */
export interface ExecExtras {
  /** How `shell: "login"` wraps this command (overrides the client's default). Default "sh". */
  shellKind?: ShellKind;
}

export interface OutputChunk {
  stream: "stdout" | "stderr";
  data: Buffer;
}

export interface RunOptions {
  /** Total deadline for the call, connect included. Default 30 000. */
  timeoutMs?: number;
  /** "login" (default) runs through the login shell so profile scripts apply; "raw" sends the command as is. */
  shell?: ShellMode;
  signal?: AbortSignal;
  /** Bytes written to the command's stdin, then EOF. */
  stdin?: string | Buffer | Uint8Array;
  /** Extra environment for this command. Values never appear in logs, events or argv on the server. */
  env?: Record<string, string>;
  /** Working directory for this command. */
  cwd?: string;
  onStdout?: (data: Buffer) => void;
  onStderr?: (data: Buffer) => void;
  /**
   * Cap on captured stdout+stderr bytes; beyond it output is discarded (the command still runs to
   * its end and is reaped) and `truncated` is set. Default DEFAULT_MAX_OUTPUT_BYTES (64 MiB);
   * `Infinity` lifts the cap.
   */
  maxOutputBytes?: number;
  /** "utf8" (default) returns strings; "buffer" returns exact Buffers. */
  encoding?: "utf8" | "buffer";
}

export type RunOptionsUtf8 = RunOptions & { encoding?: "utf8" };
export type RunOptionsBuffer = RunOptions & { encoding: "buffer" };

/** The `encoding` a run asks for; absent means "utf8". */
export type RunEncoding = "utf8" | "buffer" | undefined;

/**
 * What a run with `encoding` E resolves to: strings by default (`encoding` "utf8" or absent),
 * exact Buffers with `encoding: "buffer"`, either when the encoding is not known until run time.
 */
export type RunResult<E extends RunEncoding> = [E] extends ["buffer"]
  ? CommandResult<Buffer>
  : [E] extends ["utf8" | undefined]
    ? CommandResult<string>
    : CommandResult<string> | CommandResult<Buffer>;

/**
 * The runner contract: how every "run a shell command" method is typed (SSHClient.run,
 * SSHConnection.exec, SSHSupervisor.exec, the channels, SmolVM.run). `X` adds the runner's own
 * options (e.g. `shellKind`). Only the encoding is a type parameter, so it is inferred even when
 * the options also hold callbacks. Non-zero exit is a result, never an error.
 */
export type RunCommand<X = unknown> = <E extends RunEncoding = undefined>(
  command: string,
  options?: RunOptions & X & { encoding?: E },
) => Promise<RunResult<E>>;

/** Anything that runs shell commands with `run` (channels, SSHClient, SmolVM). */
export interface Runner<X = unknown> {
  run: RunCommand<X>;
}

// ---------------------------------------------------------------- validation

export const DEFAULT_RUN_TIMEOUT_MS = 30_000;
/** What run() keeps of a command's output unless `maxOutputBytes` says otherwise: 64 MiB. */
export const DEFAULT_MAX_OUTPUT_BYTES = 64 << 20;
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

export function validateCommand(command: unknown): asserts command is string {
  if (typeof command !== "string") throw new ValidationError("command must be a string.");
  if (command.trim() === "") throw new ValidationError("command is empty: pass the shell command to run.");
  if (command.includes("\0")) {
    throw new ValidationError("command contains a NUL byte, which no shell can receive: remove it.");
  }
}

export function validateEnvName(name: string): void {
  if (!ENV_NAME.test(name)) {
    throw new ValidationError(
      `environment variable name ${JSON.stringify(name)} is invalid: use letters, digits and _ and do not start with a digit.`,
      { details: { name } },
    );
  }
}

/** Validates names and values; the value is never echoed in the message. */
export function validateEnv(env: Record<string, string>): void {
  for (const [name, value] of Object.entries(env)) {
    validateEnvName(name);
    if (typeof value !== "string") {
      throw new ValidationError(`environment variable ${name} must be a string.`, { details: { name } });
    }
    if (value.includes("\0")) {
      throw new ValidationError(`environment variable ${name} contains a NUL byte: remove it.`, {
        details: { name },
      });
    }
  }
}

export function validateShellKind(kind: unknown): void {
  if (kind !== undefined && !SHELL_KINDS.includes(kind as ShellKind)) {
    throw new ValidationError(`shellKind must be one of ${SHELL_KINDS.join(", ")}, got ${String(kind)}.`);
  }
}

export function validateTimeout(name: string, value: number | undefined): void {
  if (value === undefined) return;
  if (typeof value !== "number" || !Number.isFinite(value) || value <= 0) {
    throw new ValidationError(`${name} must be a positive number of milliseconds, got ${String(value)}.`, {
      details: { [name]: value },
    });
  }
}

/** Checks every field of RunOptions that can be wrong, before any I/O happens. */
export function validateRunOptions(command: unknown, options: RunOptions = {}): void {
  validateCommand(command);
  validateTimeout("timeoutMs", options.timeoutMs);
  if (options.shell !== undefined && options.shell !== "login" && options.shell !== "raw") {
    throw new ValidationError(`shell must be "login" or "raw", got ${JSON.stringify(options.shell)}.`);
  }
  if (options.env) validateEnv(options.env);
  if (options.cwd !== undefined) {
    if (typeof options.cwd !== "string" || options.cwd === "" || options.cwd.includes("\0")) {
      throw new ValidationError("cwd must be a non-empty path without NUL bytes.");
    }
  }
  if (
    options.maxOutputBytes !== undefined &&
    !(
      (Number.isInteger(options.maxOutputBytes) && options.maxOutputBytes >= 0) ||
      options.maxOutputBytes === Number.POSITIVE_INFINITY
    )
  ) {
    throw new ValidationError("maxOutputBytes must be a non-negative integer (or Infinity).");
  }
}

// ---------------------------------------------------------------- shell quoting and wrapping

/** POSIX single-quote quoting: safe for any byte string without NUL. */
export function quoteSh(value: string): string {
  return `'${value.replaceAll("'", `'"'"'`)}'`;
}

/** Quoting that keeps the result on one line: newlines become "$__nl" (set by ENV_NEWLINE). */
function quoteShOneLine(value: string): string {
  return value
    .split("\n")
    .map((part) => quoteSh(part))
    .join('"$__nl"');
}
const ENV_NEWLINE = "__nl=$(printf '\\nx');__nl=${__nl%x};";

export interface WrappedCommand {
  /** The exact string to hand to the channel's exec. */
  command: string;
  /**
   * Bytes to write to stdin before the caller's stdin. Environment values travel here (read by
   * the shell's `read` builtin, which consumes exactly one line), so they are never part of the
   * server-side argv nor of any command string we log.
   */
  stdinPrefix?: Buffer;
  /**
   * sh only: the script the user's shell runs (`-lc` for login, `-c` for raw), for channels
   * that start that shell themselves instead of handing `command` to one.
   */
  script?: string;
}

export interface WrapOptions {
  shell?: ShellMode;
  shellKind?: ShellKind;
  env?: Record<string, string>;
  cwd?: string;
  /**
   * Hex id exported as SMOLVM_RUN_ID by the login wrapper, so every process of the command can
   * be found and killed even where the server ignores SSH signal requests (root logins).
   */
  runId?: string;
}

/**
 * Builds what a channel executes. sh: login → `exec "${SHELL:-/bin/sh}" -lc <quoted>`; raw →
 * verbatim (a tiny preamble is added only when env or cwd are asked for). powershell →
 * `-NoProfile -EncodedCommand <base64 UTF-16LE>`; cmd → `cmd.exe /s /c "…"`.
 */
export function wrapCommand(command: string, options: WrapOptions = {}): WrappedCommand {
  const shell = options.shell ?? "login";
  const kind = options.shellKind ?? "sh";
  const env = options.env ?? {};
  const names = Object.keys(env);

  if (kind === "powershell") {
    let script = "";
    for (const n of names) script += `$env:${n}='${env[n]!.replaceAll("'", "''")}';`;
    if (options.cwd) script += `Set-Location -LiteralPath '${options.cwd.replaceAll("'", "''")}';`;
    script += command;
    if (shell === "raw" && !names.length && !options.cwd) return { command };
    return {
      command: `powershell.exe -NoProfile -NonInteractive -EncodedCommand ${encodePowerShell(script)}`,
    };
  }
  if (kind === "cmd") {
    let script = "";
    for (const n of names) script += `set "${n}=${cmdQuotable(env[n]!, `environment variable ${n}`)}"&& `;
    if (options.cwd) script += `cd /d "${cmdQuotable(options.cwd, "cwd")}"&& `;
    script += command;
    if (shell === "raw" && !names.length && !options.cwd) return { command };
    return { command: `cmd.exe /s /c "${script}"` };
  }

  let preamble = "";
  let stdinPrefix: Buffer | undefined;
  if (names.length) {
    preamble += 'IFS= read -r __smolvm_env && eval "$__smolvm_env" && unset __smolvm_env || exit 125;';
    let line = ENV_NEWLINE;
    for (const n of names) line += `export ${n}=${quoteShOneLine(env[n]!)};`;
    line += "unset __nl";
    stdinPrefix = Buffer.from(`${line}\n`);
  }
  if (options.cwd !== undefined) preamble += `cd -- ${quoteSh(options.cwd)} || exit 1;`;

  const script = preamble ? `${preamble}\n${command}` : command;
  if (shell === "raw") return { command: script, stdinPrefix, script };
  const tag = options.runId && /^[0-9a-f]+$/.test(options.runId) ? `SMOLVM_RUN_ID=${options.runId} ` : "";
  return { command: `${tag}exec "\${SHELL:-/bin/sh}" -lc ${quoteSh(script)}`, stdinPrefix, script };
}

/**
 * cmd.exe has no quoting that holds for every string: `"` ends a quoted span (after which `&`,
 * `|`, `<`, `>` run commands), `%...%` and `!...!` expand before quotes are parsed, and CR/LF end
 * the command. A value with any of these is refused rather than passed through.
 */
function cmdQuotable(value: string, what: string): string {
  if (/["%!\r\n]/.test(value)) {
    throw new ValidationError(
      `${what} contains a character cmd.exe cannot carry safely inside quotes (" % ! or a line break): ` +
        'use shellKind "powershell", or pass the value another way (a file, stdin).',
      { details: { what } },
    );
  }
  return value;
}

export function encodePowerShell(script: string): string {
  return Buffer.from(script, "utf16le").toString("base64");
}

// ---------------------------------------------------------------- output collection

/** The result of a command that produced nothing yet: a timeout's `partial` before any output. */
export function emptyResult(durationMs: number, encoding: "utf8" | "buffer" = "utf8"): AnyCommandResult {
  return encoding === "buffer"
    ? new CommandResult<Buffer>(null, Buffer.alloc(0), Buffer.alloc(0), durationMs)
    : new CommandResult<string>(null, "", "", durationMs);
}

/**
 * Collects stdout/stderr as Buffers, in arrival order per stream, up to a shared byte cap
 * (DEFAULT_MAX_OUTPUT_BYTES unless given).
 * Bytes past the cap are counted, not kept, and set `truncated`; callbacks still see everything.
 */
export class OutputCollector {
  private readonly out: Buffer[] = [];
  private readonly err: Buffer[] = [];
  private kept = 0;
  bytesStdout = 0;
  bytesStderr = 0;
  truncated = false;

  constructor(
    private readonly maxBytes = DEFAULT_MAX_OUTPUT_BYTES,
    private readonly onStdout?: (d: Buffer) => void,
    private readonly onStderr?: (d: Buffer) => void,
  ) {}

  push(stream: "stdout" | "stderr", data: Buffer): void {
    if (stream === "stdout") this.bytesStdout += data.length;
    else this.bytesStderr += data.length;
    const room = this.maxBytes - this.kept;
    if (room > 0) {
      const piece = data.length <= room ? data : data.subarray(0, room);
      (stream === "stdout" ? this.out : this.err).push(piece);
      this.kept += piece.length;
    }
    if (data.length > Math.max(room, 0)) this.truncated = true;
    const cb = stream === "stdout" ? this.onStdout : this.onStderr;
    cb?.(data);
  }

  stdout(): Buffer {
    return Buffer.concat(this.out);
  }
  stderr(): Buffer {
    return Buffer.concat(this.err);
  }

  /** Builds the result in the encoding the caller asked for. */
  result(
    exitCode: number | null,
    signal: string | null,
    durationMs: number,
    encoding: "utf8" | "buffer" = "utf8",
  ): AnyCommandResult {
    if (encoding === "buffer") {
      return new CommandResult<Buffer>(
        exitCode,
        this.stdout(),
        this.stderr(),
        durationMs,
        signal,
        this.truncated,
      );
    }
    return new CommandResult<string>(
      exitCode,
      this.stdout().toString("utf8"),
      this.stderr().toString("utf8"),
      durationMs,
      signal,
      this.truncated,
    );
  }
}
