/**
 * What a connection is asked for: ConnectOptions (one direct transport) and
 * SessionConnectOptions (the public form: OpenSSH config, ProxyJump / ProxyCommand, an event
 * log), and their resolution into a target and its hops. Explicit options always win over the
 * config file, as on OpenSSH's command line. Reads config files only: no network I/O here.
 */
import type { Duplex } from "node:stream";
import type { ConnectConfig } from "ssh2";
import { isPort } from "../common/port.js";
import { ValidationError } from "../errors.js";
import { type AuthConfig, createAgentAuth, createKeyAuth, getAgentAvailable } from "./auth.js";
import { resolveSshConfig } from "./config.js";
import { shellSafeToken } from "./config-tokens.js";
import type { EventSink } from "./events.js";
import type { HostKeyOptions } from "./hostkeys.js";
import type { KeepaliveConfig } from "./keepalive.js";

export type KeepaliveOptions = KeepaliveConfig;

export interface ConnectOptions {
  host: string;
  port?: number;
  username: string;
  /** One method or an ordered list tried on one connection. Default: agent, then default keys. */
  auth?: AuthConfig | AuthConfig[];
  hostKey?: HostKeyOptions;
  /** TCP connect + handshake + auth. Default 10 000. */
  connectTimeoutMs?: number;
  /**
   * keepalive@openssh.com every `intervalMs`; `countMax` unanswered in a row close the
   * connection with ConnectionLostError (details.reason "keepalive_timeout"). Default on,
   * 15 000 ms x 3 (DEFAULT_KEEPALIVE); `false` turns it off.
   */
  keepalive?: Partial<KeepaliveOptions> | false;
  events?: EventSink;
  /** A pre-connected stream (proxy, jump host); host/port then only label errors and known_hosts. */
  sock?: Duplex;
  signal?: AbortSignal;
  /** ssh2 algorithm lists (exact lists replace the defaults). */
  algorithms?: ConnectConfig["algorithms"];
}

export interface JumpSpec {
  user?: string;
  host: string;
  port?: number;
}

/**
 * Parses OpenSSH's ProxyJump / -J syntax: `[user@]host[:port]` or `ssh://[user@]host[:port]`,
 * comma separated, first hop first; IPv6 hosts in brackets. "none" means no jump.
 */
export function parseProxyJump(spec: string): JumpSpec[] {
  const s = spec.trim();
  if (s === "" || s.toLowerCase() === "none") return [];
  return s.split(",").map((raw) => {
    let part = raw.trim();
    if (part.startsWith("ssh://")) part = part.slice(6).replace(/\/$/, "");
    let user: string | undefined;
    const at = part.lastIndexOf("@");
    if (at >= 0) {
      user = part.slice(0, at);
      part = part.slice(at + 1);
    }
    let host = part;
    let port: number | undefined;
    const v6 = /^\[([^\]]+)\](?::(\d+))?$/.exec(part);
    if (v6) {
      host = v6[1]!;
      if (v6[2]) port = Number(v6[2]);
    } else if ((part.match(/:/g) ?? []).length === 1) {
      const i = part.indexOf(":");
      host = part.slice(0, i);
      port = Number(part.slice(i + 1));
    }
    if (!host || (user !== undefined && !user)) {
      throw new ValidationError(`ProxyJump entry ${JSON.stringify(raw)} is not [user@]host[:port].`);
    }
    if (port !== undefined && !isPort(port)) {
      throw new ValidationError(`ProxyJump entry ${JSON.stringify(raw)} has an invalid port.`);
    }
    return { ...(user ? { user } : {}), host, ...(port ? { port } : {}) };
  });
}

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
