/**
 * ssh_config(5) tokens: `%h %p %r %u %n %d %i %l %L %C %%`, `~` and `${ENV}` in IdentityFile,
 * UserKnownHostsFile and ProxyCommand, and the check that keeps a host or user name substituted
 * into a command /bin/sh runs from carrying shell syntax (CVE-2023-51385).
 */
import { createHash } from "node:crypto";
import * as os from "node:os";
import * as path from "node:path";
import { ValidationError } from "../errors.js";

export interface TokenContext {
  /** %h: the resolved host name. */
  hostName: string;
  /** %n: the host as given. */
  originalHost: string;
  port: number;
  /** %r */
  remoteUser: string;
  /** %u */
  localUser: string;
  /** %d */
  homeDir: string;
}

/**
 * A host or user name substituted into a command that /bin/sh runs (ProxyCommand's %h %n %r):
 * only characters with no meaning to the shell, and no leading "-" (it would read as an option).
 * Anything else is refused, as OpenSSH does since CVE-2023-51385, rather than run.
 */
export function shellSafeToken(value: string, what: string): string {
  if (!/^[A-Za-z0-9._:@%+][A-Za-z0-9._:@%+-]*$/.test(value)) {
    throw new ValidationError(
      `${what} ${JSON.stringify(value.slice(0, 80))} cannot go into ProxyCommand: it has characters ` +
        "the shell would interpret (only letters, digits and . _ : @ % + - are allowed, no leading -). " +
        "Use the host's plain name or address.",
      { details: { what } },
    );
  }
  return value;
}

/**
 * Expands `%` tokens; unknown tokens are left as written. `forShell`: the result is a shell
 * command, so substituted names must pass shellSafeToken.
 */
export function expandTokens(
  s: string,
  ctx: TokenContext,
  allowed = "hprundilLCk%",
  forShell = false,
): string {
  const name = (v: string, what: string) => (forShell ? shellSafeToken(v, what) : v);
  return s.replace(/%(.)/g, (m, t: string) => {
    if (!allowed.includes(t)) return m;
    switch (t) {
      case "%":
        return "%";
      case "h":
        return name(ctx.hostName, "host name");
      case "p":
        return String(ctx.port);
      case "r":
        return name(ctx.remoteUser, "user name");
      case "u":
        return name(ctx.localUser, "local user name");
      case "n":
      case "k":
        return name(ctx.originalHost, "host");
      case "d":
        return ctx.homeDir;
      case "i":
        return String(process.getuid?.() ?? "");
      case "l":
        return os.hostname();
      case "L":
        return os.hostname().split(".")[0]!;
      case "C":
        return createHash("sha1")
          .update(`${os.hostname()}${ctx.hostName}${ctx.port}${ctx.remoteUser}`)
          .digest("hex");
      default:
        return m;
    }
  });
}

/** `~` and `${VAR}` expansion for file paths (as OpenSSH does for IdentityFile and friends). */
export function expandPath(p: string, homeDir: string = os.homedir()): string {
  let s = p.replace(/\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g, (_m, v: string) => process.env[v] ?? "");
  if (s === "~") s = homeDir;
  else if (s.startsWith("~/")) s = path.join(homeDir, s.slice(2));
  return s;
}
