/**
 * Builds the guest agent (agent/*.c) with the host's C compiler into a cache directory keyed
 * by a fingerprint of the sources, compiler and flags, so it is rebuilt only when they change.
 * Used by the image builder and by tests that run the agent on the host. The published package
 * carries a static x86_64 build (`npm pack` runs scripts/prebuild-agent.ts), used instead of
 * compiling when it was built from exactly these sources: hosts without a C toolchain, or whose
 * own architecture is not the guest's, still get the agent.
 */
import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { chmod, copyFile, mkdir, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { Deadline } from "../common/deadline.js";
import { cacheDir as defaultCacheDir } from "../common/paths.js";
import { HostDependencyError } from "../errors.js";
import { exec } from "./exec.js";

export interface BuildAgentOptions {
  /** Where built binaries are kept. Default `<cacheDir>/agent` (see cacheDir in common/paths.ts). */
  cacheDir?: string;
  /** C compiler. Default $CC or "cc". */
  cc?: string;
  /** Link statically (what a guest needs). Default true; false builds a host-only binary. */
  static?: boolean;
  /** Directory holding agent.c. Default: found next to this package. */
  sourceDir?: string;
  /** Use the packaged prebuilt agent when its sources match (static builds only). Default true. */
  prebuilt?: boolean;
  timeoutMs?: number;
  signal?: AbortSignal;
}

const CFLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"];

/** Where the package keeps the prebuilt guest agent, relative to agent/. */
export const PREBUILT_DIR = join("prebuilt", "x86_64");
const PREBUILT_HASH = "sources.sha256";

async function agentSources(sourceDir: string): Promise<string[]> {
  return (await readdir(sourceDir)).filter((f) => /\.[ch]$/.test(f)).sort();
}

/** The agent's sources, name and bytes, in name order (read at once: every create plans its image). */
async function readAgentSources(sourceDir: string): Promise<Array<[string, Buffer]>> {
  const names = await agentSources(sourceDir);
  const bytes = await Promise.all(names.map((f) => readFile(join(sourceDir, f))));
  return names.map((f, i) => [f, bytes[i]!]);
}

/** Feeds each source's name and bytes to `h`. */
function hashSources(h: ReturnType<typeof createHash>, sources: Array<[string, Buffer]>): void {
  for (const [f, bytes] of sources) {
    h.update(`${f}\0`);
    h.update(bytes);
  }
}

/** sha256 over the agent's source names and contents: what a prebuilt binary is checked against. */
export async function agentSourcesHash(sourceDir: string): Promise<string> {
  const h = createHash("sha256");
  hashSources(h, await readAgentSources(sourceDir));
  return h.digest("hex");
}

/** The packaged prebuilt agent, if it was built from exactly the sources in sourceDir. */
async function prebuiltAgent(sourceDir: string): Promise<string | undefined> {
  const bin = join(sourceDir, PREBUILT_DIR, "smolvm-agent");
  try {
    const recorded = (await readFile(join(sourceDir, PREBUILT_DIR, PREBUILT_HASH), "utf8")).trim();
    if (recorded === (await agentSourcesHash(sourceDir)) && (await stat(bin)).isFile()) return bin;
  } catch {
    // none packaged
  }
  return undefined;
}

/**
 * Compiles the static x86_64 agent into agent/prebuilt/x86_64/ with the hash of its sources
 * (run when packing). Returns the binary's path.
 */
export async function writePrebuiltAgent(options: Omit<BuildAgentOptions, "static" | "prebuilt"> = {}) {
  if (process.arch !== "x64") {
    throw new HostDependencyError(
      `the prebuilt guest agent is x86_64 and must be compiled on an x86_64 host; this one is ${process.arch}.`,
    );
  }
  const sourceDir = resolve(options.sourceDir ?? agentSourceDir());
  const built = await buildAgent({ ...options, sourceDir, static: true, prebuilt: false });
  const dir = join(sourceDir, PREBUILT_DIR);
  await mkdir(dir, { recursive: true });
  const bin = join(dir, "smolvm-agent");
  await copyFile(built, bin);
  await chmod(bin, 0o755);
  await writeFile(join(dir, PREBUILT_HASH), `${await agentSourcesHash(sourceDir)}\n`);
  return bin;
}

/** The agent/ directory of this package (walks up from this module: works from src/ and dist/). */
export function agentSourceDir(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    const candidate = join(dir, "agent");
    if (existsSync(join(candidate, "agent.c"))) return candidate;
    dir = dirname(dir);
  }
  throw new HostDependencyError(
    "the guest agent sources (agent/agent.c) were not found next to the smolvm package: reinstall smolvm.",
  );
}

