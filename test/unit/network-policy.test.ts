/**
 * The network policy's pure parts: policy parsing, verdicts, SNI/Host sniffing (on bytes a real
 * TLS client and a real DNS resolver produce), DNS answers read back by Node's resolver, the
 * conntrack parser, and the nftables ruleset checked by the real `nft -c`.
 */
import { execFileSync } from "node:child_process";
import { createSocket } from "node:dgram";
import { Resolver } from "node:dns/promises";
import { createServer } from "node:net";
import { connect as tlsConnect } from "node:tls";
import { describe, expect, it } from "vitest";
import { ValidationError } from "../../src/errors.js";
import { findOriginalDestination } from "../../src/vm/network/conntrack.js";
import { buildResponse, parseQuery, QTYPE_A, RCODE_NXDOMAIN } from "../../src/vm/network/dns-wire.js";
import {
  createCgroup,
  removeCgroup,
  renderRuleset,
  tableName,
  vmCgroup,
} from "../../src/vm/network/firewall.js";
import {
  compilePolicy,
  connectionVerdict,
  matchName,
  nameVerdict,
  normalizePolicy,
  parsePolicyArg,
} from "../../src/vm/network/policy.js";
import { sniffHost } from "../../src/vm/network/sniff.js";

const HOST_ADDRS = new Set(["192.0.2.2", "127.0.0.1"]);
const facts = (ip: string, more: { names?: string[]; sniffed?: string } = {}) => ({
  ip,
  port: 443,
  resolvedNames: more.names ?? [],
  sniffedHost: more.sniffed,
  hostAddresses: HOST_ADDRS,
});

describe("policy parsing", () => {
  it("normalizes the three forms and defaults to public", () => {
    expect(normalizePolicy(undefined)).toBe("public");
    expect(normalizePolicy("none")).toBe("none");
    expect(normalizePolicy({ allow: ["PyPI.org.", "*.pythonhosted.org", "10.1.0.0/16"] })).toEqual({
      allow: ["pypi.org", "*.pythonhosted.org", "10.1.0.0/16"],
    });
    expect(normalizePolicy({ allow: [], deny: ["x.test"] })).toEqual({ allow: [], deny: ["x.test"] });
  });

  it("rejects what it cannot enforce, with ValidationError", () => {
    for (const bad of [
      "private",
      { deny: ["a"] },
      { allow: "a" },
      { allow: ["a b"] },
      { allow: ["*"] },
      { allow: ["a.*.com"] },
      { allow: ["10.0.0.0/33"] },
      { allow: [""] },
      { allow: ["a"], extra: 1 },
      { allow: ["a"], deny: "b" },
    ]) {
      expect(() => normalizePolicy(bad), JSON.stringify(bad)).toThrow(ValidationError);
    }
  });

  it("parses the CLI form", () => {
    expect(parsePolicyArg("none")).toBe("none");
    expect(parsePolicyArg("public")).toBe("public");
    expect(parsePolicyArg("allow=pypi.org,*.pythonhosted.org,10.1.0.0/16")).toEqual({
      allow: ["pypi.org", "*.pythonhosted.org", "10.1.0.0/16"],
    });
    expect(parsePolicyArg("allow=*.example.com;deny=evil.example.com")).toEqual({
      allow: ["*.example.com"],
      deny: ["evil.example.com"],
    });
    expect(() => parsePolicyArg("everything")).toThrow(ValidationError);
    expect(() => parsePolicyArg("deny=a.test")).toThrow(ValidationError);
  });

  it("matches exact names and *. suffixes, not the apex or look-alikes", () => {
    const rules = ["pypi.org", "*.pythonhosted.org"];
    expect(matchName(rules, "PyPI.org.")).toBe("pypi.org");
    expect(matchName(rules, "files.pythonhosted.org")).toBe("*.pythonhosted.org");
    expect(matchName(rules, "a.b.pythonhosted.org")).toBe("*.pythonhosted.org");
    expect(matchName(rules, "pythonhosted.org")).toBeUndefined();
    expect(matchName(rules, "evilpythonhosted.org")).toBeUndefined();
    expect(matchName(rules, "pypi.org.evil.test")).toBeUndefined();
  });
});

