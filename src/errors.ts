/**
 * One error tree for the whole package. Every error says what happened, to what, and what to
 * do next. Callers branch on the class or on `code`, never on message text; `details` carries
 * machine-readable context and never holds a secret.
 */
import type { AnyCommandResult } from "./command-result.js";

/**
 * Every `code` an error of this package can carry: branch on these, never on message text.
 */
export type SmolVMErrorCode =
  // base and input
  | "SMOLVM_ERROR"
  | "VALIDATION"
  | "TIMEOUT"
  | "ABORTED"
  | "PROGRESS_STALL"
  | "COMMAND_EXECUTION_UNAVAILABLE"
  | "PROTOCOL"
  // connections (any transport)
  | "CONNECTION"
  // SSH
  | "SSH_CONNECTION"
  | "SSH_CONNECTION_REFUSED"
  | "SSH_CONNECTION_TIMEOUT"
  | "SSH_HOST_UNREACHABLE"
  | "SSH_CONNECTION_LOST"
  | "SSH_CLIENT_CLOSED"
  | "SSH_AUTHENTICATION"
  | "SSH_AUTH_FAILED"
  | "SSH_HOST_KEY_MISMATCH"
  | "SSH_HOST_KEY_UNKNOWN"
  | "SSH_HOST_KEY_REVOKED"
  | "SSH_HOST_KEY_UNREADABLE"
  | "SSH_HOST_KEY_WRITE_FAILED"
  | "SSH_NO_MUTUAL_KEX"
  | "SSH_KEY_LOAD"
  | "SSH_AGENT"
  | "SOCKS_REQUEST"
  | "SOCKS_REPLY"
  // guest agent
  | "AGENT_CONNECTION_REFUSED"
  | "AGENT_CONNECTION_LOST"
  | "AGENT_CONNECT_TIMEOUT"
  | "AGENT_CHANNEL_CLOSED"
  | "AGENT_AUTH_PEER"
  | "AGENT_AUTH_FAILED"
  | "AGENT_BUSY"
  | "AGENT_LIMIT"
  | "AGENT_UNSUPPORTED"
  | "GUEST_SPAWN_FAILED"
  | "GUEST_MKDIR"
  | "ENV_WRITE_FAILED"
  | "ENV_FILE_TOO_LARGE"
  | "PROCESS_NOT_FOUND"
  | "STDIN_CLOSED"
  // files
  | FileErrorCode
  | "FILE_TOO_LARGE"
  // VMs, QEMU, snapshots
  | "VM_STATE"
  | "VM_NOT_FOUND"
  | "VM_NAME_TAKEN"
  | "VM_CRASHED"
  | "VM_PAUSED"
  | "VM_STOP_FAILED"
  | "VM_RECORD_DAMAGED"
  | "QEMU_MISSING"
  | "QEMU_START_FAILED"
  | "QEMU_UNKILLABLE"
  | "QMP_COMMAND"
  | "QMP_CLOSED"
  | "QMP_UNAVAILABLE"
  | "NO_FREE_PORT"
  | "SNAPSHOT_FAILED"
  | "SNAPSHOT_NOT_FOUND"
  | "SNAPSHOT_IN_USE"
  | "POOL_TEMPLATE_MISSING"
  | "POOL_CLOSED"
  | "SNAPSHOT_DAMAGED"
  | "SNAPSHOT_RESTORE_FAILED"
  // network policy
  | "NETWORK_POLICY_UNAVAILABLE"
  | "NETWORK_DAEMON_FAILED"
  | "NETWORK_DAEMON_DOWN"
  // host, state and images
  | "HOST_DEPENDENCY"
  | "DATA_DIR_NOT_OWNED"
  | "STATE_DB"
  | "STATE_DB_TOO_NEW"
  | "IMAGE_BUILD"
  | "IMAGE_BUILD_COMMAND"
  | "IMAGE_CORRUPT"
  | "IMAGE_MISSING"
  | "IMAGE_LISTS_REFRESHED"
  | "IMAGE_DEB_MISMATCH";

/** What a failed file operation is, whatever the transport (agent errno, SFTP status). */
export type FileErrorCode =
  | "FILE_TRANSFER"
  | "FILE_NOT_FOUND"
  | "FILE_EXISTS"
  | "NOT_A_DIRECTORY"
  | "IS_A_DIRECTORY"
  | "DIRECTORY_NOT_EMPTY"
  | "PERMISSION_DENIED";

export interface ErrorOptions {
  code?: SmolVMErrorCode;
  details?: Record<string, unknown>;
  cause?: unknown;
}

export class SmolVMError extends Error {
  readonly code: SmolVMErrorCode;
  readonly details: Record<string, unknown>;
  override readonly cause?: unknown;

  constructor(message: string, options: ErrorOptions = {}) {
    super(message);
    this.name = new.target.name;
    this.code = options.code ?? "SMOLVM_ERROR";
    this.details = options.details ?? {};
    if (options.cause !== undefined) this.cause = options.cause;
  }
}

/** Bad input from the caller: empty command, NUL byte, bad env name, bad path, bad option. */
export class ValidationError extends SmolVMError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "VALIDATION", ...options });
  }
}

export interface TimeoutErrorOptions extends ErrorOptions {
  partial?: AnyCommandResult;
}

/**
 * A deadline passed or an AbortSignal fired. For a command, `partial` is the CommandResult of
 * what it produced so far (exitCode null unless it ended in the grace period); attach it with
 * `withPartial`.
 */
