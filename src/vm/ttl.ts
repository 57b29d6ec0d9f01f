/**
 * VM lifetimes (`ttlMs`): a small detached Node process per data dir, the reaper, deletes VMs
 * whose `expiresAt` passed, so a VM expires even when the process that created it is gone. It
 * holds `<dataDir>/reaper.pid` (one reaper per data dir), polls the store every 250 ms, and
 * exits once no VM has a TTL (it is started again by the next create/setTtl with one).
 */
import { spawn } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { pidAlive } from "../common/pid.js";
import { ValidationError } from "../errors.js";

const POLL_MS = 250;
/** Longest TTL accepted: about 10 years. */
const MAX_TTL_MS = 10 * 365 * 24 * 3600 * 1000;

export function validateTtl(ttlMs: number | null | undefined, name = "ttlMs"): void {
  if (ttlMs === undefined || ttlMs === null) return;
  if (typeof ttlMs !== "number" || !Number.isFinite(ttlMs) || ttlMs <= 0 || ttlMs > MAX_TTL_MS) {
    throw new ValidationError(
      `${name} must be a positive number of milliseconds (at most ~10 years), got ${String(ttlMs)}.`,
    );
  }
}

/** Labels: 1-63 character keys of letters, digits, '.', '_', '-', '/'; values up to 255 characters. */
export function validateLabels(labels: Record<string, string> | undefined): void {
  if (labels === undefined) return;
  if (typeof labels !== "object" || labels === null || Array.isArray(labels)) {
    throw new ValidationError("labels must be an object of string keys to string values.");
  }
  const entries = Object.entries(labels);
  if (entries.length > 64) throw new ValidationError("a VM takes at most 64 labels.");
  for (const [k, v] of entries) {
    if (!/^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$/.test(k)) {
      throw new ValidationError(
        `label key ${JSON.stringify(k.slice(0, 80))} is invalid: use 1-63 letters, digits, '.', '_', '-', '/'.`,
      );
    }
    if (typeof v !== "string" || v.length > 255 || v.includes("\0")) {
      throw new ValidationError(`label ${k} must have a string value of at most 255 characters.`);
    }
  }
}

/** Parses "10m", "90s", "2h", "1d" or plain milliseconds (the CLI's --ttl). */
export function parseDuration(text: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$/.exec(text.trim());
  if (!m)
    throw new ValidationError(`expected a duration like 90s, 10m, 2h or 1d, got ${JSON.stringify(text)}.`);
  const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[m[2] ?? "ms"]!;
  return Math.round(Number(m[1]) * unit);
}

function lockPath(dataDir: string): string {
  return join(dataDir, "reaper.pid");
}

function reaperHolder(dataDir: string): number | undefined {
  try {
    const pid = Number.parseInt(readFileSync(lockPath(dataDir), "utf8"), 10);
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** Starts the data dir's reaper unless one is running. Never throws: a TTL is best effort. */
export function ensureReaper(dataDir: string): void {
  const holder = reaperHolder(dataDir);
  if (holder !== undefined && pidAlive(holder)) return;
  const here = fileURLToPath(import.meta.url);
  const fromSource = here.endsWith(".ts");
  const main = join(here, "..", `reaper-main.${fromSource ? "ts" : "js"}`);
  try {
    const child = spawn(process.execPath, [...(fromSource ? ["--import", "tsx"] : []), main, dataDir], {
      detached: true,
      stdio: "ignore",
      env: { ...process.env, SMOLVM_DATA_DIR: dataDir },
    });
    child.on("error", () => {});
    child.unref();
  } catch {
    // best effort: the next create or setTtl tries again
  }
}

/** Takes the reaper lock for this process; false when another live reaper holds it. */
export function takeReaperLock(dataDir: string): boolean {
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      writeFileSync(lockPath(dataDir), `${process.pid}\n`, { flag: "wx", mode: 0o600 });
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") return false;
    }
    const holder = reaperHolder(dataDir);
    if (holder !== undefined && pidAlive(holder)) return false;
    rmSync(lockPath(dataDir), { force: true });
  }
  return false;
}

export function releaseReaperLock(dataDir: string): void {
  if (reaperHolder(dataDir) === process.pid) rmSync(lockPath(dataDir), { force: true });
}

export const REAPER_POLL_MS = POLL_MS;
