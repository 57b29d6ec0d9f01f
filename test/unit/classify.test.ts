/**
 * Error classification (by errno code and ssh2 level, never message text) and the cleartext
 * KEXINIT parser behind NoMutualKexError.
 */
import { describe, expect, it } from "vitest";
import {
  AgentError,
  AuthFailedError,
  ConnectionLostError,
  ConnectionRefusedError,
  ConnectionTimeoutError,
  HostKeyMismatchError,
  HostUnreachableError,
  NoMutualKexError,
  ProtocolError,
  SSHConnectionError,
  ValidationError,
} from "../../src/errors.js";
import {
  type AlgorithmLists,
  type ConnectContext,
  classifyConnectError,
  isChannelOpenRefused,
  noMutual,
  parseServerKexInit,
} from "../../src/ssh/classify.js";

/** The identification line and first packet (KEXINIT) of OpenSSH_9.2p1 Debian-2+deb12u10, captured from the test sshd. */
const OPENSSH_92_HEAD = Buffer.from(
  [
    "U1NILTIuMC1PcGVuU1NIXzkuMnAxIERlYmlhbi0yK2RlYjEydTEwDQoAAARUBxT3VyNcDaovYqnMJNqu8LSDAAABPXNudHJ1",
    "cDc2MXgyNTUxOS1zaGE1MTIsc250cnVwNzYxeDI1NTE5LXNoYTUxMkBvcGVuc3NoLmNvbSxjdXJ2ZTI1NTE5LXNoYTI1Nixj",
    "dXJ2ZTI1NTE5LXNoYTI1NkBsaWJzc2gub3JnLGVjZGgtc2hhMi1uaXN0cDI1NixlY2RoLXNoYTItbmlzdHAzODQsZWNkaC1z",
    "aGEyLW5pc3RwNTIxLGRpZmZpZS1oZWxsbWFuLWdyb3VwLWV4Y2hhbmdlLXNoYTI1NixkaWZmaWUtaGVsbG1hbi1ncm91cDE2",
    "LXNoYTUxMixkaWZmaWUtaGVsbG1hbi1ncm91cDE4LXNoYTUxMixkaWZmaWUtaGVsbG1hbi1ncm91cDE0LXNoYTI1NixrZXgt",
    "c3RyaWN0LXMtdjAwQG9wZW5zc2guY29tAAAAJXNzaC1lZDI1NTE5LHJzYS1zaGEyLTUxMixyc2Etc2hhMi0yNTYAAABsY2hh",
    "Y2hhMjAtcG9seTEzMDVAb3BlbnNzaC5jb20sYWVzMTI4LWN0cixhZXMxOTItY3RyLGFlczI1Ni1jdHIsYWVzMTI4LWdjbUBv",
    "cGVuc3NoLmNvbSxhZXMyNTYtZ2NtQG9wZW5zc2guY29tAAAAbGNoYWNoYTIwLXBvbHkxMzA1QG9wZW5zc2guY29tLGFlczEy",
    "OC1jdHIsYWVzMTkyLWN0cixhZXMyNTYtY3RyLGFlczEyOC1nY21Ab3BlbnNzaC5jb20sYWVzMjU2LWdjbUBvcGVuc3NoLmNv",
    "bQAAANV1bWFjLTY0LWV0bUBvcGVuc3NoLmNvbSx1bWFjLTEyOC1ldG1Ab3BlbnNzaC5jb20saG1hYy1zaGEyLTI1Ni1ldG1A",
    "b3BlbnNzaC5jb20saG1hYy1zaGEyLTUxMi1ldG1Ab3BlbnNzaC5jb20saG1hYy1zaGExLWV0bUBvcGVuc3NoLmNvbSx1bWFj",
    "LTY0QG9wZW5zc2guY29tLHVtYWMtMTI4QG9wZW5zc2guY29tLGhtYWMtc2hhMi0yNTYsaG1hYy1zaGEyLTUxMixobWFjLXNo",
    "YTEAAADVdW1hYy02NC1ldG1Ab3BlbnNzaC5jb20sdW1hYy0xMjgtZXRtQG9wZW5zc2guY29tLGhtYWMtc2hhMi0yNTYtZXRt",
    "QG9wZW5zc2guY29tLGhtYWMtc2hhMi01MTItZXRtQG9wZW5zc2guY29tLGhtYWMtc2hhMS1ldG1Ab3BlbnNzaC5jb20sdW1h",
    "Yy02NEBvcGVuc3NoLmNvbSx1bWFjLTEyOEBvcGVuc3NoLmNvbSxobWFjLXNoYTItMjU2LGhtYWMtc2hhMi01MTIsaG1hYy1z",
    "aGExAAAAFW5vbmUsemxpYkBvcGVuc3NoLmNvbQAAABVub25lLHpsaWJAb3BlbnNzaC5jb20AAAAAAAAAAAAAAAAAAAAAAAAA",
    "AA==",
  ].join(""),
  "base64",
);

