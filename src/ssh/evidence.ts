/**
 * Evidence bundles: everything needed to debug one SSH session after the fact (events,
 * automation transcript, negotiated algorithms, timing, host, why it ended, the error), written
 * as one JSON document or as JSONL (a header line, then one line per event), redacted by default
 * and always to a 0600 file.
 */
import { randomBytes } from "node:crypto";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { ValidationError } from "../errors.js";
import { EventCollector, type EventSink, jsonSafe, type SSHEvent } from "./events.js";
import { redact } from "./redact.js";

export const EVIDENCE_SCHEMA_VERSION = 1 as const;

export interface NegotiatedAlgorithms {
  kex?: string;
  serverHostKey?: string;
  /** Client-to-server cipher; "c2s/s2c" when the directions differ. */
  cipher?: string;
  mac?: string;
  compress?: string;
}

export interface EvidenceTiming {
  /** TCP connect + SSH handshake, ms. */
  connectMs?: number;
  /** User authentication, ms. */
  authMs?: number;
  /** Wall-clock ms (Date.now()) when the connection ended. */
  disconnectAt?: number;
}

export interface EvidenceHostInfo {
  host: string;
  port: number;
  username?: string;
}

export interface EvidenceBundleOptions {
  events?: readonly SSHEvent[];
  transcript?: unknown;
  algorithms?: NegotiatedAlgorithms;
  timing?: EvidenceTiming;
  hostInfo?: EvidenceHostInfo;
  disconnectReason?: string;
  /** An Error (its name, code, details, cause chain and stack are kept) or any JSON-able context. */
  errorContext?: unknown;
  /** Default: the first event's sessionId, if any. */
  sessionId?: string;
  /** Default: now. */
  createdAt?: number;
}

/** The serialised form (toJSON / the JSON file). */
export interface EvidenceBundleData {
  v: 1;
  sessionId?: string;
  createdAt: number;
  hostInfo?: EvidenceHostInfo;
  algorithms: NegotiatedAlgorithms;
  timing: EvidenceTiming;
  disconnectReason?: string;
  errorContext?: unknown;
  transcript?: unknown;
  events: SSHEvent[];
}

export interface EvidenceWriteOptions {
  format?: "json" | "jsonl";
  /** Default true: secrets are removed (see redact.ts). */
  redact?: boolean;
  /** Also hide host names, user names and IPs. Default false. */
  hostUser?: boolean;
}

const MAX_BUNDLE_BYTES = 512 * 1024 * 1024;

interface Handshake {
  kex?: string;
  serverHostKey?: string;
  cs?: { cipher?: string; mac?: string; compress?: string };
  sc?: { cipher?: string; mac?: string; compress?: string };
}

/** Maps ssh2's `handshake` event payload to NegotiatedAlgorithms. */
export function algorithmsFromHandshake(h: Handshake | undefined): NegotiatedAlgorithms {
  if (!h) return {};
  const both = (a?: string, b?: string) =>
    a !== undefined && b !== undefined && a !== b ? `${a}/${b}` : (a ?? b);
  const out: NegotiatedAlgorithms = {};
  const set = (k: keyof NegotiatedAlgorithms, v: string | undefined) => {
    if (v !== undefined) out[k] = v;
  };
  set("kex", h.kex);
  set("serverHostKey", h.serverHostKey);
  set("cipher", both(h.cs?.cipher, h.sc?.cipher));
  // AEAD ciphers (chacha20-poly1305, aes-gcm) have no separate MAC; ssh2 reports an empty string.
  set("mac", both(h.cs?.mac || undefined, h.sc?.mac || undefined));
  set("compress", both(h.cs?.compress, h.sc?.compress));
  return out;
}

/** An Error as plain data: name, message, code, details, cause chain (bounded), stack. */
export function errorToContext(err: unknown, depth = 0): unknown {
  if (!(err instanceof Error)) return jsonSafe(err);
  const e = err as Error & { code?: unknown; details?: unknown; cause?: unknown; partial?: unknown };
  const out: Record<string, unknown> = { name: e.name, message: e.message };
  if (e.code !== undefined) out.code = jsonSafe(e.code);
  if (e.details !== undefined) out.details = jsonSafe(e.details);
  if (e.cause !== undefined && depth < 8) out.cause = errorToContext(e.cause, depth + 1);
  if (e.stack) out.stack = e.stack;
  return out;
}

