/**
 * SSH-level keepalive with events: every `intervalMs` a keepalive@openssh.com global request
 * (want-reply) is sent, as OpenSSH's ServerAliveInterval does. When no reply has arrived for
 * `countMax * intervalMs`, the transport is declared dead and destroyed, so everything waiting
 * on it fails at once with ConnectionLostError instead of hanging on a silent link.
 *
 * Default: 15 s x 3, so a dead link is noticed within 45 s (OpenSSH has keepalive off by
 * default; a library that reconnects needs it on). Every SSHConnection runs one monitor (SSHClient
 * and SSHSupervisor included); ssh2's own keepalive timer is never used. The timer is unref'd:
 * it never keeps the process alive, and it is cleared when the connection closes.
 */
import type { Client } from "ssh2";
import { ValidationError } from "../errors.js";
import type { EventSink } from "./events.js";

export interface KeepaliveConfig {
  intervalMs: number;
  countMax: number;
}

export const DEFAULT_KEEPALIVE: Readonly<KeepaliveConfig> = Object.freeze({
  intervalMs: 15_000,
  countMax: 3,
});

/**
 * The keepalive a connection runs: `false` turns it off, a partial config is completed with the
 * defaults, undefined is the default.
 */
export function resolveKeepalive(k: Partial<KeepaliveConfig> | false | undefined): KeepaliveConfig | false {
  if (k === false) return false;
  if (k !== undefined && (typeof k !== "object" || k === null)) {
    throw new ValidationError("keepalive must be false or { intervalMs, countMax }.");
  }
  const r = { ...DEFAULT_KEEPALIVE, ...k };
  validateKeepalive(r);
  return r;
}

export function validateKeepalive(k: KeepaliveConfig): void {
  if (!Number.isFinite(k.intervalMs) || k.intervalMs <= 0) {
    throw new ValidationError(`keepalive.intervalMs must be a positive number, got ${String(k.intervalMs)}.`);
  }
  if (!Number.isInteger(k.countMax) || k.countMax < 1) {
    throw new ValidationError(`keepalive.countMax must be an integer >= 1, got ${String(k.countMax)}.`);
  }
}

interface Ssh2Internals {
  _protocol?: { ping(): void };
  _callbacks?: Array<(hadErr: boolean) => void>;
}

/**
 * Sends one keepalive@openssh.com request and calls `onReply` when the server answers. ssh2
 * only exposes this through its own timer, so the request is made the way ssh2 makes it:
 * a reply callback queued in order with every other global request, then the ping.
 */
export function sendKeepalive(client: Client, onReply: () => void): void {
  const c = client as unknown as Ssh2Internals;
  if (c._protocol && Array.isArray(c._callbacks)) {
    c._callbacks.push(() => onReply());
    c._protocol.ping();
    return;
  }
  // Public fallback: cancelling a forward that does not exist is answered (with a failure).
  client.unforwardIn("keepalive.invalid", 1, () => onReply());
}

export interface KeepaliveMonitorOptions extends KeepaliveConfig {
  events?: EventSink;
  /** Called once when the link is declared dead (before the transport is destroyed). */
  onTimeout?: (info: { silentMs: number; unanswered: number }) => void;
  /** Labels for events. */
  host?: string;
  port?: number;
}

export class KeepaliveMonitor {
  private timer: NodeJS.Timeout | undefined;
  private lastReply = performance.now();
  private unanswered = 0;
  private sent = 0;
  private stopped = false;
  timedOut = false;

  constructor(
    private readonly client: Client,
    private readonly options: KeepaliveMonitorOptions,
  ) {
    validateKeepalive(options);
  }

  /** The interval and count this monitor runs with. */
  get config(): KeepaliveConfig {
    return { intervalMs: this.options.intervalMs, countMax: this.options.countMax };
  }

  get deadAfterMs(): number {
    return this.options.intervalMs * this.options.countMax;
  }

  start(): this {
    this.lastReply = performance.now();
    this.schedule();
    return this;
  }

  private schedule(): void {
    if (this.stopped) return;
    const untilDead = this.lastReply + this.deadAfterMs - performance.now();
    this.timer = setTimeout(() => this.tick(), Math.max(0, Math.min(this.options.intervalMs, untilDead)));
    // The socket keeps the process alive while it is open; the keepalive alone must not.
    this.timer.unref();
  }

  /** True while the monitor runs (a timer is armed). */
  get active(): boolean {
    return !this.stopped;
  }

  private tick(): void {
    this.timer = undefined;
    if (this.stopped) return;
    const silentMs = performance.now() - this.lastReply;
    if (silentMs >= this.deadAfterMs - 1) {
      this.timedOut = true;
      this.stop();
      this.options.events?.emit("KEEPALIVE", {
        phase: "timeout",
        host: this.options.host,
        port: this.options.port,
        silentMs: Math.round(silentMs),
        unanswered: this.unanswered,
        intervalMs: this.options.intervalMs,
        countMax: this.options.countMax,
      });
      try {
        this.options.onTimeout?.({ silentMs, unanswered: this.unanswered });
      } finally {
        this.client.destroy();
      }
      return;
    }
    const seq = ++this.sent;
    const sentAt = performance.now();
    this.unanswered++;
    try {
      sendKeepalive(this.client, () => {
        if (this.stopped) return;
        this.unanswered = 0;
        this.lastReply = performance.now();
        this.options.events?.emit("KEEPALIVE", {
          phase: "reply",
          seq,
          rttMs: Math.round((performance.now() - sentAt) * 100) / 100,
        });
      });
      this.options.events?.emit("KEEPALIVE", { phase: "sent", seq, unanswered: this.unanswered });
    } catch {
      // The transport is going away; its close handler takes over.
    }
    this.schedule();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }
}
