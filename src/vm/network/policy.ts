/**
 * Network policies, pure: what a guest may reach. Parsing and validation of the public forms
 * ("public", "none", { allow, deny }, and the CLI's `allow=a,b;deny=c`), name and address
 * matching, and the address ranges "public" never reaches. The enforcing side (the per-VM
 * network daemon) asks these functions for every DNS question and every connection.
 */
import { BlockList, isIP } from "node:net";
import { ValidationError } from "../../errors.js";

/** `"public"` (default), `"none"`, or an allow-list of hostnames (`*.` wildcards) and CIDRs. */
export type NetworkPolicy = "public" | "none" | { allow: string[]; deny?: string[] };

/** One decision of the network daemon, as `vm.networkLog()` returns it. */
export interface NetworkLogEntry {
  /** ISO 8601. */
  time: string;
  proto: "tcp" | "dns";
  /** The name involved: the DNS question, or the connection's TLS SNI / HTTP Host / resolved name. */
  host?: string;
  ip: string;
  port: number;
  verdict: "allow" | "deny";
  /** The rule that decided (an allow/deny entry, or "none", "public:private" ...). */
  rule?: string;
}

/** A parsed rule list: hostnames (lower case, no trailing dot) and CIDRs. */
export interface CompiledRules {
  names: string[];
  cidrs: string[];
  list: BlockList;
  /** One list per CIDR rule, in order, to name the rule that matched. */
  each: Array<[string, BlockList]>;
}

export interface CompiledPolicy {
  mode: "public" | "none" | "allow";
  allow: CompiledRules;
  deny: CompiledRules;
}

const LABEL = /^(?!-)[a-z0-9_-]{1,63}(?<!-)$/;

function normalizeName(s: string): string {
  return s.trim().toLowerCase().replace(/\.$/, "");
}

function isHostname(s: string): boolean {
  return s.length <= 253 && s.split(".").every((l) => LABEL.test(l));
}

/** Parses "10.1.0.0/16", "2001:db8::/32" or a bare address (a /32 or /128). */
function parseCidr(s: string): { addr: string; prefix: number; family: "ipv4" | "ipv6" } | undefined {
  const [addr, p, ...rest] = s.split("/");
  if (rest.length || !addr) return undefined;
  const v = isIP(addr);
  if (!v) return undefined;
  const max = v === 4 ? 32 : 128;
  const prefix = p === undefined ? max : Number(p);
  if (!Number.isInteger(prefix) || prefix < 0 || prefix > max || (p !== undefined && !/^\d+$/.test(p)))
    return undefined;
  return { addr, prefix, family: v === 4 ? "ipv4" : "ipv6" };
}

function compileRules(rules: readonly string[], what: string): CompiledRules {
  const names: string[] = [];
  const cidrs: string[] = [];
  const list = new BlockList();
  const each: Array<[string, BlockList]> = [];
  for (const raw of rules) {
    if (typeof raw !== "string" || !raw.trim()) {
      throw new ValidationError(
        `network ${what} rules must be non-empty strings, got ${JSON.stringify(raw)}.`,
      );
    }
    const r = normalizeName(raw);
    const cidr = parseCidr(r);
    if (cidr) {
      list.addSubnet(cidr.addr, cidr.prefix, cidr.family);
      cidrs.push(r);
      each.push([r, subnetList(r)]);
      continue;
    }
    const bare = r.startsWith("*.") ? r.slice(2) : r;
    if (!isHostname(bare) || bare.includes("*")) {
      throw new ValidationError(
        `network ${what} rule ${JSON.stringify(raw)} is neither a hostname (exact, or "*.example.com"), an IP address nor a CIDR like 10.1.0.0/16.`,
      );
    }
    names.push(r);
  }
  return { names, cidrs, list, each };
}

function subnetList(cidr: string): BlockList {
  const r = parseCidr(cidr)!;
  const one = new BlockList();
  one.addSubnet(r.addr, r.prefix, r.family);
  return one;
}

