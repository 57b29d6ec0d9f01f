/**
 * Client authentication: method descriptions (password, key file, ssh-agent,
 * keyboard-interactive), loading them up front (so a bad key fails before any network I/O), and
 * the ssh2 `authHandler` that tries an ordered list of methods on ONE connection.
 */
import { existsSync, readFileSync, statSync } from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import ssh2, { type AnyAuthMethod, type AuthHandlerMiddleware, type ParsedKey } from "ssh2";
import { AgentError, KeyLoadError, ValidationError } from "../errors.js";

// ssh2 is CommonJS: its named exports are only visible through the default import.
const { utils } = ssh2;

export type AuthMethod = "password" | "privateKey" | "agent" | "keyboardInteractive";

export interface KeyboardPrompt {
  prompt: string;
  echo: boolean;
}

/** Answers keyboard-interactive prompts, one answer per prompt. */
export type KeyboardInteractiveHandler = (
  prompts: KeyboardPrompt[],
  info: { name: string; instructions: string },
) => string[] | Promise<string[]>;

export interface AuthConfig {
  method: AuthMethod;
  /** password; also answers keyboard-interactive prompts when no handler is given */
  password?: string;
  keyPath?: string;
  passphrase?: string;
  /** ssh-agent socket; default $SSH_AUTH_SOCK */
  agentSocket?: string;
  handler?: KeyboardInteractiveHandler;
}

export function createPasswordAuth(password: string): AuthConfig {
  return { method: "password", password };
}
export function createKeyAuth(keyPath: string, passphrase?: string): AuthConfig {
  return passphrase === undefined
    ? { method: "privateKey", keyPath }
    : { method: "privateKey", keyPath, passphrase };
}
export function createAgentAuth(agentSocket?: string): AuthConfig {
  return agentSocket === undefined ? { method: "agent" } : { method: "agent", agentSocket };
}
export function createKeyboardInteractiveAuth(handler: KeyboardInteractiveHandler): AuthConfig {
  return { method: "keyboardInteractive", handler };
}

/** True when $SSH_AUTH_SOCK (or the given path) names an existing socket. */
export function getAgentAvailable(socketPath = process.env.SSH_AUTH_SOCK): boolean {
  if (!socketPath) return false;
  try {
    return statSync(socketPath).isSocket();
  } catch {
    return false;
  }
}

/** ~/.ssh/id_ed25519, id_ecdsa, id_rsa (in that order), whether or not they exist. */
export function getDefaultKeyPaths(home = os.homedir()): string[] {
  return ["id_ed25519", "id_ecdsa", "id_rsa"].map((n) => path.join(home, ".ssh", n));
}

/** Default key files that exist and load without a passphrase. */
export function discoverKeys(home = os.homedir()): string[] {
  return getDefaultKeyPaths(home).filter((p) => {
    if (!existsSync(p)) return false;
    try {
      return !(utils.parseKey(readFileSync(p)) instanceof Error);
    } catch {
      return false;
    }
  });
}

/**
 * What to try when the caller named no method: the agent when one is running, then the default
 * key files that need no passphrase.
 */
export function defaultAuth(home = os.homedir()): AuthConfig[] {
  const list: AuthConfig[] = [];
  if (getAgentAvailable()) list.push(createAgentAuth());
  for (const p of discoverKeys(home)) list.push(createKeyAuth(p));
  return list;
}

/** A method ready to hand to ssh2: keys parsed, agent socket checked. */
export type PreparedAuth =
  | { method: "password"; password: string }
  | { method: "privateKey"; key: ParsedKey; keyPath: string }
  | { method: "agent"; agentSocket: string }
  | { method: "keyboardInteractive"; handler: KeyboardInteractiveHandler };

/** Loads and parses a private key file; errors name the path, never the passphrase. */
export function loadPrivateKey(keyPath: string, passphrase?: string): ParsedKey {
  if (keyPath === "~" || keyPath.startsWith("~/")) keyPath = path.join(os.homedir(), keyPath.slice(2));
  let data: Buffer;
  try {
    data = readFileSync(keyPath);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new KeyLoadError(
      code === "ENOENT"
        ? `SSH private key ${keyPath} does not exist: check keyPath.`
        : `SSH private key ${keyPath} could not be read (${code}): check its permissions.`,
      { cause: e, details: { keyPath, errno: code } },
    );
  }
  const parsed = utils.parseKey(data, passphrase);
  const key = Array.isArray(parsed) ? parsed[0] : parsed;
  if (key instanceof Error || key === undefined) {
    const encrypted = isEncryptedKey(data);
    let message: string;
    if (encrypted && passphrase === undefined) {
      message = `SSH private key ${keyPath} is encrypted: pass its passphrase.`;
    } else if (encrypted) {
      message = `SSH private key ${keyPath} could not be decrypted: the passphrase is wrong.`;
    } else {
      message = `SSH private key ${keyPath} is not a supported private key (OpenSSH, PEM or PPK format expected).`;
    }
    throw new KeyLoadError(message, { details: { keyPath, encrypted } });
  }
  if (!key.isPrivateKey()) {
    throw new KeyLoadError(`${keyPath} holds a public key, not a private key: pass the private key file.`, {
      details: { keyPath },
    });
  }
  return key;
}

