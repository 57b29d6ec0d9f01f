/**
 * Host key verification for ssh2's `hostVerifier`: a pinned fingerprint, known_hosts files
 * (parsed by known-hosts.ts) and the strict / accept-new / insecure policies.
 *
 * Every outcome that is not "trusted" is a HostKeyMismatchError whose `code` says which:
 * SSH_HOST_KEY_MISMATCH (changed or pinned mismatch), SSH_HOST_KEY_UNKNOWN, SSH_HOST_KEY_REVOKED,
 * SSH_HOST_KEY_UNREADABLE (a known_hosts file could not be read), SSH_HOST_KEY_WRITE_FAILED.
 */
import { createHash } from "node:crypto";
import { constants as fsc } from "node:fs";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { HostKeyMismatchError, type SmolVMError, ValidationError } from "../errors.js";
import {
  formatKnownHostsLine,
  type KnownHostsEntry,
  knownHostsName,
  lookupKnownHost,
  parseKnownHosts,
  sshKeyType,
} from "./known-hosts.js";

export type HostKeyPolicy = "strict" | "accept-new" | "insecure";

export interface HostKeyOptions {
  /** Default "strict": only keys already in known_hosts (or the pinned fingerprint) are trusted. */
  policy?: HostKeyPolicy;
  /** Default `~/.ssh/known_hosts`. accept-new appends to the first file of a list. */
  knownHostsPath?: string | string[];
  /** `SHA256:...` (as `ssh-keygen -lf` prints it) or `MD5:aa:bb:...`. Wins over the files. */
  fingerprint?: string;
}

export const HOST_KEY_POLICIES: readonly HostKeyPolicy[] = ["strict", "accept-new", "insecure"];

export const HostKeyErrorCode = {
  MISMATCH: "SSH_HOST_KEY_MISMATCH",
  UNKNOWN: "SSH_HOST_KEY_UNKNOWN",
  REVOKED: "SSH_HOST_KEY_REVOKED",
  UNREADABLE: "SSH_HOST_KEY_UNREADABLE",
  WRITE_FAILED: "SSH_HOST_KEY_WRITE_FAILED",
} as const;

/** Largest known_hosts file we read; bigger ones are a mistake (or an attack), not a host list. */
const MAX_KNOWN_HOSTS_BYTES = 64 * 1024 * 1024;

/** `SHA256:<base64 without padding>`, exactly as `ssh-keygen -lf` prints it. */
export function fingerprintOf(keyBlob: Buffer): string {
  return "SHA256:" + createHash("sha256").update(keyBlob).digest("base64").replace(/=+$/, "");
}

/** `MD5:aa:bb:...`, as `ssh-keygen -E md5 -lf` prints it. */
export function md5FingerprintOf(keyBlob: Buffer): string {
  return "MD5:" + createHash("md5").update(keyBlob).digest("hex").match(/../g)!.join(":");
}

/** Validates a pinned fingerprint and returns its canonical form (no base64 padding). */
export function normalizeFingerprint(fp: string): string {
  const s = fp.trim();
  const sha = /^SHA256:([A-Za-z0-9+/]{43})=?$/i.exec(s);
  if (sha && s.slice(0, 7).toUpperCase() === "SHA256:") return "SHA256:" + sha[1];
  const md5 = /^MD5:((?:[0-9a-f]{2}:){15}[0-9a-f]{2})$/i.exec(s);
  if (md5) return "MD5:" + md5[1]!.toLowerCase();
  throw new ValidationError(
    `Invalid host key fingerprint ${JSON.stringify(fp)}: expected "SHA256:" followed by 43 base64 characters ` +
      "(see `ssh-keygen -lf <key>.pub` or `ssh-keyscan <host> | ssh-keygen -lf -`).",
    { details: { fingerprint: fp } },
  );
}

/** Expands a leading `~` using HOME as it is now. */
export function expandHome(p: string): string {
  if (p === "~") return os.homedir();
  if (p.startsWith("~/")) return path.join(os.homedir(), p.slice(2));
  return p;
}

export function defaultKnownHostsPath(): string {
  return path.join(os.homedir(), ".ssh", "known_hosts");
}

function keyLabel(type: string | undefined): string {
  if (!type) return "unknown";
  const t = type.replace(/^ssh-/, "").replace(/^ecdsa-sha2-nistp\d+$/, "ecdsa");
  return t === "rsa" ? "rsa" : t;
}

/**
 * Builds an async verifier for ssh2's `hostVerifier` (keyBlob = the raw SSH wire-format public
 * key). It resolves null when the key is trusted, else the typed error the caller should throw.
 * Invalid options throw ValidationError at once, before any connection is attempted.
 */
