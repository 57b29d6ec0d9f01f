/**
 * Expect/respond automation over any output stream with a writable input: typically
 * `conn.streamExec(cmd, { pty: true, stdin: true })`, but anything that yields
 * `{ stream, data }` events and has `write()` works (a child process, a shell).
 *
 * Semantics, chosen so scripts cannot match stale output:
 * - the text up to and including a match is consumed, so the next expect waits for new output;
 * - among alternatives the earliest match in the buffer wins, ties go to the first listed;
 * - EOF and TIMEOUT are outcomes a caller can list as alternatives;
 * - the buffer is capped (oldest text is discarded and counted), so a chatty command cannot
 *   exhaust memory while nobody expects anything.
 */
import { writeFile } from "node:fs/promises";
import { StringDecoder } from "node:string_decoder";
import { ValidationError } from "../errors.js";
import { REDACTED, redact } from "./redact.js";

export const EOF: unique symbol = Symbol.for("smolvm.ssh.expect.EOF");
export const TIMEOUT: unique symbol = Symbol.for("smolvm.ssh.expect.TIMEOUT");

export type PatternType = "literal" | "regex";

export class ExpectPattern {
  readonly type: PatternType;
  readonly source: string;
  private readonly regex: RegExp | undefined;

  constructor(pattern: string | RegExp, options: { type?: PatternType } = {}) {
    if (pattern instanceof RegExp) {
      this.type = "regex";
      // g/y make exec() stateful through lastIndex; a pattern must match the same way every time.
      this.regex = new RegExp(pattern.source, pattern.flags.replace(/[gy]/g, ""));
      this.source = pattern.source;
      return;
    }
    if (typeof pattern !== "string" || pattern === "") {
      throw new ValidationError("an expect pattern must be a non-empty string or a RegExp.");
    }
    this.type = options.type ?? "literal";
    this.source = pattern;
    if (this.type === "regex") this.regex = new RegExp(pattern);
  }

  /** Earliest match in `text`, or undefined. */
  search(
    text: string,
  ):
    | { index: number; text: string; groups: (string | undefined)[]; named: Record<string, string> }
    | undefined {
    if (this.regex) {
      const m = this.regex.exec(text);
      if (!m) return undefined;
      return { index: m.index, text: m[0], groups: m.slice(1), named: { ...(m.groups ?? {}) } };
    }
    const i = text.indexOf(this.source);
    return i < 0 ? undefined : { index: i, text: this.source, groups: [], named: {} };
  }

  toString(): string {
    return this.type === "regex" ? `/${this.source}/` : JSON.stringify(this.source);
  }
}

export type PatternInput = string | RegExp | ExpectPattern | typeof EOF | typeof TIMEOUT;

export interface ExpectResult {
  /** One of the listed alternatives happened (EOF/TIMEOUT count when they were listed). */
  matched: boolean;
  /** Index of the alternative that happened, -1 when none did. */
  index: number;
  /** The alternative that happened. */
  pattern: PatternInput | undefined;
  /** The matched text ("" for EOF/TIMEOUT). */
  match: string;
  /** Regex capture groups. */
  groups: (string | undefined)[];
  namedGroups: Record<string, string>;
  /** Output before the match (on EOF: everything that was left). */
  before: string;
  /** Output still buffered after this call (unconsumed). */
  buffer: string;
  timedOut: boolean;
  eof: boolean;
  durationMs: number;
  /** Exit status, once the command ended. */
  exitCode?: number | null;
  signal?: string | null;
  /** Why the stream ended, when it ended with an error (for example ConnectionLostError). */
  error?: unknown;
}

