/**
 * `vm.pty`: interactive terminals over the guest agent. A real pseudo-terminal in the guest
 * (TERM=xterm-256color, the guest's line discipline), run by the user's login shell; input and
 * output are bytes; resize reaches the program (SIGWINCH, `stty size`). The terminal lives as long
 * as the agent connection of this SmolVM object. Over SSH this raises
 * CommandExecutionUnavailableError.
 */
import { AgentChannel } from "../channel/agent-channel.js";
import { SIGNAL_NAMES, type SignalName } from "../channel/agent-procs.js";
import { type AgentPty, openPty } from "../channel/agent-pty.js";
import type { CallOptions } from "../channel/types.js";
import { validateEnv, validateTimeout } from "../command.js";
import { Deadline } from "../common/deadline.js";
import { CommandExecutionUnavailableError, ValidationError } from "../errors.js";
import type { ChannelAccess } from "./files.js";

export interface PtyCreateOptions extends CallOptions {
  /** Default 80. */
  cols?: number;
  /** Default 24. */
  rows?: number;
  /** Run this instead of the user's login shell (still through the login shell). */
  command?: string;
  cwd?: string;
  env?: Record<string, string>;
  /** Terminal output (bytes, as the program wrote them). */
  onData: (data: Buffer) => void;
}

function checkSize(cols: number, rows: number): void {
  if (
    !Number.isInteger(cols) ||
    cols < 1 ||
    cols > 65535 ||
    !Number.isInteger(rows) ||
    rows < 1 ||
    rows > 65535
  ) {
    throw new ValidationError("cols and rows must be integers 1..65535.");
  }
}

export class Terminal {
  private exited = false;
  constructor(private readonly inner: AgentPty) {
    inner.exit.then(
      () => {
        this.exited = true;
      },
      () => {
        this.exited = true;
      },
    );
  }

  /** Sends input (keystrokes, pasted bytes). */
  async write(data: string | Buffer | Uint8Array): Promise<void> {
    const buf =
      typeof data === "string"
        ? Buffer.from(data, "utf8")
        : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    if (buf.length) await this.inner.write(buf);
  }

  /** Changes the terminal size; the program gets SIGWINCH. */
  async resize(size: { cols: number; rows: number }): Promise<void> {
    checkSize(size.cols, size.rows);
    if (!this.exited) this.inner.resize(size.rows, size.cols);
  }

  /** Signals the terminal's process group (default KILL). */
  async kill(signal: SignalName = "KILL"): Promise<void> {
    if (!SIGNAL_NAMES.includes(signal))
      throw new ValidationError(`signal must be one of ${SIGNAL_NAMES.join(", ")}.`);
    if (!this.exited) this.inner.signal(signal);
  }

  /** The program's exit code (128 + n when signal n ended it). */
  async wait(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<number> {
    validateTimeout("timeoutMs", options.timeoutMs);
    const d = new Deadline(options.timeoutMs, options.signal, "waiting for the terminal");
    try {
      return await d.race(this.inner.exit);
    } finally {
      d.dispose();
    }
  }
}

export class VmPty {
  constructor(private readonly access: ChannelAccess) {}

  /** Opens a terminal running the user's login shell (or `command`). */
  async create(options: PtyCreateOptions): Promise<Terminal> {
    if (typeof options?.onData !== "function")
      throw new ValidationError("pty.create needs an onData callback.");
    const cols = options.cols ?? 80;
    const rows = options.rows ?? 24;
    checkSize(cols, rows);
    if (options.env) validateEnv(options.env);
    validateTimeout("timeoutMs", options.timeoutMs);
    const ch = await this.access.channel();
    if (!(ch instanceof AgentChannel)) {
      throw new CommandExecutionUnavailableError(
        `VM ${this.access.name} is reached over SSH, which cannot open agent terminals.`,
        'Use an image with the guest agent (the default "tiny" has it), or `smolvm ssh` for an OpenSSH terminal.',
      );
    }
    const d = new Deadline(options.timeoutMs ?? 30_000, options.signal, "opening a terminal");
    try {
      const inner = await this.access.explain(() =>
        openPty(
          ch,
          { command: options.command, cwd: options.cwd, env: options.env, rows, cols },
          options.onData,
          d,
        ),
      );
      return new Terminal(inner);
    } finally {
      d.dispose();
    }
  }
}