/** Validates a policy and returns its canonical form (what `vm.network` shows). */
export function normalizePolicy(p: unknown): NetworkPolicy {
  if (p === undefined) return "public";
  if (p === "public" || p === "none") return p;
  if (p && typeof p === "object" && !Array.isArray(p)) {
    const o = p as { allow?: unknown; deny?: unknown };
    const keys = Object.keys(o).filter((k) => k !== "allow" && k !== "deny");
    if (keys.length) throw new ValidationError(`unknown network policy key(s): ${keys.join(", ")}.`);
    if (!Array.isArray(o.allow)) {
      throw new ValidationError(
        'a network allow-list needs `allow: string[]`, e.g. { allow: ["pypi.org"] }.',
      );
    }
    if (o.deny !== undefined && !Array.isArray(o.deny)) {
      throw new ValidationError("network `deny` must be a string[] when given.");
    }
    compileRules(o.allow as string[], "allow");
    compileRules((o.deny as string[] | undefined) ?? [], "deny");
    const out: { allow: string[]; deny?: string[] } = { allow: (o.allow as string[]).map(normalizeName) };
    if (o.deny !== undefined) out.deny = (o.deny as string[]).map(normalizeName);
    return out;
  }
  throw new ValidationError(
    `network must be "public", "none" or { allow: string[]; deny?: string[] }, got ${JSON.stringify(p)}.`,
  );
}

/** The CLI form: `none`, `public`, `allow=a,b,10.1.0.0/16` with an optional `;deny=c,d`. */
export function parsePolicyArg(s: string): NetworkPolicy {
  const t = s.trim();
  if (t === "none" || t === "public") return t;
  const parts = t.split(";").map((x) => x.trim());
  let allow: string[] | undefined;
  let deny: string[] | undefined;
  for (const part of parts) {
    const m = /^(allow|deny)=(.*)$/.exec(part);
    if (!m) {
      throw new ValidationError(
        `network policy ${JSON.stringify(s)} is not none, public or allow=host,*.domain,10.0.0.0/8[;deny=...].`,
      );
    }
    const list = m[2]!
      .split(",")
      .map((x) => x.trim())
      .filter(Boolean);
    if (m[1] === "allow") allow = list;
    else deny = list;
  }
  if (!allow) throw new ValidationError(`network policy ${JSON.stringify(s)} has deny= but no allow=.`);
  return normalizePolicy(deny ? { allow, deny } : { allow });
}

export function compilePolicy(p: NetworkPolicy): CompiledPolicy {
  if (p === "public" || p === "none") {
    return { mode: p, allow: compileRules([], "allow"), deny: compileRules([], "deny") };
  }
  return { mode: "allow", allow: compileRules(p.allow, "allow"), deny: compileRules(p.deny ?? [], "deny") };
}

/** The first name rule (`host` or `*.suffix`) that matches `host`, if any. */
export function matchName(names: readonly string[], host: string): string | undefined {
  const h = normalizeName(host);
  for (const r of names) {
    if (r.startsWith("*.")) {
      if (h.endsWith(r.slice(1)) && h.length > r.length - 1) return r;
    } else if (r === h) return r;
  }
  return undefined;
}

/** The first CIDR rule that contains `ip`, if any. */
export function matchCidr(rules: CompiledRules, ip: string): string | undefined {
  const v = isIP(ip);
  const family = v === 4 ? "ipv4" : "ipv6";
  if (!v || !rules.list.check(ip, family)) return undefined;
  return rules.each.find(([, one]) => one.check(ip, family))?.[0];
}

/** May the guest resolve `host`? Returns the deciding rule. */
export function nameVerdict(
  p: CompiledPolicy,
  host: string,
): { verdict: "allow" | "deny"; rule: string | undefined } {
  if (p.mode === "none") return { verdict: "deny", rule: "none" };
  if (p.mode === "public") return { verdict: "allow", rule: "public" };
  const denied = matchName(p.deny.names, host);
  if (denied) return { verdict: "deny", rule: `deny:${denied}` };
  const allowed = matchName(p.allow.names, host);
  if (allowed) return { verdict: "allow", rule: `allow:${allowed}` };
  return { verdict: "deny", rule: "not-allowed" };
}

/**
 * Ranges that "public" never reaches, and no policy reaches when they are the host's own
 * (loopback, link-local with the metadata address): [cidr, rule name].
 */
