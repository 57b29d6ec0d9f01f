/**
 * The control channel a sandbox runs commands through. SSH is the first implementation; the
 * guest agent (virtio-serial / vsock) is the second. Every implementation builds results and
 * wraps commands through ../command.ts, so both behave identically to callers.
 */
import type { OutputChunk, Runner, RunOptions } from "../command.js";

export type ChannelKind = "ssh" | "agent";

/** How long a file transfer may take unless its `timeoutMs` says otherwise: 5 minutes. */
export const DEFAULT_FILE_TIMEOUT_MS = 300_000;

export interface CallOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface PutFileOptions extends CallOptions {
  /** File mode in the guest, default 0o644. */
  mode?: number;
  /** Create missing parent directories. Default true. */
  mkdirs?: boolean;
}

export interface GetFileOptions extends CallOptions {
  /** Refuse (FILE_TOO_LARGE, partial file removed) a guest file larger than this many bytes. */
  maxBytes?: number;
}

/** The stream form of run: chunks in arrival order, then one exit event. */
export type StreamEvent = OutputChunk | { stream: "exit"; exitCode: number | null; signal: string | null };

export interface CommandStream extends AsyncIterable<StreamEvent> {
  /** Stops the command (kills it remotely) and ends the iteration. */
  cancel(): Promise<void>;
}

/** A sandbox's control channel: the runner contract (`run`) plus streams, files and env. */
export interface CommChannel extends Runner {
  readonly kind: ChannelKind;
  stream(
    command: string,
    options?: Omit<RunOptions, "encoding" | "onStdout" | "onStderr" | "maxOutputBytes">,
  ): CommandStream;
  putFile(localPath: string, guestPath: string, options?: PutFileOptions): Promise<void>;
  getFile(guestPath: string, localPath: string, options?: GetFileOptions): Promise<void>;
  /** Env vars persisted for login shells (/etc/profile.d/smolvm_env.sh). */
  setEnv(vars: Record<string, string>, options?: CallOptions): Promise<void>;
  unsetEnv(names: string[], options?: CallOptions): Promise<void>;
  listEnv(options?: CallOptions): Promise<Record<string, string>>;
  /** Resolves once the channel can serve calls. */
  waitReady(options?: CallOptions): Promise<void>;
  close(): Promise<void>;
}
