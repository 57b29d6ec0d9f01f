/**
 * Pure parsing for `smolssh`: OpenSSH-style destination, -L/-R/-D specs and -o Key=Value
 * options, turned into library options. No I/O here.
 */
import { isPort } from "../common/port.js";
import { ValidationError } from "../errors.js";
import type { AuthConfig } from "../ssh/auth.js";
import { createKeyAuth, createPasswordAuth } from "../ssh/auth.js";
import type { SessionConnectOptions } from "../ssh/connect-options.js";
import type { HostKeyPolicy } from "../ssh/hostkeys.js";

export interface SmolsshFlags {
  port?: string;
  identity?: string[];
  login?: string;
  jump?: string;
  local?: string[];
  remote?: string[];
  dynamic?: string[];
  noCommand?: boolean;
  option?: string[];
  configFile?: string;
  events?: string;
  evidence?: string;
}

export interface ForwardSpecL {
  bindHost?: string;
  port: number;
  host: string;
  hostPort: number;
}

export interface SmolsshPlan {
  connect: SessionConnectOptions;
  local: ForwardSpecL[];
  remote: ForwardSpecL[];
  dynamic: Array<{ bindHost?: string; port: number }>;
  command?: string;
  noCommand: boolean;
  eventsPath?: string;
  evidencePath?: string;
  warnings: string[];
}

/** Splits on ':' outside [brackets] (IPv6). */
function splitColon(s: string): string[] {
  const out: string[] = [];
  let cur = "";
  let depth = 0;
  for (const ch of s) {
    if (ch === "[") depth++;
    if (ch === "]") depth--;
    if (ch === ":" && depth === 0) {
      out.push(cur);
      cur = "";
    } else cur += ch;
  }
  out.push(cur);
  return out.map((p) => p.replace(/^\[(.*)\]$/, "$1"));
}

function port(v: string, what: string, allowZero = false): number {
  const n = Number(v);
  if (!/^\d+$/.test(v) || !isPort(n, { allowZero })) {
    throw new ValidationError(`${what}: bad port ${JSON.stringify(v)}.`);
  }
  return n;
}

/** `[bind_address:]port:host:hostport` (for -L and -R). */
export function parseForwardSpec(spec: string, flag: "-L" | "-R"): ForwardSpecL {
  const p = splitColon(spec);
  if (p.length === 3)
    return { port: port(p[0]!, flag, flag === "-R"), host: p[1]!, hostPort: port(p[2]!, flag) };
  if (p.length === 4) {
    return {
      bindHost: p[0] || undefined,
      port: port(p[1]!, flag, flag === "-R"),
      host: p[2]!,
      hostPort: port(p[3]!, flag),
    };
  }
  throw new ValidationError(`${flag} ${JSON.stringify(spec)}: expected [bind_address:]port:host:hostport.`);
}

/** `[bind_address:]port` (for -D). */
export function parseDynamicSpec(spec: string): { bindHost?: string; port: number } {
  const p = splitColon(spec);
  if (p.length === 1) return { port: port(p[0]!, "-D", true) };
  if (p.length === 2) return { bindHost: p[0] || undefined, port: port(p[1]!, "-D", true) };
  throw new ValidationError(`-D ${JSON.stringify(spec)}: expected [bind_address:]port.`);
}

/** `[user@]host` → parts (the last @ separates, as user names may contain @). */
export function parseDestination(dest: string): { user?: string; host: string } {
  if (dest.startsWith("ssh://")) {
    const m = /^ssh:\/\/(?:([^@]+)@)?(\[[^\]]+\]|[^:/]+)(?::(\d+))?\/?$/.exec(dest);
    if (!m) throw new ValidationError(`destination ${JSON.stringify(dest)} is not ssh://[user@]host[:port].`);
    return { ...(m[1] ? { user: m[1] } : {}), host: m[2]!.replace(/^\[(.*)\]$/, "$1") };
  }
  const at = dest.lastIndexOf("@");
  const host = at >= 0 ? dest.slice(at + 1) : dest;
  if (!host) throw new ValidationError("destination host is empty.");
  return at >= 0 ? { user: dest.slice(0, at), host } : { host };
}

