/**
 * A typed client for QEMU's QMP socket: greeting, capability negotiation, commands with ids,
 * errors and asynchronous events. QEMU is a trusted-but-fragile peer: anything that is not a
 * well-formed QMP message (or a line longer than MAX_LINE_BYTES) is a ProtocolError and ends the
 * connection rather than being guessed at.
 */
import { EventEmitter } from "node:events";
import { connect as netConnect, type Socket } from "node:net";
import { Deadline } from "../common/deadline.js";
import { validatePort } from "../common/port.js";
import { ProtocolError, QmpCommandError, ValidationError, VMStateError } from "../errors.js";
import { NETDEV_ID } from "./qemu.js";

export const MAX_LINE_BYTES = 1024 * 1024;
const DEFAULT_TIMEOUT_MS = 10_000;
/** Events kept for async iteration when nobody is reading; older ones are dropped. */
const MAX_QUEUED_EVENTS = 256;

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

export interface QmpStatus {
  /** "running", "paused", "prelaunch", "shutdown", "guest-panicked", ... */
  status: string;
  running: boolean;
}

export interface QmpCallOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

type Pending = {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
};

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Splits a byte stream into lines, refusing unbounded ones. Pure, so it can be tested alone. */
export class LineSplitter {
  private buf = "";
  constructor(private readonly maxLine = MAX_LINE_BYTES) {}
  push(chunk: string): string[] {
    this.buf += chunk;
    const lines: string[] = [];
    let nl = this.buf.indexOf("\n");
    while (nl >= 0) {
      const line = this.buf.slice(0, nl).replace(/\r$/, "");
      this.buf = this.buf.slice(nl + 1);
      if (line.length > this.maxLine) throw lineTooLong(line.length, this.maxLine);
      if (line.trim().length > 0) lines.push(line);
      nl = this.buf.indexOf("\n");
    }
    if (this.buf.length > this.maxLine) throw lineTooLong(this.buf.length, this.maxLine);
    return lines;
  }
}

function lineTooLong(len: number, max: number): ProtocolError {
  return new ProtocolError(
    `QMP peer sent a line of more than ${max} bytes; the QEMU monitor socket is not speaking QMP.`,
    { details: { length: len, max } },
  );
}

export type QmpMessage =
  | { kind: "greeting"; greeting: QmpGreeting }
  | { kind: "return"; id: unknown; value: unknown }
  | { kind: "error"; id: unknown; errorClass: string; desc: string }
  | { kind: "event"; event: QmpEvent };

/** Parses one QMP line. Throws ProtocolError on anything that is not a QMP message. */
export function parseQmpLine(line: string): QmpMessage {
  let msg: unknown;
  try {
    msg = JSON.parse(line);
  } catch (cause) {
    throw new ProtocolError(
      "QMP peer sent a line that is not JSON; is the socket really a QEMU QMP monitor?",
      {
        cause,
        details: { preview: line.slice(0, 80) },
      },
    );
  }
  if (!isObject(msg)) throw malformed("a non-object JSON value");
  if ("QMP" in msg) {
    const g = msg.QMP;
    if (!isObject(g) || !isObject(g.version) || !Array.isArray(g.capabilities))
      throw malformed("a bad greeting");
    return { kind: "greeting", greeting: g as unknown as QmpGreeting };
  }
  if ("return" in msg) return { kind: "return", id: msg.id, value: msg.return };
  if ("error" in msg) {
    const e = msg.error;
    if (!isObject(e) || typeof e.class !== "string" || typeof e.desc !== "string")
      throw malformed("a bad error");
    return { kind: "error", id: msg.id, errorClass: e.class, desc: e.desc };
  }
  if ("event" in msg) {
    if (typeof msg.event !== "string") throw malformed("an event without a name");
    const ts = isObject(msg.timestamp) ? msg.timestamp : {};
    return {
      kind: "event",
      event: {
        event: msg.event,
        data: isObject(msg.data) ? msg.data : {},
        timestamp: {
          seconds: typeof ts.seconds === "number" ? ts.seconds : 0,
          microseconds: typeof ts.microseconds === "number" ? ts.microseconds : 0,
        },
      },
    };
  }
  throw malformed("an object that is neither a greeting, a reply nor an event");
}