function isEncryptedKey(data: Buffer): boolean {
  const text = data.toString("latin1");
  if (text.includes("ENCRYPTED") || text.includes("Proc-Type: 4,ENCRYPTED")) return true;
  const m = /-----BEGIN OPENSSH PRIVATE KEY-----([\s\S]*?)-----END/.exec(text);
  if (!m) return /Encryption: (?!none)/.test(text);
  const raw = Buffer.from(m[1]!.replace(/\s+/g, ""), "base64");
  // "openssh-key-v1\0" then string ciphername
  const off = 15;
  if (raw.length < off + 4) return false;
  const len = raw.readUInt32BE(off);
  return raw.subarray(off + 4, off + 4 + len).toString("latin1") !== "none";
}

/** Validates and loads each method, in order. Throws KeyLoadError/AgentError/ValidationError. */
export function prepareAuth(configs: AuthConfig[]): PreparedAuth[] {
  return configs.map((c): PreparedAuth => {
    switch (c.method) {
      case "password":
        if (typeof c.password !== "string") {
          throw new ValidationError('auth method "password" needs a password.');
        }
        return { method: "password", password: c.password };
      case "privateKey":
        if (!c.keyPath) throw new ValidationError('auth method "privateKey" needs keyPath.');
        return { method: "privateKey", key: loadPrivateKey(c.keyPath, c.passphrase), keyPath: c.keyPath };
      case "agent": {
        const sock = c.agentSocket ?? process.env.SSH_AUTH_SOCK;
        if (!sock || !getAgentAvailable(sock)) {
          throw new AgentError(
            sock
              ? `ssh-agent socket ${sock} does not exist: start ssh-agent or pass another agentSocket.`
              : "ssh-agent auth was asked for but SSH_AUTH_SOCK is not set: start ssh-agent or pass agentSocket.",
            { details: { agentSocket: sock } },
          );
        }
        return { method: "agent", agentSocket: sock };
      }
      case "keyboardInteractive": {
        const pw = c.password;
        const handler: KeyboardInteractiveHandler | undefined =
          c.handler ?? (pw !== undefined ? (prompts) => prompts.map(() => pw) : undefined);
        if (!handler) {
          throw new ValidationError('auth method "keyboardInteractive" needs a handler or a password.');
        }
        return { method: "keyboardInteractive", handler };
      }
      default:
        throw new ValidationError(`unknown auth method ${JSON.stringify((c as AuthConfig).method)}.`);
    }
  });
}

const SSH_METHOD: Record<AuthMethod, string> = {
  password: "password",
  privateKey: "publickey",
  agent: "publickey",
  keyboardInteractive: "keyboard-interactive",
};

/**
 * ssh2 authHandler that walks `methods` in order on one connection, skipping those the server
 * does not offer. `tried` records what was attempted (method names only, never secrets).
 */
export function createAuthHandler(
  methods: PreparedAuth[],
  username: string,
  tried: string[] = [],
): AuthHandlerMiddleware {
  let next = 0;
  return (methodsLeft, _partial, callback) => {
    while (next < methods.length) {
      const m = methods[next++]!;
      if (methodsLeft && !methodsLeft.includes(SSH_METHOD[m.method] as never)) continue;
      tried.push(m.method === "privateKey" ? `privateKey:${m.keyPath}` : m.method);
      let auth: AnyAuthMethod;
      switch (m.method) {
        case "password":
          auth = { type: "password", username, password: m.password };
          break;
        case "privateKey":
          auth = { type: "publickey", username, key: m.key as never };
          break;
        case "agent":
          auth = { type: "agent", username, agent: m.agentSocket };
          break;
        case "keyboardInteractive":
          auth = {
            type: "keyboard-interactive",
            username,
            prompt: (name, instructions, _lang, prompts, finish) => {
              Promise.resolve(
                m.handler(
                  prompts.map((p) => ({ prompt: p.prompt, echo: p.echo ?? false })),
                  { name, instructions },
                ),
              ).then(
                (answers) => finish(answers),
                () => finish([]),
              );
            },
          };
          break;
      }
      return callback(auth);
    }
    return callback(false as never);
  };
}
