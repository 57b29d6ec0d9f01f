/**
 * `vm.files`: a filesystem API over the guest agent's file operations, or over SFTP on VMs
 * that only have SSH. Binary-safe and streamed both ways (a read hands chunks on only as the
 * consumer takes them; a write sends only what the guest granted), atomic writes (temp file,
 * fsync, rename), paths validated the same way on both transports.
 */
import { randomBytes } from "node:crypto";
import { posix } from "node:path";
import { Readable } from "node:stream";
import type { SFTPWrapper } from "ssh2";
import { AgentChannel } from "../channel/agent-channel.js";
import { fileErrorCode } from "../channel/agent-errors.js";
import {
  type AgentWatch,
  type FileEntry,
  type FileType,
  fsOp,
  listDir,
  statPath,
  type WatchEvent,
  watchDir,
} from "../channel/agent-fs.js";
import { MAX_PAYLOAD } from "../channel/agent-protocol.js";
import { guestPathProblem, validateGuestPath } from "../channel/guest-path.js";
import { SshChannel } from "../channel/ssh-channel.js";
import { type CallOptions, type CommChannel, DEFAULT_FILE_TIMEOUT_MS } from "../channel/types.js";
import { validateTimeout } from "../command.js";
import { Deadline } from "../common/deadline.js";
import { CommandExecutionUnavailableError, SmolVMError, ValidationError } from "../errors.js";
import { call, withSftp } from "../ssh/sftp.js";

export type { FileEntry, FileType, WatchEvent };

/** What the facade lends the namespaces: its channel and its error explanation. */
export interface ChannelAccess {
  channel(): Promise<CommChannel>;
  explain<T>(fn: () => Promise<T>): Promise<T>;
  readonly name: string;
}

export interface ReadOptions extends CallOptions {
  /** "utf8" (default) returns a string, "buffer" the exact bytes. */
  encoding?: "utf8" | "buffer";
  /** Refuse files larger than this (read them with readStream). Default 256 MiB. */
  maxBytes?: number;
}

export interface WriteOptions extends CallOptions {
  /** Permission bits of the file, default 0o644. */
  mode?: number;
  /** Create missing parent directories (0o755). Default true. */
  mkdirs?: boolean;
}

export interface Watcher {
  /** Stops the watch. Idempotent. */
  close(): Promise<void>;
  /** Resolves when closed; rejects (ConnectionLostError, ...) when the watch ended on its own. */
  readonly ended: Promise<void>;
}

const DEFAULT_OP_TIMEOUT_MS = 30_000;
const DEFAULT_MAX_READ = 256 << 20;

/** Like validateGuestPath, but "/" is allowed (for list, stat, exists and watch). */
function validateAnyPath(path: string): void {
  if (path === "/") return;
  if (guestPathProblem(path)) validateGuestPath(path);
}

function chunksOf(
  data: string | Buffer | Uint8Array | Readable | AsyncIterable<unknown>,
): () => AsyncIterable<Buffer> {
  if (typeof data === "string" || data instanceof Uint8Array) {
    const buf =
      typeof data === "string"
        ? Buffer.from(data, "utf8")
        : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    return async function* () {
      for (let off = 0; off < buf.length; off += MAX_PAYLOAD) yield buf.subarray(off, off + MAX_PAYLOAD);
    };
  }
  if (data && typeof (data as AsyncIterable<unknown>)[Symbol.asyncIterator] === "function") {
    let used = false;
    return async function* () {
      if (used) throw new ValidationError("a stream can be written once: pass a fresh Readable.");
      used = true;
      for await (const c of data as AsyncIterable<unknown>) {
        if (typeof c === "string") yield Buffer.from(c, "utf8");
        else if (c instanceof Uint8Array) yield Buffer.from(c.buffer, c.byteOffset, c.byteLength);
        else throw new ValidationError("files.write streams must yield Buffers or strings.");
      }
    };
  }
  throw new ValidationError("files.write data must be a string, a Buffer, a Uint8Array or a Readable.");
}

export class VmFiles {
  constructor(private readonly access: ChannelAccess) {}

