/**
 * Keys: the host's client key (one per data dir, used to log into every VM) and per-VM guest
 * host keys, generated on the host so the runtime can pin the fingerprint before first contact.
 */

import { createHash } from "node:crypto";
import { chmod, link, mkdir, mkdtemp, readFile, rename, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
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

/** A fresh ed25519 host key for one VM; the private key never touches disk outside a 0700 temp dir. */
export async function generateHostKey(options: { signal?: AbortSignal } = {}): Promise<HostKey> {
  const dir = await mkdtemp(join(tmpdir(), "smolvm-hostkey-"));
  try {
    await chmod(dir, 0o700);
    const key = join(dir, "key");
    await keygen(key, "smolvm-host", options.signal);
    const privateKeyPem = await readFile(key, "utf8");
    const publicKey = (await readFile(`${key}.pub`, "utf8")).trim();
    return { privateKeyPem, publicKey, fingerprint: publicKeyFingerprint(publicKey) };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** A known_hosts line pinning `hostKey` for `[host]:port` (what the runtime and tests use). */
export function knownHostsLine(host: string, port: number, publicKey: string): string {
  const [type, blob] = publicKey.trim().split(/\s+/);
  const name = port === 22 ? host : `[${host}]:${port}`;
  return `${name} ${type} ${blob}\n`;
}