export interface ExpectOptions {
  /** Default: the engine's defaultTimeoutMs (30 000). */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface SendOptions {
  /** Append the engine's newline ("\n"). Default true. */
  addNewline?: boolean;
  /** Record the send as [REDACTED] and scrub its text from recorded output (echoes). */
  secret?: boolean;
}

export interface ExpectRespondStep {
  pattern: PatternInput | PatternInput[];
  /** Text to send after a match; omit to only wait. */
  response?: string;
  /** Wait this long after the match before responding. */
  delayMs?: number;
  secret?: boolean;
  addNewline?: boolean;
  timeoutMs?: number;
}

/** What the engine consumes: output events and, to respond, a way to write input. */
export interface AutomationStream {
  [Symbol.asyncIterator](): AsyncIterator<
    | { stream: "stdout" | "stderr"; data: Buffer | string }
    | { stream: "exit"; exitCode: number | null; signal?: string | null }
  >;
  write?(data: string | Buffer): unknown;
  cancel?(): Promise<void> | void;
}

export interface AutomationEngineOptions {
  /** Cap on buffered, unconsumed output in characters. Default 1 MiB worth. */
  maxBufferChars?: number;
  defaultTimeoutMs?: number;
  newline?: string;
  transcript?: Transcript;
}

// ---------------------------------------------------------------- transcript

export type TranscriptKind = "output" | "send" | "expect" | "match" | "timeout" | "eof";

export interface TranscriptEntry {
  seq: number;
  /** Wall clock, Date.now(). */
  ts: number;
  kind: TranscriptKind;
  content: string;
  pattern?: string;
  durationMs?: number;
  secret?: boolean;
}

export interface TranscriptFileOptions {
  format?: "json" | "jsonl";
  /** Run redaction over the entries (secret sends are redacted regardless). Default true. */
  redact?: boolean;
}

/** An ordered record of an interaction; secret sends never enter it in clear. */
export class Transcript {
  private readonly list: TranscriptEntry[] = [];
  private readonly secrets = new Set<string>();
  private seq = 0;
  dropped = 0;

  constructor(private readonly maxEntries = 10_000) {}

  get entries(): readonly TranscriptEntry[] {
    return this.list;
  }

  /** Registers a secret so later recorded output has it scrubbed (a PTY echoes what was typed). */
  addSecret(value: string): void {
    if (value.length >= 3) this.secrets.add(value);
  }

  private scrub(text: string): string {
    let out = text;
    for (const s of this.secrets) out = out.split(s).join(REDACTED);
    return out;
  }

  record(kind: TranscriptKind, content: string, extra: Partial<TranscriptEntry> = {}): TranscriptEntry {
    const entry: TranscriptEntry = {
      seq: ++this.seq,
      ts: Date.now(),
      kind,
      content: extra.secret ? REDACTED : this.scrub(content),
      ...extra,
    };
    if (extra.secret) entry.content = REDACTED;
    this.list.push(entry);
    if (this.list.length > this.maxEntries) {
      this.list.shift();
      this.dropped++;
    }
    return entry;
  }

  toDict(options: { redact?: boolean } = {}): { entries: TranscriptEntry[]; dropped: number } {
    const entries = this.list.map((e) => ({ ...e }));
    const data = { entries, dropped: this.dropped };
    return options.redact === false ? data : (redact(data) as typeof data);
  }

  /** Writes the transcript (mode 0600: it holds what a session printed). */
  async toFile(path: string, options: TranscriptFileOptions = {}): Promise<void> {
    const dict = this.toDict({ redact: options.redact ?? true });
    const text =
      (options.format ?? "jsonl") === "jsonl"
        ? dict.entries.map((e) => JSON.stringify(e)).join("\n") + (dict.entries.length ? "\n" : "")
        : JSON.stringify(dict, null, 2);
    await writeFile(path, text, { mode: 0o600 });
  }
}

// ---------------------------------------------------------------- engine

export class AutomationEngine {
  readonly transcript: Transcript;
  readonly maxBufferChars: number;
  readonly defaultTimeoutMs: number;
  readonly newline: string;
  private buf = "";
  /** Characters dropped from the front of the buffer by the cap. */
  discardedChars = 0;
  private ended = false;
  private endError: unknown;
  private exit: { exitCode: number | null; signal: string | null } | undefined;
  private wake: (() => void) | undefined;
  private busy = false;
  private closed = false;
  private readonly pump: Promise<void>;
  private readonly decoders = { stdout: new StringDecoder("utf8"), stderr: new StringDecoder("utf8") };