function malformed(what: string): ProtocolError {
  return new ProtocolError(`QMP peer sent ${what}; closing the monitor connection.`);
}

export interface QmpClientEvents {
  event: [QmpEvent];
  close: [Error | undefined];
}

export class QmpClient extends EventEmitter<QmpClientEvents> {
  private readonly pending = new Map<string, Pending>();
  /** Ids whose caller gave up (timeout/abort); their late replies are dropped, not protocol errors. */
  private readonly abandoned = new Set<string>();
  private readonly queue: QmpEvent[] = [];
  private readonly waiters = new Set<() => void>();
  private nextId = 1;
  private closedWith: Error | undefined;
  private closed = false;

  private constructor(
    private readonly socket: Socket,
    readonly socketPath: string,
    readonly greeting: QmpGreeting,
  ) {
    super();
  }

  /** Connects, reads the greeting and negotiates capabilities. */
  static async connect(socketPath: string, options: QmpCallOptions = {}): Promise<QmpClient> {
    const deadline = new Deadline(
      options.timeoutMs ?? DEFAULT_TIMEOUT_MS,
      options.signal,
      `QMP connect to ${socketPath}`,
    );
    const socket = netConnect({ path: socketPath });
    socket.setEncoding("utf8");
    const splitter = new LineSplitter();
    try {
      const greeting = await deadline.race(
        new Promise<QmpGreeting>((resolve, reject) => {
          const onData = (chunk: string) => {
            try {
              const lines = splitter.push(chunk);
              if (lines.length === 0) return;
              const first = parseQmpLine(lines[0]!);
              if (first.kind !== "greeting") throw malformed("something other than a greeting first");
              socket.off("data", onData);
              // Anything after the greeting before we asked for it is a protocol violation.
              if (lines.length > 1) throw malformed("unsolicited data after the greeting");
              resolve(first.greeting);
            } catch (e) {
              reject(e);
            }
          };
          socket.on("data", onData);
          socket.once("error", (err: NodeJS.ErrnoException) => {
            reject(
              new VMStateError(
                `Cannot connect to the QEMU monitor at ${socketPath} (${err.code ?? err.message}): the VM is not running or its socket is stale.`,
                { code: "QMP_UNAVAILABLE", cause: err, details: { socketPath, errno: err.code } },
              ),
            );
          });
          socket.once("close", () =>
            reject(
              new VMStateError(`The QEMU monitor at ${socketPath} closed before greeting: QEMU is exiting.`, {
                code: "QMP_CLOSED",
                details: { socketPath },
              }),
            ),
          );
        }),
      );
      socket.removeAllListeners("error");
      socket.removeAllListeners("close");
      const client = new QmpClient(socket, socketPath, greeting);
      client.attach(splitter);
      await client.execute("qmp_capabilities", undefined, {
        timeoutMs: deadline.remaining(),
        signal: deadline.signal,
      });
      return client;
    } catch (e) {
      socket.destroy();
      throw e;
    } finally {
      deadline.dispose();
    }
  }

  private attach(splitter: LineSplitter): void {
    this.socket.on("data", (chunk: string) => {
      if (this.closed) return;
      try {
        for (const line of splitter.push(chunk)) this.dispatch(parseQmpLine(line));
      } catch (e) {
        this.fail(e as Error);
      }
    });
    this.socket.on("error", (err: NodeJS.ErrnoException) =>
      this.fail(
        new VMStateError(
          `The QEMU monitor connection at ${this.socketPath} failed (${err.code ?? err.message}): QEMU exited or dropped it.`,
          { code: "QMP_CLOSED", cause: err, details: { socketPath: this.socketPath, errno: err.code } },
        ),
      ),
    );
    this.socket.on("close", () => this.fail(undefined));
  }