describe("verdicts", () => {
  it('"none" refuses names and connections', () => {
    const p = compilePolicy("none");
    expect(nameVerdict(p, "example.com")).toEqual({ verdict: "deny", rule: "none" });
    expect(connectionVerdict(p, facts("198.51.100.10"))).toEqual({ verdict: "deny", rule: "none" });
  });

  it('"public" reaches public addresses only', () => {
    const p = compilePolicy("public");
    expect(connectionVerdict(p, facts("198.51.100.10")).verdict).toBe("allow");
    expect(connectionVerdict(p, facts("203.0.113.7")).verdict).toBe("allow");
    const denied: Array<[string, string]> = [
      ["127.0.0.1", "host-address"],
      ["127.0.0.2", "public:loopback"],
      ["192.0.2.2", "host-address"],
      ["10.1.2.3", "public:private"],
      ["172.16.0.1", "public:private"],
      ["192.168.1.1", "public:private"],
      ["100.64.0.1", "public:cgnat"],
      ["169.254.169.254", "public:link-local"],
      ["224.0.0.1", "public:multicast"],
      ["0.0.0.0", "public:this-network"],
      ["::1", "public:loopback"],
      ["fd00::2", "public:ula"],
      ["fe80::1", "public:link-local"],
      ["ff02::1", "public:multicast"],
      ["::ffff:127.0.0.1", "public:ipv4-mapped"],
    ];
    for (const [ip, rule] of denied)
      expect(connectionVerdict(p, facts(ip)), ip).toEqual({ verdict: "deny", rule });
  });

  it("allow-lists: names resolved by the policy, SNI/Host checked, deny wins, the host never", () => {
    const p = compilePolicy({
      allow: ["allowed.test", "*.cdn.test", "10.1.0.0/16"],
      deny: ["bad.cdn.test", "10.1.9.0/24"],
    });
    expect(nameVerdict(p, "allowed.test").verdict).toBe("allow");
    expect(nameVerdict(p, "x.cdn.test").verdict).toBe("allow");
    expect(nameVerdict(p, "bad.cdn.test")).toEqual({ verdict: "deny", rule: "deny:bad.cdn.test" });
    expect(nameVerdict(p, "denied.test")).toEqual({ verdict: "deny", rule: "not-allowed" });

    const ip = "198.51.100.10";
    const names = ["allowed.test"];
    expect(connectionVerdict(p, facts(ip, { names }))).toEqual({
      verdict: "allow",
      rule: "allow:allowed.test",
    });
    expect(connectionVerdict(p, facts(ip, { names, sniffed: "allowed.test" })).verdict).toBe("allow");
    // Never resolved through the policy: the raw IP is refused, with or without a name on it.
    expect(connectionVerdict(p, facts(ip)).verdict).toBe("deny");
    expect(connectionVerdict(p, facts(ip, { sniffed: "allowed.test" }))).toEqual({
      verdict: "deny",
      rule: "address-not-resolved-for-name",
    });
    // A resolved address carrying another name, or its own IP as Host.
    expect(connectionVerdict(p, facts(ip, { names, sniffed: "denied.test" }))).toEqual({
      verdict: "deny",
      rule: "not-allowed",
    });
    expect(connectionVerdict(p, facts(ip, { names, sniffed: ip })).verdict).toBe("deny");
    expect(connectionVerdict(p, facts(ip, { names, sniffed: "bad.cdn.test" })).rule).toBe(
      "deny:bad.cdn.test",
    );
    // CIDRs: allowed, minus the denied part; an IP Host inside them is fine.
    expect(connectionVerdict(p, facts("10.1.2.3"))).toEqual({ verdict: "allow", rule: "allow:10.1.0.0/16" });
    expect(connectionVerdict(p, facts("10.1.2.3", { sniffed: "10.1.2.3" })).verdict).toBe("allow");
    expect(connectionVerdict(p, facts("10.1.9.3"))).toEqual({ verdict: "deny", rule: "deny:10.1.9.0/24" });
    // The host and link-local stay out even when a rule covers them.
    const wide = compilePolicy({ allow: ["0.0.0.0/0"] });
    expect(connectionVerdict(wide, facts("127.0.0.1")).verdict).toBe("deny");
    expect(connectionVerdict(wide, facts("127.0.0.5")).rule).toBe("public:loopback");
    expect(connectionVerdict(wide, facts("169.254.169.254")).rule).toBe("public:link-local");
    expect(connectionVerdict(wide, facts("192.0.2.2")).rule).toBe("host-address");
    expect(connectionVerdict(wide, facts("10.9.9.9")).verdict).toBe("allow");
  });
});

describe("SNI and Host sniffing", () => {
  it("reads the SNI of a real TLS ClientHello", async () => {
    const hello = await new Promise<Buffer>((resolve, reject) => {
      const srv = createServer((s) => {
        s.once("data", (d: Buffer) => {
          resolve(d);
          s.destroy();
          srv.close();
        });
      });
      srv.listen(0, "127.0.0.1", () => {
        const c = tlsConnect({
          host: "127.0.0.1",
          port: (srv.address() as { port: number }).port,
          servername: "files.pythonhosted.org",
        });
        c.on("error", () => {});
      });
      srv.on("error", reject);
    });
    expect(sniffHost(hello)).toEqual({ kind: "host", host: "files.pythonhosted.org", via: "sni" });
    expect(sniffHost(hello.subarray(0, 20))).toEqual({ kind: "more" });
  });

  it("reads HTTP Host, waits for the head, and gives up on other protocols", () => {
    const req = Buffer.from("GET /x HTTP/1.1\r\nUser-Agent: t\r\nhost: Allowed.test:8080\r\n\r\n");
    expect(sniffHost(req)).toEqual({ kind: "host", host: "Allowed.test", via: "http" });
    expect(sniffHost(Buffer.from("GET /x HTTP/1.1\r\nAccept: */*\r\n"))).toEqual({ kind: "more" });
    expect(sniffHost(Buffer.from("GE"))).toEqual({ kind: "more" });
    expect(sniffHost(Buffer.from("GET / HTTP/1.0\r\n\r\n"))).toEqual({ kind: "none" });
    expect(sniffHost(Buffer.from("SSH-2.0-OpenSSH_9.2\r\n"))).toEqual({ kind: "none" });
    expect(sniffHost(Buffer.from("POST / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n"))).toMatchObject({
      host: "[2001:db8::1]",
    });
  });
});

