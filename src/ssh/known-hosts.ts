/**
 * OpenSSH known_hosts parsing and host matching, free of I/O so it can be tested exhaustively.
 *
 * Follows sshd(8) "SSH_KNOWN_HOSTS FILE FORMAT": `[marker] hosts keytype base64-key [comment]`,
 * where hosts is a comma list of patterns (`*`, `?`, `!negation`, `[host]:port`) or one hashed
 * `|1|salt|hash` name. Lines that do not parse are reported in `skipped` and never throw.
 */
import { createHmac } from "node:crypto";

export type KnownHostsMarker = "revoked" | "cert-authority";

export interface KnownHostsEntry {
  /** File the line came from, when known (used in error messages as `file:line`). */
  file?: string;
  /** 1-based line number. */
  line: number;
  marker?: KnownHostsMarker;
  /** The raw host field: comma-separated patterns or a hashed `|1|salt|hash` name. */
  hosts: string;
  keyType: string;
  /** The SSH wire-format public key blob. */
  key: Buffer;
  comment?: string;
}

export interface KnownHostsParseResult {
  entries: KnownHostsEntry[];
  skipped: { line: number; reason: string }[];
}

const BASE64 = /^[A-Za-z0-9+/]+={0,2}$/;

/** Reads the first SSH `string` of a wire-format key blob: its key type (`ssh-ed25519`, ...). */
export function sshKeyType(blob: Buffer): string | undefined {
  if (blob.length < 4) return undefined;
  const len = blob.readUInt32BE(0);
  if (len === 0 || len > 64 || 4 + len > blob.length) return undefined;
  const type = blob.subarray(4, 4 + len).toString("latin1");
  return /^[\x21-\x7e]+$/.test(type) ? type : undefined;
}

export function parseKnownHosts(text: string, file?: string): KnownHostsParseResult {
  const entries: KnownHostsEntry[] = [];
  const skipped: { line: number; reason: string }[] = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const lineNo = i + 1;
    const raw = lines[i]!.replace(/\r$/, "").trim();
    if (raw === "" || raw.startsWith("#")) continue;
    const fields = raw.split(/[ \t]+/);
    let marker: KnownHostsMarker | undefined;
    if (fields[0]!.startsWith("@")) {
      const m = fields.shift()!;
      if (m === "@revoked") marker = "revoked";
      else if (m === "@cert-authority") marker = "cert-authority";
      else {
        skipped.push({ line: lineNo, reason: `unknown marker ${m}` });
        continue;
      }
    }
    if (fields.length < 3) {
      skipped.push({ line: lineNo, reason: "expected: hosts keytype base64-key [comment]" });
      continue;
    }
    const [hosts, keyType, b64, ...rest] = fields as [string, string, string, ...string[]];
    if (!BASE64.test(b64)) {
      skipped.push({ line: lineNo, reason: "key is not base64" });
      continue;
    }
    const key = Buffer.from(b64, "base64");
    const embedded = sshKeyType(key);
    if (embedded !== keyType) {
      skipped.push({ line: lineNo, reason: `key type ${keyType} does not match the key's own type` });
      continue;
    }
    if (hosts.startsWith("|") && parseHashed(hosts) === undefined) {
      skipped.push({ line: lineNo, reason: "malformed hashed host name" });
      continue;
    }
    const entry: KnownHostsEntry = { line: lineNo, hosts, keyType, key };
    if (file !== undefined) entry.file = file;
    if (marker) entry.marker = marker;
    if (rest.length) entry.comment = rest.join(" ");
    entries.push(entry);
  }
  return { entries, skipped };
}

/** The name OpenSSH looks up: `host` on port 22, `[host]:port` otherwise; lower-cased. */
export function knownHostsName(host: string, port = 22): string {
  const h = host.toLowerCase();
  return port === 22 ? h : `[${h}]:${port}`;
}

/** Glob match with `*` and `?`, case-insensitive (OpenSSH lower-cases host names). */
export function matchHostPattern(name: string, pattern: string): boolean {
  const re = globRegex(pattern.toLowerCase());
  return re.test(name.toLowerCase());
}

