/**
 * Which accelerator QEMU should use. KVM only when /dev/kvm exists AND really runs a guest: some
 * hosts (nested PVM sandboxes) expose a /dev/kvm that opens but cannot run one. We find out by
 * running a 16-byte firmware under KVM with the same machine and `-cpu host` a VM would use; it
 * writes one byte to an isa-debug-exit port, which makes QEMU exit with a known code. The verdict is
 * cached per host (kernel release + QEMU version) in the data dir.
 */
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { constants, existsSync } from "node:fs";
import { access, mkdir, mkdtemp, readFile, rename, rm, writeFile } from "node:fs/promises";
import { release, tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import { dataDir as defaultDataDir } from "../common/paths.js";
import { HostDependencyError, ValidationError } from "../errors.js";
import type { Accel } from "./qemu.js";

export type AccelChoice = Accel | "auto";

export interface AccelVerdict {
  accel: Accel;
  /** Why: "forced by SMOLVM_ACCEL", "/dev/kvm is missing", "KVM runs guests", ... */
  reason: string;
}

export interface DetectOptions {
  /** Overrides SMOLVM_ACCEL. */
  force?: AccelChoice;
  env?: NodeJS.ProcessEnv;
  dataDir?: string;
  qemuPath?: string;
  /** Bound for the KVM probe. Default 5 s. */
  timeoutMs?: number;
  /** Ignore (and overwrite) the cached verdict. */
  refresh?: boolean;
  /** Do not print the fallback notice. */
  quiet?: boolean;
}

const PROBE_EXIT_CODE = (0x2a << 1) | 1;
const CACHE_FILE = "accel.json";
let fallbackNoticeShown = false;

/** Real-mode firmware at the reset vector: `mov al,0x2a; out 0xf4,al; hlt; jmp $-1`. */
function probeFirmware(): Buffer {
  const fw = Buffer.alloc(65536, 0xf4);
  Buffer.from([0xb0, 0x2a, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd]).copy(fw, fw.length - 16);
  return fw;
}

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

function run(
  file: string,
  args: string[],
  timeoutMs: number,
): Promise<{ code: number | null; signal: string | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      file,
      args,
      { timeout: timeoutMs, killSignal: "SIGKILL", maxBuffer: 1 << 20 },
      (err, stdout, stderr) => {
        const e = err as (NodeJS.ErrnoException & { code?: unknown; signal?: string }) | null;
        resolve({
          code: e ? (typeof e.code === "number" ? e.code : null) : 0,
          signal: e?.signal ?? null,
          stdout: String(stdout),
          stderr: String(stderr),
        });
      },
    );
  });
}

async function qemuVersion(qemuPath: string): Promise<string> {
  const r = await run(qemuPath, ["--version"], 5_000);
  const first = r.stdout.split("\n")[0]?.trim();
  if (r.code !== 0 || !first) {
    throw new HostDependencyError(`${qemuPath} --version failed; reinstall QEMU.`, { code: "QEMU_MISSING" });
  }
  return first;
}

/** Runs the probe firmware under KVM. Resolves with a failure reason, or undefined when KVM works. */
async function probeKvm(qemuPath: string, timeoutMs: number): Promise<string | undefined> {
  const dir = await mkdtemp(join(tmpdir(), "smolvm-kvmprobe-"));
  try {
    const fw = join(dir, "probe.bin");
    await writeFile(fw, probeFirmware());
    const r = await run(
      qemuPath,
      [
        "-M",
        "microvm,x-option-roms=off,isa-serial=off,rtc=off",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "16M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-bios",
        fw,
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=1",
      ],
      timeoutMs,
    );
    if (r.code === PROBE_EXIT_CODE) return undefined;
    const said = r.stderr.trim().split("\n").filter(Boolean).pop()?.slice(0, 160);
    if (r.signal === "SIGKILL") return `the KVM probe guest did not finish within ${timeoutMs} ms`;
    return `the KVM probe guest failed (${r.signal ?? `exit ${r.code}`}${said ? `: ${said}` : ""})`;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

interface CacheEntry {
  key: string;
  accel: Accel;
  reason: string;
  checkedAt: string;
}

async function readCache(path: string, key: string): Promise<CacheEntry | undefined> {
  try {
    const entries = JSON.parse(await readFile(path, "utf8")) as CacheEntry[];
    return Array.isArray(entries)
      ? entries.find((e) => e.key === key && (e.accel === "kvm" || e.accel === "tcg"))
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
  const tmp = `${path}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`;
  await writeFile(tmp, `${JSON.stringify(entries, null, 2)}\n`, { mode: 0o600 });
  await rename(tmp, path);
}

export async function detectAccelerator(options: DetectOptions = {}): Promise<AccelVerdict> {
  const env = options.env ?? process.env;
  const forced =
    parseChoice(options.force, "force") ?? parseChoice(env.SMOLVM_ACCEL, "SMOLVM_ACCEL") ?? "auto";
  if (forced !== "auto") {
    const by = options.force && options.force !== "auto" ? "the caller" : "SMOLVM_ACCEL";
    return { accel: forced, reason: `forced by ${by}` };
  }
  const verdict = await autoDetect(options, env);
  if (verdict.accel === "tcg" && existsSync("/dev/kvm") && !options.quiet && !fallbackNoticeShown) {
    fallbackNoticeShown = true;
    process.stderr.write(
      `smolvm: /dev/kvm is present but cannot run guests (${verdict.reason}); using TCG software emulation (slower)\n`,
    );
  }
  return verdict;
}

async function autoDetect(options: DetectOptions, env: NodeJS.ProcessEnv): Promise<AccelVerdict> {
  if (!existsSync("/dev/kvm")) return { accel: "tcg", reason: "/dev/kvm is missing" };
  try {
    await access("/dev/kvm", constants.R_OK | constants.W_OK);
  } catch {
    return { accel: "tcg", reason: "no read/write permission on /dev/kvm (join the kvm group)" };
  }
  const qemuPath = options.qemuPath ?? findQemu(env);
  const key = `${release()}|${await qemuVersion(qemuPath)}`;
  const dir = options.dataDir ?? defaultDataDir(env);
  const cachePath = join(dir, CACHE_FILE);
  if (!options.refresh) {
    const cached = await readCache(cachePath, key);
    if (cached) return { accel: cached.accel, reason: cached.reason };
  }
  const failure = await probeKvm(qemuPath, options.timeoutMs ?? 5_000);
  const verdict: AccelVerdict = failure
    ? { accel: "tcg", reason: failure }
    : { accel: "kvm", reason: "KVM runs guests" };
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await writeCache(cachePath, { key, ...verdict, checkedAt: new Date().toISOString() });
  return verdict;
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
