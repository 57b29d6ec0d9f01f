/**
 * Where smolvm keeps its state and caches. Every module resolves these through here so that
 * `SMOLVM_DATA_DIR` (tests, several installs side by side) redirects everything at once.
 */
import { homedir } from "node:os";
import { isAbsolute, join, resolve } from "node:path";

function fromEnv(name: string, env: NodeJS.ProcessEnv): string | undefined {
  const v = env[name];
  return v && v.length > 0 ? resolve(v) : undefined;
}

/** State: images, keys, VM records. `SMOLVM_DATA_DIR`, else `$XDG_STATE_HOME/smolvm`, else `~/.local/state/smolvm`. */
export function dataDir(env: NodeJS.ProcessEnv = process.env): string {
  const explicit = fromEnv("SMOLVM_DATA_DIR", env);
  if (explicit) return explicit;
  const xdg = env.XDG_STATE_HOME;
  if (xdg && isAbsolute(xdg)) return join(xdg, "smolvm");
  return join(homedir(), ".local", "state", "smolvm");
}

/**
 * Re-downloadable things (Debian .debs, unpacked kernels), shared by every data dir so that
 * test runs with throw-away data dirs stay fast. `SMOLVM_CACHE_DIR`, else
 * `$XDG_CACHE_HOME/smolvm`, else `~/.cache/smolvm`.
 */
export function cacheDir(env: NodeJS.ProcessEnv = process.env): string {
  const explicit = fromEnv("SMOLVM_CACHE_DIR", env);
  if (explicit) return explicit;
  const xdg = env.XDG_CACHE_HOME;
  if (xdg && isAbsolute(xdg)) return join(xdg, "smolvm");
  return join(homedir(), ".cache", "smolvm");
}

export function imagesDir(base: string = dataDir()): string {
  return join(base, "images");
}

export function keysDir(base: string = dataDir()): string {
  return join(base, "keys");
}
