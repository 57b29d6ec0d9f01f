/**
 * Commands over the agent: EXEC requests built from a shell command or an argv, run to a
 * collected CommandResult (execCollect) or as a live AgentCommandStream whose output is granted
 * back only as the consumer pulls it. Both go through request() (agent-request.ts).
 */
import {
  type CommandResult,
  DEFAULT_RUN_TIMEOUT_MS,
  OutputCollector,
  type RunOptions,
  type ShellMode,
  validateRunOptions,
  type WrappedCommand,
} from "../command.js";
import { Deadline } from "../common/deadline.js";
import { ProtocolError, ValidationError } from "../errors.js";
import { agentError, deadlineError } from "./agent-errors.js";
import type { AgentInfo } from "./agent-messages.js";
import { type ExecRequest, encodeExec, FrameType, u16 } from "./agent-protocol.js";
import { bounded, type RequestStream, request, type SessionSource } from "./agent-request.js";
import type { CommandStream, StreamEvent } from "./types.js";

/** The agent enforces a command's timeout this long after the host's, as a backstop. */
const AGENT_TIMEOUT_SLACK_MS = 250;

export interface ExecArgvOptions extends Omit<RunOptions, "shell"> {
  /** Run on a pseudo-terminal of this size (stdout and stderr merge into stdout). */
  pty?: { rows: number; cols: number };
}

/** A running command with interactive stdin, signals and PTY resize. */
export interface AgentCommandStream extends CommandStream {
  write(data: string | Buffer | Uint8Array): Promise<void>;
  /** Closes stdin (EOF). */
  end(): Promise<void>;
  signal(name: "TERM" | "INT" | "KILL" | "HUP" | "QUIT" | "USR1" | "USR2" | "STOP" | "CONT" | "WINCH"): void;
  resize(rows: number, cols: number): void;
}

/** An EXEC request, or one that depends on what the connected agent can do. */
export type AgentExec = ExecRequest | ((info: AgentInfo) => ExecRequest);

function forAgent(req: AgentExec, info: AgentInfo): ExecRequest {
  return typeof req === "function" ? req(info) : req;
}

/**
 * A shell command. Agents with the `shell` capability start the user's shell themselves, the
 * way sshd does (one exec instead of `/bin/sh -c 'exec "$SHELL" -lc …'`, two).
 */
export function shellRequest(wrapped: WrappedCommand, shell: ShellMode | undefined): AgentExec {
  return (info) =>
    info.capabilities.includes("shell") && wrapped.script !== undefined
      ? { argv: [wrapped.script], shell: shell ?? "login" }
      : { argv: ["/bin/sh", "-c", wrapped.command] };
}

/** exec/streamExec input: a non-empty argv without NUL bytes, and valid run options. */
export function validateArgv(argv: string[], options: Omit<RunOptions, "shell">): void {
  if (
    !Array.isArray(argv) ||
    argv.length === 0 ||
    argv.some((a) => typeof a !== "string" || a.includes("\0"))
  ) {
    throw new ValidationError("argv must be a non-empty array of strings without NUL bytes.");
  }
  validateRunOptions(argv[0] || "-", { ...options, shell: undefined });
}

export function toBuffer(v: string | Buffer | Uint8Array | undefined): Buffer {
  if (v === undefined) return Buffer.alloc(0);
  return typeof v === "string" ? Buffer.from(v, "utf8") : Buffer.from(v.buffer, v.byteOffset, v.byteLength);
}

function execPayload(req: AgentExec, deadline: Deadline): (info: AgentInfo) => Buffer {
  return (info) =>
    encodeExec({ ...forAgent(req, info), timeoutMs: deadline.remainingMs + AGENT_TIMEOUT_SLACK_MS });
}

/** Runs one command to its CommandResult; on timeout the error's `partial` has what it printed. */
export async function execCollect(
  source: SessionSource,
  req: AgentExec,
  stdin: Buffer,
  options: RunOptions,
  what: string,
): Promise<CommandResult<string> | CommandResult<Buffer>> {
  const collector = new OutputCollector(options.maxOutputBytes, options.onStdout, options.onStderr);
  const encoding = options.encoding ?? "utf8";
  return bounded(options, `${what} over ${source.name}`, (deadline) =>
    request<CommandResult<string> | CommandResult<Buffer>>(
      source,
      {
        type: FrameType.EXEC,
        kind: "exec",
        payload: execPayload(req, deadline),
        onOpen: ({ stream }) => {
          void (async () => {
            if (stdin.length) await stream!.send(stdin);
            stream!.control(FrameType.EOF);
          })().catch(() => {});
        },
        onData: (fd, data, ctl) => {
          try {
            collector.push(fd === 1 ? "stdout" : "stderr", data);
          } catch (err) {
            // The caller's onStdout/onStderr threw: stop the command, the channel is fine.
            ctl.reject(err);
            ctl.stream!.cancel();
            return;
          }
          ctl.stream!.grant(data.length);
        },
        onEnd: (m, ctl) => {
          if (m.type === "error") return ctl.reject(agentError(m, what));
          if (m.type !== "exit") return ctl.reject(new ProtocolError("exec ended without EXIT."));
          const r = collector.result(m.exitCode, m.signal, deadline.elapsedMs, encoding);
          if (m.timedOut) ctl.reject(deadline.timeoutError(r));
          else ctl.resolve(r);
        },
        // Kill the whole process group now (request() cancels); the error carries the output so far.
        onDeadline: () => deadlineError(deadline, collector.result(null, null, deadline.elapsedMs, encoding)),
      },
      deadline,
    ),
  );
}

