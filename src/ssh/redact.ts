/**
 * Recursive, typed redaction for events, transcripts, evidence bundles and error details.
 *
 * - Fields whose NAME says secret (password, passphrase, secret, token, apiKey, privateKey,
 *   authorization, cookie, credential...; case and separators ignored) are replaced whole.
 * - Every string is scrubbed by `redactText`: PEM/OpenSSH private key blocks, Authorization /
 *   Cookie / *-Token header values, URL credentials (the user is kept), password arguments of
 *   commands, and long base64 runs.
 * - `hostUser: true` also hides host names, user names and IP addresses.
 *
 * `-p` is ambiguous: OpenSSH, scp -P, nc, psql use it for a port and mkdir/cp for "parents",
 * so `-p` values are redacted only after password-taking tools (sshpass, mysql and friends).
 * `--password`, `--passphrase`, `--token`, `--secret`, `--api-key` are redacted after any command.
 */

export const REDACTED = "[REDACTED]";

export interface RedactOptions {
  /** Also hide host names, user names and IP addresses (fields and text). Default false. */
  hostUser?: boolean;
}

const SECRET_EXACT = new Set(["pass", "pwd", "pw", "passwd", "psk", "otp", "pin"]);
const SECRET_SUFFIX =
  /(password|passwords|passwd|passphrase|secret|secrets|token|tokens|apikey|apikeys|privatekey|privatekeys|authorization|cookie|cookies|credential|credentials|accesskey|secretkey|sessionkey|signingkey|clientsecret|bearer)$/;
const HOSTUSER_KEYS = new Set([
  "host",
  "hostname",
  "hosts",
  "user",
  "username",
  "login",
  "remotehost",
  "localhost",
  "remoteaddress",
  "localaddress",
  "address",
  "ip",
  "proxyjump",
  "jumphost",
  "bindaddress",
  "target",
]);

function normKey(key: string): string {
  return key.toLowerCase().replace(/[^a-z0-9]/g, "");
}

/** Whether a field of this name holds a secret (`apiKey`, `API_KEY`, `x-api-key` all do). */
export function isSecretKey(key: string): boolean {
  const k = normKey(key);
  return SECRET_EXACT.has(k) || SECRET_SUFFIX.test(k);
}

function isHostUserKey(key: string): boolean {
  return HOSTUSER_KEYS.has(normKey(key));
}

// ---------------------------------------------------------------- text

const PEM_BLOCK = /-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----[\s\S]*?(?:-----END \1-----|$)/g;
const PUTTY_KEY = /(PuTTY-User-Key-File-\d+:[^\n]*\n)[\s\S]*?(Private-MAC:)[^\n]*/g;
/** Header-like `Name: value` where the name says secret, to the end of the line. */
const SECRET_HEADER =
  /\b((?:proxy-)?authorization|(?:set-)?cookie|x-[\w-]*(?:token|key|secret|auth)[\w-]*|[\w-]*(?:api-key|apikey|access-token|auth-token|secret-key))(\s*:[ \t]*)(?:(basic|bearer|digest|token|negotiate|ntlm)[ \t]+)?([^\r\n]+)/gi;
/** `scheme://user:password@`: keep the scheme and user. */
const URL_CREDS = /\b([a-z][a-z0-9+.-]*:\/\/)([^\s:@/]*):([^\s@/]+)@/gi;
/** `--password=x`, `--password x`, `--db-password 'x y'` and the like after any command. */
const LONG_FLAG =
  /(--[\w-]*(?:password|passwd|passphrase|token|secret|api-?key|access-?key|credentials?)(?:=|[ \t]+))("[^"]*"|'[^']*'|[^\s"']+)/gi;