const ctx = (extra: Partial<ConnectContext> = {}): ConnectContext => ({
  host: "10.1.2.3",
  port: 2222,
  username: "deploy",
  connectTimeoutMs: 4000,
  ...extra,
});

const errno = (code: string, message = "irrelevant") => Object.assign(new Error(message), { code });
const level = (l: string, message = "irrelevant") => Object.assign(new Error(message), { level: l });

/** Builds an SSH binary packet holding a KEXINIT with the given name-lists (RFC 4253 §7.1). */
function kexInitPacket(lists: string[], msg = 20): Buffer {
  const parts: Buffer[] = [Buffer.from([msg]), Buffer.alloc(16, 7)];
  for (const l of lists) {
    const b = Buffer.from(l, "latin1");
    const len = Buffer.alloc(4);
    len.writeUInt32BE(b.length);
    parts.push(len, b);
  }
  parts.push(Buffer.from([0]), Buffer.alloc(4)); // first_kex_packet_follows, reserved
  const payload = Buffer.concat(parts);
  const pad = 8 - ((payload.length + 5) % 8) + 4;
  const head = Buffer.alloc(5);
  head.writeUInt32BE(payload.length + pad + 1);
  head[4] = pad;
  return Buffer.concat([head, payload, Buffer.alloc(pad)]);
}

const TEN = [
  "curve25519-sha256,diffie-hellman-group14-sha256",
  "ssh-ed25519",
  "aes128-ctr,aes256-gcm@openssh.com",
  "aes256-gcm@openssh.com,aes128-ctr",
  "hmac-sha2-256",
  "hmac-sha2-512,hmac-sha2-256",
  "none",
  "none,zlib@openssh.com",
  "",
  "",
];

