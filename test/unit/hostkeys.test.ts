import { execFileSync, spawnSync } from "node:child_process";
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { HostKeyMismatchError, ValidationError } from "../../src/errors.js";
import {
  appendKnownHost,
  createHostKeyVerifier,
  fingerprintOf,
  HostKeyErrorCode,
  md5FingerprintOf,
  normalizeFingerprint,
} from "../../src/ssh/hostkeys.js";

interface Key {
  type: string;
  blob: Buffer;
  b64: string;
  fp: string;
  md5: string;
}

let dir: string;
let ed: Key;
let ed2: Key;
let rsa: Key;

function genKey(name: string, type: string): Key {
  const f = join(dir, name);
  execFileSync("ssh-keygen", [
    "-q",
    "-t",
    type,
    ...(type === "rsa" ? ["-b", "2048"] : []),
    "-N",
    "",
    "-f",
    f,
  ]);
  const [t, b64] = readFileSync(`${f}.pub`, "utf8").trim().split(" ") as [string, string];
  const fp = execFileSync("ssh-keygen", ["-lf", `${f}.pub`])
    .toString()
    .split(" ")[1]!;
  const md5 = execFileSync("ssh-keygen", ["-E", "md5", "-lf", `${f}.pub`])
    .toString()
    .split(" ")[1]!;
  return { type: t, blob: Buffer.from(b64, "base64"), b64, fp, md5 };
}

function tmp(name: string): string {
  const d = mkdtempSync(join(dir, `${name}-`));
  return d;
}

function kh(lines: string[]): string {
  const p = join(tmp("kh"), "known_hosts");
  writeFileSync(p, lines.join("\n") + "\n");
  return p;
}

const savedHome = process.env.HOME;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "smolvm-hostkeys-"));
  ed = genKey("ed", "ed25519");
  ed2 = genKey("ed2", "ed25519");
  rsa = genKey("rsa", "rsa");
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(() => {
  process.env.HOME = savedHome;
});

async function expectErr(p: Promise<unknown>, code: string): Promise<HostKeyMismatchError> {
  const e = await p;
  expect(e).toBeInstanceOf(HostKeyMismatchError);
  expect((e as HostKeyMismatchError).code).toBe(code);
  return e as HostKeyMismatchError;
}

describe("fingerprints", () => {
  it("fingerprintOf and md5FingerprintOf equal ssh-keygen output", () => {
    for (const k of [ed, ed2, rsa]) {
      expect(fingerprintOf(k.blob)).toBe(k.fp);
      expect(md5FingerprintOf(k.blob)).toBe(k.md5);
    }
  });

  it("normalizeFingerprint accepts padding and rejects junk", () => {
    expect(normalizeFingerprint(`${ed.fp}=`)).toBe(ed.fp);
    expect(normalizeFingerprint(` ${ed.fp} `)).toBe(ed.fp);
    expect(normalizeFingerprint(ed.md5.toUpperCase().replace("MD5:", "MD5:"))).toBe(ed.md5);
    for (const bad of ["", "SHA256:", "SHA256:abc", ed.fp.slice(7), "SHA1:xyz", `${ed.fp}xx`]) {
      expect(() => normalizeFingerprint(bad), bad).toThrow(ValidationError);
    }
  });
});

