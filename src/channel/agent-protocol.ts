/**
 * The guest agent wire protocol (agent/PROTOCOL.md, version 1): the constants (checked equal to
 * agent/agent.h by test/unit/agent-constants.test.ts), frame encoding, a streaming decoder that
 * accepts any chunking, and request field encoding. Pure: no I/O. Every malformed input is a
 * ProtocolError, never a crash, and the decoder never holds more than one frame. What the agent
 * sends is decoded strictly in agent-messages.ts.
 */
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
