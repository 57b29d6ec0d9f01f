/**
 * Background processes over the agent (agent/PROTOCOL.md "Processes"): SPAWN, PROCS, PSIGNAL,
 * PINPUT and ATTACH, with strict decoding of the process list. vm/processes.ts builds
 * `vm.processes` on these. Each checks the agent's `proc` capability first.
 */
import { type CommandResult, OutputCollector } from "../command.js";
import type { Deadline } from "../common/deadline.js";
import { ProtocolError, SmolVMError } from "../errors.js";
import { type AgentErrorMessage, agentError, requireCapability } from "./agent-errors.js";
import {
  decodeFields,
  encodeExec,
  encodeFields,
  Field,
  type FieldValue,
  FrameType,
  fieldU8,
  fieldU32,
  fieldU64,
  u32,
} from "./agent-protocol.js";
import { type Requester, simpleRequest } from "./agent-request.js";

export interface ProcessInfo {
  pid: number;
  command: string;
  running: boolean;
  /** Exit code once finished (null while running, or when a signal ended it). */
  exitCode: number | null;
  /** Signal name without "SIG" when a signal ended it. */
  signal: string | null;
  startedAt: Date;
}

export type SignalName =
  | "TERM"
  | "INT"
  | "KILL"
  | "HUP"
  | "QUIT"
  | "USR1"
  | "USR2"
  | "STOP"
  | "CONT"
  | "WINCH";
export const SIGNAL_NAMES: readonly SignalName[] = [
  "TERM",
  "INT",
  "KILL",
  "HUP",
  "QUIT",
  "USR1",
  "USR2",
  "STOP",
  "CONT",
  "WINCH",
];

export const Replay = { missed: 0, all: 1, none: 2 } as const;
/** Bytes per PINPUT request (under the frame limit with room for the fields). */
const STDIN_CHUNK = 60_000;
/** A full guest stdin buffer is retried after this long. */
const STDIN_RETRY_MS = 20;

export function decodeProcesses(payload: Buffer): ProcessInfo[] {
  const out: ProcessInfo[] = [];
  let cur: ProcessInfo | undefined;
  for (const [tag, v] of decodeFields(payload)) {
    if (tag === Field.PID) {
      cur = {
        pid: fieldU32(v, "pid"),
        command: "",
        running: false,
        exitCode: null,
        signal: null,
        startedAt: new Date(0),
      };
      out.push(cur);
      continue;
    }
    if (!cur) throw new ProtocolError("agent process list does not start with a PID.");
    if (tag === Field.COMMAND) cur.command = v.toString("utf8");
    else if (tag === Field.RUNNING) cur.running = fieldU8(v, "running") === 1;
    else if (tag === Field.STARTED) cur.startedAt = new Date(fieldU64(v, "start time"));
    else if (tag === Field.EXIT_CODE) cur.exitCode = fieldU32(v, "exit code");
    else if (tag === Field.SIGNAME) cur.signal = v.toString("latin1");
    else if (!(tag & 0x80)) throw new ProtocolError(`agent process list has unknown field ${tag}.`);
  }
  return out;
}

function noProcess(m: AgentErrorMessage, pid: number, what: string): Error {
  if (m.code === "NOT_FOUND") {
    return new SmolVMError(
      `${what}: no background process with pid ${pid} in the guest (see vm.processes.list()).`,
      {
        code: "PROCESS_NOT_FOUND",
        details: { pid },
      },
    );
  }
  if (m.code === "BAD_REQUEST" && m.errno === 32) {
    return new SmolVMError(`${what}: ${m.message.slice(0, 200)}.`, {
      code: "STDIN_CLOSED",
      details: { pid },
    });
  }
  return agentError(m, what);
}

export interface SpawnRequest {
  command: string;
  shell?: "login" | "raw";
  env?: Record<string, string>;
  cwd?: string;
  stdin?: boolean;
}

export async function spawnProcess(ch: Requester, req: SpawnRequest, deadline: Deadline): Promise<number> {
  const p = await simpleRequest(
    ch,
    FrameType.SPAWN,
    (info) => {
      requireCapability(info, "proc", "background processes");
      const body = encodeExec({
        argv: [req.command],
        shell: req.shell ?? "login",
        env: req.env,
        cwd: req.cwd,
      });
      return Buffer.concat([body, encodeFields([[Field.STDIN, Buffer.from([req.stdin ? 1 : 0])]])]);
    },
    deadline,
    (m) => agentError(m, "starting a background process"),
  );
  return fieldU32(p, "pid");
}

