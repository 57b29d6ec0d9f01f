/**
 * The guest agent's requests beyond CommChannel (agent/PROTOCOL.md "File operations",
 * "Processes", PTY execs): their encoding, strict decoding of the replies, and one function per
 * request over AgentChannel.openRaw. The vm/ modules (files.ts, processes.ts, pty.ts) build the
 * public API on these. Each request first checks the agent's capabilities, so an older agent
 * gets a typed CommandExecutionUnavailableError instead of a dropped session.
 */
import { type CommandResult, OutputCollector } from "../command.js";
import type { Deadline } from "../common/deadline.js";
import {
  CommandExecutionUnavailableError,
  ConnectionLostError,
  ProtocolError,
  SmolVMError,
} from "../errors.js";
import {
  type AgentChannel,
  agentError,
  Notifier,
  type RawStream,
  type StreamHandler,
} from "./agent-channel.js";
import {
  type AgentInfo,
  type AgentMessage,
  decodeFields,
  encodeExec,
  encodeFields,
  Field,
  type FieldValue,
  FrameType,
  u16,
  u32,
} from "./agent-protocol.js";

export type FileType = "file" | "dir" | "symlink" | "other";

export interface FileEntry {
  /** Last path component. */
  name: string;
  /** Absolute guest path. */
  path: string;
  type: FileType;
  size: number;
  /** Permission bits (0..0o7777). */
  mode: number;
  mtimeMs: number;
  /** Symlinks only: what the link points to (never followed). */
  target?: string;
}

export type WatchEventType = "create" | "modify" | "delete" | "rename";
export interface WatchEvent {
  type: WatchEventType;
  path: string;
}

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

const FILE_TYPES: FileType[] = ["file", "dir", "symlink", "other"];
const EVENT_TYPES: Array<WatchEventType | undefined> = [undefined, "create", "modify", "delete", "rename"];
const FSOP = { mkdir: 1, remove: 2, rename: 3 } as const;
export const Replay = { missed: 0, all: 1, none: 2 } as const;
/** Bytes per PINPUT request (under the frame limit with room for the fields). */
const STDIN_CHUNK = 60_000;
const ERRNO = { ENOENT: 2, EEXIST: 17, ENOTDIR: 20, EISDIR: 21, ENOTEMPTY: 39, EACCES: 13 } as const;

/** Throws the typed error an older agent deserves, before anything is sent. */
export function requireCapability(info: AgentInfo, cap: string, what: string): void {
  if (info.capabilities.includes(cap)) return;
  throw new CommandExecutionUnavailableError(
    `the guest agent (version ${info.version}) does not support ${what} (capability "${cap}" missing).`,
    "Rebuild the image so its agent is current (smolvm image build --force), then recreate the VM.",
    { code: "AGENT_UNSUPPORTED", details: { capability: cap, agentVersion: info.version } },
  );
}

/** File errors carry a code callers can branch on, whatever the transport. */
export function fileErrorCode(errno: number): string {
  switch (errno) {
    case ERRNO.ENOENT:
      return "FILE_NOT_FOUND";
    case ERRNO.EEXIST:
      return "FILE_EXISTS";
    case ERRNO.ENOTDIR:
      return "NOT_A_DIRECTORY";
    case ERRNO.EISDIR:
      return "IS_A_DIRECTORY";
    case ERRNO.ENOTEMPTY:
      return "DIRECTORY_NOT_EMPTY";
    case ERRNO.EACCES:
      return "PERMISSION_DENIED";
    default:
      return "FILE_TRANSFER";
  }
}

function fileError(m: Extract<AgentMessage, { type: "error" }>, what: string, path: string): SmolVMError {
  if (m.code === "NOT_FOUND" || m.code === "IO") {
    return new SmolVMError(`${what} failed in the guest: ${m.message.slice(0, 300)}.`, {
      code: fileErrorCode(m.errno),
      details: { agentCode: m.code, errno: m.errno, path },
    });
  }
  return agentError(m, what, path);
}