describe("createHostKeyVerifier", () => {
  it("rejects unknown policies and bad pins at creation", () => {
    expect(() => createHostKeyVerifier({ policy: "off" as never }, "h", 22)).toThrow(ValidationError);
    expect(() => createHostKeyVerifier({ policy: "Insecure" as never }, "h", 22)).toThrow(ValidationError);
    expect(() => createHostKeyVerifier({ fingerprint: "deadbeef" }, "h", 22)).toThrow(ValidationError);
    expect(() => createHostKeyVerifier({ knownHostsPath: [] }, "h", 22)).toThrow(ValidationError);
  });

  it("strict is the default and reads ~/.ssh/known_hosts with HOME resolved at call time", async () => {
    const home = tmp("home");
    process.env.HOME = home;
    const verify = createHostKeyVerifier(undefined, "myhost", 22);
    const e = await expectErr(verify(ed.blob), HostKeyErrorCode.UNKNOWN);
    expect(e.expectedFingerprint).toBeUndefined();
    expect(e.actualFingerprint).toBe(ed.fp);
    expect(e.message).toContain(`${home}/.ssh/known_hosts`);
    expect(e.message).toContain("ssh-keyscan -t ed25519 myhost >>");
    expect(e.message).toContain(`fingerprint: "${ed.fp}"`);
    expect(e.message).toContain('policy: "accept-new"');
    // Strict never writes.
    expect(() => statSync(join(home, ".ssh"))).toThrow();

    mkdirSync(join(home, ".ssh"));
    writeFileSync(join(home, ".ssh", "known_hosts"), `myhost ${ed.type} ${ed.b64}\n`);
    expect(await verify(ed.blob)).toBeNull();
    // A different HOME later: the same verifier follows it.
    process.env.HOME = tmp("home2");
    await expectErr(verify(ed.blob), HostKeyErrorCode.UNKNOWN);
  });

  it("trusts plain, [host]:port and hashed entries; port matters", async () => {
    const p = kh([`alpha ${ed.type} ${ed.b64}`, `[beta]:2222 ${rsa.type} ${rsa.b64}`]);
    expect(await createHostKeyVerifier({ knownHostsPath: p }, "alpha", 22)(ed.blob)).toBeNull();
    expect(await createHostKeyVerifier({ knownHostsPath: p }, "beta", 2222)(rsa.blob)).toBeNull();
    const e = await expectErr(
      createHostKeyVerifier({ knownHostsPath: p }, "beta", 22)(rsa.blob),
      HostKeyErrorCode.UNKNOWN,
    );
    expect(e.message).toContain("ssh-keyscan -t rsa beta");
    const e2 = await expectErr(
      createHostKeyVerifier({ knownHostsPath: p }, "alpha", 2200)(ed.blob),
      HostKeyErrorCode.UNKNOWN,
    );
    expect(e2.message).toContain("ssh-keyscan -p 2200 -t ed25519 alpha");
    execFileSync("ssh-keygen", ["-q", "-H", "-f", p], { stdio: "pipe" });
    expect(readFileSync(p, "utf8")).not.toContain("alpha");
    expect(await createHostKeyVerifier({ knownHostsPath: p }, "alpha", 22)(ed.blob)).toBeNull();
    expect(await createHostKeyVerifier({ knownHostsPath: p }, "beta", 2222)(rsa.blob)).toBeNull();
  });

  it("a changed key is a mismatch with both fingerprints, file:line and ssh-keygen -R", async () => {
    const p = kh(["# first line", `alpha ${ed.type} ${ed.b64}`]);
    for (const policy of ["strict", "accept-new"] as const) {
      const e = await expectErr(
        createHostKeyVerifier({ policy, knownHostsPath: p }, "alpha", 22)(ed2.blob),
        HostKeyErrorCode.MISMATCH,
      );
      expect(e.expectedFingerprint).toBe(ed.fp);
      expect(e.actualFingerprint).toBe(ed2.fp);
      expect(e.message).toContain(`${p}:2`);
      expect(e.message).toContain(`ssh-keygen -R alpha -f ${p}`);
      expect(e.details).toMatchObject({ reason: "changed", storedAt: [`${p}:2`] });
    }
    // accept-new did not touch the file.
    expect(readFileSync(p, "utf8")).toBe(`# first line\nalpha ${ed.type} ${ed.b64}\n`);
  });

  it("a known host presenting another key type is refused under every file policy", async () => {
    const p = kh([`alpha ${rsa.type} ${rsa.b64}`]);
    for (const policy of ["strict", "accept-new"] as const) {
      const e = await expectErr(
        createHostKeyVerifier({ policy, knownHostsPath: p }, "alpha", 22)(ed.blob),
        HostKeyErrorCode.MISMATCH,
      );
      expect(e.expectedFingerprint).toBe(rsa.fp);
      expect(e.details.reason).toBe("other-types");
    }
    expect(readFileSync(p, "utf8").split("\n").filter(Boolean)).toHaveLength(1);
  });

  it("@revoked keys are refused with their own code, even if also listed as trusted", async () => {
    const p = kh([`alpha ${ed.type} ${ed.b64}`, `@revoked * ${ed.type} ${ed.b64}`]);
    for (const policy of ["strict", "accept-new"] as const) {
      const e = await expectErr(
        createHostKeyVerifier({ policy, knownHostsPath: p }, "alpha", 22)(ed.blob),
        HostKeyErrorCode.REVOKED,
      );
      expect(e.message).toContain("@revoked");
      expect(e.message).toContain(`${p}:2`);
    }
  });

  it("a pinned fingerprint wins over files, in both directions", async () => {
    const p = kh([`alpha ${ed.type} ${ed.b64}`]);
    // File says changed, pin says fine.
    expect(
      await createHostKeyVerifier({ knownHostsPath: p, fingerprint: ed2.fp }, "alpha", 22)(ed2.blob),
    ).toBeNull();
    // File says fine, pin says no.
    const e = await expectErr(
      createHostKeyVerifier({ knownHostsPath: p, fingerprint: ed2.fp }, "alpha", 22)(ed.blob),
      HostKeyErrorCode.MISMATCH,
    );
    expect(e.expectedFingerprint).toBe(ed2.fp);
    expect(e.actualFingerprint).toBe(ed.fp);
    // Even "insecure" honours an explicit pin.
    await expectErr(
      createHostKeyVerifier({ policy: "insecure", fingerprint: ed2.fp }, "alpha", 22)(ed.blob),
      HostKeyErrorCode.MISMATCH,
    );
    expect(await createHostKeyVerifier({ fingerprint: `${rsa.fp}=` }, "x", 1)(rsa.blob)).toBeNull();
    expect(await createHostKeyVerifier({ fingerprint: rsa.md5 }, "x", 1)(rsa.blob)).toBeNull();
    await expectErr(
      createHostKeyVerifier({ fingerprint: rsa.md5 }, "x", 1)(ed.blob),
      HostKeyErrorCode.MISMATCH,
    );
  });

  it("insecure trusts anything without reading files", async () => {
    const verify = createHostKeyVerifier(
      { policy: "insecure", knownHostsPath: "/nonexistent/dir/kh" },
      "alpha",
      22,
    );
    expect(await verify(ed.blob)).toBeNull();
    expect(await verify(rsa.blob)).toBeNull();
  });

  it("searches every file of a list; missing files count as empty", async () => {
    const p2 = kh([`alpha ${ed.type} ${ed.b64}`]);
    const verify = createHostKeyVerifier({ knownHostsPath: [join(dir, "missing"), p2] }, "alpha", 22);
    expect(await verify(ed.blob)).toBeNull();
  });

  it("an unreadable known_hosts (a directory, a FIFO) is a typed error, never a hang", async () => {
    const d = tmp("unreadable");
    const fifo = join(d, "fifo");
    execFileSync("mkfifo", [fifo]);
    const t0 = performance.now();
    for (const p of [d, fifo]) {
      const e = await expectErr(
        createHostKeyVerifier({ knownHostsPath: p }, "alpha", 22)(ed.blob),
        HostKeyErrorCode.UNREADABLE,
      );
      expect(e.message).toContain(p);
    }
    expect(performance.now() - t0).toBeLessThan(2000);
  });

  it("accept-new creates ~/.ssh 0700 and known_hosts 0600, appends once, then strict trusts it", async () => {
    const home = tmp("acc");
    process.env.HOME = home;
    const verify = createHostKeyVerifier({ policy: "accept-new" }, "NewHost", 2222);
    const results = await Promise.all(Array.from({ length: 10 }, () => verify(ed.blob)));
    expect(results.every((r) => r === null)).toBe(true);
    const file = join(home, ".ssh", "known_hosts");
    expect(statSync(join(home, ".ssh")).mode & 0o777).toBe(0o700);
    expect(statSync(file).mode & 0o777).toBe(0o600);
    expect(readFileSync(file, "utf8")).toBe(`[newhost]:2222 ${ed.type} ${ed.b64}\n`);
    // OpenSSH itself finds the line.
    const found = spawnSync("ssh-keygen", ["-F", "[newhost]:2222", "-f", file], { encoding: "utf8" });
    expect(found.stdout).toContain("found: line 1");
    expect(await createHostKeyVerifier({ policy: "strict" }, "newhost", 2222)(ed.blob)).toBeNull();
    // A changed key is still refused, and nothing is appended.
    await expectErr(verify(ed2.blob), HostKeyErrorCode.MISMATCH);
    expect(readFileSync(file, "utf8").split("\n").filter(Boolean)).toHaveLength(1);
  });

  it("accept-new keeps existing content (even without a final newline) and writes to the first file", async () => {
    const d = tmp("keep");
    const first = join(d, "first");
    const second = join(d, "second");
    writeFileSync(first, `# mine\nother ${rsa.type} ${rsa.b64}`);
    chmodSync(first, 0o644);
    writeFileSync(second, "");
    expect(
      await createHostKeyVerifier(
        { policy: "accept-new", knownHostsPath: [first, second] },
        "h",
        22,
      )(ed.blob),
    ).toBeNull();
    expect(readFileSync(first, "utf8")).toBe(
      `# mine\nother ${rsa.type} ${rsa.b64}\nh ${ed.type} ${ed.b64}\n`,
    );
    expect(readFileSync(second, "utf8")).toBe("");
  });

  it("accept-new reports a write failure as a typed error", async () => {
    const d = tmp("ro");
    const blocker = join(d, "file");
    writeFileSync(blocker, "");
    // The parent "directory" is a regular file: mkdir fails whatever our privileges are.
    const e = await expectErr(
      createHostKeyVerifier(
        { policy: "accept-new", knownHostsPath: join(blocker, "known_hosts") },
        "h",
        22,
      )(ed.blob),
      HostKeyErrorCode.WRITE_FAILED,
    );
    expect(e.message).toContain("accept-new");
  });

  it("appendKnownHost is idempotent for a key already present", async () => {
    const p = kh([`h ${ed.type} ${ed.b64}`]);
    await appendKnownHost(p, "h", 22, ed.blob);
    await appendKnownHost(p, "h", 22, ed.blob);
    expect(readFileSync(p, "utf8")).toBe(`h ${ed.type} ${ed.b64}\n`);
  });
});
