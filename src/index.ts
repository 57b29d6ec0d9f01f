// smolvm: the sandbox SDK. The SSH library is also available on its own as "smolvm/ssh".

export { AgentChannel, type AgentChannelOptions } from "./channel/agent-channel.js";
export type { AgentCommandStream, ExecArgvOptions } from "./channel/agent-exec.js";
export type { AgentInfo } from "./channel/agent-messages.js";
export { connectUnix, connectVsockUds } from "./channel/agent-transport.js";
export type * from "./channel/types.js";
export * from "./command.js";
export { printable } from "./common/guest-text.js";
export { dataDir } from "./common/paths.js";
export * from "./errors.js";
export { agentSourceDir, type BuildAgentOptions, buildAgent } from "./image/agent-build.js";
export {
  type BuildImageOptions,
  buildImage,
  ensureImage,
  type ImageBuildProgress,
  type ImageListEntry,
  type ImageManifest,
  type ImageName,
  type ImageOptions,
  listImages,
  removeImage,
} from "./image/index.js";
export { SSHClient, type SSHClientOptions, type WaitForSshOptions } from "./ssh/client.js";
export { type AccelVerdict, type DetectOptions, detectAccelerator } from "./vm/accel.js";
export type { DoctorCheck, DoctorOptions, DoctorReport } from "./vm/doctor.js";
export {
  type FileEntry,
  type FileType,
  type ReadOptions,
  VmFiles,
  type WatchEvent,
  type Watcher,
  type WriteOptions,
} from "./vm/files.js";
export { type NetworkMechanisms, networkMechanisms } from "./vm/network/firewall.js";
export {
  type NetworkLogEntry,
  type NetworkPolicy,
  normalizePolicy,
  parsePolicyArg,
} from "./vm/network/policy.js";
export {
  type ProcessConnectOptions,
  ProcessHandle,
  type ProcessInfo,
  type ProcessStartOptions,
  type SignalName,
  VmProcesses,
} from "./vm/processes.js";
export type { PruneResult } from "./vm/prune.js";
export { type PtyCreateOptions, Terminal, VmPty } from "./vm/pty.js";
export {
  type AccelProgress,
  type BootTimings,
  type BoundedOptions,
  type CommChannelChoice,
  type FromIdOptions,
  type FromSnapshotOptions,
  type ListOptions,
  type PoolCreateOptions,
  type RestoredFrom,
  SmolVM,
  type SmolVMCreateOptions,
  SmolVMPool,
  type SmolVMPoolOptions,
  type SmolVMProgress,
  type SshCommands,
  type VmConfig,
  type VmRecord,
  type VmStatus,
} from "./vm/smolvm.js";
export type { SnapshotInfo } from "./vm/snapshot.js";
