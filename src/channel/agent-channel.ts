/**
 * CommChannel over the guest agent (agent/PROTOCOL.md): one authenticated byte stream to the
 * guest (virtio-serial Unix socket, vsock, or a test socket) multiplexing every call.
 *
 * This class is the facade; the parts live beside it: agent-transport.ts opens the byte stream,
 * agent-connector.ts keeps the authenticated session (agent-session.ts, on a socket through
 * agent-socket.ts), agent-request.ts is the one way a call opens a stream, and agent-exec.ts,
 * agent-transfer.ts and agent-env.ts are the operations. The guest is untrusted: a violation of
 * the protocol fails the calls in flight and drops the connection; the next call reconnects.
 */
import {
  type CommandResult,
  type RunEncoding,
  type RunOptions,
  type RunResult,
  validateRunOptions,
  wrapCommand,
} from "../command.js";
import { type Deadline, sleep } from "../common/deadline.js";
import { validatePort } from "../common/port.js";
import {
  AuthenticationError,
  type OperationTimeoutError,
  ProtocolError,
  SmolVMError,
  ValidationError,
} from "../errors.js";
import { AgentConnector, type AgentConnectorOptions } from "./agent-connector.js";
import { AgentEnv } from "./agent-env.js";
import { agentError, deadlineError } from "./agent-errors.js";
import {
  type AgentCommandStream,
  type ExecArgvOptions,
  execCollect,
  openExecStream,
  shellRequest,
  toBuffer,
  validateArgv,
} from "./agent-exec.js";
import { type AgentInfo, decodeInfoFields } from "./agent-messages.js";
import { encodeWaitPort, FrameType } from "./agent-protocol.js";
import { bounded, type RequestSpec, request, simpleRequest } from "./agent-request.js";
import { getFile, getTo, putFile, putFrom } from "./agent-transfer.js";
import type { CallOptions, CommChannel, GetFileOptions, PutFileOptions } from "./types.js";

export type AgentChannelOptions = AgentConnectorOptions;

export class AgentChannel implements CommChannel {
  readonly kind = "agent" as const;
  private readonly connector: AgentConnector;
  private readonly env: AgentEnv;

  constructor(options: AgentChannelOptions) {
    this.connector = new AgentConnector(options);
    this.env = new AgentEnv(this.connector);
  }

  private get name(): string {
    return this.connector.name;
  }

  /** What the agent reported at the handshake (undefined before the first connection). */
  get agentInfo(): AgentInfo | undefined {
    return this.connector.info;
  }

  // ------------------------------------------------------------ run / exec

  async run<E extends RunEncoding = undefined>(
    command: string,
    options?: RunOptions & { encoding?: E },
  ): Promise<RunResult<E>> {
    const o: RunOptions = options ?? {};
    validateRunOptions(command, o);
    const wrapped = wrapCommand(command, { shell: o.shell, env: o.env, cwd: o.cwd });
    const stdin = Buffer.concat([wrapped.stdinPrefix ?? Buffer.alloc(0), toBuffer(o.stdin)]);
    return (await execCollect(
      this.connector,
      shellRequest(wrapped, o.shell),
      stdin,
      o,
      "command",
    )) as RunResult<E>;
  }

  /**
   * Runs argv directly (no shell): the agent's own form, named apart from the shell-string
   * `run`/`exec` of the other runners. `env` and `cwd` are applied by the agent.
   */
  runArgv(argv: string[], options?: ExecArgvOptions & { encoding?: "utf8" }): Promise<CommandResult<string>>;
  runArgv(argv: string[], options: ExecArgvOptions & { encoding: "buffer" }): Promise<CommandResult<Buffer>>;
  async runArgv(
    argv: string[],
    options: ExecArgvOptions = {},
  ): Promise<CommandResult<string> | CommandResult<Buffer>> {
    validateArgv(argv, options);
    return execCollect(
      this.connector,
      { argv, env: options.env, cwd: options.cwd, pty: options.pty },
      toBuffer(options.stdin),
      options,
      `${argv[0]}`,
    );
  }

  stream(
    command: string,
    options: Omit<RunOptions, "encoding" | "onStdout" | "onStderr" | "maxOutputBytes"> = {},
  ): AgentCommandStream {
    validateRunOptions(command, options);
    const wrapped = wrapCommand(command, { shell: options.shell, env: options.env, cwd: options.cwd });
    // Like the SSH channel: stdin is what the caller gave (or nothing), then EOF.
    const stdin = Buffer.concat([wrapped.stdinPrefix ?? Buffer.alloc(0), toBuffer(options.stdin)]);
    return openExecStream(this.connector, shellRequest(wrapped, options.shell), stdin, true, options);
  }

  /** Streams argv directly, optionally on a PTY; stdin stays open until end(). */
  streamExec(
    argv: string[],
    options: Omit<ExecArgvOptions, "encoding" | "onStdout" | "onStderr" | "maxOutputBytes"> = {},
  ): AgentCommandStream {
    validateArgv(argv, options);
    return openExecStream(
      this.connector,
      { argv, env: options.env, cwd: options.cwd, pty: options.pty },
      toBuffer(options.stdin),
      options.stdin !== undefined,
      options,
    );
  }

