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
  capabilities: { ssh: boolean; agent: boolean };
  /** Package name -> version, for `image list` and debugging. */
  packages: Record<string, string>;
  createdAt: string;
  buildMs: number;
}

export const MANIFEST_FILE = "manifest.json";

export async function sha256File(path: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest("hex");
}

export async function describeArtifact(dir: string, file: string): Promise<ImageArtifact> {
  const path = join(dir, file);
  const [{ size }, sha256] = await Promise.all([stat(path), sha256File(path)]);
  return { file, size, sha256 };
}

/** Writes manifest.json through a temp file + rename, so readers see all of it or none. */
export async function writeManifest(dir: string, manifest: ImageManifest): Promise<void> {
  const tmp = join(dir, `.${MANIFEST_FILE}.tmp-${process.pid}`);
  await writeFile(tmp, `${JSON.stringify(manifest, null, 2)}\n`, { mode: 0o644 });
  await rename(tmp, join(dir, MANIFEST_FILE));
}

// Verified artifacts keyed by path+size+mtime: re-hashing a large rootfs on every load is waste.
const verified = new Map<string, string>();

async function verifyArtifact(dir: string, art: ImageArtifact): Promise<void> {
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
  const key = `${path}\0${st.size}\0${st.mtimeMs}`;
  if (verified.get(key) === art.sha256) return;
  const sha = await sha256File(path);
  if (sha !== art.sha256) {
    throw new ImageBuildError(
      `image artifact ${path} does not match its sha256 in the manifest: the image is damaged; rebuild with \`smolvm image build --force\`.`,
      { code: "IMAGE_CORRUPT", details: { path, sha256: sha, expected: art.sha256 } },
    );
  }
  verified.set(key, sha);
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
  for (const a of arts) await verifyArtifact(dir, a);
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
