/**
 * Remembers facts about host files (their sha256, the libraries `ldd` names for a binary) by
 * the files' identity: device, inode, size and mtime. Every `SmolVM.create` plans its image,
 * and the plan's fingerprint covers about 13 MiB of host OpenSSH files and three `ldd` runs:
 * about 70 ms per create, spent before QEMU starts. With the memo it is a stat per file.
 * An upgraded package replaces its files (new inode and mtime), so a stale entry never matches.
 */
import { createHash, randomBytes } from "node:crypto";
import { readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";

interface Entry {
  /** The files the value depends on, and their identities when it was made. */
  files: string[];
  ids: string[];
  value: string | string[];
}

const FILE_NAME = "host-files.json";

async function identity(path: string): Promise<string> {
  const s = await stat(path, { bigint: true });
  return `${s.dev}:${s.ino}:${s.size}:${s.mtimeNs}`;
}

export class FileMemo {
  private dirty = false;
  private constructor(
    private readonly path: string,
    private readonly entries: Record<string, Entry>,
  ) {}

  /** The memo in `cacheDir` (empty when missing or unreadable). */
  static async open(cacheDir: string): Promise<FileMemo> {
    const path = join(cacheDir, FILE_NAME);
    let entries: Record<string, Entry> = {};
    try {
      const parsed = JSON.parse(await readFile(path, "utf8")) as unknown;
      if (parsed && typeof parsed === "object" && !Array.isArray(parsed))
        entries = parsed as Record<string, Entry>;
    } catch {
      // First use, or a damaged memo: recompute everything.
    }
    return new FileMemo(path, entries);
  }

  /** sha256 (hex) of `path`'s bytes. */
  async sha256(path: string): Promise<string> {
    const v = await this.remember(`sha256:${path}`, [path], async () =>
      createHash("sha256")
        .update(await readFile(path))
        .digest("hex"),
    );
    return v as string;
  }

  /** `compute()`'s value, reused while every file in `dependsOn` keeps its identity. */
  async remember<T extends string | string[]>(
    key: string,
    dependsOn: readonly string[],
    compute: () => Promise<T>,
  ): Promise<T> {
    const files = [...dependsOn];
    const hit = this.entries[key];
    if (hit && Array.isArray(hit.ids) && JSON.stringify(hit.files) === JSON.stringify(files)) {
      const now = await Promise.all(files.map((p) => identity(p).catch(() => "")));
      if (now.every((id, i) => id === hit.ids[i])) return hit.value as T;
    }
    // Identities are taken before computing: a file replaced meanwhile is seen as changed.
    const ids = await Promise.all(files.map(identity));
    const value = await compute();
    this.entries[key] = { files, ids, value };
    this.dirty = true;
    return value;
  }

  /**
   * Writes the memo when it changed, atomically. Concurrent plans (in this process or others)
   * each write their own temp file; the last rename wins, and a lost or failed write (a
   * read-only cache, say) only costs a recompute next time, so it never fails the caller.
   */
  async save(): Promise<void> {
    if (!this.dirty) return;
    const tmp = `${this.path}.${process.pid}-${randomBytes(4).toString("hex")}.tmp`;
    try {
      await writeFile(tmp, JSON.stringify(this.entries), { mode: 0o644 });
      await rename(tmp, this.path);
      this.dirty = false;
    } catch {
      await rm(tmp, { force: true }).catch(() => {});
    }
  }
}
