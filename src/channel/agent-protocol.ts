/**
 * The guest agent wire protocol (agent/PROTOCOL.md, version 1): frame encoding, a streaming
 * decoder that accepts any chunking, request field encoding and strict decoding of what the
 * agent sends. Pure: no I/O. Every malformed input is a ProtocolError, never a crash, and the
 * decoder never holds more than one frame.
 */
import { createHmac, timingSafeEqual } from "node:crypto";
import { ProtocolError } from "../errors.js";

export const PROTOCOL_VERSION = 1;
export const MAGIC = 0x534d4147; // "SMAG"
export const HEADER_SIZE = 16;
export const MAX_PAYLOAD = 65_536;
export const INITIAL_WINDOW = 262_144;
export const NONCE_SIZE = 32;
export const MAC_SIZE = 32;
export const SECRET_SIZE = 32;
/** The host discards at most this much stale input before CHALLENGE when resyncing. */
export const MAX_RESYNC_BYTES = 1 << 20;

export const FrameType = {
  HELLO: 0x01,
  CHALLENGE: 0x02,
  AUTH: 0x03,
  AUTH_OK: 0x04,
  EXEC: 0x10,
  PUT: 0x11,
  GET: 0x12,
  WAIT_PORT: 0x13,
  PING: 0x14,
  INFO: 0x15,
  STAT: 0x16,
  LIST: 0x17,
  FSOP: 0x18,
  WATCH: 0x19,
  SPAWN: 0x1a,
  ATTACH: 0x1b,
  PROCS: 0x1c,
  PINPUT: 0x1d,
  PSIGNAL: 0x1e,
  IDENTITY: 0x1f,
  DATA: 0x20,
  EOF: 0x21,
  CREDIT: 0x22,
  SIGNAL: 0x23,
  RESIZE: 0x24,
  CANCEL: 0x25,
  EXIT: 0x30,
  OK: 0x31,
  ERROR: 0x32,
} as const;
export type FrameTypeName = keyof typeof FrameType;
const KNOWN_TYPES = new Set<number>(Object.values(FrameType));

export const Field = {
  ARG: 1,
  ENV: 2,
  CWD: 3,
  PTY: 4,
  TIMEOUT_MS: 5,
  SHELL: 6,
  PATH: 10,
  MODE: 11,
  MKDIRS: 12,
  ENVFILE: 13,
  PORT: 20,
  VERSION: 30,
  CAPS: 31,
  START_UPTIME: 32,
  MILESTONES: 33,
  PID: 34,
  STDIN: 7,
  TO: 14,
  RECURSIVE: 15,
  DEPTH: 16,
  OP: 17,
  REPLAY: 18,
  BYTES: 19,
  FTYPE: 40,
  SIZE: 41,
  MTIME: 42,
  TARGET: 43,
  RUNNING: 44,
  EXIT_CODE: 45,
  SIGNAME: 46,
  STARTED: 47,
  COMMAND: 48,
  SECRET: 50,
  ENTROPY: 51,
  TIME_NS: 52,
  HOSTNAME: 53,
  FILE: 54,
  RUN: 55,
} as const;

export const ErrorCode = {
  PROTOCOL: 1,
  AUTH_FAILED: 2,
  BAD_REQUEST: 3,
  INVALID_PATH: 4,
  NOT_FOUND: 5,
  IO: 6,
  SPAWN_FAILED: 7,
  TIMEOUT: 8,
  LIMIT: 9,
  CANCELLED: 10,
  UNSUPPORTED: 11,
  NOT_READY: 12,
} as const;
export type ErrorCodeName = keyof typeof ErrorCode;
const ERROR_NAMES = new Map<number, ErrorCodeName>(
  Object.entries(ErrorCode).map(([k, v]) => [v, k as ErrorCodeName]),
);

/** DATA flags: which fd the bytes belong to. */
export const Fd = { IN: 0, STDOUT: 1, STDERR: 2 } as const;

export interface Frame {
  type: number;
  flags: number;
  stream: number;
  payload: Buffer;
}

// ---------------------------------------------------------------- frames

export function encodeFrame(type: number, stream: number, payload: Buffer = EMPTY, flags = 0): Buffer {
  if (payload.length > MAX_PAYLOAD) {
    throw new ProtocolError(
      `frame payload of ${payload.length} bytes exceeds the ${MAX_PAYLOAD} byte limit.`,
    );
  }
  const buf = Buffer.allocUnsafe(HEADER_SIZE + payload.length);
  buf.writeUInt32BE(MAGIC, 0);
  buf.writeUInt8(PROTOCOL_VERSION, 4);
  buf.writeUInt8(type, 5);
  buf.writeUInt16BE(flags, 6);
  buf.writeUInt32BE(stream >>> 0, 8);
  buf.writeUInt32BE(payload.length, 12);
  payload.copy(buf, HEADER_SIZE);
  return buf;
}
const EMPTY = Buffer.alloc(0);