describe("classifyConnectError", () => {
  it("maps socket errno codes to their classes", () => {
    const cases: Array<[string, new (...a: never[]) => Error]> = [
      ["ECONNREFUSED", ConnectionRefusedError],
      ["ETIMEDOUT", ConnectionTimeoutError],
      ["EHOSTUNREACH", HostUnreachableError],
      ["ENETUNREACH", HostUnreachableError],
      ["ENOTFOUND", HostUnreachableError],
      ["EAI_AGAIN", HostUnreachableError],
      ["EADDRNOTAVAIL", HostUnreachableError],
      ["ECONNRESET", ConnectionLostError],
      ["EPIPE", ConnectionLostError],
      ["ECONNABORTED", ConnectionLostError],
    ];
    for (const [code, cls] of cases) {
      const e = classifyConnectError(errno(code), ctx());
      expect(e, code).toBeInstanceOf(cls);
      expect(e.constructor, code).toBe(cls);
      expect(e.message, code).toContain("10.1.2.3:2222");
      expect(e.cause).toBeInstanceOf(Error);
    }
    const unreachable = classifyConnectError(errno("EHOSTUNREACH"), ctx());
    expect(unreachable.details).toMatchObject({ host: "10.1.2.3", port: 2222, errno: "EHOSTUNREACH" });
    expect(unreachable.code).toBe(new HostUnreachableError("x").code);
    const timeout = classifyConnectError(errno("ETIMEDOUT"), ctx());
    expect(timeout.details).toMatchObject({ connectTimeoutMs: 4000, phase: "tcp" });
  });

  it("maps ssh2 error levels to their classes", () => {
    const auth = classifyConnectError(
      level("client-authentication"),
      ctx({ tried: ["publickey", "password"] }),
    );
    expect(auth).toBeInstanceOf(AuthFailedError);
    expect(auth.message).toContain("deploy");
    expect(auth.message).toContain("publickey, password");
    expect(auth.details.tried).toEqual(["publickey", "password"]);
    const none = classifyConnectError(level("client-authentication"), ctx());
    expect(none).toBeInstanceOf(AuthFailedError);
    expect(none.details.tried).toEqual([]);
    expect(classifyConnectError(level("agent"), ctx())).toBeInstanceOf(AgentError);
    const ct = classifyConnectError(level("client-timeout"), ctx());
    expect(ct).toBeInstanceOf(ConnectionTimeoutError);
    expect(ct.details.phase).toBe("handshake");
    // A handshake failure without both lists known is a protocol problem, not "no mutual kex".
    const proto = classifyConnectError(level("handshake"), ctx());
    expect(proto.constructor).toBe(ProtocolError);
  });

  it("never classifies by message text", () => {
    for (const text of [
      "connect ECONNREFUSED 127.0.0.1:22",
      "All configured authentication methods failed",
      "Timed out while waiting for handshake",
    ]) {
      const e = classifyConnectError(new Error(text), ctx());
      expect(e.constructor, text).toBe(SSHConnectionError);
    }
    expect(classifyConnectError(undefined, ctx()).constructor).toBe(SSHConnectionError);
  });

  it("keeps typed errors and lets a host key verdict win", () => {
    const given = new ValidationError("bad");
    expect(classifyConnectError(given, ctx())).toBe(given);
    const mismatch = new HostKeyMismatchError("mismatch", {
      expected: "SHA256:a",
      actual: "SHA256:b",
    } as never);
    // ssh2 reports a rejected host key as a handshake error; the verifier's decision is the cause.
    expect(classifyConnectError(level("handshake"), ctx({ hostKeyError: mismatch }))).toBe(mismatch);
  });

  it("names both algorithm lists when negotiation has no common algorithm", () => {
    const theirs = parseServerKexInit(OPENSSH_92_HEAD)!;
    const ours: AlgorithmLists = {
      kex: ["diffie-hellman-group1-sha1", "ext-info-c"],
      serverHostKey: ["ssh-ed25519"],
      cipher: ["aes128-ctr"],
      mac: ["hmac-sha2-256"],
      compress: ["none"],
    };
    const e = classifyConnectError(level("handshake"), ctx({ ours, theirs }));
    expect(e).toBeInstanceOf(NoMutualKexError);
    const k = e as NoMutualKexError;
    expect(k.ours).toEqual(["diffie-hellman-group1-sha1"]); // ext-info-c is a signal, not a choice
    expect(k.theirs).toEqual(theirs.kex);
    expect(k.details.category).toBe("key exchange");
    expect(k.message).toContain("ours: diffie-hellman-group1-sha1;");
    expect(k.message).toContain("curve25519-sha256");

    const cipher = classifyConnectError(
      level("handshake"),
      ctx({ ours: { ...ours, kex: ["curve25519-sha256"], cipher: ["3des-cbc", "blowfish-cbc"] }, theirs }),
    ) as NoMutualKexError;
    expect(cipher).toBeInstanceOf(NoMutualKexError);
    expect(cipher.details.category).toBe("cipher");
    expect(cipher.ours).toEqual(["3des-cbc", "blowfish-cbc"]);
    expect(cipher.theirs).toContain("chacha20-poly1305@openssh.com");
    expect(cipher.message).toContain("3des-cbc,blowfish-cbc");

    const hostKey = noMutual({ ...ours, kex: ["curve25519-sha256"], serverHostKey: ["ssh-dss"] }, theirs);
    expect(hostKey).toEqual({
      what: "host key",
      ours: ["ssh-dss"],
      theirs: ["ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"],
    });
  });
});

