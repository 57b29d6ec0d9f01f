/**
 * `smolvm doctor` / `SmolVM.doctor()`: what this host can do and why, in one report. Each
 * check names what it looked at and what to do when it fails; `required` marks what the
 * default image ("tiny") cannot do without, which `--strict` turns into a non-zero exit.
 */

import { constants, existsSync, readFileSync } from "node:fs";
import { access, mkdir, stat, statfs } from "node:fs/promises";
import { delimiter, join } from "node:path";
import { dataDir as defaultDataDir } from "../common/paths.js";
import { listImages } from "../image/index.js";
import { missingKernelBuildPackages } from "../image/kernel-build.js";
import { detectAccelerator, findQemu, qemuVersion } from "./accel.js";
import { networkMechanisms } from "./network/firewall.js";
import { VmStore } from "./store.js";

export interface DoctorCheck {
  name: string;
  ok: boolean;
  /** What was found, or what is missing and how to get it. */
  detail: string;
  /** The default image needs it: `smolvm doctor --strict` fails when a required check does. */
  required?: boolean;
}

export interface DoctorReport {
  accel: { verdict: "kvm" | "tcg"; reason: string; probeMs: number };
  checks: DoctorCheck[];
  /** False when a required check failed. */
  ok: boolean;
}

export interface DoctorOptions {
  dataDir?: string;
  /** Re-probe the accelerator instead of using the cached verdict. */
  refresh?: boolean;
  /** Bound for the accelerator probe (per boot). Default 10 s. */
  timeoutMs?: number;
  signal?: AbortSignal;
  env?: NodeJS.ProcessEnv;
}

/** Minimum free space in the data dir for images and VM disks. */
const MIN_FREE_BYTES = 2 * 1024 ** 3;

function which(cmd: string, env: NodeJS.ProcessEnv): string | undefined {
  const dirs = [...(env.PATH ?? "").split(delimiter), "/usr/sbin", "/sbin"];
  for (const d of dirs) {
    const p = join(d || ".", cmd);
    if (existsSync(p)) return p;
  }
  return undefined;
}

function tool(
  name: string,
  cmds: string[],
  pkg: string,
  env: NodeJS.ProcessEnv,
  required = false,
): DoctorCheck {
  const found = cmds.map((c) => which(c, env)).find(Boolean);
  return {
    name,
    ok: Boolean(found),
    detail: found ?? `not found: install ${pkg} (apt-get install ${pkg})`,
    required,
  };
}

async function device(path: string, what: string): Promise<DoctorCheck> {
  if (!existsSync(path)) return { name: path, ok: false, detail: `missing: ${what}` };
  try {
    await access(path, constants.R_OK | constants.W_OK);
    return { name: path, ok: true, detail: "present, read/write" };
  } catch {
    return { name: path, ok: false, detail: "present but not read/write for this user" };
  }
}

function userNamespaces(): DoctorCheck {
  const read = (p: string) => {
    try {
      return readFileSync(p, "utf8").trim();
    } catch {
      return undefined;
    }
  };
  const max = read("/proc/sys/user/max_user_namespaces");
  const clone = read("/proc/sys/kernel/unprivileged_userns_clone");
  const ok = max !== undefined && Number(max) > 0 && clone !== "0";
  return {
    name: "unprivileged user namespaces",
    ok,
    detail: ok
      ? `available (max_user_namespaces=${max})`
      : `unavailable (max_user_namespaces=${max ?? "?"}, unprivileged_userns_clone=${clone ?? "n/a"}): sysctl kernel.unprivileged_userns_clone=1`,
  };
}

/**
 * Which mechanism enforces network policies for this user: root's host nftables matching each VM's
 * cgroup, or rootless a user + network namespace around QEMU (probed for real as this user).
 */
function networkPolicyCheck(): DoctorCheck {
  const net = networkMechanisms({ probeAll: true });
  const rootless = net.userns
    ? "rootless user namespaces: available"
    : "rootless user namespaces: unavailable";
  const detail =
    net.mechanism === "cgroup-nftables-proxy"
      ? `root nftables: in use (cgroup v2 at ${net.cgroup2}, conntrack); ${rootless}`
      : net.mechanism === "userns-nftables-proxy"
        ? `rootless user namespaces: in use (QEMU in its own user + network namespace; nftables and conntrack there); not available to this user: ${net.problems.filter((p) => p.startsWith("root nftables")).join("; ")}`
        : `none: create() refuses to start VMs (NETWORK_POLICY_UNAVAILABLE). Fix one of: ${net.problems.join("; ")}`;
  return { name: "network policy", ok: net.mechanism !== null, detail, required: true };
}

