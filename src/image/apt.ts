/**
 * Debian packages through the host's own package manager: versions from apt-cache, .debs
 * fetched with `apt-get download` into a shared cache and unpacked with `dpkg-deb -x` (never
 * installed). `apt-get update` runs only when the package lists are missing or a download
 * 404s, and only as root or with passwordless sudo.
 */
import { createHash, randomBytes } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, mkdtemp, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { HostDependencyError, ImageBuildError, SmolVMError } from "../errors.js";
import { exec } from "./exec.js";

export interface AptPackage {
  name: string;
  version: string;
  arch: string;
  size: number;
  sha256?: string;
  depends: string;
}

/** Parses `apt-cache show` stanzas (first stanza per package wins: the candidate). */
export function parseAptCacheShow(text: string): Map<string, AptPackage> {
  const out = new Map<string, AptPackage>();
  for (const stanza of text.split(/\n\s*\n/)) {
    const fields = new Map<string, string>();
    let last = "";
    for (const line of stanza.split("\n")) {
      if (/^\s/.test(line) && last) fields.set(last, `${fields.get(last)}\n${line.trim()}`);
      else {
        const i = line.indexOf(":");
        if (i > 0) {
          last = line.slice(0, i);
          fields.set(last, line.slice(i + 1).trim());
        }
      }
    }
    const name = fields.get("Package");
    const version = fields.get("Version");
    if (!name || !version || out.has(name)) continue;
    out.set(name, {
      name,
      version,
      arch: fields.get("Architecture") ?? "amd64",
      size: Number(fields.get("Size") ?? 0),
      sha256: fields.get("SHA256"),
      depends: fields.get("Depends") ?? "",
    });
  }
  return out;
}

/** `linux-image-amd64` -> its concrete kernel package, from `apt-cache depends` output. */
export function parseKernelDependency(dependsOutput: string): string | undefined {
  const m = /^\s*Depends:\s*(linux-image-\d[^\s]*)/m.exec(dependsOutput);
  return m?.[1];
}

async function sudoPrefix(signal?: AbortSignal): Promise<string[] | undefined> {
  if (process.getuid?.() === 0) return [];
  try {
    await exec("sudo", ["-n", "true"], { signal });
    return ["sudo", "-n"];
  } catch {
    return undefined;
  }
}

const LISTS_DIR = "/var/lib/apt/lists";

async function listsPresent(): Promise<boolean> {
  try {
    return (await readdir(LISTS_DIR)).some((f) => f.includes("_Packages"));
  } catch {
    return false;
  }
}

let updatedThisProcess = false;

/** Runs `apt-get update` if we may; otherwise a HostDependencyError naming what is missing. */
export async function aptUpdate(why: string, signal?: AbortSignal): Promise<void> {
  if (updatedThisProcess) return;
  const prefix = await sudoPrefix(signal);
  if (!prefix) {
    throw new HostDependencyError(
      `the host's apt package lists are ${why}, so the image packages (linux-image-amd64, busybox-static) cannot be fetched, and smolvm is neither root nor allowed passwordless sudo: run \`sudo apt-get update\` and retry.`,
      { details: { reason: why, packages: ["linux-image-amd64", "busybox-static"] } },
    );
  }
  const [cmd, ...rest] = [...prefix, "apt-get", "update", "-qq"];
  await exec(cmd!, rest, { signal });
  updatedThisProcess = true;
}

export async function ensureAptLists(signal?: AbortSignal): Promise<void> {
  if (!(await listsPresent())) await aptUpdate("missing", signal);
}

