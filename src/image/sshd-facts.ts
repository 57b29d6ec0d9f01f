/**
 * What an image's sshd does with its host key file, read from the binary's version string.
 * OpenSSH before 9.8 re-executes itself for every connection and that process loads the host
 * keys from their files, so a restored VM is re-keyed by writing the file. From 9.8 the listener
 * loads them once and hands them to sshd-session: the restore must restart sshd.
 */
import { readFile, stat } from "node:fs/promises";

/** True when `binary` (an sshd executable) is OpenSSH before 9.8; false when newer or unknown. */
export function sshdReadsHostKeyPerConnection(binary: Buffer): boolean {
  // The release string ("OpenSSH_9.2p1"): the binary also holds compat patterns ("OpenSSH_2.*").
  const m = /OpenSSH_(\d+)\.(\d+)p\d/.exec(binary.toString("latin1"));
  if (!m) return false;
  const major = Number(m[1]);
  return major < 9 || (major === 9 && Number(m[2]) < 8);
}

const known = new Map<string, boolean>();

/** sshdReadsHostKeyPerConnection for a file, remembered by path, size and mtime; false when unreadable. */
export async function sshdFileReadsHostKeyPerConnection(path: string): Promise<boolean> {
  try {
    const st = await stat(path);
    const key = `${path}\0${st.size}\0${st.mtimeMs}`;
    let v = known.get(key);
    if (v === undefined) {
      v = sshdReadsHostKeyPerConnection(await readFile(path));
      known.set(key, v);
    }
    return v;
  } catch {
    return false;
  }
}
