/**
 * One exec channel on the remote side: its recorded state (exit status and close, from the moment
 * it opened), the run id that tags every process of its command, and the two ways such a command
 * is stopped for good (the SSH "signal" request, then a sweep by run id).
 */
import { randomBytes } from "node:crypto";
import type { ClientChannel } from "ssh2";
import { type ExecExtras, type RunOptions, type WrappedCommand, wrapCommand } from "../command.js";
import { ValidationError } from "../errors.js";

/** An open exec channel with its exit status and close recorded from the moment it opened. */
export interface ExecChannel {
  channel: ClientChannel;
  /** Tags every process of this command (env SMOLVM_RUN_ID) so it can be found and killed. */
  runId: string;
  terminated?: boolean;
  exitCode: number | null;
  /** Signal name without "SIG". */
  signal: string | null;
  closed: boolean;
  onClose: (() => void) | undefined;
}

/** Wraps an exec channel with its exit status and close, recorded from now on. */
export function execState(channel: ClientChannel, runId: string): ExecChannel {
  const st: ExecChannel = {
    channel,
    runId,
    exitCode: null,
    signal: null,
    closed: false,
    onClose: undefined,
  };
  channel.on("exit", (code: number | null, sig?: string) => {
    if (code !== null && code !== undefined) st.exitCode = code;
    else if (sig) st.signal = sig.startsWith("SIG") ? sig.slice(3) : sig;
  });
  channel.once("close", () => {
    st.closed = true;
    st.onClose?.();
  });
  return st;
}

export const RUN_ID_ENV = "SMOLVM_RUN_ID";

export function newRunId(): string {
  return randomBytes(8).toString("hex");
}

/**
 * A command as an SSH exec runs it: wrapped for its shell, env and cwd, and tagged with a new run
 * id so a timeout can kill everything it started (killByRunIdScript).
 */
export function taggedCommand(
  command: string,
  options: Pick<RunOptions, "shell" | "env" | "cwd"> & ExecExtras,
): { wrapped: WrappedCommand; runId: string } {
  const runId = newRunId();
  const { shell, shellKind, env, cwd } = options;
  return { wrapped: wrapCommand(command, { shell, shellKind, env, cwd, runId }), runId };
}

/**
 * Kills every process whose environment carries SMOLVM_RUN_ID=<id>, and its process group
 * (which catches children that cleared their environment). Process group 0/1 and our own are
 * never touched. A fast pass with one `grep -l` comes first (GNU grep sees every match; busybox
 * grep stops at the first NUL, so it sees only processes that have the id first, such as the
 * login wrapper's shell); a thorough pass then reads each environment line by line. The id is
 * hex, so it needs no quoting.
 */
export function killByRunIdScript(runId: string): string {
  if (!/^[0-9a-f]{16}$/.test(runId)) throw new ValidationError("run id must be 16 hex digits.");
  const tag = `${RUN_ID_ENV}=${runId}`;
  return [
    "k() { p=${1#/proc/}; p=${p%/environ}; s=$(cat /proc/$p/stat 2>/dev/null) || return 0",
    "s=${s##*) }; set -- $s",
    '[ "$3" -gt 1 ] 2>/dev/null && [ "$3" != "$$" ] && kill -KILL -"$3" 2>/dev/null',
    'kill -KILL "$p" 2>/dev/null; return 0; }',
    `for f in $(grep -l -F '${tag}' /proc/[0-9]*/environ 2>/dev/null); do k "$f"; done`,
    "for f in /proc/[0-9]*/environ; do",
    `tr '\\0' '\\n' < "$f" 2>/dev/null | grep -qxF '${tag}' && k "$f"`,
    "done; true",
  ].join("\n");
}

/**
 * Terminates the remote command: OpenSSH (>= 7.9) delivers a "signal" request with killpg() to
 * the session's process group, so background children die too. ssh2 only sends the request
 * while our side of the channel is writable, but we have usually sent EOF by now, so the
 * request is sent through the protocol object directly.
 */
export function killChannel(ch: ClientChannel): void {
  const c = ch as unknown as {
    outgoing: { id: number; state: string };
    _client: { _protocol: { signal(id: number, name: string): void } };
  };
  try {
    // Only on an open channel: a request for a channel the server already freed makes OpenSSH
    // drop the whole connection ("unknown channel").
    const st = c.outgoing.state;
    if (st === "open" || st === "eof") c._client._protocol.signal(c.outgoing.id, "KILL");
  } catch {}
  try {
    ch.close();
  } catch {}
}