  private dispatch(msg: QmpMessage): void {
    if (msg.kind === "event") {
      this.queue.push(msg.event);
      if (this.queue.length > MAX_QUEUED_EVENTS) this.queue.shift();
      for (const w of this.waiters) w();
      this.emit("event", msg.event);
      return;
    }
    if (msg.kind === "greeting") throw malformed("a second greeting");
    const id = typeof msg.id === "string" ? msg.id : undefined;
    const p = id !== undefined ? this.pending.get(id) : undefined;
    if (!p) {
      if (id !== undefined && this.abandoned.delete(id)) return;
      throw malformed(`a reply to a command it was never sent (id ${JSON.stringify(msg.id)})`);
    }
    this.pending.delete(id!);
    if (msg.kind === "return") p.resolve(msg.value);
    else
      p.reject(
        new QmpCommandError(
          `QEMU rejected QMP command ${p.command}: ${msg.errorClass}: ${msg.desc}`,
          { errorClass: msg.errorClass, desc: msg.desc },
          { details: { command: p.command } },
        ),
      );
  }

  /** Ends the connection; pending commands fail with `err` or a VMStateError (QEMU went away). */
  private fail(err: Error | undefined): void {
    if (this.closed) return;
    this.closed = true;
    this.closedWith = err;
    this.socket.destroy();
    const reason =
      err ??
      new VMStateError(
        `The QEMU monitor at ${this.socketPath} closed: QEMU exited or dropped the connection.`,
        {
          code: "QMP_CLOSED",
          details: { socketPath: this.socketPath },
        },
      );
    for (const p of this.pending.values()) p.reject(reason);
    this.pending.clear();
    for (const w of this.waiters) w();
    this.emit("close", err);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Sends a command and resolves with its `return` value. */
  async execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    options: QmpCallOptions = {},
  ): Promise<T> {
    if (typeof command !== "string" || !/^[A-Za-z0-9_-]+$/.test(command)) {
      throw new ValidationError(`QMP command name ${JSON.stringify(command)} is invalid.`);
    }
    if (this.closed) {
      throw (
        this.closedWith ??
        new VMStateError(`The QEMU monitor at ${this.socketPath} is closed; reconnect to a running VM.`, {
          code: "QMP_CLOSED",
        })
      );
    }
    const id = `smolvm-${this.nextId++}`;
    const deadline = new Deadline(
      options.timeoutMs ?? DEFAULT_TIMEOUT_MS,
      options.signal,
      `QMP command ${command}`,
    );
    try {
      const reply = new Promise<unknown>((resolve, reject) =>
        this.pending.set(id, { command, resolve, reject }),
      );
      const msg: Record<string, unknown> = { execute: command, id };
      if (args !== undefined) msg.arguments = args;
      this.socket.write(`${JSON.stringify(msg)}\n`);
      return (await deadline.race(reply)) as T;
    } catch (e) {
      if (this.pending.delete(id)) this.abandoned.add(id);
      throw e;
    } finally {
      deadline.dispose();
    }
  }

  queryStatus(options?: QmpCallOptions): Promise<QmpStatus> {
    return this.execute<QmpStatus>("query-status", undefined, options);
  }
  /** ACPI power button: a guest that handles it shuts down cleanly (QEMU then exits, -no-reboot). */
  async systemPowerdown(options?: QmpCallOptions): Promise<void> {
    await this.execute("system_powerdown", undefined, options);
  }
  /** Pauses the vCPUs. */
  async stop(options?: QmpCallOptions): Promise<void> {
    await this.execute("stop", undefined, options);
  }
  /** Resumes the vCPUs. */
  async cont(options?: QmpCallOptions): Promise<void> {
    await this.execute("cont", undefined, options);
  }
  /** Asks QEMU to exit now. Resolves once QEMU acknowledged; the connection then closes. */
  async quit(options?: QmpCallOptions): Promise<void> {
    try {
      await this.execute("quit", undefined, options);
    } catch (e) {
      // QEMU may close the socket before the reply reaches us: that is the quit we asked for.
      if (!(e instanceof VMStateError && e.code === "QMP_CLOSED")) throw e;
    }
  }