function checkHeader(
  buf: Buffer,
  off: number,
): { type: number; flags: number; stream: number; length: number } {
  const magic = buf.readUInt32BE(off);
  if (magic !== MAGIC) {
    throw new ProtocolError(`agent frame has a bad magic 0x${magic.toString(16)}: the stream is corrupt.`);
  }
  const version = buf[off + 4]!;
  if (version !== PROTOCOL_VERSION) {
    throw new ProtocolError(
      `agent speaks protocol version ${version}, this host speaks ${PROTOCOL_VERSION}: rebuild the image so agent and SDK match.`,
      { details: { version } },
    );
  }
  const type = buf[off + 5]!;
  if (!KNOWN_TYPES.has(type)) throw new ProtocolError(`agent frame has unknown type 0x${type.toString(16)}.`);
  const flags = buf.readUInt16BE(off + 6);
  if (flags > 2 || (flags !== 0 && type !== FrameType.DATA)) {
    throw new ProtocolError(`agent frame type 0x${type.toString(16)} has invalid flags ${flags}.`);
  }
  const stream = buf.readUInt32BE(off + 8);
  const length = buf.readUInt32BE(off + 12);
  if (length > MAX_PAYLOAD) {
    throw new ProtocolError(`agent frame announces ${length} payload bytes, over the ${MAX_PAYLOAD} limit.`);
  }
  return { type, flags, stream, length };
}

/**
 * Streaming decoder: push any chunks, get whole frames. Holds at most one partial frame. After
 * the first error it stays failed (the connection must be dropped). In resync mode it discards
 * input until a header of the awaited type, bounded by MAX_RESYNC_BYTES.
 */
export class FrameDecoder {
  /**
   * Input not yet decoded, as received: a frame that arrives in many small chunks is joined once,
   * when it is complete, so decoding costs linear time whatever the chunking.
   */
  private parts: Buffer[] = [];
  private partsLen = 0;
  /** Bytes needed before decoding can make progress (a header, or the frame the header announced). */
  private need = HEADER_SIZE;
  private failed: ProtocolError | undefined;
  private resyncType: number | undefined;
  private discarded = 0;

  /** Skips garbage until a frame of `type` on stream 0 starts (used before authentication). */
  resync(type: number): void {
    this.resyncType = type;
    this.discarded = 0;
    this.need = HEADER_SIZE;
  }

  /** Bytes currently held (a partial frame); never more than HEADER_SIZE + MAX_PAYLOAD - 1. */
  get buffered(): number {
    return this.partsLen;
  }

  push(chunk: Buffer): Frame[] {
    if (this.failed) throw this.failed;
    try {
      if (this.partsLen + chunk.length < this.need) {
        // Not enough for progress yet: keep a private copy (never pin the caller's buffer).
        if (chunk.length) {
          this.parts.push(Buffer.from(chunk));
          this.partsLen += chunk.length;
        }
        return [];
      }
      return this.pushInner(chunk);
    } catch (err) {
      this.failed =
        err instanceof ProtocolError
          ? err
          : new ProtocolError("agent stream could not be decoded.", { cause: err });
      this.parts = [];
      this.partsLen = 0;
      throw this.failed;
    }
  }

  private pushInner(chunk: Buffer): Frame[] {
    const frames: Frame[] = [];
    let data = this.partsLen ? Buffer.concat([...this.parts, chunk]) : chunk;
    this.parts = [];
    this.partsLen = 0;
    let off = 0;
    for (;;) {
      if (this.resyncType !== undefined) {
        const start = this.scan(data, off);
        this.discarded += start - off;
        off = start;
        if (this.discarded > MAX_RESYNC_BYTES) {
          throw new ProtocolError(
            `no agent handshake within ${MAX_RESYNC_BYTES} bytes of input: the port is not speaking the agent protocol.`,
          );
        }
        if (data.length - off < HEADER_SIZE) break;
        this.resyncType = undefined;
      }
      if (data.length - off < HEADER_SIZE) break;
      const h = checkHeader(data, off);
      if (data.length - off < HEADER_SIZE + h.length) break;
      const payload = Buffer.from(data.subarray(off + HEADER_SIZE, off + HEADER_SIZE + h.length));
      frames.push({ type: h.type, flags: h.flags, stream: h.stream, payload });
      off += HEADER_SIZE + h.length;
    }
    // Copy the remainder so a large chunk is not pinned by a small tail.
    const rest = data.length - off;
    if (rest > 0) {
      this.parts = [Buffer.from(data.subarray(off))];
      this.partsLen = rest;
    }
    this.need =
      this.resyncType === undefined && rest >= HEADER_SIZE
        ? HEADER_SIZE + checkHeader(this.parts[0]!, 0).length
        : HEADER_SIZE;
    data = EMPTY;
    return frames;
  }

