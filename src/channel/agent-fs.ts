/**
 * File operations over the agent (agent/PROTOCOL.md "File operations"): STAT, LIST, FSOP
 * (mkdir/remove/rename) and inotify WATCH, with strict decoding of what the agent replies.
 * vm/files.ts builds `vm.files` on these. Each checks the agent's `fs`/`watch` capability first.
 */
import type { Deadline } from "../common/deadline.js";
import { ConnectionLostError, ProtocolError } from "../errors.js";
import { fileError, requireCapability } from "./agent-errors.js";
import {
  decodeFields,
  encodeFields,
  Field,
  type FieldValue,
  FrameType,
  fieldU8,
  fieldU32,
  fieldU64,
} from "./agent-protocol.js";
import { type Requester, simpleRequest } from "./agent-request.js";

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

const FILE_TYPES: FileType[] = ["file", "dir", "symlink", "other"];
const EVENT_TYPES: Array<WatchEventType | undefined> = [undefined, "create", "modify", "delete", "rename"];
const FSOP = { mkdir: 1, remove: 2, rename: 3 } as const;
/** close() of a watch waits at most this long for the agent to confirm the CANCEL. */
const WATCH_CLOSE_WAIT_MS = 5_000;

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
      type = FILE_TYPES[fieldU8(v, "type")];
      if (!type) throw new ProtocolError("agent sent an unknown file type.");
    } else if (tag === Field.MODE) mode = fieldU32(v, "mode") & 0o7777;
    else if (tag === Field.SIZE) size = fieldU64(v, "size");
    else if (tag === Field.MTIME) mtimeMs = fieldU64(v, "mtime");
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

function fsPayload(fields: Array<[number, FieldValue]>) {
  return (info: Parameters<typeof requireCapability>[0]) => {
    requireCapability(info, "fs", "file operations");
    return encodeFields(fields);
  };
}

export async function statPath(ch: Requester, path: string, deadline: Deadline): Promise<FileEntry> {
  const p = await simpleRequest(ch, FrameType.STAT, fsPayload([[Field.PATH, path]]), deadline, (m) =>
    fileError(m, `stat of ${path}`, path),
  );
  return decodeEntry(p, path);
}

export async function fsOp(
  ch: Requester,
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
  const p = await simpleRequest(ch, FrameType.FSOP, fsPayload(fields), deadline, (m) =>
    fileError(m, `${op} of ${path}`, path),
  );
  if (p.length) throw new ProtocolError("agent FSOP reply has a payload.");
}

/** LIST: records (u32 length + entry fields) arrive as DATA, then OK with the count. */
export function listDir(
  ch: Requester,
  path: string,
  depth: number,
  deadline: Deadline,
): Promise<FileEntry[]> {
  const entries: FileEntry[] = [];
  let pending: Buffer = Buffer.alloc(0);
  return ch.request<FileEntry[]>(
    {
      type: FrameType.LIST,
      kind: "get",
      payload: fsPayload([
        [Field.PATH, path],
        [Field.DEPTH, Buffer.from([depth])],
      ]),
      onData: (_fd, data, ctl) => {
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
          ctl.stream?.grant(data.length);
        } catch (err) {
          ctl.stream?.cancel(true);
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
    deadline,
  );
}

export interface AgentWatch {
  close(): Promise<void>;
  /** Settles when the watch ends: resolves after close(), rejects with a typed error otherwise. */
  readonly ended: Promise<void>;
}

/**
 * WATCH: resolves once the agent confirmed the inotify watch is in place; events then flow to
 * `onEvent` until close() or the agent ends the watch (`ended` says how).
 */
export function watchDir(
  ch: Requester,
  path: string,
  recursive: boolean,
  onEvent: (ev: WatchEvent) => void,
  deadline: Deadline,
): Promise<AgentWatch> {
  let closing = false;
  let cancel: (() => void) | undefined;
  let endOk!: () => void;
  let endErr!: (e: Error) => void;
  const ended = new Promise<void>((resolve, reject) => {
    endOk = resolve;
    endErr = reject;
  });
  ended.catch(() => {});
  const watch: AgentWatch = {
    ended,
    close: async () => {
      if (closing) return ended.catch(() => {});
      closing = true;
      cancel?.();
      let t: NodeJS.Timeout | undefined;
      await Promise.race([
        ended.catch(() => {}),
        new Promise<void>((r) => (t = setTimeout(r, WATCH_CLOSE_WAIT_MS))),
      ]);
      clearTimeout(t);
    },
  };
  return ch
    .request<AgentWatch>(
      {
        type: FrameType.WATCH,
        kind: "get",
        reportEndAfterCancel: true,
        payload: (info) => {
          requireCapability(info, "watch", "file watches");
          const f: Array<[number, FieldValue]> = [[Field.PATH, path]];
          if (recursive) f.push([Field.RECURSIVE, Buffer.from([1])]);
          return encodeFields(f);
        },
        onOpen: (ctl) => {
          cancel = () => {
            if (!ctl.ended) ctl.stream?.cancel(true);
          };
        },
        onData: (_fd, data, ctl) => {
          let off = 0;
          while (off + 3 <= data.length) {
            const t = data[off]!;
            const len = data.readUInt16BE(off + 1);
            if (off + 3 + len > data.length)
              throw new ProtocolError("agent watch record overruns its frame.");
            const p = data.subarray(off + 3, off + 3 + len).toString("utf8");
            off += 3 + len;
            if (t === 0) {
              ctl.resolve(watch);
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
          ctl.stream?.grant(data.length);
        },
        onEnd: (m, ctl) => {
          if (closing || (m.type === "error" && m.code === "CANCELLED")) endOk();
          else
            endErr(
              m.type === "error"
                ? fileError(m, `watch of ${path}`, path)
                : new ProtocolError("agent ended a watch."),
            );
          // An end before the watch was in place fails the call with the same error.
          ended.then(
            () => ctl.resolve(watch),
            (e) => ctl.reject(e),
          );
        },
        onFail: (err, ctl) => {
          if (closing) endOk();
          else
            endErr(
              err instanceof ConnectionLostError
                ? new ConnectionLostError(
                    `the watch of ${path} ended because the agent connection was lost: ${err.message} Watch again once the VM answers.`,
                    { code: err.code, cause: err },
                  )
                : err,
            );
          ended.then(
            () => ctl.resolve(watch),
            (e) => ctl.reject(e),
          );
        },
      },
      deadline,
    )
    .catch(async (err) => {
      await watch.close();
      throw err;
    });
}
