/**
 * File transfer over an SSHConnection's SFTP subsystem, bounded by timeoutMs/signal. Uploads
 * land atomically: written to a temporary name beside the target, then renamed over it, so a
 * reader never sees half a file.
 */
import type { SFTPWrapper } from "ssh2";
import { Deadline, sleep } from "../common/deadline.js";
import { downloadTo, validateMaxBytes } from "../common/safe-download.js";
import { ConnectionLostError, SmolVMError, ValidationError } from "../errors.js";
import type { SessionHost } from "./session-host.js";

export interface TransferOptions {
  /** Default 120 000. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface PutFileOptions extends TransferOptions {
  /** Mode of the remote file. Default 0o644. */
  mode?: number;
}

/** Retries of a refused SFTP session or subsystem request (a server at its session limit). */
const SFTP_OPEN_RETRIES = 8;

const SFTP_STATUS: Record<number, string> = {
  2: "no such file or directory",
  3: "permission denied",
  4: "the server reported a failure (a directory in the way, or the disk is full?)",
};

/** SFTP status errors are about the file, not the connection: FILE_TRANSFER with the status. */
export function call<T>(
  fn: (cb: (err: Error | null | undefined, v?: T) => void) => void,
  what: string,
): Promise<T> {
  return new Promise((resolve, reject) =>
    fn((err, v) => {
      if (!err) return resolve(v as T);
      const code = (err as { code?: unknown }).code;
      const why = typeof code === "number" ? (SFTP_STATUS[code] ?? `SFTP status ${code}`) : "SFTP error";
      reject(
        new SmolVMError(`SFTP ${what} failed: ${why}. Check the path and its permissions.`, {
          code: "FILE_TRANSFER",
          cause: err,
          details: { sftpCode: code },
        }),
      );
    }),
  );
}

export async function withSftp<T>(
  conn: SessionHost,
  options: TransferOptions,
  what: string,
  body: (sftp: SFTPWrapper) => Promise<T>,
): Promise<T> {
  if (!conn.alive) throw new ConnectionLostError(`SSH connection to ${conn.host}:${conn.port} is closed.`);
  const deadline = new Deadline(options.timeoutMs ?? 120_000, options.signal, `SFTP ${what}`);
  let sftp: SFTPWrapper | undefined;
  try {
    conn.claimSession();
    // A refused session or subsystem request under load is waited out like a refused exec.
    for (let attempt = 0; ; attempt++) {
      try {
        sftp = await deadline.race(call<SFTPWrapper>((cb) => conn.client.sftp(cb), "session"));
        break;
      } catch (e) {
        if (!conn.alive || deadline.expired || attempt >= SFTP_OPEN_RETRIES) throw e;
        await sleep(Math.min(20 * 2 ** attempt, 250), deadline.signal);
      }
    }
    return await deadline.race(body(sftp));
  } catch (e) {
    if (!conn.alive && !(e instanceof ConnectionLostError)) {
      throw new ConnectionLostError(
        `SSH connection to ${conn.host}:${conn.port} was lost during SFTP ${what}.`,
        { cause: e },
      );
    }
    throw e;
  } finally {
    sftp?.end();
    deadline.dispose();
  }
}

function checkPath(p: string, name: string): void {
  if (typeof p !== "string" || p === "" || p.includes("\0")) {
    throw new ValidationError(`${name} must be a non-empty path without NUL bytes.`);
  }
}

/** Uploads a local file to `remotePath` (atomically replaced). */
export async function putFile(
  conn: SessionHost,
  localPath: string,
  remotePath: string,
  options: PutFileOptions = {},
): Promise<void> {
  checkPath(localPath, "localPath");
  checkPath(remotePath, "remotePath");
  const mode = options.mode ?? 0o644;
  await withSftp(conn, options, "upload", async (sftp) => {
    const tmp = `${remotePath}.smolvm-${process.pid}-${Date.now().toString(36)}.tmp`;
    try {
      await call<void>((cb) => sftp.fastPut(localPath, tmp, { mode }, cb), `upload to ${tmp}`);
      await call<void>((cb) => sftp.chmod(tmp, mode, cb), "chmod");
      await call<void>((cb) => sftp.ext_openssh_rename(tmp, remotePath, cb), `rename to ${remotePath}`);
    } catch (e) {
      await call<void>((cb) => sftp.unlink(tmp, cb), "cleanup").catch(() => {});
      throw e;
    }
  });
}

export interface GetFileOptions extends TransferOptions {
  /** Refuse (FILE_TOO_LARGE, partial file removed) a remote file larger than this many bytes. */
  maxBytes?: number;
}

/**
 * Downloads `remotePath` to a local file, safely against a hostile server: into a new 0600 temp
 * file beside `localPath`, renamed over it when complete (a symlink there is replaced, never
 * followed); on failure nothing partial is left; `maxBytes` bounds what the server can send.
 */
export async function getFile(
  conn: SessionHost,
  remotePath: string,
  localPath: string,
  options: GetFileOptions = {},
): Promise<void> {
  checkPath(localPath, "localPath");
  checkPath(remotePath, "remotePath");
  validateMaxBytes(options.maxBytes);
  await withSftp(conn, options, "download", (sftp) =>
    downloadTo(localPath, `remote file ${remotePath}`, options.maxBytes, async (write) => {
      const handle = await call<Buffer>((cb) => sftp.open(remotePath, "r", cb), `open of ${remotePath}`);
      try {
        const buf = Buffer.allocUnsafe(READ_CHUNK);
        let pos = 0;
        for (;;) {
          const n = await new Promise<number>((resolve, reject) =>
            sftp.read(handle, buf, 0, buf.length, pos, (err, bytesRead) => {
              // ssh2 reports end of file as an error with code 1 (SSH_FX_EOF) or as 0 bytes.
              if (err && (err as { code?: unknown }).code === 1) return resolve(0);
              if (err) return call<number>((cb) => cb(err), `read of ${remotePath}`).catch(reject);
              resolve(bytesRead);
            }),
          );
          if (n === 0) return;
          await write(Buffer.from(buf.subarray(0, n)));
          pos += n;
        }
      } finally {
        await call<void>((cb) => sftp.close(handle, cb), "close").catch(() => {});
      }
    }),
  );
}

const READ_CHUNK = 32 * 1024;
