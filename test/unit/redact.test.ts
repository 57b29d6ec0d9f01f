import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { AuthFailedError } from "../../src/errors.js";
import { isSecretKey, REDACTED, redact, redactText } from "../../src/ssh/redact.js";

describe("isSecretKey", () => {
  it("recognises secret names whatever the case or separators", () => {
    for (const k of [
      "password",
      "Password",
      "PASSWORD",
      "passphrase",
      "db_password",
      "dbPassword",
      "secret",
      "clientSecret",
      "client-secret",
      "token",
      "accessToken",
      "access_token",
      "apiKey",
      "api_key",
      "API-KEY",
      "x-api-key",
      "privateKey",
      "private_key",
      "authorization",
      "Authorization",
      "cookie",
      "Set-Cookie",
      "credential",
      "credentials",
      "awsSecretAccessKey",
      "pass",
      "pwd",
      "passwd",
    ]) {
      expect(isSecretKey(k), k).toBe(true);
    }
  });

  it("leaves innocent names alone", () => {
    for (const k of [
      "passenger",
      "shipping",
      "keyboard",
      "tokenizer",
      "tokenCount",
      "bypass",
      "compass",
      "keyPath",
      "keyType",
      "publicKey",
      "fingerprint",
      "host",
      "user",
      "authMethod",
      "passwordAuthentication",
      "exitCode",
    ]) {
      expect(isSecretKey(k), k).toBe(false);
    }
  });
});

describe("redact values", () => {
  it("redacts secret fields at any depth, in arrays, Maps and Sets, without touching the input", () => {
    const input = {
      host: "h",
      auth: [
        { method: "password", password: "hunter2" },
        { method: "key", passphrase: "pp", keyPath: "/k" },
      ],
      nested: {
        deeper: { evenDeeper: [{ apiKey: "abc", api_key: 12345, note: "shipping passenger keyboard" }] },
      },
      map: new Map<unknown, unknown>([
        ["token", "t"],
        ["name", "n"],
      ]),
      set: new Set(["plain"]),
      password: false,
      secret: null,
    };
    const copy = structuredClone(input);
    const out = redact(input);
    expect(out).toEqual({
      host: "h",
      auth: [
        { method: "password", password: REDACTED },
        { method: "key", passphrase: REDACTED, keyPath: "/k" },
      ],
      nested: {
        deeper: {
          evenDeeper: [{ apiKey: REDACTED, api_key: REDACTED, note: "shipping passenger keyboard" }],
        },
      },
      map: new Map([
        ["token", REDACTED],
        ["name", "n"],
      ]),
      set: new Set(["plain"]),
      password: false,
      secret: null,
    });
    expect(input).toEqual(copy);
    expect(out.auth).not.toBe(input.auth);
  });

  it("redacts whole secret subtrees and Buffers under secret names", () => {
    const out = redact({ credentials: { user: "u", pass: "p" }, privateKey: Buffer.from("KEY") });
    expect(out).toEqual({ credentials: REDACTED, privateKey: REDACTED });
  });

  it("survives cycles, deep nesting, errors and odd values", () => {
    const a: Record<string, unknown> = { name: "a", token: "x" };
    a.self = a;
    a.list = [a, { back: a }];
    const out = redact(a) as Record<string, unknown>;
    expect(out.self).toBe("[Circular]");
    expect(out.token).toBe(REDACTED);
    expect((out.list as unknown[])[0]).toBe("[Circular]");
    // Shared (non-cyclic) references are copied, not reported as cycles.
    const shared = { v: 1 };
    expect(redact({ a: shared, b: shared })).toEqual({ a: { v: 1 }, b: { v: 1 } });

    let deep: Record<string, unknown> = { password: "p" };
    for (let i = 0; i < 500; i++) deep = { d: deep };
    expect(() => redact(deep)).not.toThrow();

    const err = new AuthFailedError("login with password=hunter2 failed", {
      details: { password: "hunter2", user: "u" },
    });
    expect(redact({ error: err })).toEqual({
      error: {
        name: "AuthFailedError",
        message: `login with password=${REDACTED} failed`,
        code: "SSH_AUTH_FAILED",
        details: { password: REDACTED, user: "u" },
      },
    });
    const d = new Date(5);
    expect(redact({ d, n: 1, b: true, u: undefined, big: 5n })).toEqual({
      d: new Date(5),
      n: 1,
      b: true,
      u: undefined,
      big: 5n,
    });
    expect(redact("mysql -psecret")).toBe(`mysql -p${REDACTED}`);
    expect(redact(null)).toBeNull();
    const getterBomb = {
      get boom(): string {
        throw new Error("no");
      },
    };
    expect(() => redact({ x: getterBomb })).not.toThrow();
  });

  it("hostUser hides host and user fields and their values in text", () => {
    const out = redact(
      {
        hostInfo: { host: "db.internal", port: 22, username: "alice" },
        message: "connect ECONNREFUSED 10.1.2.3:22 to db.internal as alice",
        cmd: "scp x bob@files.example.com:/tmp",
        path: "/home/alice/.ssh/id_ed25519",
      },
      { hostUser: true },
    );
    expect(out).toEqual({
      hostInfo: { host: REDACTED, port: 22, username: REDACTED },
      message: `connect ECONNREFUSED ${REDACTED}:22 to ${REDACTED} as ${REDACTED}`,
      cmd: `scp x ${REDACTED}@${REDACTED}:/tmp`,
      path: `/home/${REDACTED}/.ssh/id_ed25519`,
    });
    // Without the option, host and user stay.
    expect(redact({ host: "db.internal", user: "alice" })).toEqual({ host: "db.internal", user: "alice" });
  });
});

