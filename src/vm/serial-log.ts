/**
 * Reading the guest's serial console log: the timestamped milestones /init prints
 * ("smolvm: <ms since boot> <name>") and a bounded tail for error messages. The guest is
 * untrusted, so parsing is strict and the tail is capped and stripped of control bytes.
 */
import { open } from "node:fs/promises";
import { printable } from "../common/guest-text.js";

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
export async function tailFile(path: string, bytes = 2048): Promise<string> {
  try {
    const fh = await open(path, "r");
    try {
      const { size } = await fh.stat();
      const start = Math.max(0, size - bytes);
      const buf = Buffer.alloc(size - start);
      await fh.read(buf, 0, buf.length, start);
      return printable(buf.toString("utf8"));
    } finally {
      await fh.close();
    }
  } catch {
    return "";
  }
}