  /** Reads a whole file: a string (utf8, default) or a Buffer. */
  read(path: string, options?: ReadOptions & { encoding?: "utf8" }): Promise<string>;
  read(path: string, options: ReadOptions & { encoding: "buffer" }): Promise<Buffer>;
  async read(path: string, options: ReadOptions = {}): Promise<string | Buffer> {
    const max = options.maxBytes ?? DEFAULT_MAX_READ;
    const parts: Buffer[] = [];
    let size = 0;
    await this.readInto(path, options, (d) => {
      size += d.length;
      if (size > max) {
        throw new SmolVMError(
          `${path} is larger than maxBytes (${max}): raise maxBytes or read it with vm.files.readStream().`,
          { code: "FILE_TOO_LARGE", details: { path, maxBytes: max } },
        );
      }
      parts.push(d);
    });
    const buf = parts.length === 1 ? parts[0]! : Buffer.concat(parts, size);
    return options.encoding === "buffer" ? buf : buf.toString("utf8");
  }

  /**
   * Streams a file: the guest sends more only as the returned Readable is consumed, so memory
   * stays bounded whatever the size. Errors surface as the stream's 'error'.
   */
  readStream(path: string, options: CallOptions = {}): Readable {
    const queue: Array<Buffer | null | Error> = [];
    let wake: (() => void) | undefined;
    let taken: (() => void) | undefined;
    const push = (v: Buffer | null | Error) => {
      queue.push(v);
      wake?.();
    };
    let started = false;
    const start = () => {
      started = true;
      this.readInto(path, options, (d) => {
        push(d);
        // Hold the credit until the consumer took this chunk.
        return new Promise<void>((r) => {
          taken = r;
        });
      }).then(
        () => push(null),
        (e) => push(e as Error),
      );
    };
    return Readable.from(
      (async function* () {
        if (!started) start();
        for (;;) {
          const v = queue.shift();
          if (v === undefined) {
            await new Promise<void>((r) => {
              wake = r;
            });
            wake = undefined;
            continue;
          }
          if (v === null) return;
          if (v instanceof Error) throw v;
          yield v;
          const t = taken;
          taken = undefined;
          t?.();
        }
      })(),
      { objectMode: false, highWaterMark: MAX_PAYLOAD },
    );
  }

  /**
   * Writes a file atomically (temp file beside it, fsync, rename): readers never see half of it.
   * `data` may be a string, a Buffer or a Readable, which is streamed without buffering it whole.
   */
  async write(
    path: string,
    data: string | Buffer | Uint8Array | Readable | AsyncIterable<Buffer>,
    options: WriteOptions = {},
  ): Promise<void> {
    validateGuestPath(path);
    const mode = options.mode ?? 0o644;
    if (!Number.isInteger(mode) || mode < 0 || mode > 0o7777)
      throw new ValidationError("mode must be 0..0o7777.");
    validateTimeout("timeoutMs", options.timeoutMs);
    const source = chunksOf(data);
    const ch = await this.access.channel();
    await this.access.explain(async () => {
      if (ch instanceof AgentChannel) {
        await ch.putFrom(path, source, { ...options, mode, mkdirs: options.mkdirs !== false }).catch((e) => {
          throw mapAgentFileError(e);
        });
        return;
      }
      await this.sftp(ch, options, DEFAULT_FILE_TIMEOUT_MS, `write of ${path}`, (sftp) =>
        sftpWrite(sftp, path, source, mode, options.mkdirs !== false),
      );
    });
  }

  /** Entries of a directory (depth 1 by default; deeper levels descend into real directories only). */
  async list(path: string, options: CallOptions & { depth?: number } = {}): Promise<FileEntry[]> {
    validateAnyPath(path);
    const depth = options.depth ?? 1;
    if (!Number.isInteger(depth) || depth < 1 || depth > 16)
      throw new ValidationError("depth must be 1..16.");
    return this.op(
      path,
      options,
      "list",
      (ch, d) => listDir(ch, path, depth, d),
      (sftp) => sftpList(sftp, path, depth),
    );
  }

  /** The entry itself (a symlink is described, not followed). */
  async stat(path: string, options: CallOptions = {}): Promise<FileEntry> {
    validateAnyPath(path);
    return this.op(
      path,
      options,
      "stat",
      (ch, d) => statPath(ch, path, d),
      (sftp) => sftpStat(sftp, path),
    );
  }