describe("noMutual", () => {
  const base: AlgorithmLists = {
    kex: ["a"],
    serverHostKey: ["h"],
    cipher: ["c"],
    mac: ["m"],
    compress: ["none"],
  };
  it("is undefined when every category overlaps, and ignores MAC (AEAD ciphers carry their own)", () => {
    expect(noMutual(base, base)).toBeUndefined();
    expect(noMutual(base, { ...base, mac: ["other"] })).toBeUndefined();
  });
  it("reports the first failing category in kex, host key, cipher, compression order", () => {
    expect(noMutual(base, { ...base, cipher: ["x"], compress: ["zlib"] })?.what).toBe("cipher");
    expect(noMutual(base, { ...base, compress: ["zlib"] })).toEqual({
      what: "compression",
      ours: ["none"],
      theirs: ["zlib"],
    });
  });
});

describe("parseServerKexInit", () => {
  it("parses a real OpenSSH 9.2 KEXINIT", () => {
    const lists = parseServerKexInit(OPENSSH_92_HEAD)!;
    expect(lists.kex).toContain("curve25519-sha256");
    expect(lists.kex.at(-1)).toBe("kex-strict-s-v00@openssh.com");
    expect(lists.serverHostKey).toEqual(["ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"]);
    expect(lists.cipher).toEqual([
      "chacha20-poly1305@openssh.com",
      "aes128-ctr",
      "aes192-ctr",
      "aes256-ctr",
      "aes128-gcm@openssh.com",
      "aes256-gcm@openssh.com",
    ]);
    expect(lists.mac).toContain("hmac-sha2-256-etm@openssh.com");
    expect(lists.compress).toEqual(["none", "zlib@openssh.com"]);
  });

  it("is undefined until the whole packet has arrived", () => {
    const nl = OPENSSH_92_HEAD.indexOf(0x0a);
    for (const n of [0, 10, nl, nl + 1, nl + 3, nl + 5, nl + 200, OPENSSH_92_HEAD.length - 1]) {
      expect(parseServerKexInit(OPENSSH_92_HEAD.subarray(0, n)), `first ${n} bytes`).toBeUndefined();
    }
    expect(parseServerKexInit(OPENSSH_92_HEAD)).toBeDefined();
  });

  it("parses a constructed KEXINIT after banner lines, merging both directions", () => {
    const buf = Buffer.concat([
      Buffer.from("hello from a pre-banner line\r\nSSH-2.0-Test_1.0\r\n"),
      kexInitPacket(TEN),
    ]);
    expect(parseServerKexInit(buf)).toEqual({
      kex: ["curve25519-sha256", "diffie-hellman-group14-sha256"],
      serverHostKey: ["ssh-ed25519"],
      cipher: ["aes128-ctr", "aes256-gcm@openssh.com"],
      mac: ["hmac-sha2-256"],
      compress: ["none"],
    });
    // Directions without overlap: the client-to-server list is shown.
    const apart = [...TEN];
    apart[2] = "aes128-ctr";
    apart[3] = "aes256-ctr";
    expect(
      parseServerKexInit(Buffer.concat([Buffer.from("SSH-2.0-x\n"), kexInitPacket(apart)]))?.cipher,
    ).toEqual(["aes128-ctr"]);
  });

  it("ignores other first packets and rejects an implausible length", () => {
    expect(
      parseServerKexInit(Buffer.concat([Buffer.from("SSH-2.0-x\r\n"), kexInitPacket(TEN, 21)])),
    ).toBeUndefined();
    const huge = Buffer.concat([Buffer.from("SSH-2.0-x\r\n"), Buffer.from([0x10, 0, 0, 0, 4])]);
    expect(() => parseServerKexInit(huge)).toThrow(ProtocolError);
  });
});

describe("isChannelOpenRefused", () => {
  it("is true only for SSH_MSG_CHANNEL_OPEN_FAILURE reason codes 1..4", () => {
    for (const reason of [1, 2, 3, 4]) expect(isChannelOpenRefused({ reason })).toBe(true);
    for (const v of [
      { reason: 0 },
      { reason: 5 },
      { reason: "4" },
      new Error("open failed"),
      null,
      undefined,
    ]) {
      expect(isChannelOpenRefused(v)).toBe(false);
    }
  });
});