  constructor(
    private readonly stream: AutomationStream,
    options: AutomationEngineOptions = {},
  ) {
    this.maxBufferChars = options.maxBufferChars ?? 1 << 20;
    this.defaultTimeoutMs = options.defaultTimeoutMs ?? 30_000;
    this.newline = options.newline ?? "\n";
    this.transcript = options.transcript ?? new Transcript();
    this.pump = this.run();
  }

  /** Output received and not consumed yet. */
  get buffer(): string {
    return this.buf;
  }

  get isEof(): boolean {
    return this.ended;
  }

  get exitCode(): number | null | undefined {
    return this.exit?.exitCode;
  }

  private async run(): Promise<void> {
    try {
      for await (const ev of this.stream) {
        if (ev.stream === "exit") {
          this.exit = { exitCode: ev.exitCode, signal: ev.signal ?? null };
          continue;
        }
        const text = typeof ev.data === "string" ? ev.data : this.decoders[ev.stream].write(ev.data);
        if (text) this.append(text);
      }
    } catch (err) {
      this.endError = err;
    } finally {
      const tail = this.decoders.stdout.end() + this.decoders.stderr.end();
      if (tail) this.append(tail);
      this.ended = true;
      this.notify();
    }
  }

  private append(text: string): void {
    this.transcript.record("output", text);
    this.buf += text;
    if (this.buf.length > this.maxBufferChars) {
      const cut = this.buf.length - this.maxBufferChars;
      this.buf = this.buf.slice(cut);
      this.discardedChars += cut;
    }
    this.notify();
  }

  private notify(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  /**
   * Waits until one of `patterns` matches new output, EOF, or the timeout. Never throws for a
   * timeout or EOF: the result says which happened (`timedOut`, `eof`), so scripts can branch.
   */
  async expect(patterns: PatternInput | PatternInput[], options: ExpectOptions = {}): Promise<ExpectResult> {
    const list: PatternInput[] = Array.isArray(patterns) ? patterns : [patterns];
    if (list.length === 0) throw new ValidationError("expect needs at least one pattern.");
    if (this.busy)
      throw new ValidationError("another expect is still waiting on this engine: await it first.");
    const compiled: Array<ExpectPattern | typeof EOF | typeof TIMEOUT> = list.map((p) =>
      p === EOF || p === TIMEOUT
        ? p
        : p instanceof ExpectPattern
          ? p
          : new ExpectPattern(p as string | RegExp),
    );
    const timeoutMs = options.timeoutMs ?? this.defaultTimeoutMs;
    const describe = compiled
      .map((p) => (p === EOF ? "EOF" : p === TIMEOUT ? "TIMEOUT" : p.toString()))
      .join(" | ");
    this.transcript.record("expect", "", { pattern: describe });
    const started = performance.now();
    this.busy = true;
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      this.notify();
    }, timeoutMs);
    const onAbort = () => {
      timedOut = true;
      this.notify();
    };
    options.signal?.addEventListener("abort", onAbort, { once: true });
    if (options.signal?.aborted) timedOut = true;
    try {
      for (;;) {
        let best: { i: number; m: NonNullable<ReturnType<ExpectPattern["search"]>> } | undefined;
        compiled.forEach((p, i) => {
          if (p === EOF || p === TIMEOUT) return;
          const m = p.search(this.buf);
          if (m && (!best || m.index < best.m.index)) best = { i, m };
        });
        const base = { durationMs: performance.now() - started, ...this.exitInfo() };
        if (best) {
          const before = this.buf.slice(0, best.m.index);
          this.buf = this.buf.slice(best.m.index + best.m.text.length);
          this.transcript.record("match", best.m.text, { pattern: describe, durationMs: base.durationMs });
          return {
            matched: true,
            index: best.i,
            pattern: list[best.i],
            match: best.m.text,
            groups: best.m.groups,
            namedGroups: best.m.named,
            before,
            buffer: this.buf,
            timedOut: false,
            eof: false,
            ...base,
          };
        }
        if (this.ended) {
          const i = compiled.indexOf(EOF);
          const before = this.buf;
          this.buf = "";
          this.transcript.record("eof", "", { pattern: describe, durationMs: base.durationMs });
          return {
            matched: i >= 0,
            index: i,
            pattern: i >= 0 ? EOF : undefined,
            match: "",
            groups: [],
            namedGroups: {},
            before,
            buffer: "",
            timedOut: false,
            eof: true,
            ...(this.endError !== undefined ? { error: this.endError } : {}),
            ...base,
          };
        }
        if (timedOut) {
          const i = compiled.indexOf(TIMEOUT);
          this.transcript.record("timeout", "", { pattern: describe, durationMs: base.durationMs });
          return {
            matched: i >= 0,
            index: i,
            pattern: i >= 0 ? TIMEOUT : undefined,
            match: "",
            groups: [],
            namedGroups: {},
            before: "",
            buffer: this.buf,
            timedOut: true,
            eof: false,
            ...base,
          };
        }
        await new Promise<void>((resolve) => {
          this.wake = resolve;
        });
      }
    } finally {
      clearTimeout(timer);
      options.signal?.removeEventListener("abort", onAbort);
      this.busy = false;
    }
  }