export const NON_PUBLIC_RANGES: ReadonlyArray<readonly [string, string]> = [
  ["0.0.0.0/8", "public:this-network"],
  ["127.0.0.0/8", "public:loopback"],
  ["10.0.0.0/8", "public:private"],
  ["172.16.0.0/12", "public:private"],
  ["192.168.0.0/16", "public:private"],
  ["100.64.0.0/10", "public:cgnat"],
  ["169.254.0.0/16", "public:link-local"],
  ["224.0.0.0/4", "public:multicast"],
  ["240.0.0.0/4", "public:reserved"],
  ["::/128", "public:unspecified"],
  ["::1/128", "public:loopback"],
  ["::ffff:0:0/96", "public:ipv4-mapped"],
  ["fc00::/7", "public:ula"],
  ["fe80::/10", "public:link-local"],
  ["ff00::/8", "public:multicast"],
];
/** Never reachable by any policy, allow-lists included. */
const ALWAYS_BLOCKED = new Set([
  "public:loopback",
  "public:link-local",
  "public:this-network",
  "public:unspecified",
]);

const RANGE_LISTS = NON_PUBLIC_RANGES.map(
  ([cidr, rule]) => [subnetList(cidr), rule, parseCidr(cidr)!.family] as const,
);

function rangeOf(ip: string): string | undefined {
  const v = isIP(ip);
  if (!v) return "public:invalid";
  const family = v === 4 ? "ipv4" : "ipv6";
  return RANGE_LISTS.find(([one, , f]) => f === family && one.check(ip, family))?.[1];
}

export interface ConnectionFacts {
  ip: string;
  port: number;
  /** Names the policy's resolver returned `ip` for (allowed ones only). */
  resolvedNames: readonly string[];
  /** The TLS SNI or HTTP Host the connection carries, if any. */
  sniffedHost?: string;
  /** The host's own addresses (never reachable). */
  hostAddresses: ReadonlySet<string>;
}

/** The verdict on one TCP connection. */
export function connectionVerdict(
  p: CompiledPolicy,
  f: ConnectionFacts,
): { verdict: "allow" | "deny"; rule: string } {
  if (p.mode === "none") return { verdict: "deny", rule: "none" };
  if (f.hostAddresses.has(f.ip)) return { verdict: "deny", rule: "host-address" };
  const range = rangeOf(f.ip);
  if (range && ALWAYS_BLOCKED.has(range)) return { verdict: "deny", rule: range };
  if (p.mode === "public")
    return range ? { verdict: "deny", rule: range } : { verdict: "allow", rule: "public" };

  const deniedCidr = matchCidr(p.deny, f.ip);
  if (deniedCidr) return { verdict: "deny", rule: `deny:${deniedCidr}` };
  const allowedCidr = matchCidr(p.allow, f.ip);
  if (f.sniffedHost !== undefined) {
    const sniffed = normalizeName(f.sniffedHost.replace(/^\[(.*)\]$/, "$1"));
    if (isIP(sniffed)) {
      if (sniffed === f.ip && allowedCidr) return { verdict: "allow", rule: `allow:${allowedCidr}` };
      return { verdict: "deny", rule: "sni-or-host-not-allowed" };
    }
    const nv = nameVerdict(p, sniffed);
    if (nv.verdict === "deny") return { verdict: "deny", rule: nv.rule ?? "not-allowed" };
    if (allowedCidr) return { verdict: "allow", rule: `allow:${allowedCidr}` };
    // The name is allowed; the address must be one the resolver gave for it.
    if (f.resolvedNames.includes(sniffed)) return { verdict: "allow", rule: nv.rule ?? "allow" };
    return { verdict: "deny", rule: "address-not-resolved-for-name" };
  }
  if (allowedCidr) return { verdict: "allow", rule: `allow:${allowedCidr}` };
  for (const n of f.resolvedNames) {
    const nv = nameVerdict(p, n);
    if (nv.verdict === "allow") return { verdict: "allow", rule: nv.rule ?? "allow" };
  }
  return { verdict: "deny", rule: "not-allowed" };
}