function yesNoPolicy(v: string): HostKeyPolicy {
  const x = v.toLowerCase();
  if (x === "yes" || x === "ask") return "strict";
  if (x === "accept-new") return "accept-new";
  if (x === "no" || x === "off") return "insecure";
  throw new ValidationError(`StrictHostKeyChecking=${v}: use yes, accept-new or no.`);
}

export function buildPlan(
  dest: string,
  commandWords: string[],
  flags: SmolsshFlags,
  env: NodeJS.ProcessEnv = {},
): SmolsshPlan {
  const warnings: string[] = [];
  const d = parseDestination(dest);
  const o: Record<string, string> = {};
  for (const kv of flags.option ?? []) {
    const m = /^\s*([A-Za-z]+)\s*[= ]\s*(.*)$/.exec(kv);
    if (!m) throw new ValidationError(`-o ${JSON.stringify(kv)}: expected Key=Value.`);
    const k = m[1]!.toLowerCase();
    if (!(k in o)) o[k] = m[2]!; // first value wins, as in OpenSSH
  }
  const connect: SessionConnectOptions = {
    host: d.host,
    sshConfig: flags.configFile ?? true,
  };
  const user = flags.login ?? d.user ?? o.user;
  if (user) connect.username = user;
  const p = flags.port ?? o.port;
  if (p) connect.port = port(p, "-p");
  const auth: AuthConfig[] = [];
  for (const id of [...(flags.identity ?? []), ...(o.identityfile ? [o.identityfile] : [])])
    auth.push(createKeyAuth(id));
  // Non-interactive password source, like `sshpass -e`; never taken from argv.
  if (env.SMOLSSH_PASSWORD) auth.push(createPasswordAuth(env.SMOLSSH_PASSWORD));
  if (auth.length) connect.auth = auth;
  if (flags.jump ?? o.proxyjump) connect.proxyJump = (flags.jump ?? o.proxyjump)!;
  if (o.proxycommand) connect.proxyCommand = o.proxycommand;
  if (o.connecttimeout) connect.connectTimeoutMs = Number(o.connecttimeout) * 1000;
  if (o.stricthostkeychecking || o.userknownhostsfile) {
    connect.hostKey = {
      ...(o.stricthostkeychecking ? { policy: yesNoPolicy(o.stricthostkeychecking) } : {}),
      ...(o.userknownhostsfile ? { knownHostsPath: o.userknownhostsfile.split(/\s+/) } : {}),
    };
  }
  if (o.serveraliveinterval) {
    // 0 turns keepalive off, as in OpenSSH; otherwise it tunes the connection's default one.
    connect.keepalive =
      Number(o.serveraliveinterval) > 0
        ? {
            intervalMs: Number(o.serveraliveinterval) * 1000,
            countMax: o.serveralivecountmax ? Number(o.serveralivecountmax) : 3,
          }
        : false;
  }
  const known = new Set([
    "user",
    "port",
    "identityfile",
    "proxyjump",
    "proxycommand",
    "connecttimeout",
    "stricthostkeychecking",
    "userknownhostsfile",
    "serveraliveinterval",
    "serveralivecountmax",
    "batchmode",
  ]);
  for (const k of Object.keys(o))
    if (!known.has(k)) warnings.push(`-o ${k} is not supported and was ignored.`);
  const command = commandWords.length ? commandWords.join(" ") : undefined;
  return {
    connect,
    local: (flags.local ?? []).map((s) => parseForwardSpec(s, "-L")),
    remote: (flags.remote ?? []).map((s) => parseForwardSpec(s, "-R")),
    dynamic: (flags.dynamic ?? []).map(parseDynamicSpec),
    ...(command ? { command } : {}),
    noCommand: flags.noCommand === true,
    ...(flags.events ? { eventsPath: flags.events } : {}),
    ...(flags.evidence ? { evidencePath: flags.evidence } : {}),
    warnings,
  };
}

/** OpenSSH's exit status for a remote command: its code, or 255 when it died by a signal or gave none. */
export function exitStatusFor(exitCode: number | null): number {
  return exitCode ?? 255;
}