  /** True when something (file, directory, symlink, ...) exists at path. */
  async exists(path: string, options: CallOptions = {}): Promise<boolean> {
    try {
      await this.stat(path, options);
      return true;
    } catch (e) {
      if (e instanceof SmolVMError && (e.code === "FILE_NOT_FOUND" || e.code === "NOT_A_DIRECTORY"))
        return false;
      throw e;
    }
  }

  /** Creates a directory; `recursive` creates parents and accepts an existing directory. */
  async mkdir(path: string, options: CallOptions & { recursive?: boolean } = {}): Promise<void> {
    validateGuestPath(path);
    await this.op(
      path,
      options,
      "mkdir",
      (ch, d) => fsOp(ch, "mkdir", path, { recursive: options.recursive }, d),
      (sftp) => sftpMkdir(sftp, path, !!options.recursive),
    );
  }

  /** Removes a file or an empty directory; `recursive` removes a tree (symlinks are not followed). */
  async remove(path: string, options: CallOptions & { recursive?: boolean } = {}): Promise<void> {
    validateGuestPath(path);
    await this.op(
      path,
      options,
      "remove",
      (ch, d) => fsOp(ch, "remove", path, { recursive: options.recursive }, d),
      (sftp) => sftpRemove(sftp, path, !!options.recursive),
    );
  }

  /** Renames (moves) within the guest, replacing `to` if it is a file. */
  async rename(from: string, to: string, options: CallOptions = {}): Promise<void> {
    validateGuestPath(from);
    validateGuestPath(to);
    await this.op(
      from,
      options,
      "rename",
      (ch, d) => fsOp(ch, "rename", from, { to }, d),
      (sftp) =>
        sftpCall(() => call<void>((cb) => sftp.ext_openssh_rename(from, to, cb), `rename of ${from}`)),
    );
  }

  /**
   * Watches a directory with inotify in the guest; bursts are coalesced (one event per type and
   * path within 50 ms). The watch ends with a typed error on `ended` if the agent connection is
   * lost. Needs the guest agent.
   */
  async watch(
    path: string,
    onEvent: (ev: WatchEvent) => void,
    options: CallOptions & { recursive?: boolean } = {},
  ): Promise<Watcher> {
    validateAnyPath(path);
    if (typeof onEvent !== "function") throw new ValidationError("watch needs an onEvent callback.");
    validateTimeout("timeoutMs", options.timeoutMs);
    const ch = await this.access.channel();
    if (!(ch instanceof AgentChannel)) {
      throw new CommandExecutionUnavailableError(
        `VM ${this.access.name} is reached over SSH, and file watches need the guest agent.`,
        'Create the VM from an image with the agent (the default "tiny" has it) and commChannel "agent" or "auto".',
      );
    }
    const d = new Deadline(options.timeoutMs ?? DEFAULT_OP_TIMEOUT_MS, options.signal, `watch of ${path}`);
    try {
      const w: AgentWatch = await this.access.explain(() =>
        watchDir(ch, path, !!options.recursive, onEvent, d),
      );
      return { close: () => w.close(), ended: w.ended };
    } finally {
      d.dispose();
    }
  }

  // ------------------------------------------------------------ internals

  private async readInto(
    path: string,
    options: ReadOptions,
    sink: (d: Buffer) => Promise<void> | void,
  ): Promise<void> {
    validateGuestPath(path);
    validateTimeout("timeoutMs", options.timeoutMs);
    const ch = await this.access.channel();
    await this.access
      .explain(async () => {
        if (ch instanceof AgentChannel) {
          await ch.getTo(path, sink, options);
          return;
        }
        await this.sftp(ch, options, DEFAULT_FILE_TIMEOUT_MS, `read of ${path}`, (sftp) =>
          sftpRead(sftp, path, sink),
        );
      })
      .catch((e) => {
        throw mapAgentFileError(e);
      });
  }