// ---------------------------------------------------------------- decoding

function u8(v: Buffer, what: string): number {
  if (v.length !== 1) throw new ProtocolError(`agent ${what} field has the wrong size.`);
  return v[0]!;
}
function u32v(v: Buffer, what: string): number {
  if (v.length !== 4) throw new ProtocolError(`agent ${what} field has the wrong size.`);
  return v.readUInt32BE(0);
}
function u64v(v: Buffer, what: string): number {
  if (v.length !== 8) throw new ProtocolError(`agent ${what} field has the wrong size.`);
  const n = v.readBigUInt64BE(0);
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError(`agent ${what} is out of range.`);
  return Number(n);
}

/** One STAT reply or LIST record: the entry's fields (PATH given separately for STAT). */
export function decodeEntry(payload: Buffer, path?: string): FileEntry {
  let type: FileType | undefined;
  let mode: number | undefined;
  let size: number | undefined;
  let mtimeMs: number | undefined;
  let target: string | undefined;
  let p = path;
  for (const [tag, v] of decodeFields(payload)) {
    if (tag === Field.PATH) p = v.toString("utf8");
    else if (tag === Field.FTYPE) {
      type = FILE_TYPES[u8(v, "type")];
      if (!type) throw new ProtocolError("agent sent an unknown file type.");
    } else if (tag === Field.MODE) mode = u32v(v, "mode") & 0o7777;
    else if (tag === Field.SIZE) size = u64v(v, "size");
    else if (tag === Field.MTIME) mtimeMs = u64v(v, "mtime");
    else if (tag === Field.TARGET) target = v.toString("utf8");
    else if (!(tag & 0x80)) throw new ProtocolError(`agent file entry has unknown field ${tag}.`);
  }
  if (
    p === undefined ||
    type === undefined ||
    mode === undefined ||
    size === undefined ||
    mtimeMs === undefined
  ) {
    throw new ProtocolError("agent file entry lacks a path, type, mode, size or mtime.");
  }
  const name = p === "/" ? "/" : p.slice(p.lastIndexOf("/") + 1);
  return { name, path: p, type, size, mode, mtimeMs, ...(target !== undefined ? { target } : {}) };
}

