/**
 * Kernel module bookkeeping without kmod on the host: reads `depends=` from a module's
 * .modinfo strings and orders modules so dependencies load first (busybox insmod does not
 * resolve dependencies).
 */
import { ImageBuildError } from "../errors.js";

/** The `depends=` list from a module's bytes (uncompressed .ko). */
export function moduleDepends(ko: Buffer): string[] {
  const marker = Buffer.from("\0depends=", "latin1");
  const at = ko.indexOf(marker);
  if (at < 0) return [];
  const start = at + marker.length;
  const end = ko.indexOf(0, start);
  const value = ko.subarray(start, end < 0 ? undefined : end).toString("latin1");
  return value
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean);
}

/** Module names built into the kernel, from modules.builtin ("kernel/.../name.ko" lines). */
export function parseModulesBuiltin(text: string): Set<string> {
  const names = new Set<string>();
  for (const line of text.split("\n")) {
    const base = line.trim().split("/").pop();
    if (base?.endsWith(".ko")) names.add(base.slice(0, -3).replace(/-/g, "_"));
  }
  return names;
}

export const moduleName = (file: string) =>
  (file.split("/").pop() ?? file).replace(/\.ko(\.xz|\.zst|\.gz)?$/, "").replace(/-/g, "_");

/**
 * Load order for `wanted` (in their given order where possible), dependencies first.
 * `depsOf` gives a module's dependencies; built-in modules are dropped; a module that is
 * neither available nor built in is an error unless listed in `optional`.
 */
export function orderModules(
  wanted: readonly string[],
  depsOf: (name: string) => string[] | undefined,
  builtin: ReadonlySet<string>,
  optional: ReadonlySet<string> = new Set(),
): string[] {
  const order: string[] = [];
  const state = new Map<string, "visiting" | "done">();
  const visit = (name: string, chain: string[]) => {
    if (builtin.has(name) || state.get(name) === "done") return;
    if (state.get(name) === "visiting") {
      throw new ImageBuildError(`kernel module dependency cycle: ${[...chain, name].join(" -> ")}.`);
    }
    const deps = depsOf(name);
    if (!deps) {
      if (optional.has(name)) return;
      throw new ImageBuildError(
        `kernel module ${name} is neither built in nor shipped in the kernel package (needed by ${chain.join(" -> ") || "the image"}).`,
        { details: { module: name } },
      );
    }
    state.set(name, "visiting");
    for (const d of deps) visit(d, [...chain, name]);
    state.set(name, "done");
    order.push(name);
  };
  for (const w of wanted) visit(w, []);
  return order;
}