/**
 * The async-iterable form. Output is granted back to the agent only as the consumer pulls it,
 * so a slow consumer slows the command instead of growing memory. `initial` goes to stdin
 * first; with `closeStdin` EOF follows, otherwise stdin stays open for write()/end().
 */
export function openExecStream(
  source: SessionSource,
  req: AgentExec,
  initial: Buffer,
  closeStdin: boolean,
  options: { timeoutMs?: number; signal?: AbortSignal },
): AgentCommandStream {
  const deadline = new Deadline(
    options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS,
    options.signal,
    `streamed command over ${source.name}`,
  );
  const queue: Array<StreamEvent | { error: Error }> = [];
  let wake: (() => void) | undefined;
  let ended = false;
  let writeChain: Promise<unknown> = Promise.resolve();
  const push = (ev: StreamEvent | { error: Error }) => {
    queue.push(ev);
    wake?.();
  };
  const started = request<RequestStream>(
    source,
    {
      type: FrameType.EXEC,
      kind: "exec",
      payload: execPayload(req, deadline),
      onOpen: (ctl) => {
        const stream = ctl.stream!;
        if (initial.length) void send(stream, initial).catch(() => {});
        if (closeStdin) writeChain = writeChain.then(() => stream.control(FrameType.EOF));
        ctl.resolve(stream);
      },
      onData: (fd, data) => push({ stream: fd === 1 ? "stdout" : "stderr", data }),
      onEnd: (m) => {
        ended = true;
        if (m.type === "exit") {
          if (m.timedOut) push({ error: deadline.timeoutError() });
          else push({ stream: "exit", exitCode: m.exitCode, signal: m.signal });
        } else
          push({
            error: m.type === "error" ? agentError(m, "streamed command") : new ProtocolError("bad end"),
          });
      },
      onFail: (err) => {
        ended = true;
        push({ error: err });
      },
    },
    deadline,
  );
  const send = (stream: RequestStream, data: Buffer) => {
    writeChain = writeChain.then(() => stream.send(data));
    return writeChain;
  };
  started.catch((err) => {
    if (!deadline.expired) push({ error: err });
  });
  const onDeadline = () => {
    ended = true;
    void started.then((stream) => stream.cancel()).catch(() => {});
    push({ error: deadlineError(deadline) });
  };
  deadline.signal.addEventListener("abort", onDeadline, { once: true });

  const iterator: AsyncIterator<StreamEvent> = {
    next: async () => {
      for (;;) {
        const ev = queue.shift();
        if (ev) {
          if ("error" in ev) {
            deadline.dispose();
            queue.length = 0;
            throw ev.error;
          }
          if (ev.stream === "exit") {
            deadline.dispose();
            return { value: ev, done: false };
          }
          started.then((stream) => stream.grant(ev.data.length)).catch(() => {});
          return { value: ev, done: false };
        }
        if (ended) return { value: undefined, done: true };
        await new Promise<void>((r) => {
          wake = r;
        });
        wake = undefined;
      }
    },
    return: async () => {
      await cancel();
      return { value: undefined, done: true };
    },
  };
  const cancel = async () => {
    if (!ended) {
      const s = await started.catch(() => undefined);
      s?.cancel();
    }
    ended = true;
    deadline.dispose();
    queue.length = 0;
    wake?.();
  };
  return {
    [Symbol.asyncIterator]: () => iterator,
    cancel,
    write: async (data) => {
      const stream = await started;
      await deadline.race(send(stream, toBuffer(data)));
    },
    end: async () => {
      const stream = await started;
      writeChain = writeChain.then(() => stream.control(FrameType.EOF));
      await deadline.race(writeChain);
    },
    signal: (name) => {
      void started.then((stream) => stream.control(FrameType.SIGNAL, Buffer.from(name))).catch(() => {});
    },
    resize: (rows, cols) => {
      void started
        .then((stream) => stream.control(FrameType.RESIZE, Buffer.concat([u16(rows), u16(cols)])))
        .catch(() => {});
    },
  };
}