  private async op<T>(
    path: string,
    options: CallOptions,
    what: string,
    agent: (ch: AgentChannel, d: Deadline) => Promise<T>,
    sftp: (s: SFTPWrapper) => Promise<T>,
  ): Promise<T> {
    validateTimeout("timeoutMs", options.timeoutMs);
    const ch = await this.access.channel();
    return this.access.explain(async () => {
      if (ch instanceof AgentChannel) {
        const d = new Deadline(
          options.timeoutMs ?? DEFAULT_OP_TIMEOUT_MS,
          options.signal,
          `${what} of ${path}`,
        );
        try {
          return await agent(ch, d);
        } finally {
          d.dispose();
        }
      }
      return this.sftp(ch, options, DEFAULT_OP_TIMEOUT_MS, `${what} of ${path}`, sftp);
    });
  }

  private async sftp<T>(
    ch: CommChannel,
    options: CallOptions,
    defaultMs: number,
    what: string,
    body: (s: SFTPWrapper) => Promise<T>,
  ): Promise<T> {
    if (!(ch instanceof SshChannel)) throw new SmolVMError(`no file transport for ${what}.`);
    const d = new Deadline(options.timeoutMs ?? defaultMs, options.signal, what);
    try {
      const conn = await d.race(ch.client.connection({ signal: d.signal }));
      return await withSftp(conn, { timeoutMs: d.remainingMs, signal: d.signal }, what, body);
    } finally {
      d.dispose();
    }
  }
}

/** PUT/GET errors carry the agent's errno: give them the same codes as the other file calls. */
function mapAgentFileError(e: unknown): unknown {
  if (e instanceof SmolVMError && e.code === "FILE_TRANSFER" && typeof e.details.errno === "number") {
    const code = fileErrorCode(e.details.errno);
    if (code !== "FILE_TRANSFER") return new SmolVMError(e.message, { code, cause: e, details: e.details });
  }
  return e;
}

// ---------------------------------------------------------------- SFTP

const S_IFMT = 0o170000;

function sftpType(mode: number): FileType {
  const t = mode & S_IFMT;
  return t === 0o100000 ? "file" : t === 0o040000 ? "dir" : t === 0o120000 ? "symlink" : "other";
}

/** SFTP status 2 is "no such file": the same code the agent path gives. */
function mapSftp(e: unknown): unknown {
  const code = (e as SmolVMError)?.details?.sftpCode ?? (e as { code?: unknown })?.code;
  if (code === 2 && e instanceof Error) {
    return new SmolVMError(e.message, { code: fileErrorCode(2), cause: e, details: { sftpCode: 2 } });
  }
  return e;
}

async function sftpCall<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    throw mapSftp(e);
  }
}

interface SftpAttrs {
  mode: number;
  size: number;
  mtime: number;
}

async function entryOf(sftp: SFTPWrapper, path: string, a: SftpAttrs): Promise<FileEntry> {
  const type = sftpType(a.mode);
  const e: FileEntry = {
    name: path === "/" ? "/" : posix.basename(path),
    path,
    type,
    size: a.size,
    mode: a.mode & 0o7777,
    mtimeMs: a.mtime * 1000,
  };
  if (type === "symlink")
    e.target = await call<string>((cb) => sftp.readlink(path, cb), "readlink").catch(() => "");
  return e;
}

/** Reads with explicit requests (one at a time, 64 KiB): the consumer's pace sets the pace. */
async function sftpRead(
  sftp: SFTPWrapper,
  path: string,
  sink: (d: Buffer) => Promise<void> | void,
): Promise<void> {
  const handle = await sftpCall(() => call<Buffer>((cb) => sftp.open(path, "r", cb), `open of ${path}`));
  try {
    let pos = 0;
    for (;;) {
      const buf = Buffer.allocUnsafe(65_536);
      const n = await new Promise<number>((resolve, reject) =>
        sftp.read(handle, buf, 0, buf.length, pos, (err, bytesRead) => {
          if (err && (err as { code?: unknown }).code === 1)
            resolve(0); // EOF
          else if (err) reject(err);
          else resolve(bytesRead);
        }),
      );
      if (n === 0) return;
      pos += n;
      await sink(buf.subarray(0, n));
    }
  } finally {
    await call<void>((cb) => sftp.close(handle, cb), "close").catch(() => {});
  }
}

