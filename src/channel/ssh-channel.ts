/**
 * CommChannel over SSH: commands through the persistent SSHClient, files over SFTP (atomic:
 * written to a temp name, then renamed), the env file through stdin so values never reach argv.
 */
import { randomBytes } from "node:crypto";
import { posix } from "node:path";
import {
  DEFAULT_RUN_TIMEOUT_MS,
  quoteSh,
  type RunEncoding,
  type RunOptions,
  type RunResult,
} from "../command.js";
import { Deadline } from "../common/deadline.js";
import { guestText } from "../common/guest-text.js";
import { SmolVMError } from "../errors.js";
import type { SSHClient } from "../ssh/client.js";
import type { StreamExecEvent } from "../ssh/exec-stream.js";
import { getFile, putFile } from "../ssh/sftp.js";
import {
  ENV_FILE_MAX,
  ENV_FILE_PATH,
  envFileTooLarge,
  mergeEnv,
  parseEnvFile,
  renderEnvFile,
} from "./env-file.js";
import { validateGuestPath } from "./guest-path.js";
import {
  type CallOptions,
  type CommandStream,
  type CommChannel,
  DEFAULT_FILE_TIMEOUT_MS,
  type GetFileOptions,
  type PutFileOptions,
  type StreamEvent,
} from "./types.js";

/** Internal commands (mkdir, writing the env file) print next to nothing; keep at most this. */
const INTERNAL_OUTPUT_MAX = 4096;

export class SshChannel implements CommChannel {
  readonly kind = "ssh" as const;
  private envLock: Promise<unknown> = Promise.resolve();

  /** `envFilePath` exists for tests against hosts where /etc/profile.d is not writable. */
  constructor(
    readonly client: SSHClient,
    private readonly envFilePath = ENV_FILE_PATH,
  ) {}

  run<E extends RunEncoding = undefined>(
    command: string,
    options?: RunOptions & { encoding?: E },
  ): Promise<RunResult<E>> {
    return this.client.run(command, options);
  }

  stream(
    command: string,
    options: Omit<RunOptions, "encoding" | "onStdout" | "onStderr" | "maxOutputBytes"> = {},
  ): CommandStream {
    const { stdin, ...rest } = options;
    const started = this.client.connection({ signal: options.signal }).then((conn) => {
      const s = conn.streamExec(command, { ...rest, stdin: stdin !== undefined });
      if (stdin !== undefined) {
        s.write(typeof stdin === "string" ? Buffer.from(stdin) : Buffer.from(stdin));
        s.end();
      }
      return s;
    });
    started.catch(() => {});
    return {
      async *[Symbol.asyncIterator](): AsyncIterator<StreamEvent> {
        const s = await started;
        for await (const ev of s as AsyncIterable<StreamExecEvent>) yield ev;
      },
      cancel: async () => {
        const s = await started.catch(() => undefined);
        await s?.cancel();
      },
    };
  }

  async putFile(localPath: string, guestPath: string, options: PutFileOptions = {}): Promise<void> {
    validateGuestPath(guestPath);
    const deadline = new Deadline(
      options.timeoutMs ?? DEFAULT_FILE_TIMEOUT_MS,
      options.signal,
      "file upload",
    );
    try {
      const conn = await this.client.connection({ signal: deadline.signal });
      if (options.mkdirs !== false) await this.mkdirs(posix.dirname(guestPath), deadline.signal);
      await putFile(conn, localPath, guestPath, {
        mode: options.mode,
        signal: deadline.signal,
        timeoutMs: deadline.remaining(),
      });
    } finally {
      deadline.dispose();
    }
  }

  async getFile(guestPath: string, localPath: string, options: GetFileOptions = {}): Promise<void> {
    validateGuestPath(guestPath);
    const deadline = new Deadline(
      options.timeoutMs ?? DEFAULT_FILE_TIMEOUT_MS,
      options.signal,
      "file download",
    );
    try {
      const conn = await this.client.connection({ signal: deadline.signal });
      await getFile(conn, guestPath, localPath, {
        signal: deadline.signal,
        timeoutMs: deadline.remaining(),
        maxBytes: options.maxBytes,
      });
    } finally {
      deadline.dispose();
    }
  }

  async listEnv(options: CallOptions = {}): Promise<Record<string, string>> {
    // head stops a well-behaved guest at the cap; the host cap holds whatever the guest runs.
    const r = await this.client.run(
      `head -c ${ENV_FILE_MAX + 1} ${quoteSh(this.envFilePath)} 2>/dev/null || true`,
      {
        shell: "raw",
        timeoutMs: options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS,
        signal: options.signal,
        maxOutputBytes: ENV_FILE_MAX + 1,
        encoding: "buffer",
      },
    );
    if (r.truncated || r.stdout.length > ENV_FILE_MAX) throw envFileTooLarge();
    return parseEnvFile(r.stdout.toString("utf8"));
  }

  setEnv(vars: Record<string, string>, options: CallOptions = {}): Promise<void> {
    return this.updateEnv(vars, [], options);
  }

  unsetEnv(names: string[], options: CallOptions = {}): Promise<void> {
    return this.updateEnv({}, names, options);
  }

  async waitReady(options: CallOptions = {}): Promise<void> {
    await this.client.waitForSsh({ timeoutMs: options.timeoutMs, signal: options.signal });
  }

  async close(): Promise<void> {
    await this.client.close();
  }

  /** Read-merge-write, serialized per channel so concurrent updates do not lose each other. */
  private async updateEnv(set: Record<string, string>, unset: string[], options: CallOptions): Promise<void> {
    mergeEnv({}, set, unset); // validate before any I/O
    const deadline = new Deadline(
      options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS,
      options.signal,
      "updating the guest env file",
    );
    const task = this.envLock.then(() =>
      this.writeEnv(set, unset, { timeoutMs: deadline.remaining(), signal: deadline.signal }),
    );
    this.envLock = task.catch(() => {});
    try {
      await deadline.race(task);
    } finally {
      deadline.dispose();
    }
  }

  private async writeEnv(set: Record<string, string>, unset: string[], options: CallOptions): Promise<void> {
    const next = mergeEnv(await this.listEnv(options), set, unset);
    const file = quoteSh(this.envFilePath);
    // A temp name of its own: concurrent writers (other processes too) never share one.
    const tmp = quoteSh(`${this.envFilePath}.${randomBytes(6).toString("hex")}.tmp`);
    // The content travels on stdin: no value is ever part of a command line.
    const r = await this.client.run(
      `umask 077 && mkdir -p ${quoteSh(posix.dirname(this.envFilePath))} && cat > ${tmp} && chmod 600 ${tmp} && mv -f ${tmp} ${file}`,
      {
        shell: "raw",
        stdin: renderEnvFile(next),
        timeoutMs: options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS,
        signal: options.signal,
        maxOutputBytes: INTERNAL_OUTPUT_MAX,
      },
    );
    if (!r.ok) {
      throw new SmolVMError(
        `writing ${this.envFilePath} in the guest failed (exit ${r.exitCode}): ${guestText(r.stderr.trim())}`,
        {
          code: "ENV_WRITE_FAILED",
        },
      );
    }
  }

  private async mkdirs(dir: string, signal: AbortSignal): Promise<void> {
    const r = await this.client.run(`mkdir -p -- ${quoteSh(dir)}`, {
      shell: "raw",
      signal,
      maxOutputBytes: INTERNAL_OUTPUT_MAX,
    });
    if (!r.ok) {
      throw new SmolVMError(`could not create ${dir} in the guest: ${guestText(r.stderr.trim())}`, {
        code: "GUEST_MKDIR",
      });
    }
  }
}
