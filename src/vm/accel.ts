/**
 * Which accelerator QEMU should use, decided by booting the real thing (accel-probe.ts): KVM only
 * after the image's own kernel reached /init under it. A /dev/kvm that opens, or that runs a tiny
 * firmware, can still stop the real kernel (PVM hosts, nested virtualization), and where KVM
 * boots but slower than TCG would, TCG wins. The verdict is cached host-wide (cacheDir) per host,
 * QEMU version and kernel, since every data dir on the host gets the same answer.
 */

import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { constants, existsSync, statSync } from "node:fs";
import { access, mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { cpus, hostname, release } from "node:os";
import { delimiter, join } from "node:path";
import { hostTscKhz } from "../common/host-clock.js";
import { cacheDir as defaultCacheDir } from "../common/paths.js";
import { HostDependencyError, ValidationError } from "../errors.js";
import { ensureImage, type ImageManifest } from "../image/index.js";
import { probeKernelBoot, probeKvmFirmware } from "./accel-probe.js";
import type { Accel } from "./qemu.js";

export type AccelChoice = Accel | "auto";

export interface AccelVerdict {
  accel: Accel;
  /** Why: "forced by SMOLVM_ACCEL", "/dev/kvm is missing", "the kernel reached /init under KVM in 310 ms", ... */
  reason: string;
  /** How long the probes took when this verdict was reached (0 when forced or trivially known). */
  probeMs: number;
  /** True when the verdict came from the cache rather than a probe in this call. */
  cached?: boolean;
}

/** The kernel a verdict is about: an image's kernel and initramfs. */
export type ProbeImage = Pick<ImageManifest, "kernelPath" | "initrdPath" | "kernelCmdline" | "artifacts">;

export interface DetectOptions {
  /** Overrides SMOLVM_ACCEL. */
  force?: AccelChoice;
  env?: NodeJS.ProcessEnv;
  /** Where images are found (the default image is built there when `image` is not given). */
  dataDir?: string;
  /** Where the verdict is cached. Default: the host-wide cache dir (see cacheDir()). */
  cacheDir?: string;
  qemuPath?: string;
  /** The kernel to probe with. Default: the "tiny" image's (built when missing). */
  image?: ProbeImage;
  /** Bound for each boot probe. Default 10 s. */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Ignore (and overwrite) the cached verdict. */
  refresh?: boolean;
  /** Kept for compatibility: the library never prints; callers show `reason` themselves. */
  quiet?: boolean;
}

const CACHE_FILE = "accel.json";
const DEFAULT_PROBE_MS = 10_000;
/** KVM slower than this to /init is worth comparing with TCG (real KVM takes a few hundred ms). */
const KVM_SLOW_MS = 1_200;

function parseChoice(value: string | undefined, where: string): AccelChoice | undefined {
  if (value === undefined || value === "") return undefined;
  if (value === "kvm" || value === "tcg" || value === "auto") return value;
  throw new ValidationError(`${where} must be "kvm", "tcg" or "auto", got ${JSON.stringify(value)}.`, {
    details: { value },
  });
}

/** The qemu-system-x86_64 to run: SMOLVM_QEMU, else the first on PATH. */
export function findQemu(env: NodeJS.ProcessEnv = process.env): string {
  const explicit = env.SMOLVM_QEMU;
  if (explicit) {
    if (!existsSync(explicit)) {
      throw new HostDependencyError(`SMOLVM_QEMU points to ${explicit}, which does not exist.`, {
        code: "QEMU_MISSING",
      });
    }
    return explicit;
  }
  for (const dir of (env.PATH ?? "").split(delimiter)) {
    const p = join(dir || ".", "qemu-system-x86_64");
    if (existsSync(p)) return p;
  }
  throw new HostDependencyError(
    "qemu-system-x86_64 was not found on PATH: install QEMU (Debian: apt-get install qemu-system-x86) or set SMOLVM_QEMU.",
    { code: "QEMU_MISSING" },
  );
}

const versions = new Map<string, Promise<string>>();

/** `qemu-system-x86_64 --version`'s first line, asked once per binary (path and mtime) per process. */
export function qemuVersion(qemuPath: string): Promise<string> {
  let mtime = 0;
  try {
    mtime = statSync(qemuPath).mtimeMs;
  } catch {
    // reported by the exec below
  }
  const key = `${qemuPath}|${mtime}`;
  let v = versions.get(key);
  if (!v) {
    v = new Promise<string>((resolve, reject) => {
      execFile(qemuPath, ["--version"], { timeout: 5_000, killSignal: "SIGKILL" }, (err, stdout) => {
        const first = String(stdout).split("\n")[0]?.trim();
        if (err || !first) {
          reject(
            new HostDependencyError(`${qemuPath} --version failed; reinstall QEMU.`, {
              code: "QEMU_MISSING",
            }),
          );
        } else resolve(first);
      });
    });
    versions.set(key, v);
    v.catch(() => versions.delete(key));
  }
  return v;
}

interface CacheEntry {
  key: string;
  accel: Accel;
  reason: string;
  probeMs: number;
  checkedAt: string;
}

async function readCache(path: string, key: string): Promise<CacheEntry | undefined> {
  try {
    const entries = JSON.parse(await readFile(path, "utf8")) as CacheEntry[];
    return Array.isArray(entries)
      ? entries.find((e) => e && e.key === key && (e.accel === "kvm" || e.accel === "tcg"))
      : undefined;
  } catch {
    return undefined;
  }
}

async function writeCache(path: string, entry: CacheEntry): Promise<void> {
  let entries: CacheEntry[] = [];
  try {
    const parsed = JSON.parse(await readFile(path, "utf8"));
    if (Array.isArray(parsed)) entries = parsed.filter((e) => e && e.key !== entry.key).slice(-9);
  } catch {
    // first verdict, or a corrupt file we overwrite
  }
  entries.push(entry);
  await mkdir(join(path, ".."), { recursive: true, mode: 0o700 });
  const tmp = `${path}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`;
  await writeFile(tmp, `${JSON.stringify(entries, null, 2)}\n`, { mode: 0o600 });
  await rename(tmp, path);
}

/** What the verdict depends on: this host, this QEMU, this kernel. */
async function verdictKey(qemuPath: string, image: ProbeImage): Promise<string> {
  const cpu = cpus()[0]?.model ?? "unknown-cpu";
  return [hostname(), release(), cpu, await qemuVersion(qemuPath), image.artifacts.kernel.sha256].join("|");
}

interface Resolved {
  qemuPath: string;
  image: ProbeImage;
  cachePath: string;
}

async function resolveInputs(options: DetectOptions, env: NodeJS.ProcessEnv): Promise<Resolved> {
  const qemuPath = options.qemuPath ?? findQemu(env);
  const image =
    options.image ?? (await ensureImage("tiny", { dataDir: options.dataDir, signal: options.signal }));
  const cachePath = join(options.cacheDir ?? defaultCacheDir(env), CACHE_FILE);
  return { qemuPath, image, cachePath };
}

/**
 * The accelerator to use: forced (option, then SMOLVM_ACCEL), else auto: KVM only when the image's
 * kernel boots under it to /init, and is not slower there than under TCG. Cached; `refresh`
 * re-probes.
 */
export async function detectAccelerator(options: DetectOptions = {}): Promise<AccelVerdict> {
  const env = options.env ?? process.env;
  const forced =
    parseChoice(options.force, "force") ?? parseChoice(env.SMOLVM_ACCEL, "SMOLVM_ACCEL") ?? "auto";
  if (forced !== "auto") {
    const by = options.force && options.force !== "auto" ? "the caller" : "SMOLVM_ACCEL";
    return { accel: forced, reason: `forced by ${by}`, probeMs: 0 };
  }
  if (!existsSync("/dev/kvm")) return { accel: "tcg", reason: "/dev/kvm is missing", probeMs: 0 };
  try {
    await access("/dev/kvm", constants.R_OK | constants.W_OK);
  } catch {
    return { accel: "tcg", reason: "no read/write permission on /dev/kvm (join the kvm group)", probeMs: 0 };
  }
  const inputs = await resolveInputs(options, env);
  const key = await verdictKey(inputs.qemuPath, inputs.image);
  if (!options.refresh) {
    const hit = await readCache(inputs.cachePath, key);
    if (hit) return { accel: hit.accel, reason: hit.reason, probeMs: hit.probeMs ?? 0, cached: true };
  }
  const verdict = await probe(inputs, options);
  await writeCache(inputs.cachePath, { key, ...verdict, checkedAt: new Date().toISOString() });
  return verdict;
}

async function probe(inputs: Resolved, options: DetectOptions): Promise<AccelVerdict> {
  const t0 = performance.now();
  const took = () => Math.round(performance.now() - t0);
  const timeoutMs = options.timeoutMs ?? DEFAULT_PROBE_MS;
  const fw = await probeKvmFirmware(inputs.qemuPath, Math.min(5_000, timeoutMs));
  if (!fw.ok) return { accel: "tcg", reason: fw.reason!, probeMs: took() };
  const boot = (accel: Accel) =>
    probeKernelBoot({
      qemuPath: inputs.qemuPath,
      accel,
      kernelPath: inputs.image.kernelPath,
      initrdPath: inputs.image.initrdPath,
      kernelAppend: inputs.image.kernelCmdline,
      tscKhz: accel === "tcg" ? hostTscKhz() : undefined,
      timeoutMs,
      signal: options.signal,
    });
  const kvm = await boot("kvm");
  if (!kvm.ok)
    return { accel: "tcg", reason: `KVM cannot run the guest kernel (${kvm.reason})`, probeMs: took() };
  if (kvm.ms > KVM_SLOW_MS) {
    const tcg = await boot("tcg");
    if (tcg.ok && tcg.ms < kvm.ms) {
      return {
        accel: "tcg",
        reason: `the kernel reached /init in ${kvm.ms} ms under KVM but ${tcg.ms} ms under TCG (nested virtualization?): TCG is faster here`,
        probeMs: took(),
      };
    }
  }
  return {
    accel: "kvm",
    reason: `the guest kernel reached /init under KVM in ${kvm.ms} ms`,
    probeMs: took(),
  };
}

/**
 * Records a verdict learnt the hard way (a guest crashed under KVM after the probe passed), so
 * the next create on this host goes straight to it.
 */
export async function recordAccelVerdict(
  verdict: Pick<AccelVerdict, "accel" | "reason">,
  options: Pick<DetectOptions, "env" | "cacheDir" | "qemuPath" | "image" | "dataDir">,
): Promise<void> {
  const inputs = await resolveInputs(options, options.env ?? process.env);
  const key = await verdictKey(inputs.qemuPath, inputs.image);
  await writeCache(inputs.cachePath, { key, ...verdict, probeMs: 0, checkedAt: new Date().toISOString() });
}

export { hostTscKhz } from "../common/host-clock.js";

/** True when vhost-vsock can be used (the device node exists and is read/write for us). */
export async function vhostVsockAvailable(): Promise<boolean> {
  try {
    await access("/dev/vhost-vsock", constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}
