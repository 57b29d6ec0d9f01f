/**
 * The option spellings SSHClient and SSHSupervisor both accept, normalized one way for both:
 * the SmolVM reference's (`user`, `keyPath`, `passphrase`, `password`, `agent`, flat
 * `keepaliveIntervalMs`/`keepaliveCountMax`) and the nbs-ssh reference's (`username`,
 * `auth: [...]`, `keepalive: { intervalMs, countMax }`). Pure: no I/O beyond what createKeyAuth
 * defers to connect time.
 */
import { validateTimeout } from "../command.js";
import { ValidationError } from "../errors.js";
import { type AuthConfig, createAgentAuth, createKeyAuth } from "./auth.js";
import type { KeepaliveConfig } from "./keepalive.js";

/** Who logs in and how, in either spelling. */
export interface CredentialOptions {
  /** Login name (same as `username`). */
  user?: string;
  /** Login name (same as `user`). */
  username?: string;
  /** A private key file (`~` expanded). */
  keyPath?: string;
  /** The key's passphrase. */
  passphrase?: string;
  /** Password (also answers keyboard-interactive prompts). */
  password?: string;
  /** true: $SSH_AUTH_SOCK; a string: that agent socket. */
  agent?: boolean | string;
  /** Explicit ordered methods, tried on one connection (overrides keyPath/password/agent). */
  auth?: AuthConfig | AuthConfig[];
}

/** The connection keepalive, in either spelling. */
export interface KeepaliveSpellings {
  /**
   * keepalive@openssh.com every `intervalMs`; `countMax` unanswered in a row close the
   * connection with ConnectionLostError. `false` turns it off. Default 15 000 ms x 3.
   */
  keepalive?: Partial<KeepaliveConfig> | false;
  /** Same as `keepalive.intervalMs`; 0 turns keepalive off. */
  keepaliveIntervalMs?: number;
  /** Same as `keepalive.countMax`. */
  keepaliveCountMax?: number;
}

/** The login name from `user` or `username` (refused when both are given and differ). */
export function userFromOptions(o: CredentialOptions): string | undefined {
  if (o.user !== undefined && o.username !== undefined && o.user !== o.username) {
    throw new ValidationError(
      `user ${JSON.stringify(o.user)} and username ${JSON.stringify(o.username)} differ: give one of them.`,
    );
  }
  return o.user ?? o.username;
}

/** The auth methods the options ask for, in order; undefined means the default (agent, keys). */
export function authFromOptions(o: CredentialOptions): AuthConfig | AuthConfig[] | undefined {
  if (o.auth) return o.auth;
  const list: AuthConfig[] = [];
  if (o.keyPath) list.push(createKeyAuth(o.keyPath, o.passphrase));
  if (o.agent) list.push(createAgentAuth(typeof o.agent === "string" ? o.agent : undefined));
  if (o.password !== undefined) {
    list.push({ method: "password", password: o.password });
    // Servers that only offer keyboard-interactive usually ask for the same password.
    list.push({ method: "keyboardInteractive", password: o.password });
  }
  return list.length ? list : undefined;
}

/**
 * The keepalive the options ask for: `false` (off), a partial config, or undefined (the
 * default). The two spellings cannot be mixed.
 */
export function keepaliveFromOptions(o: KeepaliveSpellings): Partial<KeepaliveConfig> | false | undefined {
  const flat = o.keepaliveIntervalMs !== undefined || o.keepaliveCountMax !== undefined;
  if (o.keepalive !== undefined && flat) {
    throw new ValidationError(
      "give keepalive: { intervalMs, countMax } or keepaliveIntervalMs/keepaliveCountMax, not both.",
    );
  }
  if (!flat) return o.keepalive;
  if (o.keepaliveIntervalMs === 0) return false;
  validateTimeout("keepaliveIntervalMs", o.keepaliveIntervalMs);
  return {
    ...(o.keepaliveIntervalMs !== undefined ? { intervalMs: o.keepaliveIntervalMs } : {}),
    ...(o.keepaliveCountMax !== undefined ? { countMax: o.keepaliveCountMax } : {}),
  };
}