export function createHostKeyVerifier(
  options: HostKeyOptions | undefined,
  host: string,
  port: number,
): (keyBlob: Buffer) => Promise<SmolVMError | null> {
  const policy = options?.policy ?? "strict";
  if (!HOST_KEY_POLICIES.includes(policy)) {
    throw new ValidationError(
      `Unknown host key policy ${JSON.stringify(policy)}: use "strict", "accept-new" or "insecure".`,
      { details: { policy } },
    );
  }
  const pinned = options?.fingerprint !== undefined ? normalizeFingerprint(options.fingerprint) : undefined;
  const configured = options?.knownHostsPath;
  if (Array.isArray(configured) && configured.length === 0) {
    throw new ValidationError("hostKey.knownHostsPath is an empty list: give at least one file.");
  }
  const target = knownHostsName(host, port);

  return async (keyBlob: Buffer): Promise<SmolVMError | null> => {
    const actual = fingerprintOf(keyBlob);
    const type = sshKeyType(keyBlob);
    const base = { host, port, keyType: type, policy };

    if (pinned !== undefined) {
      const got = pinned.startsWith("MD5:") ? md5FingerprintOf(keyBlob) : actual;
      if (got === pinned) return null;
      return new HostKeyMismatchError(
        `Host key for ${target} does not match the pinned fingerprint: expected ${pinned}, ` +
          `the server presented ${got} (${keyLabel(type)}). Someone may be intercepting the connection, ` +
          "or the host was reinstalled. Verify the new fingerprint out of band before updating hostKey.fingerprint.",
        { expected: pinned, actual: got },
        { code: HostKeyErrorCode.MISMATCH, details: { ...base, reason: "pinned-mismatch" } },
      );
    }
    if (policy === "insecure") return null;

    const files = (
      configured === undefined
        ? [defaultKnownHostsPath()]
        : typeof configured === "string"
          ? [configured]
          : configured
    ).map(expandHome);

    let entries: KnownHostsEntry[];
    try {
      entries = await loadKnownHosts(files);
    } catch (err) {
      const e = err as NodeJS.ErrnoException & { file?: string };
      return new HostKeyMismatchError(
        `Cannot verify the host key of ${target}: reading ${e.file ?? "known_hosts"} failed (${e.code ?? e.message}). ` +
          "Fix the file's permissions or point hostKey.knownHostsPath at a readable file.",
        { actual },
        { code: HostKeyErrorCode.UNREADABLE, cause: err, details: { ...base, files, errno: e.code } },
      );
    }

    const verdict = lookupKnownHost(entries, host, port, keyBlob);
    switch (verdict.status) {
      case "trusted":
        return null;
      case "revoked":
        return new HostKeyMismatchError(
          `Host key ${actual} (${keyLabel(type)}) presented by ${target} is marked @revoked in ` +
            `${where(verdict.entry)}. Refusing to connect: this key must not be trusted. ` +
            "Ask the host's administrator for its current key.",
          { actual },
          {
            code: HostKeyErrorCode.REVOKED,
            details: { ...base, reason: "revoked", revokedAt: where(verdict.entry) },
          },
        );
      case "changed": {
        const stored = verdict.entries[0]!;
        const expected = fingerprintOf(stored.key);
        return new HostKeyMismatchError(
          `HOST KEY CHANGED for ${target}: known_hosts (${where(stored)}) has ${expected} (${keyLabel(type)}), ` +
            `the server presented ${actual}. Someone may be intercepting the connection, or the host was reinstalled. ` +
            `If the change is expected and verified, remove the old key with \`ssh-keygen -R ${quoteArg(target)}` +
            `${stored.file ? ` -f ${quoteArg(stored.file)}` : ""}\` and connect again.`,
          { expected, actual },
          {
            code: HostKeyErrorCode.MISMATCH,
            details: {
              ...base,
              reason: "changed",
              storedAt: verdict.entries.map(where),
              expectedFingerprints: verdict.entries.map((e) => fingerprintOf(e.key)),
            },
          },
        );
      }
      case "other-types": {
        // Known host, unknown key type: trusting it on first sight would let an attacker who
        // offers only a different key type bypass the stored key, so no policy accepts it.
        const known = verdict.entries.map(
          (e) => `${keyLabel(e.keyType)} ${fingerprintOf(e.key)} (${where(e)})`,
        );
        return new HostKeyMismatchError(
          `Host ${target} is known with other key types (${known.join("; ")}) but presented a ` +
            `${keyLabel(type)} key ${actual}. Verify it out of band, then add it with ` +
            `\`ssh-keyscan ${port === 22 ? "" : `-p ${port} `}-t ${keyLabel(type)} ${quoteArg(host)} >> ${quoteArg(files[0]!)}\` ` +
            "or pin it with hostKey.fingerprint.",
          { expected: fingerprintOf(verdict.entries[0]!.key), actual },
          {
            code: HostKeyErrorCode.MISMATCH,
            details: { ...base, reason: "other-types", storedAt: verdict.entries.map(where) },
          },
        );
      }
      case "unknown": {
        if (policy === "accept-new") {
          try {
            await appendKnownHost(files[0]!, host, port, keyBlob);
            return null;
          } catch (err) {
            const e = err as NodeJS.ErrnoException;
            return new HostKeyMismatchError(
              `Host ${target} is new and host key policy is "accept-new", but recording its key ${actual} in ` +
                `${files[0]} failed (${e.code ?? e.message}). Fix the file or directory permissions, or pin the key ` +
                "with hostKey.fingerprint.",
              { actual },
              { code: HostKeyErrorCode.WRITE_FAILED, cause: err, details: { ...base, files, errno: e.code } },
            );
          }
        }
        return new HostKeyMismatchError(
          `Host key for ${target} is not known (${keyLabel(type)} ${actual}) and host key policy is "strict" ` +
            `(checked ${files.join(", ")}). After verifying the fingerprint out of band, either add it: ` +
            `\`ssh-keyscan ${port === 22 ? "" : `-p ${port} `}-t ${keyLabel(type)} ${quoteArg(host)} >> ${quoteArg(files[0]!)}\`, ` +
            `pin it: hostKey: { fingerprint: "${actual}" }, or trust on first use: hostKey: { policy: "accept-new" }.`,
          { actual },
          { code: HostKeyErrorCode.UNKNOWN, details: { ...base, reason: "unknown", files } },
        );
      }
    }
  };
}

