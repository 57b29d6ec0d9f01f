/**
 * What the modules under SSHConnection need from a connection, as shapes: SessionHost for SFTP
 * and shells, ExecHost for buffered and streamed exec. They depend on these and never import
 * connection.ts (which imports them); SSHConnection provides both.
 */
import type { Client } from "ssh2";
import type { ConnectionLostError } from "../errors.js";
import type { EventSink } from "./events.js";
import type { ExecChannel } from "./exec-channel.js";

/** A connection that can open session channels (SFTP, shell). */
export interface SessionHost {
  readonly client: Client;
  readonly host: string;
  readonly port: number;
  /** True while the transport is up. */
  readonly alive: boolean;
  /** Counts a session opened outside the exec limiter; throws when the server allows no more. */
  claimSession(): void;
}

/** What running a command needs from a connection (SSHConnection provides it). */
export interface ExecHost {
  readonly host: string;
  readonly events: EventSink | undefined;
  /** True while the transport is up. */
  readonly alive: boolean;
  /** Opens an exec channel under the connection's channel limiter (see SSHConnection.openExec). */
  openExec(command: string, signal: AbortSignal, pty?: boolean, runId?: string): Promise<ExecChannel>;
  /** Stops a remote command for good (fire and forget). */
  terminate(st: ExecChannel): void;
  /** The error for a command cut by the transport's end. */
  lostError(when: string, cause?: unknown): ConnectionLostError;
}
