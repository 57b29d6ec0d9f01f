/**
 * Terminals over the agent: an EXEC on a new pseudo-terminal, run by the user's login shell,
 * with no deadline of its own once open. vm/pty.ts builds `vm.pty` on it. Needs the agent's
 * `shell` capability.
 */
import type { Deadline } from "../common/deadline.js";
import { ProtocolError } from "../errors.js";
import { agentError, requireCapability } from "./agent-errors.js";
import type { SignalName } from "./agent-procs.js";
import { encodeExec, FrameType, u16 } from "./agent-protocol.js";
import type { Requester, RequestStream } from "./agent-request.js";

export interface AgentPty {
  write(data: Buffer): Promise<void>;
  resize(rows: number, cols: number): void;
  signal(name: SignalName): void;
  /** Exit code of the terminal's program (128 + n when a signal ended it). */
  readonly exit: Promise<number>;
}

const SIGNUM: Record<string, number> = {
  HUP: 1,
  INT: 2,
  QUIT: 3,
  KILL: 9,
  USR1: 10,
  USR2: 12,
  PIPE: 13,
  TERM: 15,
};

/** An EXEC on a new pseudo-terminal; `deadline` bounds only the opening. */
export async function openPty(
  ch: Requester,
  req: { command?: string; cwd?: string; env?: Record<string, string>; rows: number; cols: number },
  onData: (d: Buffer) => void,
  deadline: Deadline,
): Promise<AgentPty> {
  const closed = new AbortController();
  let resolveExit!: (n: number) => void;
  let rejectExit!: (e: Error) => void;
  const exit = new Promise<number>((res, rej) => {
    resolveExit = res;
    rejectExit = rej;
  });
  exit.catch(() => {});
  const stream = await ch.request<RequestStream>(
    {
      type: FrameType.EXEC,
      kind: "exec",
      payload: (info) => {
        requireCapability(info, "shell", "terminals");
        return encodeExec({
          argv: [req.command ?? 'exec "$SHELL" -l'],
          shell: "login",
          env: { TERM: "xterm-256color", ...req.env },
          cwd: req.cwd,
          pty: { rows: req.rows, cols: req.cols },
        });
      },
      onOpen: (ctl) => ctl.resolve(ctl.stream!),
      onData: (_fd, data, ctl) => {
        try {
          onData(data);
        } catch {
          // a throwing callback must not stop the terminal
        }
        ctl.stream?.grant(data.length);
      },
      onEnd: (m) => {
        closed.abort();
        if (m.type === "exit") resolveExit(m.exitCode ?? 128 + (SIGNUM[m.signal ?? ""] ?? 127));
        else if (m.type === "error") rejectExit(agentError(m, "terminal"));
        else rejectExit(new ProtocolError("agent ended a terminal with OK."));
      },
      onFail: (err) => {
        closed.abort();
        rejectExit(err);
      },
    },
    deadline,
  );
  let chain: Promise<unknown> = Promise.resolve();
  return {
    exit,
    write: (data) => {
      const next = chain.then(() => stream.send(data, closed.signal));
      chain = next.catch(() => {});
      return next.then(() => {});
    },
    resize: (rows, cols) => stream.control(FrameType.RESIZE, Buffer.concat([u16(rows), u16(cols)])),
    signal: (name) => stream.control(FrameType.SIGNAL, Buffer.from(name)),
  };
}