function where(e: KnownHostsEntry): string {
  return `${e.file ?? "known_hosts"}:${e.line}`;
}

function quoteArg(s: string): string {
  return /^[\w@%+=:,./[\]-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/** Reads and parses known_hosts files; a missing file is empty, any other error throws. */
export async function loadKnownHosts(files: readonly string[]): Promise<KnownHostsEntry[]> {
  const out: KnownHostsEntry[] = [];
  for (const file of files) {
    const text = await readRegularFile(file);
    if (text !== undefined) out.push(...parseKnownHosts(text, file).entries);
  }
  return out;
}

/** Reads a regular file (never blocks on a FIFO or device); undefined when it does not exist. */
async function readRegularFile(file: string): Promise<string | undefined> {
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(file, fsc.O_RDONLY | fsc.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT" || code === "ENOTDIR") return undefined;
    throw Object.assign(err as Error, { file });
  }
  try {
    const st = await fh.stat();
    if (!st.isFile())
      throw Object.assign(new Error(`${file} is not a regular file`), { code: "EINVAL", file });
    if (st.size > MAX_KNOWN_HOSTS_BYTES) {
      throw Object.assign(new Error(`${file} is larger than ${MAX_KNOWN_HOSTS_BYTES} bytes`), {
        code: "EFBIG",
        file,
      });
    }
    return await fh.readFile("utf8");
  } finally {
    await fh.close();
  }
}

// Serialises appends per file inside this process so concurrent first connections to the same
// new host record it once; across processes each append is one O_APPEND write of a whole line.
const appendLocks = new Map<string, Promise<unknown>>();

/**
 * Records a host key in a known_hosts file (accept-new): creates the directory 0700 and the file
 * 0600 when missing, keeps existing content, appends one complete line with a single O_APPEND
 * write, and does nothing when the file already trusts this key.
 */
export async function appendKnownHost(
  file: string,
  host: string,
  port: number,
  keyBlob: Buffer,
): Promise<void> {
  const abs = path.resolve(expandHome(file));
  const prev = appendLocks.get(abs) ?? Promise.resolve();
  const run = prev
    .catch(() => {})
    .then(async () => {
      const existing = await readRegularFile(abs);
      if (existing !== undefined) {
        const found = lookupKnownHost(parseKnownHosts(existing, abs).entries, host, port, keyBlob);
        if (found.status === "trusted") return;
      }
      await fs.mkdir(path.dirname(abs), { recursive: true, mode: 0o700 });
      const needsNewline = existing !== undefined && existing.length > 0 && !existing.endsWith("\n");
      const line = (needsNewline ? "\n" : "") + formatKnownHostsLine(host, port, keyBlob);
      const fh = await fs.open(abs, fsc.O_WRONLY | fsc.O_APPEND | fsc.O_CREAT | fsc.O_NONBLOCK, 0o600);
      try {
        const st = await fh.stat();
        if (!st.isFile()) throw Object.assign(new Error(`${abs} is not a regular file`), { code: "EINVAL" });
        await fh.write(line);
      } finally {
        await fh.close();
      }
    });
  appendLocks.set(abs, run);
  try {
    await run;
  } finally {
    if (appendLocks.get(abs) === run) appendLocks.delete(abs);
  }
}
