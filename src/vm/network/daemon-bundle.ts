/**
 * How the network daemon (and its rootless relay) is started: the built file in an installed package; in a checkout, a
 * plain-JS bundle of its TypeScript sources made once per source version with esbuild (a
 * development dependency there) and kept in the cache dir. Node starts that about 150 ms faster
 * than the sources through tsx, and the daemon's start is on every create's path.
 */
import { createHash, randomBytes } from "node:crypto";
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { mkdir, rename, rm } from "node:fs/promises";
import { createRequire } from "node:module";
import { dirname, join, relative } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { cacheDir } from "../../common/paths.js";
import { SmolVMError } from "../../errors.js";

function packageRoot(): string {
  let d = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    if (existsSync(join(d, "package.json"))) {
      try {
        if (JSON.parse(readFileSync(join(d, "package.json"), "utf8")).name === "smolvm") return d;
      } catch {
        /* keep looking */
      }
    }
    d = dirname(d);
  }
  throw new SmolVMError("cannot find the smolvm package directory to start the network daemon.");
}

/** Name, size and mtime of every source file: a new version of any of them makes a new bundle. */
function sourceVersion(srcDir: string): string {
  const h = createHash("sha256");
  const walk = (dir: string) => {
    for (const e of readdirSync(dir, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith(".ts")) {
        const st = statSync(p);
        h.update(`${relative(srcDir, p)}\0${st.size}\0${st.mtimeMs}\n`);
      }
    }
  };
  walk(srcDir);
  return h.digest("hex").slice(0, 16);
}

let version: string | undefined;
/** Bundles made or being made by this process, by output path. */
const bundling = new Map<string, Promise<string>>();

/** The bundle of `entry` for this source version in the current cache dir, made when missing. */
function bundle(root: string, entry: NetworkProgram): Promise<string> {
  version ??= sourceVersion(join(root, "src"));
  const out = join(cacheDir(), "network-daemon", `${entry}-${version}.mjs`);
  let p = bundling.get(out);
  // A cache dir that was emptied under us (or a failed build) is built again.
  if (!p || !existsSync(out)) {
    p = existsSync(out) ? Promise.resolve(out) : build(root, entry, out);
    bundling.set(out, p);
    p.catch(() => bundling.delete(out));
  }
  return p;
}

async function build(root: string, entry: NetworkProgram, out: string): Promise<string> {
  const esbuild = (await import(
    pathToFileURL(createRequire(join(root, "package.json")).resolve("esbuild")).href
  )) as typeof import("esbuild");
  await mkdir(dirname(out), { recursive: true, mode: 0o700 });
  const tmp = `${out}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`;
  try {
    await esbuild.build({
      entryPoints: [join(root, "src", "vm", "network", `${entry}.ts`)],
      bundle: true,
      platform: "node",
      format: "esm",
      target: "node20",
      outfile: tmp,
      logLevel: "silent",
    });
    await rename(tmp, out);
  } finally {
    await rm(tmp, { force: true });
  }
  await pruneStaleBundles(dirname(out), entry, out).catch(() => {});
  return out;
}

/** Bundles of other source versions not built for a week: every checkout and edit makes one. */
const STALE_BUNDLE_MS = 7 * 24 * 3600_000;

async function pruneStaleBundles(dir: string, entry: NetworkProgram, keep: string): Promise<void> {
  const now = Date.now();
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (p === keep || !name.startsWith(`${entry}-`) || !name.endsWith(".mjs")) continue;
    if (now - statSync(p).mtimeMs > STALE_BUNDLE_MS) await rm(p, { force: true });
  }
}

/** The network policy's programs: the per-VM daemon, and (rootless) its relay in QEMU's namespace. */
export type NetworkProgram = "daemon" | "relay";

/**
 * Node flags for the network programs. Every VM (and every clone of a fork) starts one daemon,
 * whose start is CPU on a create's path: V8's WebAssembly trap handler, which they never use,
 * costs about 8 ms of it (where this Node has the flag).
 */
const NODE_FLAGS = process.allowedNodeEnvironmentFlags.has("--disable-wasm-trap-handler")
  ? ["--disable-wasm-trap-handler"]
  : [];

/** argv for the daemon or the relay (without its own arguments). */
export async function daemonArgv(entry: NetworkProgram = "daemon"): Promise<string[]> {
  const root = packageRoot();
  const built = join(root, "dist", "vm", "network", `${entry}.js`);
  const fromSource = fileURLToPath(import.meta.url).startsWith(join(root, "src"));
  if (!fromSource && existsSync(built)) return [process.execPath, ...NODE_FLAGS, built];
  return [process.execPath, ...NODE_FLAGS, await bundle(root, entry)];
}

/**
 * The environment of the network programs: the caller's, with `extra`, less what only costs them.
 * NODE_EXTRA_CA_CERTS makes Node parse that certificate bundle as it starts (about half of its
 * start with a system bundle of 150 certificates), and they make no TLS connection of their own.
 */
export function daemonEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env = { ...process.env, ...extra };
  delete env.NODE_EXTRA_CA_CERTS;
  return env;
}
