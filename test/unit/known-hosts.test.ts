import { execFileSync, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { fingerprintOf } from "../../src/ssh/hostkeys.js";
import {
  formatKnownHostsLine,
  hashKnownHostsName,
  hostFieldMatches,
  knownHostsName,
  lookupKnownHost,
  matchHostPattern,
  matchPatternList,
  parseKnownHosts,
  sshKeyType,
} from "../../src/ssh/known-hosts.js";

interface Key {
  type: string;
  blob: Buffer;
  b64: string;
  keygenFp: string;
}

let dir: string;
const keys = {} as Record<"ed" | "ed2" | "rsa" | "ecdsa", Key>;

/** A real key from ssh-keygen, with the fingerprint ssh-keygen itself prints. */
function genKey(name: string, type: string, bits?: string): Key {
  const f = join(dir, name);
  execFileSync("ssh-keygen", [
    "-q",
    "-t",
    type,
    ...(bits ? ["-b", bits] : []),
    "-N",
    "",
    "-C",
    name,
    "-f",
    f,
  ]);
  const [t, b64] = readFileSync(`${f}.pub`, "utf8").trim().split(" ") as [string, string];
  const fp = execFileSync("ssh-keygen", ["-lf", `${f}.pub`])
    .toString()
    .split(" ")[1]!;
  return { type: t, blob: Buffer.from(b64, "base64"), b64, keygenFp: fp };
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "smolvm-kh-"));
  keys.ed = genKey("ed", "ed25519");
  keys.ed2 = genKey("ed2", "ed25519");
  keys.rsa = genKey("rsa", "rsa", "2048");
  keys.ecdsa = genKey("ecdsa", "ecdsa", "256");
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** What `ssh-keygen -F name -f file` finds: the real OpenSSH lookup, as line numbers. */
function keygenFind(file: string, name: string): number[] {
  const r = spawnSync("ssh-keygen", ["-F", name, "-f", file], { encoding: "utf8" });
  return [...r.stdout.matchAll(/^# Host .* found: line (\d+)/gm)].map((m) => Number(m[1]));
}

describe("key blobs and fingerprints", () => {
  it("reads the key type from real ssh-keygen keys", () => {
    expect(sshKeyType(keys.ed!.blob)).toBe("ssh-ed25519");
    expect(sshKeyType(keys.rsa!.blob)).toBe("ssh-rsa");
    expect(sshKeyType(keys.ecdsa!.blob)).toBe("ecdsa-sha2-nistp256");
    expect(sshKeyType(Buffer.alloc(0))).toBeUndefined();
    expect(sshKeyType(Buffer.from([0, 0, 0, 200, 1]))).toBeUndefined();
    expect(sshKeyType(Buffer.from([0, 0, 0, 0]))).toBeUndefined();
  });

  it("fingerprints match ssh-keygen -lf for every key type", () => {
    for (const k of Object.values(keys)) {
      expect(fingerprintOf(k.blob)).toBe(k.keygenFp);
      expect(k.keygenFp).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/);
    }
  });
});

describe("host patterns", () => {
  it("globs like OpenSSH, case-insensitively", () => {
    expect(matchHostPattern("web1.example.com", "*.example.com")).toBe(true);
    expect(matchHostPattern("example.com", "*.example.com")).toBe(false);
    expect(matchHostPattern("web1.example.com", "web?.example.com")).toBe(true);
    expect(matchHostPattern("web10.example.com", "web?.example.com")).toBe(false);
    expect(matchHostPattern("WEB1.Example.COM", "web1.example.com")).toBe(true);
    expect(matchHostPattern("a+b(c)", "a+b(c)")).toBe(true);
    expect(matchHostPattern("axb", "a.b")).toBe(false);
    expect(matchHostPattern("[h]:2222", "[h]:2222")).toBe(true);
    expect(matchHostPattern("[h]:2222", "*")).toBe(true);
  });

  it("negation wins over positive matches", () => {
    expect(matchPatternList("a.corp", "*.corp,!b.corp")).toBe(1);
    expect(matchPatternList("b.corp", "*.corp,!b.corp")).toBe(-1);
    expect(matchPatternList("b.corp", "!b.corp,*.corp")).toBe(-1);
    expect(matchPatternList("c.org", "*.corp,!b.corp")).toBe(0);
    expect(matchPatternList("x", "!y")).toBe(0);
    expect(matchPatternList("x", ["x", ""])).toBe(1);
  });

  it("uses [host]:port for ports other than 22", () => {
    expect(knownHostsName("Host.Example", 22)).toBe("host.example");
    expect(knownHostsName("host", 2222)).toBe("[host]:2222");
    expect(knownHostsName("::1", 2222)).toBe("[::1]:2222");
  });

  it("hashes names exactly like ssh-keygen -H", () => {
    const f = join(dir, "hash-check");
    writeFileSync(f, `[myhost]:2200 ${keys.ed!.type} ${keys.ed!.b64}\n`);
    execFileSync("ssh-keygen", ["-q", "-H", "-f", f], { stdio: "pipe" });
    const hashed = readFileSync(f, "utf8").split(" ")[0]!;
    const salt = Buffer.from(hashed.split("|")[2]!, "base64");
    expect(hashKnownHostsName("[myhost]:2200", salt)).toBe(hashed);
    expect(hostFieldMatches(hashed, "[myhost]:2200")).toBe(true);
    expect(hostFieldMatches(hashed, "myhost")).toBe(false);
    expect(hostFieldMatches("|1|bad|bad", "myhost")).toBe(false);
  });
});

describe("parseKnownHosts", () => {
  it("parses markers, comments, comma lists and reports malformed lines without throwing", () => {
    const ed = keys.ed!;
    const text = [
      "# comment",
      "",
      `a.example,b.example ${ed.type} ${ed.b64} my comment here`,
      `@revoked * ${ed.type} ${ed.b64}`,
      `@cert-authority *.corp ${ed.type} ${ed.b64}`,
      `@bogus host ${ed.type} ${ed.b64}`,
      "only-two fields",
      `host ${ed.type} not*base64!`,
      `host ssh-rsa ${ed.b64}`,
      `|1|short|short ${ed.type} ${ed.b64}`,
      `   host-with-indent\t${ed.type}\t${ed.b64}\r`,
      "\u0000\u0001 garbage \uffff",
    ].join("\n");
    const { entries, skipped } = parseKnownHosts(text, "/f");
    expect(entries.map((e) => [e.line, e.hosts, e.marker, e.comment])).toEqual([
      [3, "a.example,b.example", undefined, "my comment here"],
      [4, "*", "revoked", undefined],
      [5, "*.corp", "cert-authority", undefined],
      [11, "host-with-indent", undefined, undefined],
    ]);
    expect(entries[0]!.file).toBe("/f");
    expect(entries[0]!.key.equals(ed.blob)).toBe(true);
    expect(skipped.map((s) => s.line)).toEqual([6, 7, 8, 9, 10, 12]);
  });

  it("never throws on random garbage", () => {
    for (let i = 0; i < 300; i++) {
      const junk = randomBytes(200).toString(i % 2 ? "latin1" : "base64");
      const r = parseKnownHosts(`${junk}\n@revoked ${junk}\n|1|${junk}`);
      for (const e of r.entries) expect(sshKeyType(e.key)).toBe(e.keyType);
    }
  });

  it("round-trips formatKnownHostsLine", () => {
    const line = formatKnownHostsLine("Box", 2222, keys.rsa!.blob);
    expect(line).toBe(`[box]:2222 ssh-rsa ${keys.rsa!.b64}\n`);
    expect(formatKnownHostsLine("box", 22, keys.ed!.blob)).toBe(`box ssh-ed25519 ${keys.ed!.b64}\n`);
    expect(() => formatKnownHostsLine("box", 22, Buffer.from("nope"))).toThrow(TypeError);
  });
});

describe("lookupKnownHost agrees with OpenSSH", () => {
  function file(lines: string[]): { path: string; entries: ReturnType<typeof parseKnownHosts>["entries"] } {
    const p = join(dir, `kh-${randomBytes(4).toString("hex")}`);
    writeFileSync(p, lines.join("\n") + "\n");
    return { path: p, entries: parseKnownHosts(readFileSync(p, "utf8"), p).entries };
  }

  it("plain, comma lists, wildcards, negation and ports, cross-checked with ssh-keygen -F", () => {
    const { ed, rsa } = keys;
    const f = file([
      `alpha,beta ${ed.type} ${ed.b64}`,
      `*.corp,!secret.corp ${ed.type} ${ed.b64}`,
      `[gamma]:2222 ${rsa.type} ${rsa.b64}`,
      `[*.lab]:2200 ${ed.type} ${ed.b64}`,
      `web? ${rsa.type} ${rsa.b64}`,
    ]);
    const cases: [string, number, number[]][] = [
      ["alpha", 22, [1]],
      ["BETA", 22, [1]],
      ["alpha", 2222, []],
      ["x.corp", 22, [2]],
      ["secret.corp", 22, []],
      ["gamma", 2222, [3]],
      ["gamma", 22, []],
      ["box.lab", 2200, [4]],
      ["box.lab", 22, []],
      ["web1", 22, [5]],
      ["web12", 22, []],
    ];
    for (const [host, port, lines] of cases) {
      expect(keygenFind(f.path, knownHostsName(host, port)), `${host}:${port}`).toEqual(lines);
      const matched = f.entries.filter((e) => hostFieldMatches(e.hosts, knownHostsName(host, port)));
      expect(
        matched.map((e) => e.line),
        `${host}:${port}`,
      ).toEqual(lines);
    }
    expect(lookupKnownHost(f.entries, "alpha", 22, ed.blob).status).toBe("trusted");
    expect(lookupKnownHost(f.entries, "gamma", 2222, rsa.blob).status).toBe("trusted");
    expect(lookupKnownHost(f.entries, "gamma", 22, rsa.blob).status).toBe("unknown");
    expect(lookupKnownHost(f.entries, "secret.corp", 22, ed.blob).status).toBe("unknown");
  });

  it("hashed files written by ssh-keygen -H", () => {
    const { ed, rsa } = keys;
    const f = file([`alpha ${ed.type} ${ed.b64}`, `[beta]:2222 ${rsa.type} ${rsa.b64}`]);
    execFileSync("ssh-keygen", ["-q", "-H", "-f", f.path], { stdio: "pipe" });
    const hashedText = readFileSync(f.path, "utf8");
    expect(hashedText).not.toContain("alpha");
    expect(hashedText).toMatch(/^\|1\|/m);
    const entries = parseKnownHosts(hashedText, f.path).entries;
    expect(entries).toHaveLength(2);
    expect(lookupKnownHost(entries, "alpha", 22, ed.blob).status).toBe("trusted");
    expect(lookupKnownHost(entries, "ALPHA", 22, ed.blob).status).toBe("trusted");
    expect(lookupKnownHost(entries, "beta", 2222, rsa.blob).status).toBe("trusted");
    expect(lookupKnownHost(entries, "beta", 22, rsa.blob).status).toBe("unknown");
    expect(lookupKnownHost(entries, "alpha", 22, keys.ed2!.blob)).toMatchObject({ status: "changed" });
    expect(keygenFind(f.path, "alpha")).toEqual([1]);
  });

  it("changed key, other key types, revoked and cert-authority lines", () => {
    const { ed, ed2, rsa, ecdsa } = keys;
    const f = file([
      `host ${ed.type} ${ed.b64}`,
      `host ${rsa.type} ${rsa.b64}`,
      `@revoked * ${ecdsa.type} ${ecdsa.b64}`,
      `ecdsahost ${ecdsa.type} ${ecdsa.b64}`,
      `@cert-authority cahost ${ed.type} ${ed.b64}`,
    ]);
    const changed = lookupKnownHost(f.entries, "host", 22, ed2.blob);
    expect(changed.status).toBe("changed");
    if (changed.status === "changed") expect(changed.entries.map((e) => e.line)).toEqual([1]);
    expect(lookupKnownHost(f.entries, "host", 22, rsa.blob).status).toBe("trusted");
    // Revocation beats a plain line that trusts the same key.
    const rev = lookupKnownHost(f.entries, "ecdsahost", 22, ecdsa.blob);
    expect(rev).toMatchObject({ status: "revoked", entry: { line: 3 } });
    const other = file([`onlyrsa ${rsa.type} ${rsa.b64}`]);
    expect(lookupKnownHost(other.entries, "onlyrsa", 22, ed.blob).status).toBe("other-types");
    // A CA line does not make a plain key trusted.
    expect(lookupKnownHost(f.entries, "cahost", 22, ed.blob).status).toBe("unknown");
  });
});
