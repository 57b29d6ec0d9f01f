/**
 * VM templates: the first create() for a given image, size, accelerator and QEMU boots cold and
 * leaves a snapshot of itself (snapshot.ts) under `<dataDir>/templates/<key>/`; later creates
 * restore it instead of booting. Concurrent creates share one build through a lock file; a
 * template that does not match (other fingerprint, missing or damaged file) is removed and built
 * again, never used.
 */
import { createHash } from "node:crypto";
import { closeSync, existsSync, openSync, readFileSync, unlinkSync, writeSync } from "node:fs";
import { rm } from "node:fs/promises";
import { join } from "node:path";
import { type Deadline, sleep } from "../common/deadline.js";
import { pidAlive } from "../common/pid.js";
import { DEVICE_MODEL } from "./qemu.js";
import { readSnapshotMeta, type SnapshotMeta } from "./snapshot.js";

export interface TemplateKeyParts {
  imageFingerprint: string;
  memoryMib: number;
  vcpus: number;
  accel: string;
  qemuVersion: string;
  diskMib?: number;
}

export function templateKey(p: TemplateKeyParts): string {
  const h = createHash("sha256").update(
    JSON.stringify([p.imageFingerprint, p.memoryMib, p.vcpus, p.accel, p.qemuVersion, p.diskMib ?? null]),
  );
  return h.digest("hex").slice(0, 24);
}

export function templateDir(dataDir: string, key: string): string {
  return join(dataDir, "templates", key);
}

/** A usable template for `key`, or undefined; a damaged or mismatched one is removed. */
export async function loadTemplate(dir: string, imageFingerprint: string): Promise<SnapshotMeta | undefined> {
  if (!existsSync(dir)) return undefined;
  try {
    const meta = await readSnapshotMeta(dir);
    // One of an older smolvm's devices still loads, but is rebuilt to get this version's.
    if (meta.config.imageFingerprint === imageFingerprint && meta.config.deviceModel === DEVICE_MODEL)
      return meta;
  } catch {
    // damaged: rebuilt below
  }
  await rm(dir, { recursive: true, force: true });
  return undefined;
}

/** Tries to become the builder of a template; false while another live process builds it. */
export function tryTemplateLock(dir: string): (() => void) | undefined {
  const lock = `${dir}.lock`;
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fd = openSync(lock, "wx", 0o600);
      writeSync(fd, String(process.pid));
      closeSync(fd);
      return () => {
        try {
          unlinkSync(lock);
        } catch {
          // already gone
        }
      };
    } catch {
      const holder = Number.parseInt(safeRead(lock), 10);
      if (Number.isInteger(holder) && holder > 0 && pidAlive(holder)) return undefined;
      try {
        unlinkSync(lock); // a dead builder's lock
      } catch {
        // raced with another taker
      }
    }
  }
  return undefined;
}

function safeRead(p: string): string {
  try {
    return readFileSync(p, "utf8");
  } catch {
    return "";
  }
}

/**
 * Waits while another process builds the template: resolves with it once built, or undefined
 * when the builder gave up (its lock is gone without a template).
 */
export async function awaitTemplate(
  dir: string,
  imageFingerprint: string,
  deadline: Deadline,
): Promise<SnapshotMeta | undefined> {
  for (;;) {
    if (existsSync(dir)) return loadTemplate(dir, imageFingerprint);
    if (!existsSync(`${dir}.lock`)) return undefined;
    await sleep(25, deadline.signal);
  }
}