export async function listProcesses(ch: Requester, deadline: Deadline): Promise<ProcessInfo[]> {
  const p = await simpleRequest(
    ch,
    FrameType.PROCS,
    (info) => {
      requireCapability(info, "proc", "background processes");
      return Buffer.alloc(0);
    },
    deadline,
    (m) => agentError(m, "listing processes"),
  );
  return decodeProcesses(p);
}

export async function signalProcess(ch: Requester, pid: number, signal: SignalName, deadline: Deadline) {
  await simpleRequest(
    ch,
    FrameType.PSIGNAL,
    encodeFields([
      [Field.PID, u32(pid)],
      [Field.SIGNAME, signal],
    ]),
    deadline,
    (m) => noProcess(m, pid, `signalling process ${pid}`),
  );
}

/** Feeds stdin in chunks; a full guest buffer is retried shortly (bounded by the deadline). */
export async function processInput(
  ch: Requester,
  pid: number,
  data: Buffer,
  close: boolean,
  deadline: Deadline,
): Promise<void> {
  let off = 0;
  do {
    const chunk = data.subarray(off, off + STDIN_CHUNK);
    const last = off + chunk.length >= data.length;
    const fields: Array<[number, FieldValue]> = [[Field.PID, u32(pid)]];
    if (chunk.length) fields.push([Field.BYTES, chunk]);
    if (close && last) fields.push([Field.STDIN, Buffer.from([0])]);
    const p = await simpleRequest(ch, FrameType.PINPUT, encodeFields(fields), deadline, (m) =>
      noProcess(m, pid, `writing to the stdin of process ${pid}`),
    );
    const accepted = fieldU32(p, "accepted bytes");
    if (accepted > chunk.length) throw new ProtocolError("agent accepted more stdin than it was sent.");
    off += accepted;
    if (accepted < chunk.length) await new Promise((r) => setTimeout(r, STDIN_RETRY_MS));
    if (off >= data.length && !(close && accepted < chunk.length)) break;
  } while (!deadline.expired);
  deadline.throwIfExpired();
}

export interface Attachment {
  /** Settles with the process's result once it finished and its output was delivered. */
  readonly result: Promise<CommandResult<string> | CommandResult<Buffer>>;
  /** Stops receiving output; the process keeps running. */
  detach(): void;
}

/** ATTACH: replays per `replay`, then streams live until the process ends. */
export async function attachProcess(
  ch: Requester,
  pid: number,
  options: {
    replay: keyof typeof Replay;
    onStdout?: (d: Buffer) => void;
    onStderr?: (d: Buffer) => void;
    maxOutputBytes: number;
    encoding: "utf8" | "buffer";
  },
  deadline: Deadline,
): Promise<Attachment> {
  const collector = new OutputCollector(options.maxOutputBytes, options.onStdout, options.onStderr);
  const t0 = performance.now();
  let settle!: {
    resolve: (r: CommandResult<string> | CommandResult<Buffer>) => void;
    reject: (e: Error) => void;
  };
  const result = new Promise<CommandResult<string> | CommandResult<Buffer>>((resolve, reject) => {
    settle = { resolve, reject };
  });
  result.catch(() => {});
  try {
    return await ch.request<Attachment>(
      {
        type: FrameType.ATTACH,
        kind: "exec",
        reportEndAfterCancel: true,
        payload: (info) => {
          requireCapability(info, "proc", "background processes");
          return encodeFields([
            [Field.PID, u32(pid)],
            [Field.REPLAY, Buffer.from([Replay[options.replay]])],
          ]);
        },
        onOpen: (ctl) =>
          ctl.resolve({
            result,
            detach: () => {
              if (!ctl.ended) ctl.stream?.cancel(true);
            },
          }),
        onData: (fd, data, ctl) => {
          try {
            collector.push(fd === 1 ? "stdout" : "stderr", data);
          } catch {
            // a throwing callback must not stop the stream
          }
          ctl.stream?.grant(data.length);
        },
        onEnd: (m) => {
          if (m.type === "exit")
            settle.resolve(collector.result(m.exitCode, m.signal, performance.now() - t0, options.encoding));
          else if (m.type === "error") settle.reject(noProcess(m, pid, `attaching to process ${pid}`));
          else settle.reject(new ProtocolError("agent ended an ATTACH with OK."));
        },
        onFail: (err) => settle.reject(err),
      },
      deadline,
    );
  } catch (err) {
    settle.reject(err as Error);
    throw err;
  }
}