describe("redactText", () => {
  it("removes real PEM and OpenSSH private keys, keeping the markers", () => {
    const dir = mkdtempSync(join(tmpdir(), "smolvm-redact-"));
    try {
      for (const [type, fmt] of [
        ["ed25519", []],
        ["rsa", ["-b", "2048", "-m", "PEM"]],
        ["ecdsa", ["-m", "PKCS8"]],
      ] as const) {
        const f = join(dir, type);
        execFileSync("ssh-keygen", ["-q", "-t", type, ...fmt, "-N", "", "-f", f]);
        const pem = readFileSync(f, "utf8");
        const body = pem.split("\n")[1]!;
        const out = redactText(`before\n${pem}after`);
        expect(out).not.toContain(body);
        expect(out).toMatch(
          /^before\n-----BEGIN [A-Z ]*PRIVATE KEY-----\[REDACTED\]-----END [A-Z ]*PRIVATE KEY-----\nafter$/,
        );
        // A key cut off mid-way (truncated output) is still removed.
        const cut = pem.slice(0, 200);
        expect(redactText(cut)).not.toContain(body.slice(0, 30));
        // Public keys are not secrets but their base64 is a long run: it is hidden too.
        const pub = readFileSync(`${f}.pub`, "utf8").trim();
        expect(redactText(pub)).toMatch(/^\S+ \[REDACTED\]/);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("redacts Authorization and cookie headers, keeping the scheme", () => {
    expect(redactText("Authorization: Bearer eyJhbGciOi.xyz.abc\nHost: x")).toBe(
      `Authorization: Bearer ${REDACTED}\nHost: x`,
    );
    expect(redactText("authorization:Basic dXNlcjpwYXNz")).toBe(`authorization:Basic ${REDACTED}`);
    expect(redactText("Proxy-Authorization: Digest abc")).toBe(`Proxy-Authorization: Digest ${REDACTED}`);
    expect(redactText("Cookie: session=abc; other=def")).toBe(`Cookie: ${REDACTED}`);
    expect(redactText("X-Api-Key: k123")).toBe(`X-Api-Key: ${REDACTED}`);
    expect(redactText("curl -H 'X-Auth-Token: tok'")).toBe(`curl -H 'X-Auth-Token: ${REDACTED}`);
  });

  it("redacts URL passwords and keeps the user", () => {
    expect(redactText("git clone https://bob:s3cr3t@github.com/x.git")).toBe(
      `git clone https://bob:${REDACTED}@github.com/x.git`,
    );
    expect(redactText("postgres://app:p%40ss@db:5432/app")).toBe(`postgres://app:${REDACTED}@db:5432/app`);
    expect(redactText("https://github.com/x.git and http://host:8080/path")).toBe(
      "https://github.com/x.git and http://host:8080/path",
    );
    expect(redactText("ssh://user@host:22")).toBe("ssh://user@host:22");
  });

  it("redacts password arguments of commands", () => {
    const cases: [string, string][] = [
      ["sshpass -p hunter2 ssh host", `sshpass -p ${REDACTED} ssh host`],
      ["sshpass -phunter2 ssh host", `sshpass -p${REDACTED} ssh host`],
      ["sshpass -p 'two words' ssh -p 2222 host", `sshpass -p ${REDACTED} ssh -p 2222 host`],
      ["mysql -u root -psecret db", `mysql -u root -p${REDACTED} db`],
      ["mysql -u root -p", "mysql -u root -p"],
      ['mysqldump -p"x y" db', `mysqldump -p${REDACTED} db`],
      ["/usr/bin/mysql -h h -p s3 -e 'select 1'", `/usr/bin/mysql -h h -p ${REDACTED} -e 'select 1'`],
      ["redis-cli -a pw ping", `redis-cli -a ${REDACTED} ping`],
      ["tool --password hunter2 --verbose", `tool --password ${REDACTED} --verbose`],
      ["tool --password=hunter2", `tool --password=${REDACTED}`],
      ["tool --db-password 'a b' x", `tool --db-password ${REDACTED} x`],
      ["vault login --token=abc.def", `vault login --token=${REDACTED}`],
      ["export API_KEY=abc123 && run", `export API_KEY=${REDACTED} && run`],
      ['{"password": "hunter2", "user": "u"}', `{"password": "${REDACTED}", "user": "u"}`],
      ["echo x; mysql -pX; ssh -p 22 h", `echo x; mysql -p${REDACTED}; ssh -p 22 h`],
    ];
    for (const [input, want] of cases) expect(redactText(input), input).toBe(want);
  });

  it("leaves -p alone where it is a port or a flag (documented choice)", () => {
    for (const s of [
      "ssh -p 2222 user@host",
      "scp -P 2222 a b",
      "mkdir -p /tmp/a/b",
      "cp -p src dst",
      "nc -l -p 8080",
      "psql -h db -p 5432 -U app",
      "ssh -o StrictHostKeyChecking=no -p 22 h",
      "sshpass -e ssh -p 2222 h",
      "sshpass -f /run/pw ssh -p 2222 h",
    ]) {
      expect(redactText(s), s).toBe(s);
    }
  });

  it("redacts long base64 runs but not words, paths, hex digests or fingerprints", () => {
    const b64 = Buffer.from("0123456789abcdefghij0123456789ABCDEFGHIJ!").toString("base64");
    expect(redactText(`blob ${b64} end`)).toBe(`blob ${REDACTED} end`);
    const keep = [
      "shipping passenger keyboard tokenizer secretary",
      "a".repeat(60),
      "/usr/lib/node_modules/typescript/lib/typescript.js",
      "/home/someone/projects/averyveryverylongdirectorynamewithoutdigits/file",
      "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
      "da39a3ee5e6b4b0d3255bfef95601890afd80709",
      "SHA256:E7H1+TKJnstVfRHyC8rOZAUMqR+ssCxhvTajCAWWKcc",
      "ConnectionRefusedError: connect ECONNREFUSED 127.0.0.1:2222",
      "The password prompt appeared; the token was accepted; secret handshake.",
    ];
    for (const s of keep) expect(redactText(s), s).toBe(s);
  });
});
