/**
 * What the agent channel throws: the agent's ERROR codes, socket failures, expired deadlines and
 * missing capabilities mapped onto the typed errors of errors.ts, with messages that say what to
 * do next. Every agent module builds its errors here, so one failure reads the same everywhere.
 */

import type { AnyCommandResult } from "../command.js";
import type { Deadline } from "../common/deadline.js";
import { guestText } from "../common/guest-text.js";
import {
  CommandExecutionUnavailableError,
  ConnectionLostError,
  ConnectionRefusedError,
  type FileErrorCode,
  OperationTimeoutError,
  ProtocolError,
  SmolVMError,
  ValidationError,
} from "../errors.js";
import type { AgentInfo, AgentMessage } from "./agent-messages.js";

export type AgentErrorMessage = Extract<AgentMessage, { type: "error" }>;

/** A socket that could not be opened: refused (nothing listens) or otherwise unreachable. */
export function connectError(err: NodeJS.ErrnoException, what: string): SmolVMError {
  if (err.code === "ECONNREFUSED" || err.code === "ENOENT") {
    return new ConnectionRefusedError(
      `${what} refused the connection (${err.code}): the agent or the VM is not running; start the VM or use commChannel "ssh".`,
      { code: "AGENT_CONNECTION_REFUSED", cause: err },
    );
  }
  return new ConnectionLostError(`${what} could not be reached (${err.code ?? err.message}).`, {
    code: "AGENT_CONNECTION_LOST",
    cause: err,
  });
}

/** The byte stream to the agent ended under a session (calls in flight fail with this). */
export function connectionLost(name: string, err?: Error): ConnectionLostError {
  return new ConnectionLostError(
    `the connection to ${name} closed${err ? ` (${(err as NodeJS.ErrnoException).code ?? err.message})` : ""}: the agent may have crashed or the VM stopped; retry the call (it reconnects), or use commChannel "ssh".`,
    { code: "AGENT_CONNECTION_LOST", cause: err },
  );
}

/** A call on (or a connection finishing for) a channel that close() ended. */
export function channelClosed(message: string): ConnectionLostError {
  return new ConnectionLostError(message, { code: "AGENT_CHANNEL_CLOSED" });
}

/** The deadline's own error again, carrying `partial` (the output gathered so far). */
export function deadlineError(deadline: Deadline, partial?: AnyCommandResult): OperationTimeoutError {
  const e = deadline.reason ?? deadline.timeoutError();
  return partial ? e.withPartial(partial) : e;
}

/** An agent ERROR reply as the typed error a caller of `what` can act on. */
export function agentError(m: AgentErrorMessage, what: string, path?: string): SmolVMError {
  const details = { agentCode: m.code, errno: m.errno, ...(path ? { path } : {}) };
  const text = guestText(m.message, { max: 300 });
  switch (m.code) {
    case "INVALID_PATH":
    case "BAD_REQUEST":
      return new ValidationError(`${what} was refused by the guest agent: ${text}.`, { details });
    case "NOT_FOUND":
    case "IO":
      return new SmolVMError(`${what} failed in the guest: ${text}.`, { code: "FILE_TRANSFER", details });
    case "SPAWN_FAILED":
      return new SmolVMError(
        `${what} could not start in the guest: ${text}; check the program path and cwd.`,
        {
          code: "GUEST_SPAWN_FAILED",
          details,
        },
      );
    case "TIMEOUT":
      return new OperationTimeoutError(`${what} timed out in the guest: ${text}.`, { details });
    case "LIMIT":
      return new SmolVMError(`${what} was refused: ${text}; wait for other calls to finish.`, {
        code: "AGENT_LIMIT",
        details,
      });
    default:
      return new ProtocolError(`${what} failed with agent error ${m.code}: ${text}.`, { details });
  }
}

const ERRNO = { ENOENT: 2, EEXIST: 17, ENOTDIR: 20, EISDIR: 21, ENOTEMPTY: 39, EACCES: 13 } as const;

/** File errors carry a code callers can branch on, whatever the transport. */
export function fileErrorCode(errno: number): FileErrorCode {
  switch (errno) {
    case ERRNO.ENOENT:
      return "FILE_NOT_FOUND";
    case ERRNO.EEXIST:
      return "FILE_EXISTS";
    case ERRNO.ENOTDIR:
      return "NOT_A_DIRECTORY";
    case ERRNO.EISDIR:
      return "IS_A_DIRECTORY";
    case ERRNO.ENOTEMPTY:
      return "DIRECTORY_NOT_EMPTY";
    case ERRNO.EACCES:
      return "PERMISSION_DENIED";
    default:
      return "FILE_TRANSFER";
  }
}

/** An agent ERROR for a file operation on `path`: the errno picks the code (FILE_NOT_FOUND, ...). */
export function fileError(m: AgentErrorMessage, what: string, path: string): SmolVMError {
  if (m.code === "NOT_FOUND" || m.code === "IO") {
    return new SmolVMError(`${what} failed in the guest: ${m.message.slice(0, 300)}.`, {
      code: fileErrorCode(m.errno),
      details: { agentCode: m.code, errno: m.errno, path },
    });
  }
  return agentError(m, what, path);
}

/**
 * A transfer's failure as the caller sees it: the deadline's own error stays, a local file
 * system error (errno code, not ours) becomes a FILE_TRANSFER SmolVMError.
 */
export function transferError(err: unknown, deadline: Deadline): unknown {
  if (deadline.expired && err === deadline.reason) return err;
  if ((err as NodeJS.ErrnoException)?.code && !(err instanceof SmolVMError)) {
    return new SmolVMError(`local file error: ${(err as Error).message}`, {
      code: "FILE_TRANSFER",
      cause: err,
    });
  }
  return err;
}

/** Throws the typed error an older agent deserves, before anything is sent. */
export function requireCapability(info: AgentInfo, cap: string, what: string): void {
  if (info.capabilities.includes(cap)) return;
  throw new CommandExecutionUnavailableError(
    `the guest agent (version ${info.version}) does not support ${what} (capability "${cap}" missing).`,
    "Rebuild the image so its agent is current (smolvm image build --force), then recreate the VM.",
    { code: "AGENT_UNSUPPORTED", details: { capability: cap, agentVersion: info.version } },
  );
}
