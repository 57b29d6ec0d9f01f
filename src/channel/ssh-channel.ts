/**
 * CommChannel over SSH: commands through the persistent SSHClient, files over SFTP (atomic:
 * written to a temp name, then renamed), the env file through stdin so values never reach argv.
 */
import { posix } from "node:path";
import type { SFTPWrapper } from "ssh2";
import {
  type CommandResult,
  DEFAULT_RUN_TIMEOUT_MS,
  quoteSh,
  type RunOptions,
  type RunOptionsBuffer,
  type RunOptionsUtf8,
} from "../command.js";
import { Deadline } from "../common/deadline.js";
import { SmolVMError, ValidationError } from "../errors.js";
import type { SSHClient } from "../ssh/client.js";
import type { StreamExecEvent } from "../ssh/connection.js";
import { ENV_FILE_PATH, mergeEnv, parseEnvFile, renderEnvFile } from "../vm/env-file.js";
import type { CallOptions, CommandStream, CommChannel, PutFileOptions, StreamEvent } from "./types.js";

const FILE_TIMEOUT_MS = 300_000;

export class SshChannel implements CommChannel {
  readonly kind = "ssh" as const;

  /** `envFilePath` exists for tests against hosts where /etc/profile.d is not writable. */
  constructor(
    readonly client: SSHClient,
    private readonly envFilePath = ENV_FILE_PATH,
  ) {}

  run(command: string, options?: RunOptionsUtf8): Promise<CommandResult<string>>;
  run(command: string, options: RunOptionsBuffer): Promise<CommandResult<Buffer>>;
  run(command: string, options?: RunOptions): Promise<CommandResult<string> | CommandResult<Buffer>>;
  run(command: string, options: RunOptions = {}): Promise<CommandResult<string> | CommandResult<Buffer>> {
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
    await this.withSftp(options, "upload", async (sftp, signal) => {
      const dir = posix.dirname(guestPath);
      if (options.mkdirs !== false) await this.mkdirs(dir, signal);
      const tmp = `${dir}/.smolvm-upload-${process.pid}-${Date.now().toString(36)}`;
      try {
        await sftpCall<void>((cb) => sftp.fastPut(localPath, tmp, { mode: options.mode ?? 0o644 }, cb));
        await sftpCall<void>((cb) => sftp.chmod(tmp, options.mode ?? 0o644, cb));
        await sftpCall<void>((cb) => sftp.ext_openssh_rename(tmp, guestPath, cb));
      } catch (e) {
        await sftpCall<void>((cb) => sftp.unlink(tmp, cb)).catch(() => {});
        throw e;
      }
    });
  }

  async getFile(guestPath: string, localPath: string, options: CallOptions = {}): Promise<void> {
    validateGuestPath(guestPath);
    await this.withSftp(options, "download", async (sftp) => {
      await sftpCall<void>((cb) => sftp.fastGet(guestPath, localPath, cb));
    });
  }

  async listEnv(options: CallOptions = {}): Promise<Record<string, string>> {
    const r = await this.client.run(`cat ${quoteSh(this.envFilePath)} 2>/dev/null || true`, {
      shell: "raw",
      timeoutMs: options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS,
      signal: options.signal,
    });
    return parseEnvFile(r.stdout);
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

  private async updateEnv(set: Record<string, string>, unset: string[], options: CallOptions): Promise<void> {
    mergeEnv({}, set, unset); // validate before any I/O
    const next = mergeEnv(await this.listEnv(options), set, unset);
    const file = quoteSh(this.envFilePath);
    const tmp = quoteSh(`${this.envFilePath}.tmp`);
    // The content travels on stdin: no value is ever part of a command line.
    const r = await this.client.run(
      `umask 077 && mkdir -p ${quoteSh(posix.dirname(this.envFilePath))} && cat > ${tmp} && chmod 600 ${tmp} && mv -f ${tmp} ${file}`,
      {
        shell: "raw",
        stdin: renderEnvFile(next),
        timeoutMs: options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS,
        signal: options.signal,
      },
    );
    if (!r.ok) {
      throw new SmolVMError(
        `writing ${this.envFilePath} in the guest failed (exit ${r.exitCode}): ${r.stderr.trim()}`,
        {
          code: "ENV_WRITE_FAILED",
        },
      );
    }
  }

  private async mkdirs(dir: string, signal: AbortSignal): Promise<void> {
    const r = await this.client.run(`mkdir -p -- ${quoteSh(dir)}`, { shell: "raw", signal });
    if (!r.ok) {
      throw new SmolVMError(`could not create ${dir} in the guest: ${r.stderr.trim()}`, {
        code: "GUEST_MKDIR",
      });
    }
  }

  private async withSftp<T>(
    options: CallOptions,
    what: string,
    body: (sftp: SFTPWrapper, signal: AbortSignal) => Promise<T>,
  ): Promise<T> {
    const deadline = new Deadline(options.timeoutMs ?? FILE_TIMEOUT_MS, options.signal, `SFTP ${what}`);
    let sftp: SFTPWrapper | undefined;
    try {
      const conn = await this.client.connection({ signal: deadline.signal });
      sftp = await deadline.race(sftpCall<SFTPWrapper>((cb) => conn.client.sftp(cb)));
      return await deadline.race(body(sftp, deadline.signal));
    } catch (e) {
      throw mapSftpError(e, what);
    } finally {
      sftp?.end();
      deadline.dispose();
    }
  }
}

export function validateGuestPath(path: string): void {
  if (typeof path !== "string" || !path.startsWith("/")) {
    throw new ValidationError(`guest path must be absolute, got ${JSON.stringify(path)}.`);
  }
  if (path.includes("\0")) throw new ValidationError("guest path contains a NUL byte.");
  if (path.split("/").includes("..")) {
    throw new ValidationError(
      `guest path ${JSON.stringify(path)} contains "..": pass a normalized absolute path.`,
    );
  }
}

function sftpCall<T>(fn: (cb: (err: Error | null | undefined, v?: T) => void) => void): Promise<T> {
  return new Promise((resolve, reject) => fn((err, v) => (err ? reject(err) : resolve(v as T))));
}

function mapSftpError(e: unknown, what: string): unknown {
  if (e instanceof SmolVMError) return e;
  const code = (e as { code?: unknown }).code;
  if (typeof code === "number" || code === "ENOENT") {
    const msg =
      code === 2 || code === "ENOENT"
        ? "no such file"
        : code === 3
          ? "permission denied"
          : `SFTP status ${code}`;
    return new SmolVMError(`file ${what} failed: ${msg}.`, {
      code: "FILE_TRANSFER",
      cause: e,
      details: { sftpCode: code },
    });
  }
  return new SmolVMError(`file ${what} failed: ${(e as Error).message}`, { code: "FILE_TRANSFER", cause: e });
}
