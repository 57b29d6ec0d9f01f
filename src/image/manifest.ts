/**
 * manifest.json: the last file written into an image directory (atomic rename), and the only
 * proof that a build finished. Loading verifies every artifact against it, so a partial,
 * truncated or corrupted build is never booted.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { ImageBuildError } from "../errors.js";

export type ImageName = "tiny" | "debian";
export const IMAGE_NAMES: readonly ImageName[] = ["tiny", "debian"];

export interface ImageArtifact {
  /** File name inside the image directory. */
  file: string;
  size: number;
  sha256: string;
}

export interface ImageManifest {
  name: ImageName;
  fingerprint: string;
  /** Absolute path of the image directory. */
  dir: string;
  kernelPath: string;
  initrdPath: string;
  /** Only for images with a disk (debian): the ext4 image, to be used copy-on-write. */
  rootfsPath?: string;
  /** The kernel release (uname -r) inside the guest. */
  kernelRelease: string;
  /** Kernel command line the image needs (the runtime appends its own console/quiet bits). */
  kernelCmdline: string;
  artifacts: { kernel: ImageArtifact; initrd: ImageArtifact; rootfs?: ImageArtifact };
  capabilities: {
    ssh: boolean;
    agent: boolean;
    /**
     * The image's sshd loads its host key file on every connection: a VM restored from a
     * snapshot is re-keyed by writing the file, with no sshd restart. True in images with the
     * agent, whose sshd runs per connection under the agent's listener (`sshd -i`). Images built
     * before that started a listening sshd and recorded whether it re-read the file per
     * connection (OpenSSH before 9.8); absent in older ones (treated as false: sshd restarts).
     */
    sshHostKeyPerConnection?: boolean;
  };
  /** Package name -> version, for `image list` and debugging. */
  packages: Record<string, string>;
  createdAt: string;
  buildMs: number;
}

export const MANIFEST_FILE = "manifest.json";

export async function sha256File(path: string, signal?: AbortSignal): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20, signal }))
    hash.update(chunk as Buffer);
  return hash.digest("hex");
}

export async function describeArtifact(
  dir: string,
  file: string,
  signal?: AbortSignal,
): Promise<ImageArtifact> {
  const path = join(dir, file);
  const [{ size }, sha256] = await Promise.all([stat(path), sha256File(path, signal)]);
  return { file, size, sha256 };
}

/** Writes manifest.json through a temp file + rename, so readers see all of it or none. */
export async function writeManifest(dir: string, manifest: ImageManifest): Promise<void> {
  const tmp = join(dir, `.${MANIFEST_FILE}.tmp-${process.pid}`);
  await writeFile(tmp, `${JSON.stringify(manifest, null, 2)}\n`, { mode: 0o644 });
  await rename(tmp, join(dir, MANIFEST_FILE));
}

/**
 * Verification results survive the process in `<dir>/.verified.json`, keyed by size, mtime
 * and inode: hashing a 2 GiB rootfs on every VM start would cost seconds. Any rewrite of an
 * artifact changes its mtime (or size), so it is hashed again.
 */
const STAMP_FILE = ".verified.json";
type Stamp = Record<string, { size: number; mtimeMs: number; ino: number; sha256: string }>;

async function readStamp(dir: string): Promise<Stamp> {
  try {
    return JSON.parse(await readFile(join(dir, STAMP_FILE), "utf8")) as Stamp;
  } catch {
    return {};
  }
}

/** Records that the artifacts' current bytes match their sha256 (called right after hashing them). */
export async function writeVerifiedStamp(dir: string, arts: readonly ImageArtifact[]): Promise<void> {
  const stamp: Stamp = {};
  for (const a of arts) {
    const st = await stat(join(dir, a.file));
    stamp[a.file] = { size: st.size, mtimeMs: st.mtimeMs, ino: st.ino, sha256: a.sha256 };
  }
  const tmp = join(dir, `${STAMP_FILE}.${process.pid}.${Math.random().toString(36).slice(2)}`);
  try {
    await writeFile(tmp, JSON.stringify(stamp));
    await rename(tmp, join(dir, STAMP_FILE));
  } catch {
    await rm(tmp, { force: true }); // read-only data dir: verification just stays uncached
  }
}

/** Returns true when the file had to be hashed (the stamp did not vouch for it). */
async function verifyArtifact(dir: string, art: ImageArtifact, stamp: Stamp): Promise<boolean> {
  const path = join(dir, art.file);
  let st: Awaited<ReturnType<typeof stat>>;
  try {
    st = await stat(path);
  } catch (cause) {
    throw new ImageBuildError(
      `image artifact ${path} is missing: rebuild with \`smolvm image build --force\`.`,
      {
        code: "IMAGE_CORRUPT",
        details: { path },
        cause,
      },
    );
  }
  if (st.size !== art.size) {
    throw new ImageBuildError(
      `image artifact ${path} is ${st.size} bytes, the manifest says ${art.size}: the image is damaged; rebuild with \`smolvm image build --force\`.`,
      { code: "IMAGE_CORRUPT", details: { path, size: st.size, expected: art.size } },
    );
  }
  const s = stamp[art.file];
  if (s && s.size === st.size && s.mtimeMs === st.mtimeMs && s.ino === st.ino && s.sha256 === art.sha256) {
    return false;
  }
  const sha = await sha256File(path);
  if (sha !== art.sha256) {
    throw new ImageBuildError(
      `image artifact ${path} does not match its sha256 in the manifest: the image is damaged; rebuild with \`smolvm image build --force\`.`,
      { code: "IMAGE_CORRUPT", details: { path, sha256: sha, expected: art.sha256 } },
    );
  }
  return true;
}

/** Reads dir/manifest.json and checks every artifact (exists, size, sha256). Throws ImageBuildError (code IMAGE_CORRUPT / IMAGE_MISSING). */
export async function loadVerifiedManifest(dir: string): Promise<ImageManifest> {
  const path = join(dir, MANIFEST_FILE);
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (cause) {
    throw new ImageBuildError(
      `image directory ${dir} has no ${MANIFEST_FILE}: its build did not finish; build it with \`smolvm image build\`.`,
      { code: "IMAGE_MISSING", details: { dir }, cause },
    );
  }
  let m: ImageManifest;
  try {
    m = JSON.parse(text) as ImageManifest;
  } catch (cause) {
    throw new ImageBuildError(`${path} is not valid JSON: rebuild with \`smolvm image build --force\`.`, {
      code: "IMAGE_CORRUPT",
      details: { path },
      cause,
    });
  }
  if (!m || typeof m !== "object" || !m.artifacts?.kernel || !m.artifacts?.initrd || !m.fingerprint) {
    throw new ImageBuildError(`${path} lacks required fields: rebuild with \`smolvm image build --force\`.`, {
      code: "IMAGE_CORRUPT",
      details: { path },
    });
  }
  const arts = [m.artifacts.kernel, m.artifacts.initrd, ...(m.artifacts.rootfs ? [m.artifacts.rootfs] : [])];
  const stamp = await readStamp(dir);
  let hashed = false;
  for (const a of arts) hashed = (await verifyArtifact(dir, a, stamp)) || hashed;
  if (hashed) await writeVerifiedStamp(dir, arts);
  // Paths are recomputed from the directory so a moved data dir keeps working.
  return {
    ...m,
    dir,
    kernelPath: join(dir, m.artifacts.kernel.file),
    initrdPath: join(dir, m.artifacts.initrd.file),
    ...(m.artifacts.rootfs ? { rootfsPath: join(dir, m.artifacts.rootfs.file) } : {}),
  };
}

export async function removeDir(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
}
