/**
 * The `tiny` image: our own build of Debian's kernel source (kernel-build.ts, everything built
 * in) booted directly, and an initramfs holding busybox-static and OpenSSH (sshd, sftp-server,
 * ssh-keygen), with /init from init-script.ts. Built rootless: packages are unpacked, never
 * installed, and the cpio is written by our own writer (root-owned entries without fakeroot).
 */
import { copyFile, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { HostDependencyError } from "../errors.js";
import { buildAgent } from "./agent-build.js";
import { type AptPackage, extractDeb, fetchDeb, resolveImagePackages } from "./apt.js";
import { type CpioEntry, withParentDirs, writeCpio } from "./cpio.js";
import { exec } from "./exec.js";
import { FileMemo } from "./file-memo.js";
import { computeFingerprint } from "./fingerprint.js";
import { LD_SO_CACHE, sharedLibraries } from "./host-libs.js";
import { PROFILE, renderTinyInit, SSHD_CONFIG } from "./init-script.js";
import { buildKernel, kernelRecipe } from "./kernel-build.js";

export const SSH_BINARIES = [
  "/usr/sbin/sshd",
  "/usr/lib/openssh/sftp-server",
  "/usr/bin/ssh-keygen",
] as const;

export const ETC_PASSWD = `root:x:0:0:root:/root:/bin/sh
sshd:x:100:65534:sshd privilege separation:/run/sshd:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
`;
export const ETC_GROUP = "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n";
// "*": no password login, but not "locked" ("!"), which would also refuse key logins.
export const ETC_SHADOW =
  "root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n";

export interface TinyPlan {
  fingerprint: string;
  /** The static guest agent binary, or undefined when this host cannot build it. */
  agentPath?: string;
  /** The linux-source package tiny's kernel is compiled from. */
  kernelSource: AptPackage;
  busybox: AptPackage;
  hostFiles: Record<string, string>;
  packages: Record<string, string>;
}

/** Resolves versions and hashes inputs: cheap (no download), decides the fingerprint. */
export async function planTiny(cacheDir: string, signal?: AbortSignal): Promise<TinyPlan> {
  // Independent inputs, looked up together: every create plans its image before QEMU starts.
  const [{ kernelSource, pkgs }, memo, agentPath] = await Promise.all([
    resolveImagePackages(["busybox-static"], cacheDir, signal, { kernelSource: true }),
    FileMemo.open(cacheDir),
    guestAgent(cacheDir, signal),
  ]);
  const libs = await memo.remember(
    `ldd:${JSON.stringify(SSH_BINARIES)}`,
    [...SSH_BINARIES, LD_SO_CACHE],
    () => sharedLibraries(SSH_BINARIES, signal),
  );
  const files = [...SSH_BINARIES, ...libs];
  const [shas, agentSha] = await Promise.all([
    Promise.all(files.map((f) => memo.sha256(f))),
    agentPath ? memo.sha256(agentPath) : null,
  ]);
  const hostFiles = Object.fromEntries(files.map((f, i) => [f, shas[i]!]));
  await memo.save();
  const busybox = pkgs.get("busybox-static")!;
  const source = kernelSource!;
  const fingerprint = computeFingerprint({
    image: "tiny",
    kernelSource: `${source.name}=${source.version}`,
    kernel: kernelRecipe(),
    busybox: `${busybox.name}=${busybox.version}`,
    hostFiles,
    agent: agentSha,
    init: renderTinyInit(),
    sshdConfig: SSHD_CONFIG,
    profile: PROFILE,
    etc: [ETC_PASSWD, ETC_GROUP, ETC_SHADOW],
  });
  return {
    fingerprint,
    agentPath,
    kernelSource: source,
    busybox,
    hostFiles,
    packages: { [source.name]: source.version, [busybox.name]: busybox.version },
  };
}

/**
 * The guest agent (agent/*.c, compiled statically and cached by the agent builder). A host
 * without a static C toolchain still gets a working image, with SSH as its only channel.
 */
export async function guestAgent(cacheDir: string, signal?: AbortSignal): Promise<string | undefined> {
  try {
    return await buildAgent({ cacheDir: join(cacheDir, "agent"), signal });
  } catch (e) {
    if (e instanceof HostDependencyError) return undefined;
    throw e;
  }
}

/**
 * The kernel runs /sbin/modprobe (its CONFIG_MODPROBE_PATH) for every module it lacks, from its
 * own initcalls on. Busybox's modprobe cannot find our modules (they live in
 * /lib/modules/smolvm) and each run costs a cold busybox exec: under TCG about 100 ms of every
 * boot. Without the file the kernel's request fails at once; users still find the applet on PATH.
 */
const KERNEL_MODPROBE = "sbin/modprobe";
const USER_MODPROBE = "usr/sbin/modprobe";

/** Busybox binary + applet symlinks, from the unpacked busybox-static package. */
export async function busyboxEntries(
  pkg: AptPackage,
  cacheDir: string,
  signal?: AbortSignal,
): Promise<CpioEntry[]> {
  const deb = await fetchDeb(pkg, cacheDir, signal);
  const tmp = await mkdtemp(join(cacheDir, ".bb-"));
  try {
    await extractDeb(deb, tmp, signal);
    const bin = join(tmp, "bin", "busybox");
    const data = await readFile(bin);
    // The static binary runs on the host too: ask it for its applets.
    const list = (await exec(bin, ["--list-full"], { signal })).stdout.toString("utf8");
    const entries: CpioEntry[] = [{ type: "file", path: "bin/busybox", mode: 0o755, data }];
    for (const line of list.split("\n")) {
      let p = line.trim();
      if (!p || p === "bin/busybox" || p === "linuxrc") continue;
      if (p === KERNEL_MODPROBE) p = USER_MODPROBE;
      const depth = p.split("/").length - 1;
      entries.push({ type: "symlink", path: p, target: `${"../".repeat(depth)}bin/busybox` });
    }
    return entries;
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

/** The base initramfs for `modules` (from `kernelModulesDir`) with the given /init. */
export async function initramfsEntries(opts: {
  init: string;
  modules: readonly string[];
  kernelModulesDir: string;
  busybox: CpioEntry[];
  withSsh: boolean;
  agentPath?: string;
  signal?: AbortSignal;
}): Promise<CpioEntry[]> {
  const dirs = ["proc", "sys", "dev", "tmp", "run", "root", "etc", "var/log", "lib/modules/smolvm", "smolvm"];
  const entries: CpioEntry[] = dirs.map((d) => ({
    type: "dir",
    path: d,
    mode: d === "tmp" ? 0o1777 : d === "root" ? 0o700 : 0o755,
  }));
  entries.push(...opts.busybox);
  entries.push({ type: "file", path: "init", mode: 0o755, data: opts.init });
  if (opts.agentPath) {
    entries.push({
      type: "file",
      path: "sbin/smolvm-agent",
      mode: 0o755,
      data: await readFile(opts.agentPath),
    });
  }
  for (const m of opts.modules) {
    entries.push({
      type: "file",
      path: `lib/modules/smolvm/${m}.ko`,
      mode: 0o644,
      data: await readFile(join(opts.kernelModulesDir, `${m}.ko`)),
    });
  }
  if (opts.withSsh) {
    entries.push(
      { type: "file", path: "etc/passwd", mode: 0o644, data: ETC_PASSWD },
      { type: "file", path: "etc/group", mode: 0o644, data: ETC_GROUP },
      { type: "file", path: "etc/shadow", mode: 0o600, data: ETC_SHADOW },
      { type: "file", path: "etc/profile", mode: 0o644, data: PROFILE },
      { type: "file", path: "etc/ssh/sshd_config", mode: 0o644, data: SSHD_CONFIG },
      { type: "dir", path: "etc/profile.d", mode: 0o755 },
    );
    const libs = await sharedLibraries(SSH_BINARIES, opts.signal);
    for (const f of [...SSH_BINARIES, ...libs]) {
      // readFile follows symlinks: the guest gets the library bytes under the name ld.so asks for.
      entries.push({ type: "file", path: f, mode: 0o755, data: await readFile(f) });
    }
  }
  return withParentDirs(entries);
}

export interface BuiltArtifacts {
  kernelRelease: string;
  /** Whether the image ships the guest agent. */
  agent: boolean;
  packages: Record<string, string>;
  modules: string[];
}

/** Builds tiny's artifacts (vmlinuz, initrd.cpio) into `outDir`. */
export async function buildTinyInto(
  plan: TinyPlan,
  outDir: string,
  cacheDir: string,
  step: (name: string, detail?: boolean) => void,
  signal?: AbortSignal,
): Promise<BuiltArtifacts> {
  step("preparing the kernel");
  const kernel = await buildKernel(plan.kernelSource, cacheDir, { signal, onStep: (s) => step(s, true) });
  step("fetching busybox");
  const busybox = await busyboxEntries(plan.busybox, cacheDir, signal);
  step("writing the initramfs");
  const entries = await initramfsEntries({
    init: renderTinyInit(),
    modules: [],
    kernelModulesDir: "",
    busybox,
    withSsh: true,
    agentPath: plan.agentPath,
    signal,
  });
  await writeFile(join(outDir, "initrd.cpio"), writeCpio(entries));
  await copyFile(kernel.vmlinux, join(outDir, "vmlinux"));
  return {
    kernelRelease: kernel.release,
    agent: Boolean(plan.agentPath),
    packages: plan.packages,
    modules: [],
  };
}
