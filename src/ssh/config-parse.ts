/**
 * The pure half of OpenSSH client configuration (ssh_config(5)): splitting a line into
 * arguments (quotes, `Key=Value`, trailing `#` comments) and parsing a file's text into `Host`
 * / `Match` blocks, `Include`s and keyword lines. No file or environment access: config.ts
 * resolves what a host gets from the parsed files.
 */

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

const RAW_VALUE = new Set(["proxycommand", "remotecommand", "localcommand", "knownhostscommand"]);

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
