/**
 * Where `smolvm create -e` and `smolvm env set` take env values from. `NAME=value` on the command
 * line is visible to every host user in `ps`, so secrets come from stdin (a bare `NAME`, or
 * `--env-stdin` for NAME=value lines) or from an env file (`--env-file PATH`): the values never
 * enter argv. (Node 20 itself also reads a `--env-file` it finds anywhere in argv, into the CLI
 * process's own environment; that is why stdin has its own flag instead of `--env-file -`.)
 */
import { readFileSync } from "node:fs";
import { validateEnvName } from "../command.js";
import { ValidationError } from "../errors.js";

/**
 * Parses an env file: `NAME=value` lines, optional `export `, `#` comments and blank lines.
 * A value may be wrapped in single or double quotes (taken literally, no expansion; inside
 * double quotes `\n`, `\"` and `\\` are escapes), so multi-line values can be written.
 */
export function parseEnvFileText(text: string, source: string): Record<string, string> {
  const env: Record<string, string> = {};
  const lines = text.replace(/\r\n/g, "\n").split("\n");
  for (let n = 0; n < lines.length; n++) {
    const line = lines[n]!.replace(/^\s*(export\s+)?/, "");
    if (line === "" || line.startsWith("#")) continue;
    const eq = line.indexOf("=");
    if (eq <= 0) throw new ValidationError(`${source}:${n + 1}: expected NAME=value.`);
    const name = line.slice(0, eq).trim();
    validateEnvName(name);
    let value = line.slice(eq + 1);
    if (value.startsWith("'") && value.trimEnd().endsWith("'") && value.trimEnd().length >= 2) {
      value = value.trimEnd().slice(1, -1);
    } else if (value.startsWith('"') && value.trimEnd().endsWith('"') && value.trimEnd().length >= 2) {
      value = value
        .trimEnd()
        .slice(1, -1)
        .replace(/\\(["\\n])/g, (_, c: string) => (c === "n" ? "\n" : c));
    }
    env[name] = value;
  }
  return env;
}

/** All of stdin (fd 0); reading it twice is a usage error. */
function readStdinOnce(state: { used: boolean }, why: string): string {
  if (state.used) throw new ValidationError(`stdin can be read only once (${why}): use --env-file PATH.`);
  state.used = true;
  return readFileSync(0, "utf8");
}

/**
 * The env vars a command line asks for: `--env-file` files first (in order), then NAME=value
 * lines from stdin with `envStdin`, then `NAME=value` pairs, then at most one bare `NAME` whose
 * value is all of stdin (one trailing newline dropped, so `echo "$TOKEN" | …` works).
 */
export function collectEnv(pairs: string[], envFiles: string[], envStdin = false): Record<string, string> {
  const stdin = { used: false };
  const env: Record<string, string> = {};
  for (const f of envFiles) Object.assign(env, parseEnvFileText(readEnvFileFrom(f), f));
  if (envStdin) Object.assign(env, parseEnvFileText(readStdinOnce(stdin, "--env-stdin"), "stdin"));
  for (const p of pairs) {
    const i = p.indexOf("=");
    if (i === 0)
      throw new ValidationError(`expected NAME=value or NAME, got ${JSON.stringify(p.slice(0, 20))}…`);
    if (i > 0) {
      env[p.slice(0, i)] = p.slice(i + 1);
      continue;
    }
    validateEnvName(p);
    env[p] = readStdinOnce(stdin, `the value of ${p}`).replace(/\r?\n$/, "");
  }
  return env;
}

function readEnvFileFrom(path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch (e) {
    throw new ValidationError(
      `cannot read env file ${path} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}).`,
    );
  }
}