async function sftpStat(sftp: SFTPWrapper, path: string): Promise<FileEntry> {
  const a = await sftpCall(() => call<SftpAttrs>((cb) => sftp.lstat(path, cb), `stat of ${path}`));
  return entryOf(sftp, path, a);
}

async function sftpList(sftp: SFTPWrapper, path: string, depth: number): Promise<FileEntry[]> {
  const out: FileEntry[] = [];
  const items = await sftpCall(() =>
    call<Array<{ filename: string; attrs: SftpAttrs }>>((cb) => sftp.readdir(path, cb), `list of ${path}`),
  );
  for (const it of items) {
    if (it.filename === "." || it.filename === "..") continue;
    const child = path === "/" ? `/${it.filename}` : `${path}/${it.filename}`;
    const e = await entryOf(sftp, child, it.attrs);
    out.push(e);
    if (depth > 1 && e.type === "dir") out.push(...(await sftpList(sftp, child, depth - 1)));
  }
  return out;
}

async function sftpMkdir(sftp: SFTPWrapper, path: string, recursive: boolean): Promise<void> {
  if (recursive) {
    const parts = path.split("/").filter(Boolean);
    for (let i = 1; i <= parts.length; i++) {
      const p = `/${parts.slice(0, i).join("/")}`;
      const a = await call<SftpAttrs>((cb) => sftp.stat(p, cb), "stat").catch(() => undefined);
      if (a && sftpType(a.mode) === "dir") continue;
      await sftpCall(() => call<void>((cb) => sftp.mkdir(p, { mode: 0o755 }, cb), `mkdir of ${p}`));
    }
    return;
  }
  await sftpCall(() => call<void>((cb) => sftp.mkdir(path, { mode: 0o755 }, cb), `mkdir of ${path}`));
}

async function sftpRemove(sftp: SFTPWrapper, path: string, recursive: boolean): Promise<void> {
  const a = await sftpCall(() => call<SftpAttrs>((cb) => sftp.lstat(path, cb), `stat of ${path}`));
  if (sftpType(a.mode) !== "dir") {
    await sftpCall(() => call<void>((cb) => sftp.unlink(path, cb), `remove of ${path}`));
    return;
  }
  if (recursive) {
    for (const e of await sftpList(sftp, path, 1)) await sftpRemove(sftp, e.path, true);
  }
  await sftpCall(() => call<void>((cb) => sftp.rmdir(path, cb), `remove of ${path}`));
}

async function sftpWrite(
  sftp: SFTPWrapper,
  path: string,
  source: () => AsyncIterable<Buffer>,
  mode: number,
  mkdirs: boolean,
): Promise<void> {
  const dir = posix.dirname(path);
  if (mkdirs && dir !== "/") await sftpMkdir(sftp, dir, true);
  const tmp = `${dir === "/" ? "" : dir}/.${posix.basename(path)}.smolvm-${randomBytes(4).toString("hex")}`;
  const handle = await sftpCall(() =>
    call<Buffer>((cb) => sftp.open(tmp, "w", { mode }, cb), `open of ${tmp}`),
  );
  let pos = 0;
  try {
    for await (const chunk of source()) {
      for (let off = 0; off < chunk.length; ) {
        const n = Math.min(32_768, chunk.length - off);
        await call<void>(
          (cb) => sftp.write(handle, chunk, off, n, pos, (err) => cb(err)),
          `write of ${path}`,
        );
        off += n;
        pos += n;
      }
    }
    await call<void>((cb) => sftp.ext_openssh_fsync(handle, (err) => cb(err)), "fsync").catch(() => {});
    await call<void>((cb) => sftp.close(handle, cb), "close");
    await call<void>((cb) => sftp.chmod(tmp, mode, cb), "chmod");
    await sftpCall(() => call<void>((cb) => sftp.ext_openssh_rename(tmp, path, cb), `rename to ${path}`));
  } catch (e) {
    await call<void>((cb) => sftp.close(handle, cb), "close").catch(() => {});
    await call<void>((cb) => sftp.unlink(tmp, cb), "cleanup").catch(() => {});
    throw e;
  }
}