async function dataDirCheck(dir: string): Promise<DoctorCheck[]> {
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const st = await stat(dir);
    const fs = await statfs(dir);
    const free = fs.bavail * fs.bsize;
    const mode = st.mode & 0o777;
    const mine = typeof process.getuid !== "function" || st.uid === process.getuid();
    await access(dir, constants.W_OK);
    return [
      {
        name: "data dir",
        ok: mine,
        detail: `${dir} (mode ${mode.toString(8).padStart(4, "0")}${mine ? "" : ", owned by another user: use your own SMOLVM_DATA_DIR"})`,
        required: true,
      },
      {
        name: "free space",
        ok: free >= MIN_FREE_BYTES,
        detail: `${(free / 1024 ** 3).toFixed(1)} GiB free in ${dir}${free >= MIN_FREE_BYTES ? "" : ": images and VM disks need at least 2 GiB"}`,
        required: true,
      },
    ];
  } catch (e) {
    return [
      {
        name: "data dir",
        ok: false,
        detail: `${dir} is not usable (${(e as Error).message}): set SMOLVM_DATA_DIR`,
        required: true,
      },
    ];
  }
}

/** Checks the host: QEMU, the accelerator verdict, devices, build tools, the data dir, images, VMs. */
export async function doctor(options: DoctorOptions = {}): Promise<DoctorReport> {
  const env = options.env ?? process.env;
  const base = options.dataDir ?? defaultDataDir(env);
  const checks: DoctorCheck[] = [];
  let qemuOk = false;
  try {
    const qemu = findQemu(env);
    checks.push({ name: "qemu", ok: true, detail: `${qemu}: ${await qemuVersion(qemu)}`, required: true });
    qemuOk = true;
  } catch (e) {
    checks.push({ name: "qemu", ok: false, detail: (e as Error).message, required: true });
  }
  checks.push(await device("/dev/kvm", "no hardware acceleration; guests run under TCG (slower)"));
  checks.push(await device("/dev/vhost-vsock", "the agent uses virtio-serial instead (no loss)"));
  checks.push(tool("qemu-img", ["qemu-img"], "qemu-utils", env));
  checks.push(tool("mkfs.ext4", ["mkfs.ext4"], "e2fsprogs", env));
  checks.push(tool("debootstrap", ["debootstrap"], "debootstrap", env));
  checks.push({
    name: "busybox",
    ok: existsSync("/usr/share/doc/busybox-static") || existsSync("/bin/busybox"),
    detail: existsSync("/usr/share/doc/busybox-static")
      ? "busybox-static installed"
      : "not found: install busybox-static (the tiny image's userland)",
    required: true,
  });
  checks.push(tool("cpio", ["cpio"], "cpio", env));
  checks.push(tool("C compiler", ["cc", "gcc"], "build-essential (builds the guest agent)", env));
  const kernelTools = missingKernelBuildPackages(env);
  checks.push({
    name: "kernel build tools",
    ok: kernelTools.length === 0,
    detail: kernelTools.length
      ? `not found: install ${kernelTools.join(" ")} (apt-get install ${kernelTools.join(" ")}; tiny compiles its kernel once per host)`
      : "gcc, make, flex, bison, bc, xz and libelf headers present (tiny compiles its kernel once per host)",
    required: true,
  });
  checks.push(userNamespaces());
  checks.push(networkPolicyCheck());
  checks.push(...(await dataDirCheck(base)));

  const images = await listImages({ dataDir: base });
  checks.push({
    name: "images",
    ok: images.every((i) => i.ok),
    detail: images.length
      ? images.map((i) => `${i.name}${i.ok ? "" : ` (broken: ${i.error})`}`).join(", ")
      : "none built yet (the first create builds tiny)",
  });
  const store = VmStore.open(base);
  try {
    store.reconcile();
    const running = store.list().filter((r) => r.status === "running");
    checks.push({
      name: "running VMs",
      ok: true,
      detail: running.length ? running.map((r) => `${r.name} (${r.id})`).join(", ") : "none",
    });
  } finally {
    store.close();
  }

  let accel: DoctorReport["accel"] = { verdict: "tcg", reason: "QEMU is missing", probeMs: 0 };
  if (qemuOk) {
    try {
      const v = await detectAccelerator({
        dataDir: base,
        env,
        refresh: options.refresh,
        timeoutMs: options.timeoutMs,
        signal: options.signal,
      });
      accel = { verdict: v.accel, reason: v.reason, probeMs: v.probeMs };
    } catch (e) {
      accel = {
        verdict: "tcg",
        reason: `the accelerator could not be probed: ${(e as Error).message}`,
        probeMs: 0,
      };
    }
  }
  checks.unshift({ name: "accelerator", ok: qemuOk, detail: `${accel.verdict}: ${accel.reason}` });
  return { accel, checks, ok: checks.every((c) => c.ok || !c.required) };
}