  /** Offset of the first plausible header of the awaited type at or after `from`, or a safe tail. */
  private scan(data: Buffer, from: number): number {
    const want = this.resyncType!;
    for (let i = from; i + HEADER_SIZE <= data.length; i++) {
      if (
        data.readUInt32BE(i) === MAGIC &&
        data[i + 4] === PROTOCOL_VERSION &&
        data[i + 5] === want &&
        data.readUInt16BE(i + 6) === 0 &&
        data.readUInt32BE(i + 8) === 0 &&
        data.readUInt32BE(i + 12) <= MAX_PAYLOAD
      ) {
        return i;
      }
    }
    // Keep the last HEADER_SIZE-1 bytes: a header may straddle chunks.
    return Math.max(from, data.length - (HEADER_SIZE - 1));
  }
}

// ---------------------------------------------------------------- fields

export type FieldValue = Buffer | string;

export function encodeFields(fields: Array<[number, FieldValue]>): Buffer {
  const parts: Buffer[] = [];
  for (const [tag, value] of fields) {
    const v = typeof value === "string" ? Buffer.from(value, "utf8") : value;
    const h = Buffer.allocUnsafe(5);
    h.writeUInt8(tag, 0);
    h.writeUInt32BE(v.length, 1);
    parts.push(h, v);
  }
  return Buffer.concat(parts);
}

export function decodeFields(payload: Buffer, offset = 0): Array<[number, Buffer]> {
  const out: Array<[number, Buffer]> = [];
  let off = offset;
  while (off < payload.length) {
    if (payload.length - off < 5) throw new ProtocolError("agent field header is truncated.");
    const tag = payload[off]!;
    const len = payload.readUInt32BE(off + 1);
    off += 5;
    if (len > payload.length - off) throw new ProtocolError(`agent field ${tag} overruns its frame.`);
    out.push([tag, payload.subarray(off, off + len)]);
    off += len;
  }
  return out;
}

/** A one-byte field value (strict size). */
export function fieldU8(v: Buffer, what: string): number {
  if (v.length !== 1) throw new ProtocolError(`agent ${what} field has the wrong size.`);
  return v[0]!;
}
/** A big-endian u32 field value (strict size). */
export function fieldU32(v: Buffer, what: string): number {
  if (v.length !== 4) throw new ProtocolError(`agent ${what} field has the wrong size.`);
  return v.readUInt32BE(0);
}
/** A big-endian u64 field value, at most Number.MAX_SAFE_INTEGER. */
export function fieldU64(v: Buffer, what: string): number {
  if (v.length !== 8) throw new ProtocolError(`agent ${what} field has the wrong size.`);
  const n = v.readBigUInt64BE(0);
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError(`agent ${what} is out of range.`);
  return Number(n);
}

export function u16(n: number): Buffer {
  const b = Buffer.allocUnsafe(2);
  b.writeUInt16BE(n, 0);
  return b;
}
export function u32(n: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}

// ---------------------------------------------------------------- host → agent requests

export interface ExecRequest {
  argv: string[];
  /**
   * Run argv[0] (the only element) as a shell script the way sshd runs a command: "raw" is
   * `<user's shell> -c`, "login" is `<user's shell> -lc`; home directory and login variables
   * as sshd sets them. Agents advertise it as the `shell` capability.
   */
  shell?: "raw" | "login";
  env?: Record<string, string>;
  cwd?: string;
  pty?: { rows: number; cols: number };
  timeoutMs?: number;
}

export function encodeExec(req: ExecRequest): Buffer {
  const fields: Array<[number, FieldValue]> = req.argv.map((a) => [Field.ARG, a]);
  if (req.shell) fields.push([Field.SHELL, Buffer.from([req.shell === "login" ? 1 : 0])]);
  for (const [k, v] of Object.entries(req.env ?? {})) fields.push([Field.ENV, `${k}=${v}`]);
  if (req.cwd !== undefined) fields.push([Field.CWD, req.cwd]);
  if (req.pty) fields.push([Field.PTY, Buffer.concat([u16(req.pty.rows), u16(req.pty.cols)])]);
  if (req.timeoutMs !== undefined) {
    fields.push([Field.TIMEOUT_MS, u32(Math.min(0xffffffff, Math.max(1, Math.ceil(req.timeoutMs))))]);
  }
  return encodeFields(fields);
}

