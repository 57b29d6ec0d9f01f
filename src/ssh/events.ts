/**
 * Structured SSH session events: a typed in-memory collector (bounded ring) that also appends
 * each event to a JSONL file the moment it happens, redacted by default.
 *
 * Line schema (v 1): { v, sessionId, seq, ts, mono, type, data }. `seq` starts at 1 and grows by
 * one per event of a collector; `ts` is wall-clock ms (Date.now()), `mono` monotonic ms
 * (performance.now()), so ordering and durations survive clock jumps.
 */
import { randomUUID } from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import { ValidationError } from "../errors.js";
import { redact } from "./redact.js";

export type EventType =
  | "CONNECT"
  | "AUTH"
  | "EXEC"
  | "FORWARD"
  | "KEEPALIVE"
  | "STATE_CHANGE"
  | "DISCONNECT"
  | "ERROR"
  | "PROGRESS_WARNING";

export const EVENT_TYPES: readonly EventType[] = [
  "CONNECT",
  "AUTH",
  "EXEC",
  "FORWARD",
  "KEEPALIVE",
  "STATE_CHANGE",
  "DISCONNECT",
  "ERROR",
  "PROGRESS_WARNING",
];

export const EVENT_SCHEMA_VERSION = 1 as const;

export interface EventSink {
  emit(type: EventType, data: Record<string, unknown>): void;
}

export interface SSHEvent {
  v: 1;
  sessionId: string;
  seq: number;
  /** Wall clock, Date.now(). */
  ts: number;
  /** Monotonic clock, performance.now(). */
  mono: number;
  type: EventType;
  data: Record<string, unknown>;
}

export interface EventCollectorOptions {
  /** Default: a random UUID. */
  sessionId?: string;
  /** JSONL file appended to as events happen (created 0600, existing content kept). */
  logPath?: string;
  /** Redact secrets in memory and in the log. Default true. */
  redact?: boolean;
  /** Events kept in memory; older ones are dropped (the log keeps everything). Default 10,000. */
  maxEvents?: number;
}

const DEFAULT_MAX_EVENTS = 10_000;

/** Milliseconds as events report them: two decimals. */
export function roundMs(ms: number): number {
  return Math.round(ms * 100) / 100;
}

/**
 * Makes any value JSON-safe: Buffers become `{ type: "Buffer", bytes }` (length only: raw bytes
 * do not belong in logs), bigints strings, Errors `{ name, message, code }`, cycles "[Circular]".
 */
export function jsonSafe(value: unknown, seen: WeakSet<object> = new WeakSet(), depth = 0): unknown {
  if (value === null) return null;
  switch (typeof value) {
    case "string":
    case "boolean":
      return value;
    case "number":
      return Number.isFinite(value) ? value : String(value);
    case "bigint":
      return value.toString();
    case "undefined":
    case "function":
    case "symbol":
      return undefined;
  }
  const obj = value as object;
  if (seen.has(obj)) return "[Circular]";
  if (depth > 64) return "[MaxDepth]";
  if (Buffer.isBuffer(obj) || ArrayBuffer.isView(obj))
    return { type: "Buffer", bytes: (obj as Uint8Array).byteLength };
  if (obj instanceof Date) return obj.toISOString();
  seen.add(obj);
  try {
    const rec = (x: unknown) => jsonSafe(x, seen, depth + 1);
    if (Array.isArray(obj)) return obj.map((x) => rec(x) ?? null);
    if (obj instanceof Map) return Object.fromEntries([...obj].map(([k, x]) => [String(k), rec(x)]));
    if (obj instanceof Set) return [...obj].map((x) => rec(x) ?? null);
    if (obj instanceof Error) {
      const e = obj as Error & { code?: unknown; details?: unknown };
      const o: Record<string, unknown> = { name: e.name, message: e.message };
      if (e.code !== undefined) o.code = rec(e.code);
      if (e.details !== undefined) o.details = rec(e.details);
      return o;
    }
    if (typeof (obj as { toJSON?: unknown }).toJSON === "function")
      return rec((obj as { toJSON(): unknown }).toJSON());
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(obj)) {
      const r = rec(x);
      if (r !== undefined) out[k] = r;
    }
    return out;
  } finally {
    seen.delete(obj);
  }
}

export class EventCollector implements EventSink {
  readonly sessionId: string;
  readonly logPath: string | undefined;
  private readonly redactEnabled: boolean;
  private readonly maxEvents: number;
  private readonly ring: SSHEvent[] = [];
  private head = 0;
  private seq = 0;
  private fd: number | undefined;
  private closed = false;
  private writeError: Error | undefined;
  private readonly listeners = new Set<(e: SSHEvent) => void>();
  /** Events evicted from memory by `maxEvents` (still in the log file, if any). */
  dropped = 0;