export class OperationTimeoutError extends SmolVMError {
  readonly partial?: AnyCommandResult;
  constructor(message: string, options: TimeoutErrorOptions = {}) {
    super(message, { code: "TIMEOUT", ...options });
    if (options.partial !== undefined) this.partial = options.partial;
  }

  /** The same error (class, code, message, details, cause) carrying `partial`. */
  withPartial(partial: AnyCommandResult): this {
    const Ctor = this.constructor as new (message: string, options: TimeoutErrorOptions) => this;
    return new Ctor(this.message, { code: this.code, details: this.details, cause: this.cause, partial });
  }
}

/** The operation was cancelled by the caller's AbortSignal (a kind of timeout for callers). */
export class OperationAbortedError extends OperationTimeoutError {
  constructor(message: string, options: TimeoutErrorOptions = {}) {
    super(message, { code: "ABORTED", ...options });
  }
}

/** The VM or image has no way to run commands; `remediation` says how to get one. */
export class CommandExecutionUnavailableError extends SmolVMError {
  readonly remediation: string;
  constructor(message: string, remediation: string, options: ErrorOptions = {}) {
    super(`${message} ${remediation}`, { code: "COMMAND_EXECUTION_UNAVAILABLE", ...options });
    this.remediation = remediation;
  }
}

// ---------------------------------------------------------------- connections (any transport)

/**
 * A transport to the peer (SSH server, guest agent) could not be opened or ended underneath an
 * operation. Catch this to handle connection trouble whatever the channel; `code` says which
 * transport and what happened (SSH_CONNECTION_*, AGENT_CONNECTION_*, ...).
 */
export class ConnectionError extends SmolVMError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "CONNECTION", ...options });
  }
}

// ---------------------------------------------------------------- SSH: transport

/**
 * A connection failure. Historically the SSH tree's root, it is also what the guest agent's
 * refused/lost connections are (ConnectionRefusedError, ConnectionLostError, with AGENT_* codes):
 * code written against it keeps working for both transports.
 */
export class SSHConnectionError extends ConnectionError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "SSH_CONNECTION", ...options });
  }
}
export class ConnectionRefusedError extends SSHConnectionError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "SSH_CONNECTION_REFUSED", ...options });
  }
}
export class ConnectionTimeoutError extends SSHConnectionError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "SSH_CONNECTION_TIMEOUT", ...options });
  }
}
export class HostUnreachableError extends SSHConnectionError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "SSH_HOST_UNREACHABLE", ...options });
  }
}
/** An established connection ended underneath an operation (reset, EOF, keepalive timeout). */
export class ConnectionLostError extends SSHConnectionError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "SSH_CONNECTION_LOST", ...options });
  }
}

// ---------------------------------------------------------------- SSH: authentication

export class AuthenticationError extends SmolVMError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "SSH_AUTHENTICATION", ...options });
  }
}
export class AuthFailedError extends AuthenticationError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "SSH_AUTH_FAILED", ...options });
  }
}
export class HostKeyMismatchError extends AuthenticationError {
  readonly expectedFingerprint: string | undefined;
  readonly actualFingerprint: string;
  constructor(
    message: string,
    fingerprints: { expected?: string; actual: string },
    options: ErrorOptions = {},
  ) {
    super(message, {
      code: "SSH_HOST_KEY_MISMATCH",
      ...options,
      details: {
        ...options.details,
        expectedFingerprint: fingerprints.expected,
        actualFingerprint: fingerprints.actual,
      },
    });
    this.expectedFingerprint = fingerprints.expected;
    this.actualFingerprint = fingerprints.actual;
  }
}
export class NoMutualKexError extends AuthenticationError {
  readonly ours: string[];
  readonly theirs: string[];
  constructor(message: string, lists: { ours: string[]; theirs: string[] }, options: ErrorOptions = {}) {
    super(message, { code: "SSH_NO_MUTUAL_KEX", ...options, details: { ...options.details, ...lists } });
    this.ours = lists.ours;
    this.theirs = lists.theirs;
  }
}
export class KeyLoadError extends AuthenticationError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "SSH_KEY_LOAD", ...options });
  }
}
export class AgentError extends AuthenticationError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "SSH_AGENT", ...options });
  }
}

// ---------------------------------------------------------------- channels, VMs, images

/** A peer (guest agent, SOCKS client, QMP) sent bytes that break the protocol. */
export class ProtocolError extends SmolVMError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "PROTOCOL", ...options });
  }
}

/** The VM is not in a state that allows the operation (stopped, crashed, deleted). */
export class VMStateError extends SmolVMError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "VM_STATE", ...options });
  }
}

export class VMNotFoundError extends SmolVMError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "VM_NOT_FOUND", ...options });
  }
}

/** A host prerequisite (QEMU, kernel package, compiler) is missing or unusable. */
export class HostDependencyError extends SmolVMError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "HOST_DEPENDENCY", ...options });
  }
}

export class ImageBuildError extends SmolVMError {
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, { code: "IMAGE_BUILD", ...options });
  }
}

/** QEMU answered a QMP command with an error. `errorClass` is QMP's class (GenericError, CommandNotFound, ...). */
export class QmpCommandError extends SmolVMError {
  readonly errorClass: string;
  readonly desc: string;
  constructor(message: string, qmp: { errorClass: string; desc: string }, options: ErrorOptions = {}) {
    super(message, { code: "QMP_COMMAND", ...options, details: { ...options.details, ...qmp } });
    this.errorClass = qmp.errorClass;
    this.desc = qmp.desc;
  }
}