export function encodePut(
  target: { path: string } | { envFile: true },
  mode?: number,
  mkdirs = true,
): Buffer {
  const fields: Array<[number, FieldValue]> = [];
  if ("path" in target) fields.push([Field.PATH, target.path]);
  else fields.push([Field.ENVFILE, EMPTY]);
  if (mode !== undefined) fields.push([Field.MODE, u32(mode)]);
  fields.push([Field.MKDIRS, Buffer.from([mkdirs ? 1 : 0])]);
  return encodeFields(fields);
}

export function encodeGet(target: { path: string } | { envFile: true }): Buffer {
  return encodeFields("path" in target ? [[Field.PATH, target.path]] : [[Field.ENVFILE, EMPTY]]);
}

export function encodeWaitPort(port: number, timeoutMs: number): Buffer {
  return encodeFields([
    [Field.PORT, u16(port)],
    [Field.TIMEOUT_MS, u32(Math.min(0xffffffff, Math.max(1, Math.ceil(timeoutMs))))],
  ]);
}

export function encodeHello(hostNonce: Buffer): Buffer {
  return Buffer.concat([u16(PROTOCOL_VERSION), u16(0), hostNonce]);
}

// ---------------------------------------------------------------- authentication

const HOST_LABEL = Buffer.from("smolvm-agent-v1 host");
const AGENT_LABEL = Buffer.from("smolvm-agent-v1 agent");