  constructor(opts: EventCollectorOptions = {}) {
    this.sessionId = opts.sessionId ?? randomUUID();
    this.redactEnabled = opts.redact ?? true;
    const max = opts.maxEvents ?? DEFAULT_MAX_EVENTS;
    if (!Number.isInteger(max) || max < 1)
      throw new RangeError(`maxEvents must be a positive integer, got ${max}`);
    this.maxEvents = max;
    this.logPath = opts.logPath;
    if (opts.logPath !== undefined) this.fd = openLog(opts.logPath);
  }

  emit(type: EventType, data: Record<string, unknown> = {}): SSHEvent {
    const safe = jsonSafe(this.redactEnabled ? redact(data) : data);
    const event: SSHEvent = {
      v: EVENT_SCHEMA_VERSION,
      sessionId: this.sessionId,
      seq: ++this.seq,
      ts: Date.now(),
      mono: performance.now(),
      type,
      data: (safe && typeof safe === "object" && !Array.isArray(safe) ? safe : { value: safe }) as Record<
        string,
        unknown
      >,
    };
    if (this.ring.length < this.maxEvents) this.ring.push(event);
    else {
      this.ring[this.head] = event;
      this.head = (this.head + 1) % this.maxEvents;
      this.dropped++;
    }
    if (this.fd !== undefined) {
      // Synchronous append: the line is on disk before emit returns, so a crash loses nothing.
      try {
        fs.writeSync(this.fd, JSON.stringify(event) + "\n");
      } catch (err) {
        this.writeError ??= err as Error;
      }
    }
    for (const l of this.listeners) {
      try {
        l(event);
      } catch {
        // A faulty listener must not break the session that emits.
      }
    }
    return event;
  }

  /** Events in memory, oldest first (at most `maxEvents`). */
  get events(): SSHEvent[] {
    return this.head === 0
      ? this.ring.slice()
      : [...this.ring.slice(this.head), ...this.ring.slice(0, this.head)];
  }

  getByType(type: EventType): SSHEvent[] {
    return this.events.filter((e) => e.type === type);
  }

  /** Calls `listener` for every later event; returns the unsubscribe function. */
  on(listener: (e: SSHEvent) => void): () => void {
    this.listeners.add(listener);
    return () => {
      this.listeners.delete(listener);
    };
  }

  /** The first error writing the log, if any (emit never throws because of the log). */
  get logError(): Error | undefined {
    return this.writeError;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Flushes and closes the log file. Idempotent; later events are kept in memory only. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const fd = this.fd;
    this.fd = undefined;
    if (fd !== undefined) {
      try {
        fs.fsyncSync(fd);
      } catch {
        // fsync is best effort (some filesystems refuse it); the data was already written.
      }
      fs.closeSync(fd);
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** Opens (creating 0600) a regular file for appending; never blocks on a FIFO. */
function openLog(logPath: string): number {
  let fd: number | undefined;
  try {
    fs.mkdirSync(path.dirname(path.resolve(logPath)), { recursive: true, mode: 0o700 });
    fd = fs.openSync(
      logPath,
      fs.constants.O_WRONLY | fs.constants.O_APPEND | fs.constants.O_CREAT | fs.constants.O_NONBLOCK,
      0o600,
    );
    if (!fs.fstatSync(fd).isFile()) throw Object.assign(new Error("not a regular file"), { code: "EINVAL" });
    // A pre-existing log may be world-readable; events can hold host names and commands.
    fs.fchmodSync(fd, 0o600);
    return fd;
  } catch (err) {
    if (fd !== undefined) fs.closeSync(fd);
    const e = err as NodeJS.ErrnoException;
    throw new ValidationError(
      `Cannot open the event log ${logPath} for appending (${e.code ?? e.message}): give a writable regular file path.`,
      { cause: err, details: { logPath, errno: e.code } },
    );
  }
}

/** Reads a JSONL event log back (blank and torn final lines are ignored). */
export function parseEventLog(text: string): SSHEvent[] {
  const out: SSHEvent[] = [];
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    try {
      const e = JSON.parse(line) as SSHEvent;
      if (e && typeof e === "object" && typeof e.type === "string" && typeof e.seq === "number") out.push(e);
    } catch {
      // A line torn by a crash mid-write is skipped, not fatal.
    }
  }
  return out;
}
