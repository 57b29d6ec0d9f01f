/**
 * The full connect of the public API: `SSHConnection.connect` plus what sits around it —
 * OpenSSH config (`sshConfig`), ProxyJump / ProxyCommand, an owned JSONL event log
 * (`eventLogPath`) — and the evidence bundle of a connection. Explicit options always win over
 * the config file, as on OpenSSH's command line.
 */
import { ValidationError } from "../errors.js";
import { type AuthConfig, createAgentAuth, createKeyAuth, getAgentAvailable } from "./auth.js";
import { resolveSshConfig, shellSafeToken } from "./config.js";
import type { ConnectOptions, SSHConnection } from "./connection.js";
import { SSHConnection as Connection } from "./connection.js";
import { EventCollector, type EventSink } from "./events.js";
import { algorithmsFromHandshake, EvidenceBundle } from "./evidence.js";
import {
  connectThroughCommand,
  connectThroughJumps,
  type JumpSpec,
  ownResources,
  parseProxyJump,
} from "./proxy.js";

export interface SessionConnectOptions extends Omit<ConnectOptions, "username" | "sock"> {
  /** Default: from the config file, else the local user. */
  username?: string;
  /** Apply OpenSSH config: true = ~/.ssh/config, a string = that file. Default false. */
  sshConfig?: boolean | string;
  /** `[user@]host[:port],...` or hops with their own options (auth, hostKey, ...). */
  proxyJump?: string | Array<JumpSpec | ConnectOptions>;
  /** A local command whose stdin/stdout reach the server's SSH port (%h %p %r %% expanded). */
  proxyCommand?: string;
  /** Write events as JSONL to this file (a collector is created when `events` is not given). */
  eventLogPath?: string;
}

export interface ResolvedSession {
  target: ConnectOptions;
  jumps: ConnectOptions[];
  proxyCommand?: string;
  /** Problems in config files (never fatal). */
  warnings: string[];
}

function localUser(): string {
  return process.env.USER ?? process.env.LOGNAME ?? "root";
}

function authFromIdentities(files: string[], identitiesOnly: boolean): AuthConfig[] | undefined {
  if (!files.length) return undefined;
  const keys = files.map((f) => createKeyAuth(f));
  return !identitiesOnly && getAgentAvailable() ? [createAgentAuth(), ...keys] : keys;
}

/** %h %p %r %% in a caller's ProxyCommand; names are refused unless shell-safe. */
function expandProxyTokens(cmd: string, t: { host: string; port: number; user: string }): string {
  return cmd.replace(/%([hpr%])/g, (_m, c: string) =>
    c === "h"
      ? shellSafeToken(t.host, "host name")
      : c === "p"
        ? String(t.port)
        : c === "r"
          ? shellSafeToken(t.user, "user name")
          : "%",
  );
}

