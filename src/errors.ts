/**
 * One error tree for the whole package. Every error says what happened, to what, and what to
 * do next. Callers branch on the class or on `code`, never on message text; `details` carries
 * machine-readable context and never holds a secret.
 */

export interface ErrorOptions {
  code?: string;
  details?: Record<string, unknown>;
  cause?: unknown;
}

export class SmolVMError extends Error {
  readonly code: string;
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

/** A deadline passed or an AbortSignal fired. `partial` holds what was produced so far. */
export class OperationTimeoutError extends SmolVMError {
  readonly partial?: unknown;
  constructor(message: string, options: ErrorOptions & { partial?: unknown } = {}) {
    super(message, { code: "TIMEOUT", ...options });
    if (options.partial !== undefined) this.partial = options.partial;
  }
}

/** The operation was cancelled by the caller's AbortSignal (a kind of timeout for callers). */
export class OperationAbortedError extends OperationTimeoutError {
  constructor(message: string, options: ErrorOptions & { partial?: unknown } = {}) {
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

// ---------------------------------------------------------------- SSH: transport

export class SSHConnectionError extends SmolVMError {
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
