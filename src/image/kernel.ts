/**
 * The guest kernel from a Debian linux-image .deb: vmlinuz plus only the modules an image
 * needs, decompressed (busybox insmod cannot read .ko.xz/.ko.zst) and ordered so dependencies
 * load first. The pick is cached per (package, version, module list) in the shared cache dir:
 * unpacking the 70 MB .deb is the slowest step of a cold tiny build.
 */
import { createHash } from "node:crypto";
import { mkdir, mkdtemp, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { ImageBuildError } from "../errors.js";
import { type AptPackage, extractDeb, fetchDeb } from "./apt.js";
import { exec } from "./exec.js";
import { moduleDepends, moduleName, orderModules, parseModulesBuiltin } from "./kmod.js";

export interface KernelPick {
  dir: string;
  /** uname -r */
  release: string;
  vmlinuz: string;
  /** The uncompressed ELF kernel, booted through PVH (see extractVmlinux). */
  vmlinux: string;
  /** Module names in load order; files are `<dir>/modules/<name>.ko`. */
  modules: string[];
  builtin: string[];
}

async function walk(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...(await walk(p)));
    else out.push(p);
  }
  return out;
}

async function readKo(path: string, signal?: AbortSignal): Promise<Buffer> {
  if (path.endsWith(".ko")) return readFile(path);
  if (path.endsWith(".ko.xz")) return (await exec("xz", ["-dc", path], { signal })).stdout;
  if (path.endsWith(".ko.zst")) return (await exec("zstd", ["-dcq", path], { signal })).stdout;
  if (path.endsWith(".ko.gz")) return (await exec("gzip", ["-dc", path], { signal })).stdout;
  throw new ImageBuildError(`unknown kernel module format: ${path}`);
}

const MAGICS: { magic: Buffer; cmd: string; args: string[] }[] = [
  { magic: Buffer.from("fd377a585a00", "hex"), cmd: "xz", args: ["-dcq", "--single-stream"] },
  { magic: Buffer.from("28b52ffd", "hex"), cmd: "zstd", args: ["-dcq"] },
  { magic: Buffer.from("1f8b0800", "hex"), cmd: "gzip", args: ["-dcq"] },
];

/**
 * The ELF vmlinux inside a bzImage (what the kernel's scripts/extract-vmlinux does). QEMU boots
 * it directly through the PVH entry point, skipping in-guest decompression: under TCG that
 * saves seconds per boot (8-14 s to sshd with vmlinuz, about 4 s with vmlinux here).
 */
export async function extractVmlinux(bzImage: Buffer, signal?: AbortSignal): Promise<Buffer> {
  const ELF = Buffer.from("7f454c46", "hex");
  for (const { magic, cmd, args } of MAGICS) {
    let at = bzImage.indexOf(magic);
    while (at >= 0) {
      try {
        const { stdout } = await exec(cmd, args, { input: bzImage.subarray(at), signal });
        if (stdout.subarray(0, 4).equals(ELF)) return stdout;
      } catch (e) {
        // zstd/gzip complain about the bytes after the stream: keep the output if it is ELF.
        if (signal?.aborted) throw e;
      }
      at = bzImage.indexOf(magic, at + 1);
    }
  }
  throw new ImageBuildError("could not find an ELF vmlinux inside the kernel image.");
}

export async function pickKernel(
  pkg: AptPackage,
  wanted: readonly string[],
  optional: readonly string[],
  cacheDir: string,
  signal?: AbortSignal,
): Promise<KernelPick> {
  const key = `v2_${pkg.name}_${pkg.version}_${[...wanted, ...optional.map((o) => `${o}?`)].join(",")}`;
  const hashKey = createHash("sha256").update(key).digest("hex").slice(0, 16);
  const dir = join(cacheDir, "kernels", `${pkg.name}-${hashKey}`);
  try {
    const meta = JSON.parse(await readFile(join(dir, "pick.json"), "utf8")) as KernelPick;
    return { ...meta, dir, vmlinuz: join(dir, "vmlinuz"), vmlinux: join(dir, "vmlinux") };
  } catch {
    /* not cached yet */
  }
  const deb = await fetchDeb(pkg, cacheDir, signal);
  await mkdir(join(cacheDir, "kernels"), { recursive: true });
  const work = await mkdtemp(join(cacheDir, "kernels", ".x-"));
  try {
    const root = join(work, "root");
    await extractDeb(deb, root, signal);
    const releases = await readdir(join(root, "lib", "modules")).catch(() => [] as string[]);
    if (releases.length !== 1) {
      throw new ImageBuildError(`${pkg.name} ships ${releases.length} module trees, expected 1.`);
    }
    const release = releases[0]!;
    const modRoot = join(root, "lib", "modules", release);
    const builtin = parseModulesBuiltin(
      await readFile(join(modRoot, "modules.builtin"), "utf8").catch(() => ""),
    );
    const files = new Map<string, string>();
    for (const f of await walk(join(modRoot, "kernel"))) {
      if (/\.ko(\.xz|\.zst|\.gz)?$/.test(f)) files.set(moduleName(f), f);
    }
    const bytes = new Map<string, Buffer>();
    const depsOf = (name: string) => {
      const b = bytes.get(name);
      return b ? moduleDepends(b) : undefined;
    };
    // Load the bytes of every module reachable from the wanted set before ordering.
    const queue = [...wanted, ...optional];
    while (queue.length) {
      const n = queue.shift()!;
      if (bytes.has(n) || builtin.has(n) || !files.has(n)) continue;
      const b = await readKo(files.get(n)!, signal);
      bytes.set(n, b);
      queue.push(...moduleDepends(b));
    }
    const order = orderModules([...wanted, ...optional], depsOf, builtin, new Set(optional));
    const out = join(work, "pick");
    await mkdir(join(out, "modules"), { recursive: true });
    const bz = await readFile(join(root, "boot", `vmlinuz-${release}`));
    await writeFile(join(out, "vmlinuz"), bz);
    await writeFile(join(out, "vmlinux"), await extractVmlinux(bz, signal));
    for (const n of order) await writeFile(join(out, "modules", `${n}.ko`), bytes.get(n)!);
    const meta = {
      release,
      modules: order,
      builtin: [...wanted, ...optional].filter((w) => builtin.has(w)),
    };
    await writeFile(join(out, "pick.json"), JSON.stringify(meta, null, 2));
    try {
      await rename(out, dir);
    } catch (e) {
      // Another builder won the race with identical content: use theirs.
      if (!["ENOTEMPTY", "EEXIST"].includes((e as NodeJS.ErrnoException).code ?? "")) throw e;
    }
    return { ...meta, dir, vmlinuz: join(dir, "vmlinuz"), vmlinux: join(dir, "vmlinux") };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
