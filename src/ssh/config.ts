/**
 * OpenSSH client configuration (ssh_config(5)) resolution: reads files (only regular files,
 * bounded) and computes the settings for one host the way `ssh -G` does. Parsing is in
 * config-parse.ts, tokens in config-tokens.ts.
 *
 * Supported: `Host` (several patterns, `*`/`?` wildcards, `!` negation; matched case-sensitively
 * against the host as typed, as OpenSSH does), `Match` with `all`, `host`, `originalhost`,
 * `user`, `localuser`, `tagged`, `final`, `canonical` (and `!` before each). `Match exec` and
 * `Match localnetwork` never match: resolving a config never runs commands. `Include` (relative
 * to ~/.ssh, globs, depth 16, conditional inside a block), first value wins per keyword except
 * IdentityFile (accumulates), case-insensitive keywords, `Key=Value`, quoted values, trailing
 * `#` comments, and tokens `%h %p %r %u %n %d %i %l %L %C %%` plus `~` and `${ENV}`.
 */
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { isPort } from "../common/port.js";
import { ValidationError } from "../errors.js";
import { type MatchCriterion, parseSshConfig, type SshConfigFile } from "./config-parse.js";
import { expandPath, expandTokens, type TokenContext } from "./config-tokens.js";
import type { HostKeyPolicy } from "./hostkeys.js";
import { matchHostPattern } from "./known-hosts.js";

export interface ResolvedSshConfig {
  /** The host as asked for (the alias). */
  host: string;
  hostName: string;
  port: number;
  user: string;
  /** IdentityFile values in order, expanded. Empty when none is configured (use defaults). */
  identityFiles: string[];
  identitiesOnly: boolean;
  proxyJump?: string;
  /** ProxyCommand with %h %p %r %n %% expanded. */
  proxyCommand?: string;
  connectTimeoutMs?: number;
  /** 0 = disabled (OpenSSH's default). */
  serverAliveIntervalMs: number;
  serverAliveCountMax: number;
  /** yes/ask -> "strict" (a library cannot ask), accept-new, no/off -> "insecure". */
  strictHostKeyChecking: HostKeyPolicy;
  userKnownHostsFiles: string[];
  /** Keywords (lower-case) the config files set for this host: lets explicit options and config merge. */
  configured: string[];
  /** First value of every keyword that applied, as written (lower-case keyword -> args). */
  raw: Record<string, string[]>;
  /** Files read, in order. */
  files: string[];
  /** Problems found (bad lines, unreadable includes); never fatal. */
  warnings: string[];
}

export interface ResolveSshConfigOptions {
  /** Config file; default ~/.ssh/config (missing is fine). An explicit path must exist. */
  configPath?: string;
  /** System-wide file read after the user one; default /etc/ssh/ssh_config unless configPath is given. */
  systemConfigPath?: string | false;
  /** User given on the command line: wins over `User`. */
  user?: string;
  /** Port given on the command line: wins over `Port`. */
  port?: number;
}

const MAX_CONFIG_BYTES = 4 * 1024 * 1024;
const MAX_INCLUDE_DEPTH = 16;
/** Keywords whose value is the rest of the line, verbatim. */

// ---------------------------------------------------------------- resolution

/** Reads a regular file (never a FIFO or device), bounded; undefined when missing. */
function readConfigFile(file: string): string | undefined {
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT" || code === "ENOTDIR") return undefined;
    throw err;
  }
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile()) throw Object.assign(new Error(`${file} is not a regular file`), { code: "EINVAL" });
    if (st.size > MAX_CONFIG_BYTES) throw Object.assign(new Error(`${file} is too large`), { code: "EFBIG" });
    return fs.readFileSync(fd, "utf8");
  } finally {
    fs.closeSync(fd);
  }
}