/** Tools whose `-p` (or redis-cli `-a`) takes a password. */
const PW_TOOL =
  /(^|[\s;&|(`'"/])(sshpass|mysql|mysqldump|mysqladmin|mysqlimport|mysqlcheck|mysqlshow|mysqlsh|mariadb(?:-dump|-admin|-import|-check|-show)?|redis-cli)\b([^\n;&|]*)/g;
/** `key=value` / `key: value` / `"key": "value"` pairs in free text whose key says secret. */
const SECRET_ASSIGN =
  /(["']?)([\w.-]*(?:password|passwd|passphrase|secret|token|api[_-]?key|private[_-]?key|access[_-]?key|credential)s?)\1([ \t]*[=:][ \t]*)("[^"]*"|'[^']*'|[^\s,;&}"']+)/gi;
/** Base64 runs of 40+ characters that mix cases and digits (random bytes do; words, paths and hex do not). */
const BASE64_RUN = /(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{40,}={0,2}/g;
const IPV4 = /\b(?:25[0-5]|2[0-4]\d|1?\d?\d)(?:\.(?:25[0-5]|2[0-4]\d|1?\d?\d)){3}\b/g;
const IPV6 = /(?<![\w:])(?:[0-9a-f]{1,4}:){2,7}[0-9a-f]{0,4}(?![\w:])|(?<![\w:])::1(?![\w:])/gi;
const USER_AT_HOST = /\b([a-z_][\w.-]*)@([a-z0-9][\w.-]*[a-z0-9]|\[[0-9a-f:]+\])/gi;

function redactToolArgs(_m: string, lead: string, tool: string, args: string): string {
  if (tool === "sshpass") return lead + tool + redactSshpassArgs(args);
  const flag = tool === "redis-cli" ? "-a" : "-p";
  const re = new RegExp(`(^|\\s)(${flag})([ \\t]*)("[^"]*"|'[^']*'|[^\\s"']+)`, "g");
  const red = args.replace(re, (_x, sp: string, f: string, gap: string, val: string) =>
    val.startsWith("-") && gap !== "" ? `${sp}${f}${gap}${val}` : `${sp}${f}${gap}${REDACTED}`,
  );
  return lead + tool + red;
}

/** sshpass's own options end at the wrapped command (`sshpass -p pw ssh -p 2222 h`). */
function redactSshpassArgs(args: string): string {
  const tok = /(\s+)(-[pfdP])?([ \t]*)("[^"]*"|'[^']*'|[^\s"']+)?/y;
  let out = "";
  let i = 0;
  while (i < args.length) {
    tok.lastIndex = i;
    const m = tok.exec(args);
    if (!m || m[0] === "" || (m[2] === undefined && !m[4]?.startsWith("-"))) break;
    const [all, sp, flag, gap, val] = m as unknown as [
      string,
      string,
      string | undefined,
      string,
      string | undefined,
    ];
    if (flag === "-p" && val !== undefined) out += `${sp}${flag}${gap}${REDACTED}`;
    else out += all;
    i += all.length;
  }
  return out + args.slice(i);
}

function hasMixedAlnum(s: string): boolean {
  return /[A-Z]/.test(s) && /[a-z]/.test(s) && /[0-9]/.test(s);
}

/** Scrubs secrets out of free text (logs, commands, error messages, transcripts). */
export function redactText(s: string, opts: RedactOptions = {}): string {
  let out = s
    .replace(PEM_BLOCK, (_m, label: string) => `-----BEGIN ${label}-----${REDACTED}-----END ${label}-----`)
    .replace(PUTTY_KEY, `$1${REDACTED}\n$2 ${REDACTED}`)
    .replace(SECRET_HEADER, (_m, name: string, sep: string, scheme: string | undefined) =>
      scheme ? `${name}${sep}${scheme} ${REDACTED}` : `${name}${sep}${REDACTED}`,
    )
    .replace(URL_CREDS, (_m, scheme: string, user: string) => `${scheme}${user}:${REDACTED}@`)
    .replace(LONG_FLAG, (_m, flag: string) => `${flag}${REDACTED}`)
    .replace(PW_TOOL, redactToolArgs)
    .replace(SECRET_ASSIGN, (m, q: string, key: string, sep: string, val: string) =>
      val === REDACTED || val.startsWith("[REDACTED") ? m : `${q}${key}${q}${sep}${quoteLike(val)}`,
    )
    .replace(BASE64_RUN, (m, offset: number, whole: string) => {
      // Fingerprints (`SHA256:...`) identify a public key; they are evidence, not secrets.
      if (/(?:SHA256|SHA512|SHA1):$/i.test(whole.slice(Math.max(0, offset - 7), offset))) return m;
      return hasMixedAlnum(m) ? REDACTED : m;
    });
  if (opts.hostUser) {
    out = out
      .replace(USER_AT_HOST, `${REDACTED}@${REDACTED}`)
      .replace(IPV4, REDACTED)
      .replace(IPV6, REDACTED);
  }
  return out;
}

function quoteLike(val: string): string {
  if (val.startsWith('"')) return `"${REDACTED}"`;
  if (val.startsWith("'")) return `'${REDACTED}'`;
  return REDACTED;
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

// ---------------------------------------------------------------- values

/**
 * Returns a deep copy of `value` with secrets replaced by "[REDACTED]". Plain objects, arrays,
 * Maps and Sets keep their shape; class instances become plain objects (their `toJSON()` when
 * they have one); Errors become `{ name, message, code?, details? }`; cycles become
 * "[Circular]". Never throws.
 */
export function redact<T>(value: T, opts: RedactOptions = {}): T {
  let text = (s: string) => redactText(s, opts);
  if (opts.hostUser) {
    // Names seen in host/user fields are hidden wherever they appear in text too.
    const names = new Set<string>();
    collectHostUser(value, names, new WeakSet(), 0);
    const list = [...names].filter((n) => n.length >= 2).sort((a, b) => b.length - a.length);
    if (list.length) {
      const re = new RegExp(`(?<![\\w.-])(?:${list.map(escapeRegExp).join("|")})(?![\\w-]|\\.[\\w])`, "gi");
      text = (s: string) => redactText(s, opts).replace(re, REDACTED);
    }
  }
  return walk(value, text, opts, new WeakSet(), 0) as T;
}

const MAX_DEPTH = 64;

function collectHostUser(v: unknown, out: Set<string>, seen: WeakSet<object>, depth: number): void {
  if (v === null || typeof v !== "object" || depth > MAX_DEPTH || seen.has(v)) return;
  seen.add(v);
  const entries = v instanceof Map ? [...v.entries()] : Array.isArray(v) ? [] : Object.entries(v);
  for (const [k, val] of entries) {
    if (typeof k === "string" && isHostUserKey(k)) {
      if (typeof val === "string") out.add(val);
      else if (Array.isArray(val)) for (const x of val) if (typeof x === "string") out.add(x);
    }
    collectHostUser(val, out, seen, depth + 1);
  }
  if (Array.isArray(v)) for (const x of v) collectHostUser(x, out, seen, depth + 1);
}

function redactField(value: unknown): unknown {
  // Absence and flags are not secrets ("password: false" means "no password auth").
  if (value === null || value === undefined || typeof value === "boolean") return value;
  return REDACTED;
}

function walk(
  v: unknown,
  text: (s: string) => string,
  opts: RedactOptions,
  seen: WeakSet<object>,
  depth: number,
): unknown {
  if (typeof v === "string") return text(v);
  if (v === null || typeof v !== "object") {
    if (typeof v === "function" || typeof v === "symbol") return undefined;
    return v;
  }
  if (seen.has(v)) return "[Circular]";
  if (depth > MAX_DEPTH) return "[MaxDepth]";
  if (Buffer.isBuffer(v) || ArrayBuffer.isView(v)) return v instanceof Uint8Array ? Buffer.from(v) : v;
  if (v instanceof Date) return new Date(v.getTime());
  if (v instanceof RegExp) return v;
  seen.add(v);
  try {
    const rec = (x: unknown) => walk(x, text, opts, seen, depth + 1);
    const field = (k: string, x: unknown): unknown => {
      if (isSecretKey(k)) return redactField(x);
      if (opts.hostUser && isHostUserKey(k) && (typeof x === "string" || typeof x === "number"))
        return REDACTED;
      return rec(x);
    };
    if (Array.isArray(v)) return v.map(rec);
    if (v instanceof Map) {
      const m = new Map();
      for (const [k, x] of v)
        m.set(typeof k === "string" ? k : rec(k), typeof k === "string" ? field(k, x) : rec(x));
      return m;
    }
    if (v instanceof Set) return new Set([...v].map(rec));
    if (v instanceof Error) {
      const e = v as Error & { code?: unknown; details?: unknown; cause?: unknown };
      const o: Record<string, unknown> = { name: e.name, message: text(e.message) };
      if (e.code !== undefined) o.code = e.code;
      if (e.details !== undefined) o.details = rec(e.details);
      if (e.cause !== undefined) o.cause = rec(e.cause);
      return o;
    }
    const proto = Object.getPrototypeOf(v);
    if (
      proto !== Object.prototype &&
      proto !== null &&
      typeof (v as { toJSON?: unknown }).toJSON === "function"
    ) {
      return rec((v as { toJSON(): unknown }).toJSON());
    }
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v)) {
      const r = field(k, x);
      if (r !== undefined || x === undefined) out[k] = r;
    }
    return out;
  } catch {
    return "[Unredactable]";
  } finally {
    seen.delete(v);
  }
}
