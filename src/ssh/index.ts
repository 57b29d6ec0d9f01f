// smolvm/ssh: a resilient SSH library for any SSH host, VM or not. Exported by name: what a user
// of the library needs; the modules' internals (codecs, kill scripts, collectors) stay private.

export {
  type AnyCommandResult,
  CommandResult,
  DEFAULT_RUN_TIMEOUT_MS,
  type ExecExtras,
  type OutputChunk,
  type RunCommand,
  type Runner,
  type RunOptions,
  type RunOptionsBuffer,
  type RunOptionsUtf8,
  type RunResult,
  type ShellKind,
  type ShellMode,
} from "../command.js";
export {
  AgentError,
  AuthenticationError,
  AuthFailedError,
  ConnectionError,
  ConnectionLostError,
  ConnectionRefusedError,
  ConnectionTimeoutError,
  type ErrorOptions,
  HostKeyMismatchError,
  HostUnreachableError,
  KeyLoadError,
  NoMutualKexError,
  OperationAbortedError,
  OperationTimeoutError,
  ProtocolError,
  SmolVMError,
  type SmolVMErrorCode,
  SSHConnectionError,
  ValidationError,
} from "../errors.js";
export {
  type AuthConfig,
  type AuthMethod,
  createAgentAuth,
  createKeyAuth,
  createKeyboardInteractiveAuth,
  createPasswordAuth,
  getAgentAvailable,
  getDefaultKeyPaths,
  type KeyboardInteractiveHandler,
  type KeyboardPrompt,
} from "./auth.js";
export {
  AutomationEngine,
  type AutomationEngineOptions,
  type AutomationStream,
  EOF,
  type ExpectOptions,
  ExpectPattern,
  type ExpectRespondStep,
  type ExpectResult,
  type PatternInput,
  type PatternType,
  type SendOptions,
  TIMEOUT,
  Transcript,
  type TranscriptEntry,
  type TranscriptFileOptions,
  type TranscriptKind,
} from "./automation.js";
export {
  defaultClientRetryPolicy,
  PER_COMMAND_CONNECTIONS,
  SSHClient,
  type SSHClientOptions,
  type WaitForSshOptions,
} from "./client.js";
export type { CredentialOptions, KeepaliveSpellings } from "./client-options.js";
export { type ResolvedSshConfig, type ResolveSshConfigOptions, resolveSshConfig } from "./config.js";
export {
  type MatchCriterion,
  parseSshConfig,
  type SshConfigFile,
  type SshConfigLine,
} from "./config-parse.js";
export type {
  ConnectOptions,
  JumpSpec,
  KeepaliveOptions,
  SessionConnectOptions,
} from "./connect-options.js";
export { type CloseListener, connectSession, SSHConnection } from "./connection.js";
export {
  EVENT_SCHEMA_VERSION,
  EVENT_TYPES,
  EventCollector,
  type EventCollectorOptions,
  type EventSink,
  type EventType,
  parseEventLog,
  type SSHEvent,
} from "./events.js";
export {
  EvidenceBundle,
  type EvidenceBundleData,
  type EvidenceBundleOptions,
  type EvidenceExtra,
  type EvidenceSource,
  type EvidenceWriteOptions,
  getEvidenceBundle,
} from "./evidence.js";
export { ExecStream, type StreamExecEvent, type StreamExecOptions } from "./exec-stream.js";
export { ForwardManager, forwardDynamic, forwardLocal, forwardRemote } from "./forward.js";
export {
  DynamicForwardHandle,
  type DynamicForwardSpec,
  ForwardHandle,
  type ForwardIntent,
  type ForwardKind,
  type ForwardManagerOptions,
  LocalForwardHandle,
  type LocalForwardSpec,
  RemoteForwardHandle,
  type RemoteForwardSpec,
} from "./forward-handles.js";
export type { ConnectTimings } from "./handshake.js";
export {
  createHostKeyVerifier,
  fingerprintOf,
  HostKeyErrorCode,
  type HostKeyOptions,
  type HostKeyPolicy,
} from "./hostkeys.js";
export { DEFAULT_KEEPALIVE, type KeepaliveConfig } from "./keepalive.js";
export { REDACTED, type RedactOptions, redact, redactText } from "./redact.js";
export {
  classifyFailure,
  type FailureKind,
  type RetryLoopOptions,
  RetryPolicy,
  type RetryPolicyOptions,
  retryWithPolicy,
} from "./retry.js";
export { type ServerQuirks, serverQuirks } from "./server-quirks.js";
export type { GetFileOptions, PutFileOptions, TransferOptions } from "./sftp.js";
export { openShell, type ShellOptions, type ShellSession } from "./shell.js";
export { type ConnectOut, type SocksConnectionInfo, SocksServer, type SocksServerOptions } from "./socks.js";
export type { SocksCredentials } from "./socks-codec.js";
export {
  ConnectionState,
  type Connector,
  SSHSupervisor,
  type StateListener,
  type SupervisorExecOptions,
  type SupervisorOptions,
  type SupervisorStreamOptions,
} from "./supervisor.js";
export {
  ProgressWatchdog,
  type ProgressWatchdogOptions,
  type WatchedStream,
  type WatchOptions,
  watchStream,
} from "./watchdog.js";