/** Candidate versions of the packages; a package apt does not know is a HostDependencyError. */
export async function aptShow(
  names: readonly string[],
  signal?: AbortSignal,
): Promise<Map<string, AptPackage>> {
  await ensureAptLists(signal);
  let text = "";
  try {
    text = (await exec("apt-cache", ["show", "--no-all-versions", ...names], { signal })).stdout.toString(
      "utf8",
    );
  } catch (e) {
    if (!(e instanceof SmolVMError) || e.code !== "IMAGE_BUILD_COMMAND") throw e;
    // apt-cache fails as a whole when one name is unknown: find which.
    const known = new Map<string, AptPackage>();
    for (const n of names) {
      try {
        const one = await exec("apt-cache", ["show", "--no-all-versions", n], { signal });
        for (const [k, v] of parseAptCacheShow(one.stdout.toString("utf8"))) known.set(k, v);
      } catch {
        /* reported below */
      }
    }
    text = "";
    const missing = names.filter((n) => !known.has(n));
    if (missing.length) {
      throw new HostDependencyError(
        `apt on this host does not know the package(s) ${missing.join(", ")}: check /etc/apt/sources.list and run \`apt-get update\`.`,
        { details: { packages: missing }, cause: e },
      );
    }
    return known;
  }
  const pkgs = parseAptCacheShow(text);
  const missing = names.filter((n) => !pkgs.has(n));
  if (missing.length) {
    throw new HostDependencyError(
      `apt on this host has no installable candidate for ${missing.join(", ")}: run \`apt-get update\` and retry.`,
      { details: { packages: missing } },
    );
  }
  return pkgs;
}

export async function resolveKernelPackage(
  signal?: AbortSignal,
  meta = "linux-image-amd64",
): Promise<string> {
  await ensureAptLists(signal);
  let out: string;
  try {
    out = (await exec("apt-cache", ["depends", meta], { signal })).stdout.toString("utf8");
  } catch (cause) {
    if (cause instanceof HostDependencyError) throw cause;
    throw new HostDependencyError(
      `apt on this host does not know ${meta}: add a Debian main repository to /etc/apt/sources.list and run \`apt-get update\`.`,
      { details: { package: meta }, cause },
    );
  }
  const pkg = parseKernelDependency(out);
  if (!pkg) {
    throw new HostDependencyError(`${meta} does not depend on a concrete linux-image package on this host.`, {
      details: { package: meta },
    });
  }
  return pkg;
}

const safe = (s: string) => s.replace(/[^A-Za-z0-9.+~-]/g, "_");

/**
 * The .deb for `pkg` in `<cacheDir>/debs`, downloading it if absent. A cached file is reused only
 * when its sha256 matches the package index (the cache dir is shared and a name and size prove
 * nothing); downloads land in a temp dir, are verified, and are renamed in, so a crash never
 * leaves a half file under the final name.
 */
