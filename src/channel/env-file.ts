/**
 * The managed env file, /etc/profile.d/smolvm_env.sh, sourced by login shells in the guest.
 * One `export NAME='value'` line per variable, POSIX single-quoted, so any value (newlines,
 * quotes, $) round-trips exactly. Both channels (SSH and the guest agent) write this format.
 */
import { quoteSh, validateEnv, validateEnvName } from "../command.js";
import { ProtocolError, SmolVMError } from "../errors.js";

export const ENV_FILE_PATH = "/etc/profile.d/smolvm_env.sh";
/** Both channels read at most this much of the guest env file (the guest may point it at /dev/zero). */
export const ENV_FILE_MAX = 1 << 20;

export function envFileTooLarge(): SmolVMError {
  return new SmolVMError(
    `the guest env file ${ENV_FILE_PATH} is larger than ${ENV_FILE_MAX} bytes (or is not a regular file): something in the guest replaced it; unsetEnvVars cannot repair it, remove it in the guest or recreate the VM.`,
    { code: "ENV_FILE_TOO_LARGE", details: { max: ENV_FILE_MAX } },
  );
}
const HEADER = "# Managed by smolvm: edit with setEnvVars/unsetEnvVars.\n";

export function renderEnvFile(vars: Record<string, string>): string {
  validateEnv(vars);
  const names = Object.keys(vars).sort();
  return HEADER + names.map((n) => `export ${n}=${quoteSh(vars[n]!)}\n`).join("");
}

/** Parses what renderEnvFile wrote. Anything else in the file is a ProtocolError: the guest is untrusted. */
export function parseEnvFile(text: string): Record<string, string> {
  const vars: Record<string, string> = {};
  let i = 0;
  while (i < text.length) {
    if (text[i] === "\n") {
      i++;
      continue;
    }
    if (text[i] === "#") {
      const nl = text.indexOf("\n", i);
      i = nl < 0 ? text.length : nl + 1;
      continue;
    }
    const m = /^export ([A-Za-z_][A-Za-z0-9_]*)=/.exec(text.slice(i, i + 300));
    if (!m)
      throw new ProtocolError(
        `the guest env file ${ENV_FILE_PATH} has a line smolvm did not write near offset ${i}.`,
      );
    const name = m[1]!;
    i += m[0].length;
    let value = "";
    // A value is a run of '...' pieces joined by "'" escapes, as quoteSh writes them.
    for (;;) {
      if (text[i] === "'") {
        const end = text.indexOf("'", i + 1);
        if (end < 0) throw new ProtocolError(`the guest env file has an unterminated value for ${name}.`);
        value += text.slice(i + 1, end);
        i = end + 1;
      } else if (text.startsWith(`"'"`, i)) {
        value += "'";
        i += 3;
      } else break;
    }
    if (i < text.length && text[i] !== "\n") {
      throw new ProtocolError(`the guest env file has trailing bytes after ${name}.`);
    }
    vars[name] = value;
  }
  return vars;
}

/** Applies set/unset to the current map; names are validated, values never echoed. */
export function mergeEnv(
  current: Record<string, string>,
  set: Record<string, string> = {},
  unset: string[] = [],
): Record<string, string> {
  validateEnv(set);
  for (const n of unset) validateEnvName(n);
  const next = { ...current, ...set };
  for (const n of unset) delete next[n];
  return next;
}