  // ------------------------------------------------------------ files

  async putFile(localPath: string, guestPath: string, options: PutFileOptions = {}): Promise<void> {
    return putFile(this.connector, localPath, guestPath, options);
  }

  async getFile(guestPath: string, localPath: string, options: GetFileOptions = {}): Promise<void> {
    return getFile(this.connector, guestPath, localPath, options);
  }

  /** PUT from any chunk source (streamed within the agent's credit, atomic in the guest). */
  async putFrom(
    guestPath: string,
    source: () => AsyncIterable<Buffer>,
    options: PutFileOptions = {},
  ): Promise<void> {
    return putFrom(this.connector, guestPath, source, options);
  }

  /** GET into a sink; credit goes back only as the sink finishes each chunk (bounded memory). */
  async getTo(
    guestPath: string,
    sink: (data: Buffer) => Promise<void> | void,
    options: CallOptions = {},
  ): Promise<number> {
    return getTo(this.connector, guestPath, sink, options);
  }

  // ------------------------------------------------------------ env

  async listEnv(options: CallOptions = {}): Promise<Record<string, string>> {
    return this.env.list(options);
  }

  async setEnv(vars: Record<string, string>, options: CallOptions = {}): Promise<void> {
    return this.env.set(vars, options);
  }

  async unsetEnv(names: string[], options: CallOptions = {}): Promise<void> {
    return this.env.unset(names, options);
  }

  // ------------------------------------------------------------ small requests

  /**
   * The secret later sessions prove (after the agent was told a new one, see setIdentity in
   * agent-identity.ts); the current session stays authenticated.
   */
  rekey(secret: Buffer): void {
    this.connector.rekey(secret);
  }

  /** Round trip to the agent; resolves with the elapsed milliseconds. */
  async ping(options: CallOptions = {}): Promise<number> {
    return bounded(options, `ping of ${this.name}`, async (deadline) => {
      const p = await this.simple(FrameType.PING, Buffer.alloc(0), deadline, "ping");
      if (p.length) throw new ProtocolError("agent PING reply has a payload.");
      return deadline.elapsedMs;
    });
  }

  /** Version, capabilities, start uptime and the boot milestones the init logged. */
  async info(options: CallOptions = {}): Promise<AgentInfo> {
    return bounded(options, `info of ${this.name}`, async (deadline) => {
      return decodeInfoFields(await this.simple(FrameType.INFO, Buffer.alloc(0), deadline, "info"));
    });
  }

  /** Waits until something accepts TCP connections on 127.0.0.1:`port` inside the guest. */
  async waitForPort(port: number, options: CallOptions = {}): Promise<void> {
    validatePort("port", port);
    return bounded(options, `waiting for guest port ${port}`, async (deadline) => {
      const p = await this.simple(
        FrameType.WAIT_PORT,
        encodeWaitPort(port, deadline.remainingMs),
        deadline,
        `waiting for guest port ${port}`,
      );
      if (p.length !== 4) throw new ProtocolError("agent WAIT_PORT reply is malformed.");
    });
  }

  /**
   * Resolves once the agent answers an authenticated ping, retrying connection failures (the
   * VM may still be booting). A wrong secret fails at once: retrying cannot fix it.
   */
  async waitReady(options: CallOptions = {}): Promise<void> {
    return bounded(options, `waiting for ${this.name}`, async (deadline) => {
      let last: unknown;
      for (;;) {
        try {
          await this.simple(FrameType.PING, Buffer.alloc(0), deadline, "ping");
          return;
        } catch (err) {
          if (
            err instanceof AuthenticationError ||
            err instanceof ValidationError ||
            (err instanceof SmolVMError && err.code === "AGENT_BUSY") ||
            this.connector.closed
          )
            throw err;
          if (!deadline.expired) last = err;
        }
        if (!deadline.expired)
          await sleep(Math.min(100, deadline.remainingMs), deadline.signal).catch(() => {});
        if (deadline.expired) {
          const detail = last instanceof Error ? ` The last attempt failed: ${last.message}` : "";
          const e = deadlineError(deadline);
          throw new (e.constructor as typeof OperationTimeoutError)(`${e.message}${detail}`, {
            code: e.code,
            cause: last,
          });
        }
      }
    });
  }

  async close(): Promise<void> {
    await this.connector.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  // ------------------------------------------------------------ requests beyond CommChannel

  /**
   * Runs one request on its own stream for the agent operations beyond CommChannel
   * (agent-fs.ts, agent-procs.ts, agent-pty.ts, agent-identity.ts), through the same request()
   * every call here uses.
   */
  request<T>(spec: RequestSpec<T>, deadline: Deadline): Promise<T> {
    return request(this.connector, spec, deadline);
  }

  /** A request answered by one OK (its payload) or one ERROR. */
  private simple(type: number, payload: Buffer, deadline: Deadline, what: string): Promise<Buffer> {
    return simpleRequest(this, type, payload, deadline, (m) => agentError(m, what), what);
  }
}