export class EvidenceBundle {
  readonly events: SSHEvent[];
  readonly transcript: unknown;
  readonly algorithms: NegotiatedAlgorithms;
  readonly timing: EvidenceTiming;
  readonly hostInfo: EvidenceHostInfo | undefined;
  readonly disconnectReason: string | undefined;
  readonly errorContext: unknown;
  readonly sessionId: string | undefined;
  readonly createdAt: number;

  constructor(opts: EvidenceBundleOptions = {}) {
    this.events = [...(opts.events ?? [])];
    this.transcript = opts.transcript;
    this.algorithms = { ...opts.algorithms };
    this.timing = { ...opts.timing };
    this.hostInfo = opts.hostInfo ? { ...opts.hostInfo } : undefined;
    this.disconnectReason = opts.disconnectReason;
    this.errorContext = opts.errorContext === undefined ? undefined : errorToContext(opts.errorContext);
    this.sessionId = opts.sessionId ?? this.events[0]?.sessionId;
    this.createdAt = opts.createdAt ?? Date.now();
  }

  /** The bundle as JSON-safe data; redacted unless `redact: false`. */
  toObject(opts: { redact?: boolean; hostUser?: boolean } = {}): EvidenceBundleData {
    const data: EvidenceBundleData = {
      v: EVIDENCE_SCHEMA_VERSION,
      createdAt: this.createdAt,
      algorithms: this.algorithms,
      timing: this.timing,
      events: this.events,
    };
    if (this.sessionId !== undefined) data.sessionId = this.sessionId;
    if (this.hostInfo) data.hostInfo = this.hostInfo;
    if (this.disconnectReason !== undefined) data.disconnectReason = this.disconnectReason;
    if (this.errorContext !== undefined) data.errorContext = this.errorContext;
    if (this.transcript !== undefined) data.transcript = this.transcript;
    const safe = jsonSafe(data) as EvidenceBundleData;
    return opts.redact === false ? safe : redact(safe, { hostUser: opts.hostUser ?? false });
  }

  /** Redacted, so `JSON.stringify(bundle)` never leaks a secret into a log. */
  toJSON(): EvidenceBundleData {
    return this.toObject();
  }

  /** Writes the bundle atomically (temp file + rename) to a 0600 file. */
  async toFile(filePath: string, opts: EvidenceWriteOptions = {}): Promise<void> {
    const format = opts.format ?? "json";
    if (format !== "json" && format !== "jsonl") {
      throw new ValidationError(`Unknown evidence format ${JSON.stringify(format)}: use "json" or "jsonl".`);
    }
    const data = this.toObject({ redact: opts.redact ?? true, hostUser: opts.hostUser ?? false });
    let text: string;
    if (format === "json") text = JSON.stringify(data, null, 2) + "\n";
    else {
      const { events, ...header } = data;
      text = [
        JSON.stringify({ kind: "bundle", ...header }),
        ...events.map((e) => JSON.stringify({ kind: "event", ...e })),
      ]
        .join("\n")
        .concat("\n");
    }
    const abs = path.resolve(filePath);
    const tmp = path.join(path.dirname(abs), `.${path.basename(abs)}.${randomBytes(6).toString("hex")}.tmp`);
    const fh = await fs.open(tmp, "wx", 0o600);
    try {
      await fh.writeFile(text);
      await fh.sync().catch(() => {});
    } finally {
      await fh.close();
    }
    try {
      await fs.rename(tmp, abs);
    } catch (err) {
      await fs.rm(tmp, { force: true });
      throw err;
    }
  }