  /** Runs a human-monitor command (for what QMP lacks, like hostfwd) and returns its text output. */
  humanMonitorCommand(commandLine: string, options?: QmpCallOptions): Promise<string> {
    return this.execute<string>("human-monitor-command", { "command-line": commandLine }, options);
  }

  /** Adds tcp:127.0.0.1:hostPort -> guest:guestPort on the VM's user-mode network. */
  async hostfwdAdd(hostPort: number, guestPort: number, options?: QmpCallOptions): Promise<void> {
    validatePort("hostPort", hostPort);
    validatePort("guestPort", guestPort);
    const rule = `tcp:127.0.0.1:${hostPort}-:${guestPort}`;
    const out = await this.humanMonitorCommand(`hostfwd_add ${NETDEV_ID} ${rule}`, options);
    // HMP reports failure only as text; success is silent, so any output means it failed.
    if (out.trim().length > 0) {
      throw new QmpCommandError(
        `QEMU could not forward 127.0.0.1:${hostPort} to guest port ${guestPort} (is the host port in use?).`,
        { errorClass: "HostfwdFailed", desc: out.trim().slice(0, 200) },
        { details: { hostPort, guestPort } },
      );
    }
  }

  /** Removes the forward on 127.0.0.1:hostPort. */
  async hostfwdRemove(hostPort: number, options?: QmpCallOptions): Promise<void> {
    validatePort("hostPort", hostPort);
    const out = await this.humanMonitorCommand(
      `hostfwd_remove ${NETDEV_ID} tcp:127.0.0.1:${hostPort}`,
      options,
    );
    // QEMU prints "host forwarding rule for <rule> removed" or "... not found".
    if (!/ removed\s*$/.test(out)) {
      throw new QmpCommandError(
        `QEMU has no forward on 127.0.0.1:${hostPort} to remove.`,
        { errorClass: "HostfwdNotFound", desc: out.trim().slice(0, 200) },
        { details: { hostPort } },
      );
    }
  }

  /** Resolves with the next event named `name` (already-queued events count). */
  async waitForEvent(name: string, options: QmpCallOptions = {}): Promise<QmpEvent> {
    const deadline = new Deadline(
      options.timeoutMs ?? DEFAULT_TIMEOUT_MS,
      options.signal,
      `waiting for QMP event ${name}`,
    );
    try {
      for (;;) {
        const i = this.queue.findIndex((e) => e.event === name);
        if (i >= 0) return this.queue.splice(i, 1)[0]!;
        if (this.closed) {
          throw new VMStateError(`The QEMU monitor closed before event ${name} arrived.`, {
            code: "QMP_CLOSED",
          });
        }
        await deadline.race(this.nextChange());
      }
    } finally {
      deadline.dispose();
    }
  }

  private nextChange(): Promise<void> {
    return new Promise((resolve) => {
      const w = () => {
        this.waiters.delete(w);
        resolve();
      };
      this.waiters.add(w);
    });
  }

  /** Events as they arrive (including those queued before iteration began); ends when the connection closes. */
  async *events(options: { signal?: AbortSignal } = {}): AsyncGenerator<QmpEvent> {
    const deadline = new Deadline(undefined, options.signal, "QMP event iteration");
    try {
      for (;;) {
        const e = this.queue.shift();
        if (e) {
          yield e;
          continue;
        }
        if (this.closed) return;
        await deadline.race(this.nextChange());
      }
    } finally {
      deadline.dispose();
    }
  }

  /** Idempotent. */
  async close(): Promise<void> {
    if (!this.closed) {
      this.socket.end();
      this.fail(undefined);
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
