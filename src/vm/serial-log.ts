/**
 * Reading the guest's serial console log: the timestamped milestones /init prints
 * ("smolvm: <ms since boot> <name>") and a bounded tail for error messages. The guest is
 * untrusted, so parsing is strict and the tail is capped and stripped of control bytes.
 */
import { open, rename, writeFile } from "node:fs/promises";
import { sleep } from "../common/deadline.js";
import { printable } from "../common/guest-text.js";

/** Kept for modules that import it from here; the one implementation is common/guest-text.ts. */
export { printable };

const MILESTONE = /^smolvm: (\d{1,9}) ([a-z][a-z0-9-]{0,40})\r?$/gm;

/** milestone name → ms since guest boot (the first occurrence wins). */
export function serialMilestones(log: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const m of log.matchAll(MILESTONE)) {
    const name = m[2]!;
    if (!(name in out)) out[name] = Number(m[1]);
  }
  return out;
}

/** The last `bytes` of a file as printable text (empty when missing). */
/**
 * Waits until the guest's init logged milestone `name` in the serial log at `path` (create()
 * returns a VM whose network is configured, not just one whose agent answers).
 */
export async function waitForMilestone(
  path: string,
  name: string,
  deadline: { signal: AbortSignal },
): Promise<void> {
  for (;;) {
    const log = await tailFile(path, 65536);
    if (serialMilestones(log)[name] !== undefined) return;
    await sleep(10, deadline.signal);
  }
}

export async function tailFile(path: string, bytes = 2048): Promise<string> {
  return printable((await tailBytes(path, bytes)).toString("utf8"));
}

/** The serial log kept per VM: about this much of the newest console output (two files at most). */
export const SERIAL_LOG_MAX = 1 << 20;

/** The previous generation of a rotated serial log. */
export function rotatedPath(path: string): string {
  return `${path}.1`;
}

/**
 * Bounds the serial log a guest can grow at will: once it passes `max` bytes its last `max`
 * bytes move to `<path>.1` and the file is truncated (QEMU opened it with append=on, so it
 * keeps writing at the new end). Bytes the guest writes between the copy and the truncation are
 * lost. Best effort: a missing file or a failed rotation is not an error.
 */
export async function rotateSerialLog(path: string, max = SERIAL_LOG_MAX): Promise<void> {
  try {
    const fh = await open(path, "r+");
    try {
      const { size } = await fh.stat();
      if (size <= max) return;
      const buf = Buffer.allocUnsafe(max);
      const { bytesRead } = await fh.read(buf, 0, max, size - max);
      const tmp = `${rotatedPath(path)}.${process.pid}.tmp`;
      await writeFile(tmp, buf.subarray(0, bytesRead), { mode: 0o600 });
      await rename(tmp, rotatedPath(path));
      await fh.truncate(0);
    } finally {
      await fh.close();
    }
  } catch {
    // Nothing to rotate, or the VM directory is going away.
  }
}

/** The newest `max` bytes of the console (rotated generation included), as the guest wrote them. */
export async function readSerialLog(path: string, max = SERIAL_LOG_MAX): Promise<string> {
  await rotateSerialLog(path, max);
  const parts: Buffer[] = [];
  let want = max;
  for (const p of [path, rotatedPath(path)]) {
    if (want <= 0) break;
    const b = await tailBytes(p, want);
    parts.unshift(b);
    want -= b.length;
  }
  return Buffer.concat(parts).toString("utf8");
}

async function tailBytes(path: string, bytes: number): Promise<Buffer> {
  try {
    const fh = await open(path, "r");
    try {
      const { size } = await fh.stat();
      const start = Math.max(0, size - bytes);
      const buf = Buffer.alloc(size - start);
      const { bytesRead } = await fh.read(buf, 0, buf.length, start);
      return buf.subarray(0, bytesRead);
    } finally {
      await fh.close();
    }
  } catch {
    return Buffer.alloc(0);
  }
}
