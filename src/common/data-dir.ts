/**
 * The data dir holds VM secrets (agent secrets, SSH keys, state.db): it is private to its owner
 * whichever command creates it first. Every entry point that writes there calls
 * `ensureDataDir` before anything else: it creates the dir 0700, tightens a looser one we own,
 * and refuses one owned by another user (that user could read or swap everything in it).
 */
import { chmodSync, closeSync, existsSync, mkdirSync, openSync, statSync } from "node:fs";
import { SmolVMError } from "../errors.js";

export function ensureDataDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = statSync(dir);
  const uid = process.getuid?.();
  if (uid !== undefined && st.uid !== uid) {
    throw new SmolVMError(
      `the smolvm data dir ${dir} belongs to uid ${st.uid}, not to this user (uid ${uid}): it holds VM secrets, so it is not shared. Use your own (SMOLVM_DATA_DIR) or run as its owner.`,
      { code: "DATA_DIR_NOT_OWNED", details: { dir, owner: st.uid, uid } },
    );
  }
  if (!st.isDirectory()) {
    throw new SmolVMError(`the smolvm data dir ${dir} is not a directory.`, {
      code: "DATA_DIR_NOT_OWNED",
      details: { dir },
    });
  }
  if ((st.mode & 0o077) !== 0) chmodSync(dir, 0o700);
}

/**
 * Creates `path` 0600 if absent and tightens it (and the listed companions, e.g. SQLite's -wal
 * and -shm, which SQLite creates with the main file's mode) if they exist with looser modes.
 */
export function ensurePrivateFile(path: string, companions: string[] = []): void {
  closeSync(openSync(path, "a", 0o600));
  for (const p of [path, ...companions]) {
    if (!existsSync(p)) continue;
    if ((statSync(p).mode & 0o077) !== 0) chmodSync(p, 0o600);
  }
}
