/**
 * OpenSSH client configuration (ssh_config(5)): a pure parser plus a resolver that reads files
 * (only regular files, bounded) and computes the settings for one host the way `ssh -G` does.
 *
 * Supported: `Host` (several patterns, `*`/`?` wildcards, `!` negation; matched case-sensitively
 * against the host as typed, as OpenSSH does), `Match` with `all`, `host`, `originalhost`,
 * `user`, `localuser`, `tagged`, `final`, `canonical` (and `!` before each). `Match exec` and
 * `Match localnetwork` never match: resolving a config never runs commands. `Include` (relative
 * to ~/.ssh, globs, depth 16, conditional inside a block), first value wins per keyword except
 * IdentityFile (accumulates), case-insensitive keywords, `Key=Value`, quoted values, trailing
 * `#` comments, and tokens `%h %p %r %u %n %d %i %l %L %C %%` plus `~` and `${ENV}`.
 */
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { isPort } from "../common/port.js";
import { ValidationError } from "../errors.js";
import type { HostKeyPolicy } from "./hostkeys.js";
import { matchHostPattern } from "./known-hosts.js";

export interface MatchCriterion {
  negate: boolean;
  /** Lower-cased criterion name: all, host, originalhost, user, localuser, exec, ... */
  name: string;
  arg?: string;
}

export type SshConfigLine =
  | { kind: "host"; line: number; patterns: string[] }
  | { kind: "match"; line: number; criteria: MatchCriterion[] }
  | { kind: "include"; line: number; patterns: string[] }
  | { kind: "option"; line: number; keyword: string; args: string[]; value: string };

export interface SshConfigFile {
  filePath?: string;
  lines: SshConfigLine[];
  errors: { line: number; message: string }[];
}

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
const RAW_VALUE = new Set(["proxycommand", "remotecommand", "localcommand", "knownhostscommand"]);

// ---------------------------------------------------------------- parsing (pure)