const globCache = new Map<string, RegExp>();
function globRegex(pattern: string): RegExp {
  let re = globCache.get(pattern);
  if (!re) {
    const src = pattern
      .replace(/[.+^${}()|[\]\\]/g, "\\$&")
      .replace(/\*/g, "[\\s\\S]*")
      .replace(/\?/g, "[\\s\\S]");
    re = new RegExp(`^${src}$`);
    if (globCache.size > 1000) globCache.clear();
    globCache.set(pattern, re);
  }
  return re;
}

/**
 * OpenSSH `match_pattern_list`: 1 when some positive pattern matches and no negated one does,
 * -1 when a negated pattern matches (a negation always wins), 0 otherwise.
 */
export function matchPatternList(name: string, patterns: string | readonly string[]): 1 | 0 | -1 {
  const list = typeof patterns === "string" ? patterns.split(",") : patterns;
  let positive = false;
  for (const p of list) {
    if (p === "") continue;
    if (p.startsWith("!")) {
      if (matchHostPattern(name, p.slice(1))) return -1;
    } else if (matchHostPattern(name, p)) positive = true;
  }
  return positive ? 1 : 0;
}

function parseHashed(token: string): { salt: Buffer; hash: Buffer } | undefined {
  const parts = token.split("|");
  // "", "1", salt, hash
  if (parts.length !== 4 || parts[0] !== "" || parts[1] !== "1") return undefined;
  if (!BASE64.test(parts[2]!) || !BASE64.test(parts[3]!)) return undefined;
  const salt = Buffer.from(parts[2]!, "base64");
  const hash = Buffer.from(parts[3]!, "base64");
  if (salt.length !== 20 || hash.length !== 20) return undefined;
  return { salt, hash };
}

/** `|1|salt|hash` for a name, as `ssh-keygen -H` writes it (HMAC-SHA1 keyed by the salt). */
export function hashKnownHostsName(name: string, salt: Buffer): string {
  const hash = createHmac("sha1", salt).update(name).digest("base64");
  return `|1|${salt.toString("base64")}|${hash}`;
}

/** Whether a known_hosts host field matches a lookup name (see `knownHostsName`). */
export function hostFieldMatches(hosts: string, name: string): boolean {
  if (hosts.startsWith("|")) {
    const h = parseHashed(hosts);
    if (!h) return false;
    return createHmac("sha1", h.salt).update(name).digest().equals(h.hash);
  }
  return matchPatternList(name, hosts) === 1;
}

export type KnownHostsLookup =
  /** A plain (unmarked) line for this host holds exactly this key. */
  | { status: "trusted"; entry: KnownHostsEntry }
  /** An `@revoked` line holds this key: never trust it, whatever else the files say. */
  | { status: "revoked"; entry: KnownHostsEntry }
  /** The host is known with a key of the same type, but a different one: possible MITM. */
  | { status: "changed"; entries: KnownHostsEntry[] }
  /** The host is known, but only with keys of other types. */
  | { status: "other-types"; entries: KnownHostsEntry[] }
  | { status: "unknown" };

/** Decides what the known_hosts entries say about `keyBlob` presented by `host:port`. */
export function lookupKnownHost(
  entries: readonly KnownHostsEntry[],
  host: string,
  port: number,
  keyBlob: Buffer,
): KnownHostsLookup {
  const name = knownHostsName(host, port);
  const type = sshKeyType(keyBlob);
  const forHost = entries.filter((e) => e.marker !== "cert-authority" && hostFieldMatches(e.hosts, name));
  const revoked = forHost.find((e) => e.marker === "revoked" && e.key.equals(keyBlob));
  if (revoked) return { status: "revoked", entry: revoked };
  const plain = forHost.filter((e) => e.marker === undefined);
  const trusted = plain.find((e) => e.key.equals(keyBlob));
  if (trusted) return { status: "trusted", entry: trusted };
  const sameType = plain.filter((e) => e.keyType === type);
  if (sameType.length) return { status: "changed", entries: sameType };
  if (plain.length) return { status: "other-types", entries: plain };
  return { status: "unknown" };
}

/** One known_hosts line (with trailing newline) for a host's key, in OpenSSH's plain form. */
export function formatKnownHostsLine(host: string, port: number, keyBlob: Buffer): string {
  const type = sshKeyType(keyBlob);
  if (!type) throw new TypeError("not an SSH public key blob");
  return `${knownHostsName(host, port)} ${type} ${keyBlob.toString("base64")}\n`;
}
