/**
 * `vm.processes`: background processes that belong to the guest, not to the host call that
 * started them. They survive this SmolVM object closing and this host process exiting; any
 * SmolVM object in any host process can list them, re-attach (the output nobody received is
 * replayed once, then output streams live), feed stdin, signal the process group and wait.
 * Needs the guest agent; over SSH these calls raise CommandExecutionUnavailableError.
 */
import { AgentChannel } from "../channel/agent-channel.js";
import {
  type Attachment,
  attachProcess,
  listProcesses,
  type ProcessInfo,
  processInput,
  SIGNAL_NAMES,
  type SignalName,
  signalProcess,
  spawnProcess,
} from "../channel/agent-procs.js";
import type { CallOptions } from "../channel/types.js";
import {
  type CommandResult,
  type ShellMode,
  validateCommand,
  validateEnv,
  validateTimeout,
} from "../command.js";
import { Deadline } from "../common/deadline.js";
import { CommandExecutionUnavailableError, SmolVMError, ValidationError } from "../errors.js";
import type { ChannelAccess } from "./files.js";

export type { ProcessInfo, SignalName };

export interface ProcessStartOptions extends CallOptions {
  cwd?: string;
  env?: Record<string, string>;
  /** "login" (default) runs through the user's login shell, "raw" through `sh -c`. */
  shell?: ShellMode;
  /** Keep stdin open for sendStdin()/closeStdin(). Default false (stdin is empty). */
  stdin?: boolean;
  onStdout?: (data: Buffer) => void;
  onStderr?: (data: Buffer) => void;
  /** Cap on the output wait() keeps (callbacks see everything). Default 16 MiB. */
  maxOutputBytes?: number;
}

export interface ProcessConnectOptions extends CallOptions {
  onStdout?: (data: Buffer) => void;
  onStderr?: (data: Buffer) => void;
  /** What to replay first: what no host received (default), the whole ring, or nothing. */
  replay?: "missed" | "all" | "none";
  maxOutputBytes?: number;
}

const DEFAULT_CALL_MS = 30_000;
const DEFAULT_MAX_OUTPUT = 16 << 20;

/** A handle on one background process; several handles may exist for one process. */
export class ProcessHandle {
  constructor(
    /** The process id in the guest (also its process group id). */
    readonly pid: number,
    private readonly ch: AgentChannel,
    private readonly attachment: Attachment,
  ) {}

  /** Writes to the process's stdin (it must have been started with `stdin: true`). */
  async sendStdin(data: string | Buffer | Uint8Array, options: CallOptions = {}): Promise<void> {
    const buf =
      typeof data === "string"
        ? Buffer.from(data, "utf8")
        : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    await bounded(options, `stdin of process ${this.pid}`, (d) =>
      processInput(this.ch, this.pid, buf, false, d),
    );
  }

  /** Closes stdin (the process reads EOF). */
  async closeStdin(options: CallOptions = {}): Promise<void> {
    await bounded(options, `closing stdin of process ${this.pid}`, (d) =>
      processInput(this.ch, this.pid, Buffer.alloc(0), true, d),
    );
  }

  /** Sends a signal (default KILL) to the whole process group. */
  async kill(signal: SignalName = "KILL", options: CallOptions = {}): Promise<void> {
    if (!SIGNAL_NAMES.includes(signal)) {
      throw new ValidationError(
        `signal must be one of ${SIGNAL_NAMES.join(", ")}, got ${JSON.stringify(signal)}.`,
      );
    }
    await bounded(options, `signalling process ${this.pid}`, (d) =>
      signalProcess(this.ch, this.pid, signal, d),
    );
  }

  /**
   * Resolves with the process's result once it exited (the output this handle received, up to
   * maxOutputBytes). Without timeoutMs it waits as long as the process runs.
   */
  async wait(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<CommandResult<string>> {
    validateTimeout("timeoutMs", options.timeoutMs);
    const d = new Deadline(options.timeoutMs, options.signal, `waiting for process ${this.pid}`);
    try {
      return (await d.race(this.attachment.result)) as CommandResult<string>;
    } finally {
      d.dispose();
    }
  }

  /** Stops receiving output here; the process keeps running. */
  detach(): void {
    this.attachment.detach();
  }
}

export class VmProcesses {
  constructor(private readonly access: ChannelAccess) {}