  private exitInfo(): { exitCode?: number | null; signal?: string | null } {
    return this.exit ? { exitCode: this.exit.exitCode, signal: this.exit.signal } : {};
  }

  /** Writes `text` (plus the newline unless addNewline is false) to the command's input. */
  async send(text: string, options: SendOptions = {}): Promise<void> {
    if (typeof text !== "string") throw new ValidationError("send takes a string.");
    if (!this.stream.write) {
      throw new ValidationError("this stream has no input: start it with { stdin: true } to send.");
    }
    if (this.closed) throw new ValidationError("the automation engine is closed.");
    const data = options.addNewline === false ? text : text + this.newline;
    if (options.secret) this.transcript.addSecret(text);
    this.transcript.record("send", data, { secret: options.secret === true });
    await this.stream.write(data);
  }

  /** expect, then (only on a match, after delayMs) send `response`. */
  async expectRespond(
    pattern: PatternInput | PatternInput[],
    response: string,
    options: ExpectOptions & SendOptions & { delayMs?: number } = {},
  ): Promise<ExpectResult> {
    const r = await this.expect(pattern, options);
    if (!r.matched || r.pattern === EOF || r.pattern === TIMEOUT) return r;
    if (options.delayMs) await new Promise((res) => setTimeout(res, options.delayMs));
    await this.send(response, options);
    return r;
  }

  /** Runs steps in order; stops at the first step whose pattern did not match (by default). */
  async runSequence(
    steps: ExpectRespondStep[],
    options: { stopOnFailure?: boolean; signal?: AbortSignal } = {},
  ): Promise<ExpectResult[]> {
    const results: ExpectResult[] = [];
    for (const step of steps) {
      const common = { timeoutMs: step.timeoutMs, signal: options.signal };
      const r =
        step.response === undefined
          ? await this.expect(step.pattern, common)
          : await this.expectRespond(step.pattern, step.response, {
              ...common,
              delayMs: step.delayMs,
              secret: step.secret,
              addNewline: step.addNewline,
            });
      results.push(r);
      if (!r.matched && options.stopOnFailure !== false) break;
    }
    return results;
  }

  /** Cancels the underlying command (when the stream supports it) and waits for the pump. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.ended) return;
    if (!this.stream.cancel) return; // nothing to stop: leave the stream to its owner
    await this.stream.cancel();
    await this.pump;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