export function hostProof(secret: Buffer, agentNonce: Buffer, hostNonce: Buffer): Buffer {
  return createHmac("sha256", secret).update(HOST_LABEL).update(agentNonce).update(hostNonce).digest();
}
export function agentProof(secret: Buffer, hostNonce: Buffer, agentNonce: Buffer): Buffer {
  return createHmac("sha256", secret).update(AGENT_LABEL).update(hostNonce).update(agentNonce).digest();
}
export function proofsEqual(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

// ---------------------------------------------------------------- agent → host messages

export interface AgentInfo {
  version: string;
  capabilities: string[];
  /** Seconds since guest boot when the agent started (from /proc/uptime). */
  startUptimeS: number;
  pid?: number;
  /** The boot milestones file as the init wrote it (text, at most 16 KiB). */
  milestones?: string;
}

export type AgentMessage =
  | { type: "challenge"; stream: 0; nonce: Buffer }
  | { type: "authOk"; stream: 0; proof: Buffer; info: AgentInfo }
  | { type: "data"; stream: number; fd: 0 | 1 | 2; data: Buffer }
  | { type: "credit"; stream: number; bytes: number }
  | {
      type: "exit";
      stream: number;
      exitCode: number | null;
      signal: string | null;
      timedOut: boolean;
      cancelled: boolean;
    }
  | { type: "ok"; stream: number; payload: Buffer }
  | {
      type: "error";
      stream: number;
      code: ErrorCodeName | "UNKNOWN";
      codeNumber: number;
      errno: number;
      message: string;
    };

const SIGNAL_NAME = /^[A-Z][A-Z0-9+-]{0,15}$/;
const VERSION_TEXT = /^[\x20-\x7e]{1,64}$/;

function text(b: Buffer, what: string, max: number): string {
  if (b.length > max) throw new ProtocolError(`agent ${what} is longer than ${max} bytes.`);
  return b.toString("utf8");
}

export function decodeInfoFields(payload: Buffer, offset = 0): AgentInfo {
  let version: string | undefined;
  let caps: string[] | undefined;
  let uptime: number | undefined;
  const info: Partial<AgentInfo> = {};
  for (const [tag, v] of decodeFields(payload, offset)) {
    if (tag === Field.VERSION) {
      version = text(v, "version", 64);
      if (!VERSION_TEXT.test(version))
        throw new ProtocolError("agent version string is not printable ASCII.");
    } else if (tag === Field.CAPS) {
      caps = text(v, "capabilities", 1024).split(",").filter(Boolean);
    } else if (tag === Field.START_UPTIME) {
      const s = text(v, "start uptime", 32);
      if (!/^\d{1,12}(\.\d{1,9})?$/.test(s)) throw new ProtocolError("agent start uptime is not a number.");
      uptime = Number(s);
    } else if (tag === Field.PID) {
      if (v.length !== 4) throw new ProtocolError("agent pid field has the wrong size.");
      info.pid = v.readUInt32BE(0);
    } else if (tag === Field.MILESTONES) {
      info.milestones = text(v, "milestones", 16_384);
    } else if (!(tag & 0x80)) {
      throw new ProtocolError(`agent info has unknown field ${tag}.`);
    }
  }
  if (version === undefined || caps === undefined || uptime === undefined) {
    throw new ProtocolError("agent info lacks version, capabilities or start uptime.");
  }
  return { ...info, version, capabilities: caps, startUptimeS: uptime };
}

/** Strictly decodes one frame the agent sent. Host-only types from the agent are errors. */
export function decodeAgentFrame(f: Frame): AgentMessage {
  const p = f.payload;
  const needStream = () => {
    if (f.stream === 0)
      throw new ProtocolError(`agent sent frame type 0x${f.type.toString(16)} on stream 0.`);
  };
  switch (f.type) {
    case FrameType.CHALLENGE:
      if (f.stream !== 0 || p.length !== 4 + NONCE_SIZE)
        throw new ProtocolError("agent CHALLENGE is malformed.");
      if (p.readUInt16BE(0) !== PROTOCOL_VERSION) {
        throw new ProtocolError(
          `agent speaks protocol version ${p.readUInt16BE(0)}: rebuild the image so agent and SDK match.`,
        );
      }
      return { type: "challenge", stream: 0, nonce: Buffer.from(p.subarray(4)) };
    case FrameType.AUTH_OK:
      if (f.stream !== 0 || p.length < MAC_SIZE) throw new ProtocolError("agent AUTH_OK is malformed.");
      return {
        type: "authOk",
        stream: 0,
        proof: Buffer.from(p.subarray(0, MAC_SIZE)),
        info: decodeInfoFields(p, MAC_SIZE),
      };
    case FrameType.DATA:
      needStream();
      if (p.length === 0) throw new ProtocolError("agent sent an empty DATA frame.");
      return { type: "data", stream: f.stream, fd: f.flags as 0 | 1 | 2, data: p };
    case FrameType.CREDIT: {
      needStream();
      if (p.length !== 4) throw new ProtocolError("agent CREDIT is malformed.");
      const bytes = p.readUInt32BE(0);
      if (bytes === 0) throw new ProtocolError("agent granted zero credit.");
      return { type: "credit", stream: f.stream, bytes };
    }
    case FrameType.EXIT: {
      needStream();
      if (p.length < 5 || p.length > 5 + 16) throw new ProtocolError("agent EXIT is malformed.");
      const code = p.readInt32BE(0);
      const fl = p[4]!;
      if (fl > 3) throw new ProtocolError("agent EXIT has unknown flags.");
      const sig = p.subarray(5).toString("latin1");
      if (sig) {
        if (!SIGNAL_NAME.test(sig) || code !== -1)
          throw new ProtocolError("agent EXIT has an invalid signal.");
        return {
          type: "exit",
          stream: f.stream,
          exitCode: null,
          signal: sig,
          timedOut: !!(fl & 1),
          cancelled: !!(fl & 2),
        };
      }
      if (code < 0 || code > 255) throw new ProtocolError(`agent EXIT has an impossible exit code ${code}.`);
      return {
        type: "exit",
        stream: f.stream,
        exitCode: code,
        signal: null,
        timedOut: !!(fl & 1),
        cancelled: !!(fl & 2),
      };
    }
    case FrameType.OK:
      needStream();
      return { type: "ok", stream: f.stream, payload: p };
    case FrameType.ERROR: {
      if (p.length < 6 || p.length > 6 + 1024) throw new ProtocolError("agent ERROR is malformed.");
      const codeNumber = p.readUInt16BE(0);
      return {
        type: "error",
        stream: f.stream,
        codeNumber,
        code: ERROR_NAMES.get(codeNumber) ?? "UNKNOWN",
        errno: p.readInt32BE(2),
        message: p.subarray(6).toString("utf8"),
      };
    }
    default:
      throw new ProtocolError(
        `agent sent frame type 0x${f.type.toString(16)}, which only the host may send.`,
      );
  }
}

/** Reads a u64 OK payload (PUT/GET byte counts). */
export function decodeU64(p: Buffer, what: string): number {
  if (p.length !== 8) throw new ProtocolError(`agent ${what} reply is malformed.`);
  const n = p.readBigUInt64BE(0);
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError(`agent ${what} reply is out of range.`);
  return Number(n);
}