  /** Starts `command` in the background and returns at once with its handle. */
  async start(command: string, options: ProcessStartOptions = {}): Promise<ProcessHandle> {
    validateCommand(command);
    if (options.env) validateEnv(options.env);
    if (options.shell !== undefined && options.shell !== "login" && options.shell !== "raw") {
      throw new ValidationError('shell must be "login" or "raw".');
    }
    if (options.cwd !== undefined && (!options.cwd.startsWith("/") || options.cwd.includes("\0"))) {
      throw new ValidationError("cwd must be an absolute guest path.");
    }
    const ch = await this.agent("start background processes");
    return this.access.explain(() =>
      bounded(options, "starting a background process", async (d) => {
        const pid = await spawnProcess(
          ch,
          { command, shell: options.shell, env: options.env, cwd: options.cwd, stdin: options.stdin },
          d,
        );
        const att = await attachProcess(
          ch,
          pid,
          {
            replay: "missed",
            onStdout: options.onStdout,
            onStderr: options.onStderr,
            maxOutputBytes: options.maxOutputBytes ?? DEFAULT_MAX_OUTPUT,
            encoding: "utf8",
          },
          d,
        );
        return new ProcessHandle(pid, ch, att);
      }),
    );
  }

  /** Every process the agent tracks, oldest first, finished ones included until evicted. */
  async list(options: CallOptions = {}): Promise<ProcessInfo[]> {
    const ch = await this.agent("list background processes");
    return this.access.explain(() => bounded(options, "listing processes", (d) => listProcesses(ch, d)));
  }

  /** Re-attaches to a process started by any SmolVM object in any host process. */
  async connect(pid: number, options: ProcessConnectOptions = {}): Promise<ProcessHandle> {
    if (!Number.isInteger(pid) || pid < 1 || pid > 0xffffffff)
      throw new ValidationError("pid must be a positive integer.");
    const replay = options.replay ?? "missed";
    if (!["missed", "all", "none"].includes(replay))
      throw new ValidationError('replay must be "missed", "all" or "none".');
    const ch = await this.agent("attach to background processes");
    return this.access.explain(() =>
      bounded(options, `attaching to process ${pid}`, async (d) => {
        // The attach stream reports a missing pid only after it opened: check the table first.
        if (!(await listProcesses(ch, d)).some((p) => p.pid === pid)) {
          throw new SmolVMError(
            `no background process with pid ${pid} in VM ${this.access.name}: see vm.processes.list() (finished ones are kept until newer ones evict them).`,
            { code: "PROCESS_NOT_FOUND", details: { pid } },
          );
        }
        const att = await attachProcess(
          ch,
          pid,
          {
            replay,
            onStdout: options.onStdout,
            onStderr: options.onStderr,
            maxOutputBytes: options.maxOutputBytes ?? DEFAULT_MAX_OUTPUT,
            encoding: "utf8",
          },
          d,
        );
        return new ProcessHandle(pid, ch, att);
      }),
    );
  }

  private async agent(what: string): Promise<AgentChannel> {
    const ch = await this.access.channel();
    if (ch instanceof AgentChannel) return ch;
    throw new CommandExecutionUnavailableError(
      `VM ${this.access.name} is reached over SSH, which cannot ${what}.`,
      'Use an image with the guest agent (the default "tiny" has it) and commChannel "agent" or "auto"; over SSH, run commands with vm.run().',
    );
  }
}

async function bounded<T>(options: CallOptions, what: string, fn: (d: Deadline) => Promise<T>): Promise<T> {
  validateTimeout("timeoutMs", options.timeoutMs);
  const d = new Deadline(options.timeoutMs ?? DEFAULT_CALL_MS, options.signal, what);
  try {
    return await fn(d);
  } finally {
    d.dispose();
  }
}