describe("DNS wire format against Node's resolver", () => {
  it("answers A questions, NODATA for AAAA and NXDOMAIN", async () => {
    const sock = createSocket("udp4");
    const questions: string[] = [];
    sock.on("message", (msg, r) => {
      const q = parseQuery(msg)!;
      questions.push(`${q.name}/${q.qtype}`);
      const reply =
        q.name === "allowed.test"
          ? buildResponse(q, 0, ["198.51.100.10", "198.51.100.11"])
          : buildResponse(q, RCODE_NXDOMAIN);
      sock.send(reply, r.port, r.address);
    });
    await new Promise<void>((r) => sock.bind(0, "127.0.0.1", r));
    const resolver = new Resolver({ timeout: 2_000, tries: 1 });
    resolver.setServers([`127.0.0.1:${sock.address().port}`]);
    try {
      expect((await resolver.resolve4("Allowed.Test")).sort()).toEqual(["198.51.100.10", "198.51.100.11"]);
      await expect(resolver.resolve6("allowed.test")).rejects.toMatchObject({ code: "ENODATA" });
      await expect(resolver.resolve4("denied.test")).rejects.toMatchObject({ code: "ENOTFOUND" });
      expect(questions).toEqual(["allowed.test/1", "allowed.test/28", "denied.test/1"]);
      expect(QTYPE_A).toBe(1);
    } finally {
      sock.close();
    }
    expect(parseQuery(Buffer.from("short"))).toBeUndefined();
  });
});

describe("conntrack and nftables", () => {
  it("finds the original destination of a redirected connection", () => {
    const text = [
      "ipv4     2 udp      17 29 src=192.0.2.2 dst=10.255.255.53 sport=57935 dport=53 src=127.0.0.1 dst=192.0.2.2 sport=43155 dport=57935 mark=0 zone=0 use=2",
      "ipv4     2 tcp      6 117 ESTABLISHED src=192.0.2.2 dst=198.51.100.10 sport=38280 dport=80 src=127.0.0.1 dst=192.0.2.2 sport=35237 dport=38280 [ASSURED] mark=0 zone=0 use=2",
      "ipv4     2 tcp      6 117 ESTABLISHED src=192.0.2.2 dst=203.0.113.10 sport=38281 dport=443 src=203.0.113.10 dst=192.0.2.2 sport=443 dport=38281 [ASSURED] mark=0 zone=0 use=2",
    ].join("\n");
    expect(findOriginalDestination(text, { address: "192.0.2.2", port: 38280 }, 35237)).toEqual({
      ip: "198.51.100.10",
      port: 80,
    });
    expect(findOriginalDestination(text, { address: "192.0.2.2", port: 38281 }, 35237)).toBeUndefined();
    expect(findOriginalDestination(text, { address: "192.0.2.2", port: 38280 }, 1)).toBeUndefined();
  });

  it("renders rulesets the real nft accepts (checked, not applied)", () => {
    const id = `vm-unit${process.pid}`;
    const cg = vmCgroup(id);
    createCgroup(cg);
    try {
      const closed = renderRuleset(id, cg);
      expect(closed).toContain(`table inet ${tableName(id)}`);
      expect(closed).not.toContain("dnat");
      const open = renderRuleset(id, cg, { tcp: 41000, dns: 41001 });
      expect(open).toContain("udp dport 53 dnat ip to 127.0.0.1:41001");
      expect(open).toContain("meta l4proto tcp dnat ip to 127.0.0.1:41000");
      expect(open).not.toContain("fib daddr type unicast accept");
      // "public": the kernel passes public unicast addresses itself; the rest goes to the daemon.
      const pub = renderRuleset(id, cg, { tcp: 41000, dns: 41001 }, "public");
      expect(pub).toContain("fib daddr type local dnat ip to 127.0.0.1:41000");
      expect(pub).toMatch(/ip daddr \{ [^}]*169\.254\.0\.0\/16[^}]* \} dnat ip to 127\.0\.0\.1:41000/);
      expect(pub).toMatch(/ip daddr != \{ [^}]*127\.0\.0\.0\/8[^}]* \} fib daddr type unicast accept/);
      for (const text of [closed, open, pub]) execFileSync("nft", ["-c", "-f", "-"], { input: text });
    } finally {
      removeCgroup(cg);
    }
  });
});