/** Pure-ish resolution (reads config files only): what to connect to, through what. */
export function resolveSessionOptions(opts: SessionConnectOptions): ResolvedSession {
  if (!opts || typeof opts.host !== "string" || opts.host === "") {
    throw new ValidationError("host is required: pass the SSH server's address or a config alias.");
  }
  const warnings: string[] = [];
  const { sshConfig, proxyJump, proxyCommand, eventLogPath: _log, ...base } = opts;
  let target: ConnectOptions = { ...base, username: opts.username ?? "" };
  let jumpSpec = proxyJump;
  let command = proxyCommand;
  let commandExpanded = false;
  const configPath = typeof sshConfig === "string" ? sshConfig : undefined;
  const resolveHost = (host: string, user?: string, port?: number) =>
    resolveSshConfig(host, { ...(configPath ? { configPath, systemConfigPath: false } : {}), user, port });

  if (sshConfig) {
    const c = resolveHost(opts.host, opts.username, opts.port);
    warnings.push(...c.warnings);
    const has = (k: string) => c.configured.includes(k);
    target = {
      ...target,
      host: c.hostName,
      port: opts.port ?? c.port,
      username: opts.username ?? c.user,
      auth: opts.auth ?? authFromIdentities(c.identityFiles, c.identitiesOnly),
      connectTimeoutMs: opts.connectTimeoutMs ?? c.connectTimeoutMs,
      // ServerAliveInterval/CountMax tune the connection's one keepalive; an interval of 0 turns
      // it off, as in OpenSSH. Unset: the library default (on).
      keepalive:
        opts.keepalive ??
        (has("serveraliveinterval") && c.serverAliveIntervalMs <= 0
          ? false
          : has("serveraliveinterval") || has("serveralivecountmax")
            ? {
                ...(c.serverAliveIntervalMs > 0 ? { intervalMs: c.serverAliveIntervalMs } : {}),
                countMax: c.serverAliveCountMax,
              }
            : undefined),
      hostKey:
        opts.hostKey ??
        (has("stricthostkeychecking") || has("userknownhostsfile")
          ? { policy: c.strictHostKeyChecking, knownHostsPath: c.userKnownHostsFiles }
          : undefined),
    };
    if (jumpSpec === undefined && c.proxyJump) jumpSpec = c.proxyJump;
    if (command === undefined && c.proxyCommand && c.proxyCommand.toLowerCase() !== "none") {
      // Already expanded (and checked) by the config resolver: expanding again would re-read %.
      command = c.proxyCommand;
      commandExpanded = true;
    }
  }
  if (!target.username) target.username = localUser();
  for (const k of Object.keys(target) as Array<keyof ConnectOptions>)
    if (target[k] === undefined) delete target[k];

  if (jumpSpec !== undefined && command !== undefined) {
    throw new ValidationError("give either proxyJump or proxyCommand, not both.");
  }
  const hops: ConnectOptions[] = [];
  const list = typeof jumpSpec === "string" ? parseProxyJump(jumpSpec) : (jumpSpec ?? []);
  for (const hop of list) {
    if ("username" in hop || "auth" in hop || "hostKey" in hop) {
      // A hop with its own full options: used as given.
      const full = hop as ConnectOptions;
      hops.push({ ...full, username: full.username ?? target.username });
      continue;
    }
    const j = hop as JumpSpec;
    let h: ConnectOptions = {
      host: j.host,
      port: j.port ?? 22,
      username: j.user ?? target.username,
      // Without a config, a hop trusts the same known_hosts and uses the same credentials;
      // a pinned fingerprint belongs to the target only.
      ...(target.auth ? { auth: target.auth } : {}),
      ...(target.hostKey ? { hostKey: { ...target.hostKey, fingerprint: undefined } } : {}),
      ...(target.connectTimeoutMs ? { connectTimeoutMs: target.connectTimeoutMs } : {}),
      ...(target.events ? { events: target.events } : {}),
    };
    if (sshConfig) {
      const c = resolveHost(j.host, j.user, j.port);
      h = {
        ...h,
        host: c.hostName,
        port: j.port ?? c.port,
        username: j.user ?? c.user,
        auth: authFromIdentities(c.identityFiles, c.identitiesOnly) ?? h.auth,
        ...(c.configured.includes("stricthostkeychecking") || c.configured.includes("userknownhostsfile")
          ? { hostKey: { policy: c.strictHostKeyChecking, knownHostsPath: c.userKnownHostsFiles } }
          : {}),
      };
    }
    hops.push(h);
  }
  const resolved: ResolvedSession = { target, jumps: hops, warnings };
  if (command && commandExpanded) resolved.proxyCommand = command;
  else if (command) {
    resolved.proxyCommand = expandProxyTokens(command, {
      host: target.host,
      port: target.port ?? 22,
      user: target.username,
    });
  }
  return resolved;
}

/**
 * Connects with everything the public options allow. The returned connection owns what was
 * created for it (jump connections, the proxy command, an event log) and closes them with itself.
 */
export async function connectSession(opts: SessionConnectOptions): Promise<SSHConnection> {
  let owned: EventCollector | undefined;
  let events: EventSink | undefined = opts.events;
  if (!events && opts.eventLogPath) {
    owned = new EventCollector({ logPath: opts.eventLogPath });
    events = owned;
  }
  try {
    const r = resolveSessionOptions({ ...opts, ...(events ? { events } : {}) });
    const conn = r.proxyCommand
      ? await connectThroughCommand(r.proxyCommand, r.target)
      : r.jumps.length
        ? await connectThroughJumps(r.jumps, r.target)
        : await Connection.connectDirect(r.target);
    if (owned) {
      const log = owned;
      ownResources(conn, [() => log.close()]);
      sessionEvents.set(conn, log);
    } else if (opts.events instanceof EventCollector) sessionEvents.set(conn, opts.events);
    return conn;
  } catch (e) {
    await owned?.close();
    throw e;
  }
}

const sessionEvents = new WeakMap<SSHConnection, EventCollector>();

/**
 * The evidence bundle of a connection: its events (from `events` or the collector given at
 * connect), negotiated algorithms, timings, host, why it ended, the error and a transcript.
 */
export function getEvidenceBundle(
  conn: SSHConnection | undefined,
  extra: {
    events?: EventCollector;
    error?: unknown;
    transcript?: unknown;
    disconnectReason?: string;
    host?: { host: string; port: number; username?: string };
  } = {},
): EvidenceBundle {
  const collector = extra.events ?? (conn ? sessionEvents.get(conn) : undefined);
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