export function decodeProcesses(payload: Buffer): ProcessInfo[] {
  const out: ProcessInfo[] = [];
  let cur: ProcessInfo | undefined;
  for (const [tag, v] of decodeFields(payload)) {
    if (tag === Field.PID) {
      cur = {
        pid: u32v(v, "pid"),
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
    else if (tag === Field.RUNNING) cur.running = u8(v, "running") === 1;
    else if (tag === Field.STARTED) cur.startedAt = new Date(u64v(v, "start time"));
    else if (tag === Field.EXIT_CODE) cur.exitCode = u32v(v, "exit code");
    else if (tag === Field.SIGNAME) cur.signal = v.toString("latin1");
    else if (!(tag & 0x80)) throw new ProtocolError(`agent process list has unknown field ${tag}.`);
  }
  return out;
}

// ---------------------------------------------------------------- one-shot requests

/** What a request's handlers may do: settle it, and reach its stream (for credit). */
interface RequestControl<T> {
  resolve(value: T): void;
  reject(err: unknown): void;
  raw(): RawStream | undefined;
}

/**
 * One request on its own stream: opens it, lets the handlers settle it, races the deadline, and
 * sends CANCEL when the caller gave up before the agent answered. Every bounded request here
 * goes through it.
 */
function request<T>(
  ch: AgentChannel,
  type: number,
  payload: (info: AgentInfo) => Buffer,
  deadline: Deadline,
  h: {
    kind: StreamHandler["kind"];
    onData?: (data: Buffer, ctl: RequestControl<T>) => void;
    onEnd: (m: Parameters<StreamHandler["onEnd"]>[0], ctl: RequestControl<T>) => void;
  },
): Promise<T> {
  let raw: RawStream | undefined;
  let finished = false;
  const result = new Promise<T>((resolve, reject) => {
    const ctl: RequestControl<T> = {
      resolve: (v) => {
        finished = true;
        resolve(v);
      },
      reject: (e) => {
        finished = true;
        reject(e);
      },
      raw: () => raw,
    };
    ch.openRaw(
      type,
      payload,
      {
        kind: h.kind,
        ...(h.onData ? { onData: (_fd: number, data: Buffer) => h.onData!(data, ctl) } : {}),
        onEnd: (m) => h.onEnd(m, ctl),
        onFail: (err) => ctl.reject(err),
      },
      deadline,
    ).then((r) => {
      raw = r;
    }, reject);
  });
  result.catch(() => {});
  return deadline.race(result).catch((err) => {
    if (!finished) raw?.control(FrameType.CANCEL);
    throw err;
  });
}

function simple(
  ch: AgentChannel,
  type: number,
  payload: (info: AgentInfo) => Buffer,
  deadline: Deadline,
  onError: (m: Extract<AgentMessage, { type: "error" }>) => Error,
): Promise<Buffer> {
  return request<Buffer>(ch, type, payload, deadline, {
    kind: "simple",
    onEnd: (m, ctl) => {
      if (m.type === "ok") ctl.resolve(m.payload);
      else if (m.type === "error") ctl.reject(onError(m));
      else ctl.reject(new ProtocolError("a file or process request ended with EXIT."));
    },
  });
}

export async function statPath(ch: AgentChannel, path: string, deadline: Deadline): Promise<FileEntry> {
  const p = await simple(
    ch,
    FrameType.STAT,
    (info) => {
      requireCapability(info, "fs", "file operations");
      return encodeFields([[Field.PATH, path]]);
    },
    deadline,
    (m) => fileError(m, `stat of ${path}`, path),
  );
  return decodeEntry(p, path);
}

export async function fsOp(
  ch: AgentChannel,
  op: keyof typeof FSOP,
  path: string,
  options: { to?: string; recursive?: boolean },
  deadline: Deadline,
): Promise<void> {
  const fields: Array<[number, FieldValue]> = [
    [Field.OP, Buffer.from([FSOP[op]])],
    [Field.PATH, path],
  ];
  if (options.to !== undefined) fields.push([Field.TO, options.to]);
  if (options.recursive) fields.push([Field.RECURSIVE, Buffer.from([1])]);
  const p = await simple(
    ch,
    FrameType.FSOP,
    (info) => {
      requireCapability(info, "fs", "file operations");
      return encodeFields(fields);
    },
    deadline,
    (m) => fileError(m, `${op} of ${path}`, path),
  );
  if (p.length) throw new ProtocolError("agent FSOP reply has a payload.");
}

/** LIST: records (u32 length + entry fields) arrive as DATA, then OK with the count. */
export function listDir(
  ch: AgentChannel,
  path: string,
  depth: number,
  deadline: Deadline,
): Promise<FileEntry[]> {
  const entries: FileEntry[] = [];
  let pending: Buffer = Buffer.alloc(0);
  return request<FileEntry[]>(
    ch,
    FrameType.LIST,
    (info) => {
      requireCapability(info, "fs", "file operations");
      return encodeFields([
        [Field.PATH, path],
        [Field.DEPTH, Buffer.from([depth])],
      ]);
    },
    deadline,
    {
      kind: "get",
      onData: (data, ctl) => {
        try {
          pending = pending.length ? Buffer.concat([pending, data]) : data;
          let off = 0;
          while (pending.length - off >= 4) {
            const len = pending.readUInt32BE(off);
            if (len > 16_384) throw new ProtocolError("agent list record is too long.");
            if (pending.length - off - 4 < len) break;
            entries.push(decodeEntry(pending.subarray(off + 4, off + 4 + len)));
            off += 4 + len;
          }
          pending = Buffer.from(pending.subarray(off));
          ctl.raw()?.grant(data.length);
        } catch (err) {
          ctl.raw()?.control(FrameType.CANCEL);
          ctl.reject(err);
        }
      },
      onEnd: (m, ctl) => {
        if (m.type === "error") return ctl.reject(fileError(m, `list of ${path}`, path));
        if (m.type !== "ok" || m.payload.length !== 4)
          return ctl.reject(new ProtocolError("agent LIST reply is malformed."));
        if (pending.length || m.payload.readUInt32BE(0) !== entries.length) {
          return ctl.reject(
            new ProtocolError("agent LIST sent a different number of entries than it counted."),
          );
        }
        ctl.resolve(entries);
      },
    },
  );
}

// ---------------------------------------------------------------- watch

export interface AgentWatch {
  close(): Promise<void>;
  /** Settles when the watch ends: resolves after close(), rejects with a typed error otherwise. */
  readonly ended: Promise<void>;
}

/** WATCH: resolves once the agent confirmed the inotify watch is in place. */
export function watchDir(
  ch: AgentChannel,
  path: string,
  recursive: boolean,
  onEvent: (ev: WatchEvent) => void,
  deadline: Deadline,
): Promise<AgentWatch> {
  let raw: RawStream | undefined;
  let closing = false;
  let finished = false;
  let ready!: () => void;
  let endOk!: () => void;
  let endErr!: (e: Error) => void;
  const readyP = new Promise<void>((r) => {
    ready = r;
  });
  const ended = new Promise<void>((resolve, reject) => {
    endOk = resolve;
    endErr = reject;
  });
  ended.catch(() => {});
  const opened = ch.openRaw(
    FrameType.WATCH,
    (info) => {
      requireCapability(info, "watch", "file watches");
      const f: Array<[number, FieldValue]> = [[Field.PATH, path]];
      if (recursive) f.push([Field.RECURSIVE, Buffer.from([1])]);
      return encodeFields(f);
    },
    {
      kind: "get",
      onData: (_fd, data) => {
        let off = 0;
        while (off + 3 <= data.length) {
          const t = data[off]!;
          const len = data.readUInt16BE(off + 1);
          if (off + 3 + len > data.length) throw new ProtocolError("agent watch record overruns its frame.");
          const p = data.subarray(off + 3, off + 3 + len).toString("utf8");
          off += 3 + len;
          if (t === 0) {
            ready();
            continue;
          }
          const type = EVENT_TYPES[t];
          if (!type) throw new ProtocolError(`agent sent unknown watch event type ${t}.`);
          if (!closing) {
            try {
              onEvent({ type, path: p });
            } catch {
              // a throwing callback must not break the channel
            }
          }
        }
        if (off !== data.length) throw new ProtocolError("agent watch record is truncated.");
        raw?.grant(data.length);
      },
      onEnd: (m) => {
        finished = true;
        if (closing || (m.type === "error" && m.code === "CANCELLED")) return endOk();
        const err =
          m.type === "error"
            ? fileError(m, `watch of ${path}`, path)
            : new ProtocolError("agent ended a watch.");
        endErr(err);
      },
      onFail: (err) => {
        finished = true;
        if (closing) return endOk();
        endErr(
          err instanceof ConnectionLostError
            ? new ConnectionLostError(
                `the watch of ${path} ended because the agent connection was lost: ${err.message} Watch again once the VM answers.`,
                { code: err.code, cause: err },
              )
            : err,
        );
      },
    },
    deadline,
  );
  const watch: AgentWatch = {
    ended,
    close: async () => {
      if (closing) return ended.catch(() => {});
      closing = true;
      if (!finished) raw?.control(FrameType.CANCEL);
      let t: NodeJS.Timeout | undefined;
      await Promise.race([ended.catch(() => {}), new Promise<void>((r) => (t = setTimeout(r, 5_000)))]);
      clearTimeout(t);
    },
  };
  return deadline
    .race(
      opened.then(async (r) => {
        raw = r;
        await Promise.race([readyP, ended]);
        return watch;
      }),
    )
    .catch(async (err) => {
      await watch.close();
      throw err;
    });
}

// ---------------------------------------------------------------- processes

export interface SpawnRequest {
  command: string;
  shell?: "login" | "raw";
  env?: Record<string, string>;
  cwd?: string;
  stdin?: boolean;
}

export async function spawnProcess(ch: AgentChannel, req: SpawnRequest, deadline: Deadline): Promise<number> {
  const p = await simple(
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
  return u32v(p, "pid");
}

export async function listProcesses(ch: AgentChannel, deadline: Deadline): Promise<ProcessInfo[]> {
  const p = await simple(
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

function noProcess(m: Extract<AgentMessage, { type: "error" }>, pid: number, what: string): Error {
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

export async function signalProcess(ch: AgentChannel, pid: number, signal: SignalName, deadline: Deadline) {
  await simple(
    ch,
    FrameType.PSIGNAL,
    () =>
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
  ch: AgentChannel,
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
    const p = await simple(
      ch,
      FrameType.PINPUT,
      () => encodeFields(fields),
      deadline,
      (m) => noProcess(m, pid, `writing to the stdin of process ${pid}`),
    );
    const accepted = u32v(p, "accepted bytes");
    if (accepted > chunk.length) throw new ProtocolError("agent accepted more stdin than it was sent.");
    off += accepted;
    if (accepted < chunk.length) await new Promise((r) => setTimeout(r, 20));
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
  ch: AgentChannel,
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
  let raw: RawStream | undefined;
  let finished = false;
  let rejectEarly: ((e: Error) => void) | undefined;
  let openP!: Promise<RawStream>;
  const result = new Promise<CommandResult<string> | CommandResult<Buffer>>((resolve, reject) => {
    rejectEarly = reject;
    const handler = {
      kind: "exec" as const,
      onData: (fd: number, data: Buffer) => {
        try {
          collector.push(fd === 1 ? "stdout" : "stderr", data);
        } catch {
          // a throwing callback must not stop the stream
        }
        raw?.grant(data.length);
      },
      onEnd: (m: Extract<AgentMessage, { type: "exit" | "ok" | "error" }>) => {
        finished = true;
        if (m.type === "exit")
          resolve(collector.result(m.exitCode, m.signal, performance.now() - t0, options.encoding));
        else if (m.type === "error") reject(noProcess(m, pid, `attaching to process ${pid}`));
        else reject(new ProtocolError("agent ended an ATTACH with OK."));
      },
      onFail: (err: Error) => {
        finished = true;
        reject(err);
      },
    };
    openP = ch.openRaw(
      FrameType.ATTACH,
      (info) => {
        requireCapability(info, "proc", "background processes");
        return encodeFields([
          [Field.PID, u32(pid)],
          [Field.REPLAY, Buffer.from([Replay[options.replay]])],
        ]);
      },
      handler,
      deadline,
    );
  });
  result.catch(() => {});
  try {
    raw = await openP;
  } catch (err) {
    rejectEarly?.(err as Error);
    throw err;
  }
  return {
    result,
    detach: () => {
      if (!finished) raw?.control(FrameType.CANCEL);
    },
  };
}

// ---------------------------------------------------------------- terminals

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

/** An EXEC on a new pseudo-terminal, run by the user's login shell, with no deadline of its own. */
export async function openPty(
  ch: AgentChannel,
  req: { command?: string; cwd?: string; env?: Record<string, string>; rows: number; cols: number },
  onData: (d: Buffer) => void,
  deadline: Deadline,
): Promise<AgentPty> {
  const credit = new Notifier();
  const closed = new AbortController();
  let raw: RawStream | undefined;
  let resolveExit!: (n: number) => void;
  let rejectExit!: (e: Error) => void;
  const exit = new Promise<number>((res, rej) => {
    resolveExit = res;
    rejectExit = rej;
  });
  exit.catch(() => {});
  raw = await ch.openRaw(
    FrameType.EXEC,
    (info) => {
      requireCapability(info, "shell", "terminals");
      return encodeExec({
        argv: [req.command ?? 'exec "$SHELL" -l'],
        shell: "login",
        env: { TERM: "xterm-256color", ...req.env },
        cwd: req.cwd,
        pty: { rows: req.rows, cols: req.cols },
      });
    },
    {
      kind: "exec",
      onData: (_fd, data) => {
        try {
          onData(data);
        } catch {
          // a throwing callback must not stop the terminal
        }
        raw?.grant(data.length);
      },
      onCredit: () => credit.notify(),
      onEnd: (m) => {
        closed.abort();
        credit.notify();
        if (m.type === "exit") resolveExit(m.exitCode ?? 128 + (SIGNUM[m.signal ?? ""] ?? 127));
        else if (m.type === "error") rejectExit(agentError(m, "terminal"));
        else rejectExit(new ProtocolError("agent ended a terminal with OK."));
      },
      onFail: (err) => {
        closed.abort();
        credit.notify();
        rejectExit(err);
      },
    },
    deadline,
  );
  const stream = raw;
  let chain: Promise<unknown> = Promise.resolve();
  return {
    exit,
    write: (data) => {
      const next = chain.then(() => stream.send(data, () => credit.wait(closed.signal)));
      chain = next.catch(() => {});
      return next.then(() => {});
    },
    resize: (rows, cols) => stream.control(FrameType.RESIZE, Buffer.concat([u16(rows), u16(cols)])),
    signal: (name) => stream.control(FrameType.SIGNAL, Buffer.from(name)),
  };
}

/** What a VM restored from a snapshot changes before its first user command (agent/identity.c). */
export interface IdentityRequest {
  /** The agent secret the next session must prove (32 bytes). */
  secret?: Buffer;
  /** Host entropy credited to the guest's RNG, which then reseeds at once (16-512 bytes). */
  entropy?: Buffer;
  /** The wall clock to set, in ns since the epoch. */
  timeNs?: bigint;
  hostname?: string;
  /** Files written atomically (temp + rename, parents made), before anything else changes. */
  files?: Array<{ path: string; mode: number; data: string | Buffer }>;
  /** A shell command started in the background once the rest is applied (not waited for). */
  run?: string;
}

export async function setIdentity(ch: AgentChannel, req: IdentityRequest, deadline: Deadline): Promise<void> {
  await simple(
    ch,
    FrameType.IDENTITY,
    (info) => {
      requireCapability(info, "identity", "re-keying a restored VM");
      const f: Array<[number, FieldValue]> = [];
      if (req.secret) f.push([Field.SECRET, req.secret]);
      if (req.entropy) f.push([Field.ENTROPY, req.entropy]);
      if (req.timeNs !== undefined) {
        const t = Buffer.alloc(8);
        t.writeBigUInt64BE(req.timeNs);
        f.push([Field.TIME_NS, t]);
      }
      if (req.hostname) f.push([Field.HOSTNAME, req.hostname]);
      for (const file of req.files ?? []) {
        const path = Buffer.from(file.path);
        const head = Buffer.alloc(6);
        head.writeUInt32BE(file.mode & 0o7777, 0);
        head.writeUInt16BE(path.length, 4);
        f.push([Field.FILE, Buffer.concat([head, path, Buffer.from(file.data)])]);
      }
      if (req.run) f.push([Field.RUN, req.run]);
      return encodeFields(f);
    },
    deadline,
    (m) => agentError(m, "setting the identity of a restored VM"),
  );
}