  /** Reads a bundle written by toFile, in either format. */
  static async fromFile(filePath: string): Promise<EvidenceBundle> {
    const fh = await fs.open(filePath, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    let text: string;
    try {
      const st = await fh.stat();
      if (!st.isFile() || st.size > MAX_BUNDLE_BYTES) {
        throw new ValidationError(
          `${filePath} is not an evidence bundle file (not a regular file, or too large).`,
        );
      }
      text = await fh.readFile("utf8");
    } finally {
      await fh.close();
    }
    return EvidenceBundle.parse(text, filePath);
  }

  /** Parses the text of a bundle file (JSON or JSONL). */
  static parse(text: string, source = "evidence bundle"): EvidenceBundle {
    const bad = (why: string) =>
      new ValidationError(`${source} is not a smolvm evidence bundle (${why}).`, { details: { source } });
    let whole: unknown;
    try {
      whole = JSON.parse(text);
    } catch {
      whole = undefined;
    }
    if (
      whole &&
      typeof whole === "object" &&
      !Array.isArray(whole) &&
      (whole as { kind?: unknown }).kind !== "bundle"
    ) {
      return EvidenceBundle.fromData(whole as EvidenceBundleData, bad);
    }
    let header: (EvidenceBundleData & { kind?: string }) | undefined;
    const events: SSHEvent[] = [];
    for (const [i, line] of text.split("\n").entries()) {
      if (!line.trim()) continue;
      let obj: { kind?: string } & Record<string, unknown>;
      try {
        obj = JSON.parse(line);
      } catch {
        throw bad(`line ${i + 1} is not JSON`);
      }
      const { kind, ...rest } = obj;
      if (kind === "bundle") header = rest as unknown as EvidenceBundleData;
      else if (kind === "event") events.push(rest as unknown as SSHEvent);
      else throw bad(`line ${i + 1} has no known "kind"`);
    }
    if (!header) throw bad("no header line");
    return EvidenceBundle.fromData({ ...header, events }, bad);
  }

  private static fromData(d: EvidenceBundleData, bad: (why: string) => Error): EvidenceBundle {
    if (d.v !== EVIDENCE_SCHEMA_VERSION) throw bad(`unsupported version ${JSON.stringify(d.v)}`);
    if (!Array.isArray(d.events)) throw bad("events is not a list");
    const b = new EvidenceBundle({
      events: d.events,
      transcript: d.transcript,
      algorithms: d.algorithms,
      timing: d.timing,
      hostInfo: d.hostInfo,
      disconnectReason: d.disconnectReason,
      sessionId: d.sessionId,
      createdAt: d.createdAt,
    });
    // Already plain data: keep it as read instead of re-wrapping it.
    (b as { errorContext: unknown }).errorContext = d.errorContext;
    return b;
  }
}

/** What getEvidenceBundle reads from a connection (SSHConnection has all of it). */
export interface EvidenceSource {
  readonly host: string;
  readonly port: number;
  readonly username: string;
  readonly negotiated: Record<string, unknown> | undefined;
  readonly timings: { tcpMs: number; handshakeMs: number; authMs: number };
  /** Where its events went: an EventCollector's are included. */
  readonly events: EventSink | undefined;
}

export interface EvidenceExtra {
  /** Events to include (default: the connection's collector, if its sink is one). */
  events?: EventCollector;
  error?: unknown;
  transcript?: unknown;
  disconnectReason?: string;
  host?: { host: string; port: number; username?: string };
}

/**
 * The evidence bundle of a connection: its events (from `events` or the collector it was
 * connected with), negotiated algorithms, timings, host, why it ended, the error and a transcript.
 */
export function getEvidenceBundle(
  conn: EvidenceSource | undefined,
  extra: EvidenceExtra = {},
): EvidenceBundle {
  const collector = extra.events ?? (conn?.events instanceof EventCollector ? conn.events : undefined);
  const lastDisconnect = collector?.getByType("DISCONNECT").at(-1);
  return new EvidenceBundle({
    events: collector?.events ?? [],
    transcript: extra.transcript,
    algorithms: algorithmsFromHandshake(conn?.negotiated as never),
    timing: conn
      ? {
          connectMs: Math.round(conn.timings.tcpMs + conn.timings.handshakeMs),
          authMs: Math.round(conn.timings.authMs),
          ...(lastDisconnect ? { disconnectAt: lastDisconnect.ts } : {}),
        }
      : {},
    hostInfo: conn ? { host: conn.host, port: conn.port, username: conn.username } : extra.host,
    disconnectReason: extra.disconnectReason ?? (lastDisconnect?.data.reason as string | undefined),
    errorContext: extra.error,
  });
}
