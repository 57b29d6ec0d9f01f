/**
 * The layers ARCHITECTURE.md draws, checked on the source: cli > vm > image > channel > ssh >
 * common > the root modules (command.ts, errors.ts). A module may import only
 * from its own folder or from a folder below it, so no import runs upward and no two folders
 * import each other. Scans every import/export-from/import() specifier under src/.
 */
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { describe, expect, it } from "vitest";

const SRC = resolve(import.meta.dirname, "../../src");
/** Higher imports lower. The root modules (command.ts, errors.ts) are the base, below common. */
const RANK: Record<string, number> = { cli: 5, vm: 4, image: 3, channel: 2, ssh: 1, common: 0, "<root>": -1 };

function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? sources(join(dir, e.name)) : e.name.endsWith(".ts") ? [join(dir, e.name)] : [],
  );
}

/** The layer of a path under src/: its first folder, or "<root>" for src/*.ts. */
function layerOf(path: string): string {
  const parts = relative(SRC, path).split("/");
  return parts.length === 1 ? "<root>" : parts[0]!;
}

const SPECIFIER =
  /(?:^|[\s;])(?:import|export)\s[^;]*?\sfrom\s+["']([^"']+)["']|import\(\s*["']([^"']+)["']\s*\)/g;

/** Every relative import of `text` (a file at `file`) that breaks the layer order. */
function layerViolations(file: string, text: string): string[] {
  const out: string[] = [];
  const from = layerOf(file);
  for (const m of text.matchAll(SPECIFIER)) {
    const spec = m[1] ?? m[2]!;
    if (!spec.startsWith(".")) continue;
    const target = resolve(dirname(file), spec);
    if (!target.startsWith(`${SRC}/`)) continue;
    const to = layerOf(target);
    if (to === from) continue;
    if (RANK[from] === undefined || RANK[to] === undefined) {
      out.push(
        `${relative(SRC, file)}: folder ${RANK[from] === undefined ? from : to} has no place in the layers`,
      );
    } else if (RANK[to]! >= RANK[from]!) {
      out.push(`${relative(SRC, file)} (${from}) imports ${spec} (${to})`);
    }
  }
  return out;
}

describe("layers", () => {
  it("no module imports upward or sideways between cli/, vm/, image/, channel/, ssh/ and common/", () => {
    const violations = sources(SRC)
      .filter((f) => relative(SRC, f) !== "index.ts") // the package entry re-exports every layer
      .flatMap((f) => layerViolations(f, readFileSync(f, "utf8")));
    expect(violations).toEqual([]);
  });

  it("catches an upward, a sideways and a dynamic import", () => {
    const file = join(SRC, "channel", "x.ts");
    expect(layerViolations(file, 'import { a } from "../vm/y.js";')).toEqual([
      "channel/x.ts (channel) imports ../vm/y.js (vm)",
    ]);
    expect(
      layerViolations(join(SRC, "ssh", "x.ts"), 'export type { B } from "../channel/b.js";'),
    ).toHaveLength(1);
    expect(
      layerViolations(join(SRC, "common", "x.ts"), 'const m = await import("../image/z.js");'),
    ).toHaveLength(1);
    expect(
      layerViolations(
        join(SRC, "image", "x.ts"),
        'import {\n  c,\n} from "./c.js";\nimport { d } from "../channel/d.js";',
      ),
    ).toEqual([]);
    expect(layerViolations(join(SRC, "errors.ts"), 'import { e } from "./ssh/e.js";')).toHaveLength(1);
  });
});
