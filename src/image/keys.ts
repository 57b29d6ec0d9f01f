/**
 * Keys: the host's client key (one per data dir, used to log into every VM) and per-VM guest
 * host keys, generated on the host so the runtime can pin the fingerprint before first contact.
 */

import { createHash, generateKeyPairSync, randomBytes } from "node:crypto";
import { chmod, link, mkdir, mkdtemp, readFile, rename, rm } from "node:fs/promises";
import { join } from "node:path";
import { ensureDataDir } from "../common/data-dir.js";
import { dataDir as defaultDataDir, keysDir } from "../common/paths.js";
import { KeyLoadError } from "../errors.js";
import { exec } from "./exec.js";

export interface ClientKey {
  privateKeyPath: string;
  /** One line: "ssh-ed25519 AAAA... smolvm". */
  publicKey: string;
}

export interface HostKey {
  /** OpenSSH-format private key (PEM-like "-----BEGIN OPENSSH PRIVATE KEY-----"). Secret. */
  privateKeyPem: string;
  /** One line: "ssh-ed25519 AAAA... smolvm-host". */
  publicKey: string;
  /** "SHA256:<base64, no padding>", as `ssh-keygen -l` prints it. */
  fingerprint: string;
}

/** OpenSSH's SHA256 fingerprint of a public key line. */
export function publicKeyFingerprint(publicKeyLine: string): string {
  const blob = publicKeyLine.trim().split(/\s+/)[1];
  if (!blob) throw new KeyLoadError("not an OpenSSH public key line: expected '<type> <base64> [comment]'.");
  const digest = createHash("sha256").update(Buffer.from(blob, "base64")).digest("base64");
  return `SHA256:${digest.replace(/=+$/, "")}`;
}

async function keygen(path: string, comment: string, signal?: AbortSignal): Promise<void> {
  await exec("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], { signal });
}

/**
 * `<dataDir>/keys/id_ed25519` (0600, dir 0700), created with ssh-keygen when absent. Safe when
 * several processes call it at once: the key is published with link(), so exactly one wins.
 */
export async function ensureClientKey(
  dataDir: string = defaultDataDir(),
  options: { signal?: AbortSignal } = {},
): Promise<ClientKey> {
  ensureDataDir(dataDir);
  const dir = keysDir(dataDir);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
  const privateKeyPath = join(dir, "id_ed25519");
  const pubPath = `${privateKeyPath}.pub`;
  const readPub = async (): Promise<string | undefined> => {
    try {
      await readFile(privateKeyPath);
    } catch {
      return undefined;
    }
    try {
      return (await readFile(pubPath, "utf8")).trim();
    } catch {
      // The winner has not written .pub yet: derive it from the private key.
      const { stdout } = await exec("ssh-keygen", ["-y", "-f", privateKeyPath], { signal: options.signal });
      return `${stdout.toString("utf8").trim()} smolvm`;
    }
  };
  const existing = await readPub();
  if (existing) return { privateKeyPath, publicKey: existing };
  const tmp = await mkdtemp(join(dir, ".new-"));
  try {
    const key = join(tmp, "id_ed25519");
    await keygen(key, "smolvm", options.signal);
    await chmod(key, 0o600);
    try {
      await link(key, privateKeyPath);
      await rename(`${key}.pub`, pubPath);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
    }
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
  const publicKey = await readPub();
  if (!publicKey) throw new KeyLoadError(`could not create the client key ${privateKeyPath}.`);
  return { privateKeyPath, publicKey };
}

/** An SSH wire-format string: u32 length, then the bytes. */
function sshString(b: Buffer | string): Buffer {
  const data = typeof b === "string" ? Buffer.from(b) : b;
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  return Buffer.concat([len, data]);
}

/**
 * A fresh ed25519 host key for one VM, made in this process (no ssh-keygen run on every VM's
 * path) and written in OpenSSH's own unencrypted format (PROTOCOL.key), which sshd loads; the
 * private key never touches the host's disk.
 */
export async function generateHostKey(options: { signal?: AbortSignal } = {}): Promise<HostKey> {
  options.signal?.throwIfAborted();
  const { privateKey } = generateKeyPairSync("ed25519");
  const jwk = privateKey.export({ format: "jwk" });
  const pub = Buffer.from(jwk.x!, "base64url");
  const seed = Buffer.from(jwk.d!, "base64url");
  const type = "ssh-ed25519";
  const pubBlob = Buffer.concat([sshString(type), sshString(pub)]);
  const check = randomBytes(4);
  const parts = [check, check, pubBlob, sshString(Buffer.concat([seed, pub])), sshString("smolvm-host")];
  let priv = Buffer.concat(parts);
  // Padded with 1, 2, 3... to the cipher block size ("none": 8).
  const pad = (8 - (priv.length % 8)) % 8;
  priv = Buffer.concat([priv, Buffer.from(Array.from({ length: pad }, (_, i) => i + 1))]);
  const nKeys = Buffer.alloc(4);
  nKeys.writeUInt32BE(1);
  const body = Buffer.concat([
    Buffer.from("openssh-key-v1\0"),
    sshString("none"),
    sshString("none"),
    sshString(""),
    nKeys,
    sshString(pubBlob),
    sshString(priv),
  ]);
  const b64 = body.toString("base64").replace(/.{70}/g, "$&\n");
  const privateKeyPem = `-----BEGIN OPENSSH PRIVATE KEY-----\n${b64.endsWith("\n") ? b64 : `${b64}\n`}-----END OPENSSH PRIVATE KEY-----\n`;
  seed.fill(0);
  const publicKey = `${type} ${pubBlob.toString("base64")} smolvm-host`;
  return { privateKeyPem, publicKey, fingerprint: publicKeyFingerprint(publicKey) };
}

/** A known_hosts line pinning `hostKey` for `[host]:port` (what the runtime and tests use). */
export function knownHostsLine(host: string, port: number, publicKey: string): string {
  const [type, blob] = publicKey.trim().split(/\s+/);
  const name = port === 22 ? host : `[${host}]:${port}`;
  return `${name} ${type} ${blob}\n`;
}