export async function fetchDeb(pkg: AptPackage, cacheDir: string, signal?: AbortSignal): Promise<string> {
  const debs = join(cacheDir, "debs");
  const final = join(debs, `${safe(pkg.name)}_${safe(pkg.version)}_${safe(pkg.arch)}.deb`);
  const want = await indexSha256(pkg, signal);
  if ((await fileSha256(final).catch(() => undefined)) === want) return final;
  await mkdir(debs, { recursive: true });
  const tmp = await mkdtemp(join(debs, ".dl-"));
  try {
    const args = ["download", "-qq", `${pkg.name}=${pkg.version}`];
    if (process.getuid?.() === 0) args.unshift("-o", "APT::Sandbox::User=root");
    try {
      await exec("apt-get", args, { cwd: tmp, signal });
    } catch (e) {
      if (!(e instanceof ImageBuildError)) throw e;
      // Usually stale lists (the mirror dropped this version): refresh once and retry.
      await aptUpdate("stale (download failed)", signal);
      throw new ImageBuildError(
        `downloading ${pkg.name} ${pkg.version} failed; the package lists were refreshed: run the build again to use the new versions.`,
        { code: "IMAGE_LISTS_REFRESHED", details: { package: pkg.name }, cause: e },
      );
    }
    const files = (await readdir(tmp)).filter((f) => f.endsWith(".deb"));
    if (files.length !== 1) {
      throw new ImageBuildError(
        `apt-get download ${pkg.name} produced ${files.length} .deb files, expected 1.`,
      );
    }
    const got = await fileSha256(join(tmp, files[0]!));
    if (got !== want) {
      throw new ImageBuildError(
        `${pkg.name} ${pkg.version} downloaded with sha256 ${got}, but the package index says ${want}: the mirror or a proxy altered it; run \`apt-get update\` and retry.`,
        { code: "IMAGE_DEB_MISMATCH", details: { package: pkg.name, want, got } },
      );
    }
    await rename(join(tmp, files[0]!), final);
    return final;
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

/** The sha256 the package index gives for exactly this version (looked up when the plan lacks it). */
async function indexSha256(pkg: AptPackage, signal?: AbortSignal): Promise<string> {
  if (pkg.sha256 && /^[0-9a-f]{64}$/.test(pkg.sha256)) return pkg.sha256;
  const r = await exec("apt-cache", ["show", `${pkg.name}=${pkg.version}`], { signal });
  const sha = parseAptCacheShow(r.stdout.toString("utf8")).get(pkg.name)?.sha256;
  if (!sha || !/^[0-9a-f]{64}$/.test(sha)) {
    throw new HostDependencyError(
      `the package index has no sha256 for ${pkg.name} ${pkg.version}, so its .deb cannot be verified: run \`apt-get update\`.`,
      { details: { package: pkg.name } },
    );
  }
  return sha;
}

async function fileSha256(path: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest("hex");
}

export async function extractDeb(deb: string, dir: string, signal?: AbortSignal): Promise<void> {
  await mkdir(dir, { recursive: true });
  await exec("dpkg-deb", ["-x", deb, dir], { signal });
}

/** The host's Debian mirrors, from sources.list(.d): [main mirror, security mirror?]. */
export function parseAptSources(text: string, codename: string): { mirror?: string; security?: string } {
  const out: { mirror?: string; security?: string } = {};
  const consider = (uri: string, suites: string[]) => {
    if (!/^https?:\/\//.test(uri)) return;
    if (suites.includes(codename) && !out.mirror) out.mirror = uri.replace(/\/+$/, "");
    if (suites.includes(`${codename}-security`) && !out.security) out.security = uri.replace(/\/+$/, "");
  };
  // one-line format: deb [opts] uri suite comps...
  for (const raw of text.split("\n")) {
    const line = raw.replace(/#.*/, "").trim();
    const m = /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)/.exec(line);
    if (m) consider(m[1]!, [m[2]!]);
  }
  // deb822 format
  for (const stanza of text.split(/\n\s*\n/)) {
    const get = (k: string) => new RegExp(`^${k}:\\s*(.+)$`, "mi").exec(stanza)?.[1]?.trim();
    const types = get("Types");
    if (!types?.split(/\s+/).includes("deb")) continue;
    const uris = get("URIs")?.split(/\s+/) ?? [];
    const suites = get("Suites")?.split(/\s+/) ?? [];
    for (const u of uris) consider(u, suites);
  }
  return out;
}

/** "linux-image-6.1.0-56-amd64 (= 6.1.192-2)" from the metapackage's Depends field. */
export function parseExactDependency(
  depends: string,
  prefix: RegExp,
): { name: string; version?: string } | undefined {
  for (const alt of depends.split(/[,|]/)) {
    const m = /^\s*(\S+)\s*(?:\(\s*=\s*([^)\s]+)\s*\))?/.exec(alt);
    if (m && prefix.test(m[1]!)) return { name: m[1]!, version: m[2] };
  }
  return undefined;
}

async function listsKey(): Promise<string> {
  const files = (await readdir(LISTS_DIR).catch(() => [] as string[])).filter((f) => f.includes("_Packages"));
  const names = files.sort();
  const stats = await Promise.all(names.map((f) => stat(join(LISTS_DIR, f)).catch(() => undefined)));
  const parts = names.flatMap((f, i) => {
    const st = stats[i];
    return st ? [`${f}:${st.size}:${st.mtimeMs}`] : [];
  });
  return createHash("sha256").update(parts.join("\n")).digest("hex");
}

/**
 * The concrete kernel package behind `linux-image-amd64` plus candidates for `names`. apt-cache
 * takes about a second per call on hosts without a pkgcache.bin, so the answer is memoized in
 * the cache dir, keyed by the package lists' names, sizes and mtimes (an `apt-get update`
 * invalidates it).
 */
export async function resolveImagePackages(
  names: readonly string[],
  cacheDir: string,
  signal?: AbortSignal,
  opts: { kernelSource?: boolean } = {},
): Promise<{ kernel: AptPackage; pkgs: Map<string, AptPackage>; kernelSource?: AptPackage }> {
  await ensureAptLists(signal);
  const key = createHash("sha256")
    .update(`${await listsKey()}\n${names.join(",")}${opts.kernelSource ? "\n+source" : ""}`)
    .digest("hex");
  const memoPath = join(cacheDir, "apt-resolve.json");
  type Memo = Record<string, { kernel: AptPackage; pkgs: AptPackage[]; kernelSource?: AptPackage }>;
  let memo: Memo = {};
  try {
    memo = JSON.parse(await readFile(memoPath, "utf8")) as Memo;
    const hit = memo[key];
    if (hit) {
      return {
        kernel: hit.kernel,
        pkgs: new Map(hit.pkgs.map((p) => [p.name, p])),
        ...(hit.kernelSource ? { kernelSource: hit.kernelSource } : {}),
      };
    }
  } catch {
    memo = {};
  }
  const meta = "linux-image-amd64";
  const first = await aptShow([meta, ...names], signal);
  const dep = parseExactDependency(first.get(meta)!.depends, /^linux-image-\d/);
  let kernel: AptPackage | undefined;
  if (dep?.version) kernel = { name: dep.name, version: dep.version, arch: "amd64", size: 0, depends: "" };
  else
    kernel = (await aptShow([dep?.name ?? (await resolveKernelPackage(signal, meta))], signal))
      .values()
      .next().value;
  if (!kernel) throw new HostDependencyError(`${meta} does not name a concrete kernel package on this host.`);
  const pkgs = new Map(names.map((n) => [n, first.get(n)!]));
  let kernelSource: AptPackage | undefined;
  if (opts.kernelSource) {
    const name = kernelSourcePackage(kernel.name);
    kernelSource = name ? (await aptShow([name], signal)).get(name) : undefined;
    if (!kernelSource) {
      throw new HostDependencyError(
        `the package lists have no kernel source for ${kernel.name} (${name ?? "no linux-source name"}): run \`apt-get update\`.`,
        { details: { kernel: kernel.name, source: name } },
      );
    }
  }
  // Keep a few other entries (tiny and debian resolve different names); older lists age out.
  memo = {
    ...Object.fromEntries(Object.entries(memo).slice(-7)),
    [key]: { kernel, pkgs: [...pkgs.values()], ...(kernelSource ? { kernelSource } : {}) },
  };
  await mkdir(cacheDir, { recursive: true });
  const tmp = `${memoPath}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`;
  await writeFile(tmp, JSON.stringify(memo));
  await rename(tmp, memoPath);
  return { kernel, pkgs, ...(kernelSource ? { kernelSource } : {}) };
}

/**
 * Debian's source package for a kernel image package: linux-image-6.1.0-57-amd64 is built from
 * linux-source-6.1. Undefined for a name that does not say its version.
 */
export function kernelSourcePackage(imagePackage: string): string | undefined {
  const m = /^linux-image-(\d+\.\d+)[.-]/.exec(imagePackage);
  return m ? `linux-source-${m[1]}` : undefined;
}
