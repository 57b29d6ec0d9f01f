/**
 * A newc ("070701") cpio writer: the format the Linux kernel unpacks as an initramfs. Written
 * here rather than shelling out to cpio so that ownership (root:root), modes and timestamps are
 * exact without root or fakeroot, and so the per-VM config archive is built in memory.
 *
 * The kernel accepts several archives concatenated (each ends with a TRAILER!!! record; zero
 * padding between them is skipped), which is how a per-VM config reaches the guest through
 * QEMU's single `-initrd` file: base initramfs + config cpio.
 */
import { constants } from "node:fs";
import { appendFile, chmod, copyFile, rename, rm, stat } from "node:fs/promises";
import { ValidationError } from "../errors.js";

export type CpioEntry =
  | { type: "file"; path: string; mode: number; data: Buffer | string }
  | { type: "dir"; path: string; mode: number }
  | { type: "symlink"; path: string; target: string };

const S_IFREG = 0o100000;
const S_IFDIR = 0o040000;
const S_IFLNK = 0o120000;

function normalizePath(path: string): string {
  if (typeof path !== "string" || path.includes("\0")) {
    throw new ValidationError(`cpio entry path ${JSON.stringify(path)} is not a valid path.`);
  }
  const parts = path.split("/").filter((p) => p !== "" && p !== ".");
  if (parts.length === 0 || parts.some((p) => p === "..")) {
    throw new ValidationError(
      `cpio entry path ${JSON.stringify(path)} must name a file below the archive root, without "..".`,
    );
  }
  return parts.join("/");
}

function checkMode(path: string, mode: number): void {
  if (!Number.isInteger(mode) || mode < 0 || mode > 0o7777) {
    throw new ValidationError(`cpio entry ${path} has mode ${mode}; give permission bits only (0..0o7777).`);
  }
}

function hex8(n: number): string {
  return n.toString(16).padStart(8, "0");
}

const pad4 = (n: number) => (4 - (n % 4)) % 4;

function record(ino: number, mode: number, nlink: number, mtime: number, name: string, data: Buffer): Buffer {
  const nameBuf = Buffer.from(`${name}\0`, "utf8");
  const header =
    "070701" +
    hex8(ino) +
    hex8(mode) +
    hex8(0) + // uid: root
    hex8(0) + // gid: root
    hex8(nlink) +
    hex8(mtime) +
    hex8(data.length) +
    hex8(0) +
    hex8(0) +
    hex8(0) +
    hex8(0) +
    hex8(nameBuf.length) +
    hex8(0);
  const headLen = 110 + nameBuf.length;
  return Buffer.concat([
    Buffer.from(header, "ascii"),
    nameBuf,
    Buffer.alloc(pad4(headLen)),
    data,
    Buffer.alloc(pad4(data.length)),
  ]);
}

/**
 * Serializes entries, in order, as one newc archive owned by root. Parent directories are not
 * added implicitly; a later entry for the same path overrides an earlier one when unpacked.
 */
export function writeCpio(entries: readonly CpioEntry[], options: { mtime?: number } = {}): Buffer {
  const mtime = options.mtime ?? 0;
  const chunks: Buffer[] = [];
  let ino = 1;
  for (const e of entries) {
    const path = normalizePath(e.path);
    if (e.type === "file") {
      checkMode(path, e.mode);
      const data = typeof e.data === "string" ? Buffer.from(e.data, "utf8") : e.data;
      chunks.push(record(ino++, S_IFREG | e.mode, 1, mtime, path, data));
    } else if (e.type === "dir") {
      checkMode(path, e.mode);
      chunks.push(record(ino++, S_IFDIR | e.mode, 2, mtime, path, Buffer.alloc(0)));
    } else {
      if (!e.target || e.target.includes("\0")) {
        throw new ValidationError(`cpio symlink ${path} needs a non-empty target without NUL bytes.`);
      }
      chunks.push(record(ino++, S_IFLNK | 0o777, 1, mtime, path, Buffer.from(e.target, "utf8")));
    }
  }
  chunks.push(record(0, 0, 1, 0, "TRAILER!!!", Buffer.alloc(0)));
  return Buffer.concat(chunks);
}

/** Adds a 0755 directory entry for every missing parent of the given entries (before them). */
export function withParentDirs(entries: readonly CpioEntry[], dirMode = 0o755): CpioEntry[] {
  const seen = new Set<string>();
  for (const e of entries) if (e.type === "dir") seen.add(normalizePath(e.path));
  const out: CpioEntry[] = [];
  for (const e of entries) {
    const parts = normalizePath(e.path).split("/");
    for (let i = 1; i < parts.length; i++) {
      const dir = parts.slice(0, i).join("/");
      if (!seen.has(dir)) {
        seen.add(dir);
        out.push({ type: "dir", path: dir, mode: dirMode });
      }
    }
    out.push(e);
  }
  return out;
}

export interface VmConfigFile {
  /** Path inside the guest, e.g. "smolvm/config/authorized_keys" (leading "/" allowed). */
  path: string;
  /** Permission bits, e.g. 0o600. */
  mode: number;
  data: Buffer | string;
}

/**
 * The per-VM config archive (host key, authorized_keys, agent secret, env), appended to the
 * image's base initramfs by composeInitrd. Parent directories are created 0700: the archive
 * carries secrets.
 */
export function buildVmConfigCpio(files: readonly VmConfigFile[]): Buffer {
  return writeCpio(
    withParentDirs(
      files.map((f) => ({ type: "file" as const, path: f.path, mode: f.mode, data: f.data })),
      0o700,
    ),
  );
}

/**
 * Writes base initramfs + config archive to outPath (mode 0600, atomically). The base is copied
 * in the kernel (copy_file_range, or a reflink where the filesystem has them): streaming its
 * 19 MiB through Node took about 60 ms of every create. The copy is made 0600 before the
 * secrets are appended; the config archive starts on a 4-byte boundary as the kernel's unpacker
 * expects.
 */
export async function composeInitrd(
  baseInitrdPath: string,
  configCpio: Buffer,
  outPath: string,
): Promise<void> {
  const { size } = await stat(baseInitrdPath);
  const tmp = `${outPath}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`;
  try {
    await copyFile(baseInitrdPath, tmp, constants.COPYFILE_FICLONE);
    await chmod(tmp, 0o600);
    await appendFile(tmp, Buffer.concat([Buffer.alloc(pad4(size)), configCpio]));
    await rename(tmp, outPath);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}
