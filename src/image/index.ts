/**
 * Images: build, cache (by fingerprint), verify, list, remove. Layout:
 *   <dataDir>/images/<name>-<fp16>/{vmlinux,initrd.cpio,rootfs.ext4?,manifest.json}
 * A build happens in a temp dir beside the final one and is renamed into place after
 * manifest.json (written last) so readers never see a partial image; a lock file stops two
 * processes building the same image twice, and a loser of a rename race uses the winner's copy.
 */

import { mkdir, mkdtemp, readdir, rename, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { ensureDataDir } from "../common/data-dir.js";
import { Deadline } from "../common/deadline.js";
import { cacheDir as defaultCacheDir, dataDir as defaultDataDir, imagesDir } from "../common/paths.js";
import { HostDependencyError, ImageBuildError, SmolVMError, ValidationError } from "../errors.js";
import { buildDebianInto, planDebian } from "./debian.js";
import { shortFingerprint } from "./fingerprint.js";
import { acquireLock, sweepDeadBuilds } from "./lock.js";
import {
  describeArtifact,
  IMAGE_NAMES,
  type ImageManifest,
  type ImageName,
  loadVerifiedManifest,
  writeManifest,
  writeVerifiedStamp,
} from "./manifest.js";
import { type ImageBuildProgress, ProgressReporter } from "./progress.js";
import { buildTinyInto, planTiny } from "./tiny.js";

export { hostTscKhz } from "../common/host-clock.js";
export { kernelCmdline } from "./boot-args.js";
export { buildVmConfigCpio, composeInitrd, type VmConfigFile } from "./cpio.js";
export { CONFIG_DIR, MILESTONES } from "./init-script.js";
export {
  type ClientKey,
  ensureClientKey,
  generateHostKey,
  type HostKey,
  knownHostsLine,
  publicKeyFingerprint,
} from "./keys.js";
export type { ImageArtifact, ImageManifest, ImageName } from "./manifest.js";
export type { ImageBuildProgress } from "./progress.js";

export interface ImageOptions {
  /** Defaults to dataDir() (SMOLVM_DATA_DIR, XDG state dir, ~/.local/state/smolvm). */
  dataDir?: string;
  /** Shared download cache; defaults to cacheDir() (SMOLVM_CACHE_DIR, ~/.cache/smolvm). */
  cacheDir?: string;
  signal?: AbortSignal;
  timeoutMs?: number;
}

export interface BuildImageOptions extends ImageOptions {
  /** Rebuild even when a verified image with the same fingerprint exists. */
  force?: boolean;
  onProgress?: (p: ImageBuildProgress) => void;
}

/** Kernel command line every image needs; the runtime adds console/panic options of its own. */
export const BASE_KERNEL_CMDLINE = "console=ttyS0 panic=-1 quiet loglevel=4";

// tiny compiles its kernel on first use (a few minutes on two cores; cached after).
const DEFAULT_TIMEOUT_MS: Record<ImageName, number> = { tiny: 20 * 60_000, debian: 45 * 60_000 };

function checkName(name: string): asserts name is ImageName {
  if (!IMAGE_NAMES.includes(name as ImageName)) {
    throw new ValidationError(
      `unknown image ${JSON.stringify(name)}: choose one of ${IMAGE_NAMES.join(", ")}.`,
      {
        details: { name },
      },
    );
  }
}

async function plan(name: ImageName, cacheDir: string, signal: AbortSignal) {
  return name === "tiny" ? planTiny(cacheDir, signal) : planDebian(cacheDir, signal);
}

/**
 * Builds `name` (or returns the cached, verified image with the same fingerprint). When a
 * download fails because the host's package lists were stale, they are refreshed and the build
 * is planned again once (new versions, new fingerprint).
 */
export async function buildImage(name: ImageName, opts: BuildImageOptions = {}): Promise<ImageManifest> {
  checkName(name);
  try {
    return await buildOnce(name, opts);
  } catch (e) {
    if (!(e instanceof ImageBuildError) || e.code !== "IMAGE_LISTS_REFRESHED" || opts.signal?.aborted)
      throw e;
    return buildOnce(name, opts);
  }
}

async function buildOnce(name: ImageName, opts: BuildImageOptions): Promise<ImageManifest> {
  const base = opts.dataDir ?? defaultDataDir();
  ensureDataDir(base);
  const cache = opts.cacheDir ?? defaultCacheDir();
  const images = imagesDir(base);
  const deadline = new Deadline(
    opts.timeoutMs ?? DEFAULT_TIMEOUT_MS[name],
    opts.signal,
    `building image ${name}`,
  );
  const progress = new ProgressReporter(name, name === "tiny" ? 5 : 8, opts.onProgress);
  const started = performance.now();
  try {
    const signal = deadline.signal;
    progress.begin("resolving package versions");
    // Every step takes the deadline's signal (child processes are killed, loops stop), so an
    // error surfaces only after the temp dir and the lock are cleaned up.
    const p = await plan(name, cache, signal);
    const dir = join(images, `${name}-${shortFingerprint(p.fingerprint)}`);
    if (!opts.force) {
      const cached = await loadVerifiedManifest(dir).catch(() => undefined);
      if (cached) {
        progress.finish("cached");
        return cached;
      }
    }
    await mkdir(images, { recursive: true, mode: 0o700 });
    const lock = await acquireLock(join(images, `.${name}-${shortFingerprint(p.fingerprint)}.lock`), {
      signal,
      onWait: () => progress.begin("waiting for another build of this image"),
    });
    try {
      if (!opts.force) {
        const cached = await loadVerifiedManifest(dir).catch(() => undefined);
        if (cached) {
          progress.finish("cached");
          return cached;
        }
      }
      await sweepDeadBuilds(images);
      const tmp = await mkdtemp(join(images, `.build-${name}-${process.pid}-`));
      try {
        const step = (s: string, detail?: boolean) => (detail ? progress.detail(s) : progress.begin(s));
        const built =
          name === "tiny"
            ? await buildTinyInto(p as Awaited<ReturnType<typeof planTiny>>, tmp, cache, step, signal)
            : await buildDebianInto(p as Awaited<ReturnType<typeof planDebian>>, tmp, cache, step, signal);
        progress.begin("checksumming");
        const artifacts: ImageManifest["artifacts"] = {
          kernel: await describeArtifact(tmp, "vmlinux", signal),
          initrd: await describeArtifact(tmp, "initrd.cpio", signal),
        };
        if (name === "debian") artifacts.rootfs = await describeArtifact(tmp, "rootfs.ext4", signal);
        const manifest: ImageManifest = {
          name,
          fingerprint: p.fingerprint,
          dir,
          kernelPath: join(dir, "vmlinux"),
          initrdPath: join(dir, "initrd.cpio"),
          ...(artifacts.rootfs ? { rootfsPath: join(dir, "rootfs.ext4") } : {}),
          kernelRelease: built.kernelRelease,
          kernelCmdline: BASE_KERNEL_CMDLINE,
          artifacts,
          capabilities: {
            ssh: true,
            agent: built.agent,
            // With the agent, sshd runs per connection under its listener (init-script.ts).
            sshHostKeyPerConnection: built.agent,
          },
          packages: built.packages,
          createdAt: new Date().toISOString(),
          buildMs: Math.round(performance.now() - started),
        };
        await writeVerifiedStamp(tmp, Object.values(artifacts));
        await writeManifest(tmp, manifest);
        // A broken or forced-out previous copy is moved aside first; VMs that have its files
        // open keep them.
        const stale = await stat(dir).then(
          () => true,
          () => false,
        );
        if (stale) {
          const trash = `${tmp}.old`;
          await rename(dir, trash);
          await rm(trash, { recursive: true, force: true });
        }
        await rename(tmp, dir);
      } finally {
        await rm(tmp, { recursive: true, force: true });
      }
    } finally {
      await lock.release();
    }
    const m = await loadVerifiedManifest(dir);
    progress.finish(`built in ${((performance.now() - started) / 1000).toFixed(1)}s`);
    return m;
  } catch (e) {
    if (deadline.expired) throw deadline.reason;
    if (e instanceof SmolVMError) throw e;
    throw new ImageBuildError(`building image ${name} failed: ${(e as Error).message}`, { cause: e });
  } finally {
    deadline.dispose();
  }
}

/**
 * The verified image for `name`, building it when missing. When the inputs cannot be resolved
 * (no apt lists and no way to update them) an already-built image of that name is used.
 */
export async function ensureImage(name: ImageName, opts: BuildImageOptions = {}): Promise<ImageManifest> {
  try {
    return await buildImage(name, { ...opts, force: false });
  } catch (e) {
    if (!(e instanceof HostDependencyError)) throw e;
    const existing = (await listImages(opts)).filter((i) => i.name === name && i.ok);
    const newest = existing.sort((a, b) =>
      (b.manifest?.createdAt ?? "").localeCompare(a.manifest?.createdAt ?? ""),
    )[0];
    if (newest?.manifest) return newest.manifest;
    throw e;
  }
}

export interface ImageListEntry {
  name: string;
  dir: string;
  ok: boolean;
  manifest?: ImageManifest;
  /** Why the image is unusable, when ok is false. */
  error?: string;
}

/** Every image directory in the data dir, verified. Broken ones are listed with ok: false. */
export async function listImages(opts: ImageOptions = {}): Promise<ImageListEntry[]> {
  const images = imagesDir(opts.dataDir ?? defaultDataDir());
  let names: string[];
  try {
    names = (await readdir(images)).filter((n) => !n.startsWith(".")).sort();
  } catch {
    return [];
  }
  const out: ImageListEntry[] = [];
  for (const n of names) {
    opts.signal?.throwIfAborted();
    const dir = join(images, n);
    const name = n.replace(/-[0-9a-f]{16}$/, "");
    try {
      out.push({ name, dir, ok: true, manifest: await loadVerifiedManifest(dir) });
    } catch (e) {
      out.push({ name, dir, ok: false, error: (e as Error).message });
    }
  }
  return out;
}

/** Removes every built copy of `name`; returns the directories removed. */
export async function removeImage(name: ImageName, opts: ImageOptions = {}): Promise<string[]> {
  checkName(name);
  const removed: string[] = [];
  for (const i of await listImages(opts)) {
    if (i.name !== name) continue;
    await rm(i.dir, { recursive: true, force: true });
    removed.push(i.dir);
  }
  return removed;
}
