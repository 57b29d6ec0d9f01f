/**
 * A cross-process build lock: a file created with O_EXCL holding the owner's pid. A lock whose
 * pid is dead (crashed builder) is stale and taken over. Waiting is bounded by the caller's
 * signal.
 */
import { open, readdir, readFile, rm } from "node:fs/promises";
import { hostname } from "node:os";
import { join } from "node:path";
import { sleep } from "../common/deadline.js";
import { pidAlive } from "../common/pid.js";

export interface FileLock {
  release(): Promise<void>;
}

/** Returns once the lock is held; `onWait` is called once if another process holds it. */
export async function acquireLock(
  path: string,
  options: { signal?: AbortSignal; onWait?: (pid: number) => void; pollMs?: number } = {},
): Promise<FileLock> {
  let told = false;
  for (;;) {
    options.signal?.throwIfAborted();
    try {
      const fh = await open(path, "wx", 0o644);
      await fh.writeFile(`${process.pid} ${hostname()}\n`);
      await fh.close();
      let released = false;
      return {
        release: async () => {
          if (released) return;
          released = true;
          await rm(path, { force: true });
        },
      };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
    }
    let owner = Number.NaN;
    let host = "";
    try {
      const parts = (await readFile(path, "utf8")).trim().split(/\s+/);
      owner = Number(parts[0]);
      host = parts[1] ?? "";
    } catch {
      continue; // released between our open and read
    }
    if (!Number.isInteger(owner) || (host === hostname() && !pidAlive(owner))) {
      // Stale: its builder died. Removing and retrying with O_EXCL keeps one winner.
      await rm(path, { force: true });
      continue;
    }
    if (!told) {
      told = true;
      options.onWait?.(owner);
    }
    await sleep(options.pollMs ?? 200, options.signal);
  }
}

/**
 * Removes the `.build-<what>-<pid>-*` temp dirs under `dir` whose builder died (crash, SIGKILL):
 * a live builder's dir is never touched.
 */
export async function sweepDeadBuilds(dir: string): Promise<void> {
  for (const n of await readdir(dir).catch(() => [] as string[])) {
    const m = /^\.build-[a-z]+-(\d+)-/.exec(n);
    if (m && !pidAlive(Number(m[1]))) await rm(join(dir, n), { recursive: true, force: true });
  }
}