/** Runs the compiler through image/exec.ts, bounded by `timeoutMs` and the caller's signal. */
async function run(cmd: string, args: string[], cwd: string, timeoutMs: number, signal?: AbortSignal) {
  const deadline = new Deadline(timeoutMs, signal, `${cmd} (building the guest agent)`);
  try {
    const { stdout } = await exec(cmd, args, { cwd, signal: deadline.signal });
    return { stdout: stdout.toString("utf8") };
  } finally {
    deadline.dispose();
  }
}

/** `cc --version`'s first line, asked once per process and compiler (it keys the build cache). */
const compilerVersions = new Map<string, string>();

async function compilerVersion(cc: string, cwd: string, signal?: AbortSignal): Promise<string> {
  const known = compilerVersions.get(cc);
  if (known !== undefined) return known;
  const v = (await run(cc, ["--version"], cwd, 10_000, signal)).stdout.split("\n")[0] ?? "";
  compilerVersions.set(cc, v);
  return v;
}

/** Compiles the agent if needed and returns the path of the binary. */
export async function buildAgent(options: BuildAgentOptions = {}): Promise<string> {
  const sourceDir = resolve(options.sourceDir ?? agentSourceDir());
  const cc = options.cc ?? process.env.CC ?? "cc";
  const isStatic = options.static ?? true;
  const timeoutMs = options.timeoutMs ?? 120_000;
  const cacheDir = resolve(options.cacheDir ?? join(defaultCacheDir(), "agent"));

  if (isStatic && options.prebuilt !== false) {
    const prebuilt = await prebuiltAgent(sourceDir);
    if (prebuilt) return prebuilt;
  }
  if (isStatic && process.arch !== "x64") {
    throw new HostDependencyError(
      `the guest agent is x86_64, but this host's compiler builds for ${process.arch} and the package carries no prebuilt agent for these sources: install the published smolvm package, or use commChannel "ssh".`,
    );
  }
  const sources = await readAgentSources(sourceDir);
  let ccVersion: string;
  try {
    ccVersion = await compilerVersion(cc, sourceDir, options.signal);
  } catch (err) {
    throw new HostDependencyError(
      `the C compiler ${JSON.stringify(cc)} is not usable, so the guest agent cannot be built: install gcc (apt-get install gcc libc6-dev) or set CC.`,
      { cause: err, details: { cc } },
    );
  }
  const h = createHash("sha256");
  h.update(`${ccVersion}\0${CFLAGS.join(" ")}\0${isStatic}\0${process.arch}\0`);
  hashSources(h, sources);
  const fingerprint = h.digest("hex").slice(0, 16);
  const out = join(cacheDir, fingerprint, "smolvm-agent");
  try {
    if ((await stat(out)).isFile()) return out;
  } catch {
    // not built yet
  }

  await mkdir(dirname(out), { recursive: true });
  // Build to a unique name and rename: concurrent builders never see a half-written binary.
  const tmp = `${out}.${randomBytes(6).toString("hex")}.tmp`;
  const args = [
    ...CFLAGS,
    "-o",
    tmp,
    ...sources.map(([f]) => f).filter((f) => f.endsWith(".c")),
    ...(isStatic ? ["-static"] : []),
  ];
  try {
    await run(cc, args, sourceDir, timeoutMs, options.signal);
    await rename(tmp, out);
  } catch (err) {
    await rm(tmp, { force: true });
    // image/exec.ts puts the tail of the compiler's stderr into its error message.
    const detail = (err instanceof Error ? err.message : String(err)).slice(0, 2000);
    throw new HostDependencyError(
      `building the guest agent with ${cc} failed${isStatic ? " (static link)" : ""}: ${detail}. ` +
        (isStatic
          ? "Install the static C library (apt-get install libc6-dev) or pass static: false for a host-only build."
          : "Check that a working C toolchain is installed."),
      { cause: err, details: { cc, sourceDir } },
    );
  }
  return out;
}