/** Minimal glob(3) for Include: `*`, `?` and `[...]` per path segment, sorted results. */
export function globPaths(pattern: string): string[] {
  if (!/[*?[]/.test(pattern)) return [pattern];
  const abs = path.resolve(pattern);
  const parts = abs.split("/").filter(Boolean);
  let bases = ["/"];
  for (let i = 0; i < parts.length; i++) {
    const seg = parts[i]!;
    const next: string[] = [];
    for (const base of bases) {
      if (!/[*?[]/.test(seg)) {
        next.push(path.join(base, seg));
        continue;
      }
      let names: string[];
      try {
        names = fs.readdirSync(base);
      } catch {
        continue;
      }
      const re = segmentRegex(seg);
      for (const name of names.sort()) {
        if (name.startsWith(".") && !seg.startsWith(".")) continue;
        if (re.test(name)) next.push(path.join(base, name));
      }
    }
    bases = next;
  }
  return bases.filter((p) => fs.existsSync(p));
}

function segmentRegex(seg: string): RegExp {
  let src = "";
  for (let i = 0; i < seg.length; i++) {
    const c = seg[i]!;
    if (c === "*") src += "[^/]*";
    else if (c === "?") src += "[^/]";
    else if (c === "[") {
      const end = seg.indexOf("]", i + 2);
      if (end < 0) src += "\\[";
      else {
        let cls = seg.slice(i + 1, end);
        if (cls.startsWith("!")) cls = "^" + cls.slice(1);
        src += `[${cls.replace(/\\/g, "\\\\")}]`;
        i = end;
      }
    } else src += c.replace(/[.+^${}()|\\]/g, "\\$&");
  }
  return new RegExp(`^${src}$`);
}

interface ResolveState {
  host: string;
  originalHost: string;
  localUser: string;
  homeDir: string;
  values: Map<string, string[]>;
  identityFiles: string[];
  configured: Set<string>;
  files: string[];
  warnings: string[];
  wantFinal: boolean;
  postCanon: boolean;
}

function currentHostName(st: ResolveState): string {
  const hn = st.values.get("hostname")?.[0];
  // OpenSSH matches `Host` against the name as typed, then lower-cases the resulting host name.
  return (hn === undefined ? st.host : expandTokens(hn, ctxOf(st, st.host), "h%")).toLowerCase();
}

function ctxOf(st: ResolveState, hostName: string): TokenContext {
  return {
    hostName,
    originalHost: st.originalHost,
    port: Number(st.values.get("port")?.[0] ?? 22),
    remoteUser: st.values.get("user")?.[0] ?? st.localUser,
    localUser: st.localUser,
    homeDir: st.homeDir,
  };
}

function evalMatch(st: ResolveState, criteria: MatchCriterion[]): boolean {
  for (const c of criteria) {
    let r: boolean;
    switch (c.name) {
      case "all":
        r = true;
        break;
      case "canonical":
        r = st.postCanon;
        break;
      case "final":
        st.wantFinal = true;
        r = st.postCanon;
        break;
      case "host":
        r = matchList(currentHostName(st), c.arg!, true);
        break;
      case "originalhost":
        r = matchList(st.originalHost, c.arg!, true);
        break;
      case "user":
        r = matchList(st.values.get("user")?.[0] ?? st.localUser, c.arg!, false);
        break;
      case "localuser":
        r = matchList(st.localUser, c.arg!, false);
        break;
      case "tagged":
        r = matchList(st.values.get("tag")?.[0] ?? "", c.arg!, false);
        break;
      default:
        // exec, localnetwork: resolving a config never runs commands or inspects interfaces.
        r = false;
    }
    if (c.negate ? r : !r) return false;
  }
  return true;
}

/** Comma pattern list; negation wins. Match host compares case-insensitively. */
function matchList(name: string, list: string, ci: boolean): boolean {
  let positive = false;
  for (const p of list.split(",")) {
    if (!p) continue;
    const neg = p.startsWith("!");
    const pat = neg ? p.slice(1) : p;
    const hit = ci ? matchHostPattern(name, pat) : matchCase(name, pat);
    if (hit && neg) return false;
    if (hit) positive = true;
  }
  return positive;
}

function matchCase(name: string, pattern: string): boolean {
  const src = pattern
    .replace(/[.+^${}()|[\]\\]/g, "\\$&")
    .replace(/\*/g, "[\\s\\S]*")
    .replace(/\?/g, "[\\s\\S]");
  return new RegExp(`^${src}$`).test(name);
}

/** `Host` lines: patterns are matched case-sensitively against the host as typed. */
function hostLineMatches(host: string, patterns: string[]): boolean {
  let positive = false;
  for (const p of patterns) {
    for (const one of p.split(",")) {
      if (!one) continue;
      if (one.startsWith("!")) {
        if (matchCase(host, one.slice(1))) return false;
      } else if (matchCase(host, one)) positive = true;
    }
  }
  return positive;
}

function applyFile(
  st: ResolveState,
  parsed: SshConfigFile,
  active: boolean,
  neverMatch: boolean,
  depth: number,
  includeBase: string,
): void {
  for (const e of parsed.errors) st.warnings.push(`${parsed.filePath ?? "config"}:${e.line}: ${e.message}`);
  for (const l of parsed.lines) {
    if (l.kind === "host") active = !neverMatch && hostLineMatches(st.host, l.patterns);
    else if (l.kind === "match") active = !neverMatch && evalMatch(st, l.criteria);
    else if (l.kind === "include") {
      if (depth >= MAX_INCLUDE_DEPTH) {
        st.warnings.push(`${parsed.filePath}:${l.line}: Include nested deeper than ${MAX_INCLUDE_DEPTH}`);
        continue;
      }
      for (const pat of l.patterns) {
        const expanded = expandPath(pat, st.homeDir);
        const full = path.isAbsolute(expanded) ? expanded : path.join(includeBase, expanded);
        for (const file of globPaths(full)) {
          loadInto(st, file, active, neverMatch || !active, depth + 1, includeBase);
        }
      }
    } else if (active && !neverMatch) {
      if (l.keyword === "identityfile") {
        st.identityFiles.push(l.args[0]!);
        st.configured.add(l.keyword);
      } else if (!st.values.has(l.keyword)) {
        st.values.set(l.keyword, l.args);
        st.configured.add(l.keyword);
      }
    }
  }
}

function loadInto(
  st: ResolveState,
  file: string,
  active: boolean,
  neverMatch: boolean,
  depth: number,
  includeBase: string,
): boolean {
  let text: string | undefined;
  try {
    text = readConfigFile(file);
  } catch (err) {
    st.warnings.push(`cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    return false;
  }
  if (text === undefined) return false;
  if (!st.files.includes(file)) st.files.push(file);
  applyFile(st, parseSshConfig(text, { filePath: file }), active, neverMatch, depth, includeBase);
  return true;
}

function localUserName(): string {
  try {
    return os.userInfo().username;
  } catch {
    return process.env.USER ?? "root";
  }
}

/**
 * Resolves the settings OpenSSH would use for `host`: user config, then the system config,
 * first value wins; a second pass when a `Match final` asked for one.
 */
export function resolveSshConfig(host: string, opts: ResolveSshConfigOptions = {}): ResolvedSshConfig {
  const homeDir = os.homedir();
  const userConfig =
    opts.configPath !== undefined
      ? expandPath(opts.configPath, homeDir)
      : path.join(homeDir, ".ssh", "config");
  if (opts.configPath !== undefined) {
    let ok: string | undefined;
    try {
      ok = readConfigFile(userConfig);
    } catch (err) {
      throw new ValidationError(
        `Cannot read SSH config ${userConfig} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}): give a readable regular file.`,
        { cause: err, details: { configPath: userConfig } },
      );
    }
    if (ok === undefined) {
      throw new ValidationError(`SSH config ${userConfig} does not exist: fix sshConfig / -F or remove it.`, {
        details: { configPath: userConfig },
      });
    }
  }
  const systemConfig =
    opts.systemConfigPath === false
      ? undefined
      : (opts.systemConfigPath ?? (opts.configPath === undefined ? "/etc/ssh/ssh_config" : undefined));

  const st: ResolveState = {
    host,
    originalHost: host,
    localUser: localUserName(),
    homeDir,
    values: new Map(),
    identityFiles: [],
    configured: new Set(),
    files: [],
    warnings: [],
    wantFinal: false,
    postCanon: false,
  };
  // Command-line values are set first, so they win over the files (first value wins).
  if (opts.user !== undefined) st.values.set("user", [opts.user]);
  if (opts.port !== undefined) st.values.set("port", [String(opts.port)]);

  const pass = () => {
    loadInto(st, userConfig, true, false, 0, path.join(homeDir, ".ssh"));
    if (systemConfig) loadInto(st, systemConfig, true, false, 0, path.dirname(systemConfig));
  };
  pass();
  if (st.wantFinal) {
    st.postCanon = true;
    pass();
  }
  return finish(st);
}

function parseYesNo(v: string | undefined, dflt: boolean): boolean {
  if (v === undefined) return dflt;
  return /^(yes|true)$/i.test(v);
}

function seconds(v: string | undefined, st: ResolveState, kw: string): number | undefined {
  if (v === undefined || /^none$/i.test(v)) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) {
    st.warnings.push(`${kw} ${v} is not a whole number of seconds; ignored`);
    return undefined;
  }
  return n;
}

function finish(st: ResolveState): ResolvedSshConfig {
  const hostName = currentHostName(st);
  const first = (k: string) => st.values.get(k)?.[0];
  let port = 22;
  const portStr = first("port");
  if (portStr !== undefined) {
    const n = Number(portStr);
    if (isPort(n)) port = n;
    else st.warnings.push(`Port ${portStr} is not a valid port; using 22`);
  }
  const user = first("user") ?? st.localUser;
  const ctx: TokenContext = { ...ctxOf(st, hostName), port, remoteUser: user };
  const file = (p: string) => expandPath(expandTokens(p, ctx), st.homeDir);

  const shkc = first("stricthostkeychecking")?.toLowerCase();
  const strictHostKeyChecking: HostKeyPolicy =
    shkc === "accept-new"
      ? "accept-new"
      : shkc === "no" || shkc === "off" || shkc === "false"
        ? "insecure"
        : "strict";

  const kh = st.values.get("userknownhostsfile");
  const userKnownHostsFiles =
    kh && !(kh.length === 1 && /^none$/i.test(kh[0]!))
      ? kh.map(file)
      : kh
        ? []
        : [path.join(st.homeDir, ".ssh", "known_hosts"), path.join(st.homeDir, ".ssh", "known_hosts2")];

  const out: ResolvedSshConfig = {
    host: st.originalHost,
    hostName,
    port,
    user,
    identityFiles: st.identityFiles.filter((f) => !/^none$/i.test(f)).map(file),
    identitiesOnly: parseYesNo(first("identitiesonly"), false),
    serverAliveIntervalMs: (seconds(first("serveraliveinterval"), st, "ServerAliveInterval") ?? 0) * 1000,
    serverAliveCountMax: seconds(first("serveralivecountmax"), st, "ServerAliveCountMax") ?? 3,
    strictHostKeyChecking,
    userKnownHostsFiles,
    configured: [...st.configured],
    raw: Object.fromEntries(st.values),
    files: st.files,
    warnings: st.warnings,
  };
  // OpenSSH: whichever of ProxyCommand / ProxyJump comes first wins; "none" disables both.
  const pc = first("proxycommand");
  const pj = first("proxyjump");
  if (pc !== undefined && (pj === undefined || proxyCommandFirst(st))) {
    if (!/^none$/i.test(pc)) out.proxyCommand = expandTokens(pc, ctx, "hnpr%", true);
  } else if (pj !== undefined && !/^none$/i.test(pj)) {
    out.proxyJump = pj;
  }
  const ct = seconds(first("connecttimeout"), st, "ConnectTimeout");
  if (ct !== undefined) out.connectTimeoutMs = ct * 1000;
  return out;
}

/** Map insertion order records which keyword was set first. */
function proxyCommandFirst(st: ResolveState): boolean {
  for (const k of st.values.keys()) {
    if (k === "proxycommand") return true;
    if (k === "proxyjump") return false;
  }
  return false;
}