/** Splits arguments like OpenSSH's argv_split: quotes, backslash escapes, `#` ends the line. */
export function splitConfigArgs(s: string): { args: string[]; error?: string } {
  const args: string[] = [];
  let i = 0;
  while (i < s.length) {
    while (i < s.length && /\s/.test(s[i]!)) i++;
    if (i >= s.length) break;
    if (s[i] === "#") break;
    let cur = "";
    let quote: string | undefined;
    for (; i < s.length; i++) {
      const c = s[i]!;
      if (quote) {
        if (c === quote) quote = undefined;
        else if (c === "\\" && (s[i + 1] === quote || s[i + 1] === "\\")) cur += s[++i];
        else cur += c;
      } else if (c === '"' || c === "'") quote = c;
      else if (/\s/.test(c)) break;
      else if (c === "\\" && i + 1 < s.length && /[\s"'\\]/.test(s[i + 1]!)) cur += s[++i];
      else cur += c;
    }
    if (quote) return { args, error: "unterminated quote" };
    args.push(cur);
  }
  return { args };
}

export function parseSshConfig(text: string, opts: { filePath?: string } = {}): SshConfigFile {
  const out: SshConfigFile = { lines: [], errors: [] };
  if (opts.filePath !== undefined) out.filePath = opts.filePath;
  const lines = text.split("\n");
  for (let n = 0; n < lines.length; n++) {
    const lineNo = n + 1;
    const raw = lines[n]!.replace(/\r$/, "");
    const m = /^\s*([A-Za-z][A-Za-z0-9]*)(?:\s*=\s*|\s+|$)(.*)$/.exec(raw);
    if (!m) {
      if (raw.trim() !== "" && !raw.trim().startsWith("#"))
        out.errors.push({ line: lineNo, message: "not a keyword line" });
      continue;
    }
    const keyword = m[1]!.toLowerCase();
    const rest = m[2]!;
    if (RAW_VALUE.has(keyword)) {
      const value = rest.trim();
      if (!value) out.errors.push({ line: lineNo, message: `${m[1]} needs a value` });
      else out.lines.push({ kind: "option", line: lineNo, keyword, args: [value], value });
      continue;
    }
    const { args, error } = splitConfigArgs(rest);
    if (error) {
      out.errors.push({ line: lineNo, message: `${m[1]}: ${error}` });
      continue;
    }
    if (keyword === "host") {
      if (!args.length) out.errors.push({ line: lineNo, message: "Host needs at least one pattern" });
      else out.lines.push({ kind: "host", line: lineNo, patterns: args });
    } else if (keyword === "match") {
      const criteria = parseMatch(args);
      if (typeof criteria === "string") out.errors.push({ line: lineNo, message: `Match: ${criteria}` });
      else out.lines.push({ kind: "match", line: lineNo, criteria });
    } else if (keyword === "include") {
      if (!args.length) out.errors.push({ line: lineNo, message: "Include needs a path" });
      else out.lines.push({ kind: "include", line: lineNo, patterns: args });
    } else if (!args.length) {
      out.errors.push({ line: lineNo, message: `${m[1]} needs a value` });
    } else {
      out.lines.push({ kind: "option", line: lineNo, keyword, args, value: rest.trim() });
    }
  }
  return out;
}

const NO_ARG = new Set(["all", "canonical", "final"]);
const WITH_ARG = new Set(["host", "originalhost", "user", "localuser", "exec", "localnetwork", "tagged"]);

function parseMatch(args: string[]): MatchCriterion[] | string {
  if (!args.length) return "needs criteria";
  const out: MatchCriterion[] = [];
  for (let i = 0; i < args.length; i++) {
    let name = args[i]!.toLowerCase();
    const negate = name.startsWith("!");
    if (negate) name = name.slice(1);
    if (NO_ARG.has(name)) out.push({ negate, name });
    else if (WITH_ARG.has(name)) {
      const arg = args[++i];
      if (arg === undefined) return `${name} needs an argument`;
      out.push({ negate, name, arg });
    } else return `unknown criterion ${args[i]}`;
  }
  if (out.some((c) => c.name === "all") && out.some((c) => !NO_ARG.has(c.name))) {
    return "'all' cannot be combined with other criteria";
  }
  return out;
}

// ---------------------------------------------------------------- tokens

export interface TokenContext {
  /** %h: the resolved host name. */
  hostName: string;
  /** %n: the host as given. */
  originalHost: string;
  port: number;
  /** %r */
  remoteUser: string;
  /** %u */
  localUser: string;
  /** %d */
  homeDir: string;
}

/**
 * A host or user name substituted into a command that /bin/sh runs (ProxyCommand's %h %n %r):
 * only characters with no meaning to the shell, and no leading "-" (it would read as an option).
 * Anything else is refused, as OpenSSH does since CVE-2023-51385, rather than run.
 */
export function shellSafeToken(value: string, what: string): string {
  if (!/^[A-Za-z0-9._:@%+][A-Za-z0-9._:@%+-]*$/.test(value)) {
    throw new ValidationError(
      `${what} ${JSON.stringify(value.slice(0, 80))} cannot go into ProxyCommand: it has characters ` +
        "the shell would interpret (only letters, digits and . _ : @ % + - are allowed, no leading -). " +
        "Use the host's plain name or address.",
      { details: { what } },
    );
  }
  return value;
}

/**
 * Expands `%` tokens; unknown tokens are left as written. `forShell`: the result is a shell
 * command, so substituted names must pass shellSafeToken.
 */
export function expandTokens(
  s: string,
  ctx: TokenContext,
  allowed = "hprundilLCk%",
  forShell = false,
): string {
  const name = (v: string, what: string) => (forShell ? shellSafeToken(v, what) : v);
  return s.replace(/%(.)/g, (m, t: string) => {
    if (!allowed.includes(t)) return m;
    switch (t) {
      case "%":
        return "%";
      case "h":
        return name(ctx.hostName, "host name");
      case "p":
        return String(ctx.port);
      case "r":
        return name(ctx.remoteUser, "user name");
      case "u":
        return name(ctx.localUser, "local user name");
      case "n":
      case "k":
        return name(ctx.originalHost, "host");
      case "d":
        return ctx.homeDir;
      case "i":
        return String(process.getuid?.() ?? "");
      case "l":
        return os.hostname();
      case "L":
        return os.hostname().split(".")[0]!;
      case "C":
        return createHash("sha1")
          .update(`${os.hostname()}${ctx.hostName}${ctx.port}${ctx.remoteUser}`)
          .digest("hex");
      default:
        return m;
    }
  });
}

/** `~` and `${VAR}` expansion for file paths (as OpenSSH does for IdentityFile and friends). */
export function expandPath(p: string, homeDir: string = os.homedir()): string {
  let s = p.replace(/\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g, (_m, v: string) => process.env[v] ?? "");
  if (s === "~") s = homeDir;
  else if (s.startsWith("~/")) s = path.join(homeDir, s.slice(2));
  return s;
}

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
