// The suite also holds the tree to its types and lint rules: `npm test` (and so CI) fails on a
// type error, including the compile-time checks in the tests (e.g. the runner contract's result
// types in codebase-shape.test.ts), or on a lint finding.
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import { describe, expect, it } from "vitest";

const run = promisify(execFile);
const root = join(import.meta.dirname, "..", "..");
const bin = (name: string) => join(root, "node_modules", ".bin", name);

async function check(cmd: string, args: string[]): Promise<string> {
  try {
    await run(cmd, args, { cwd: root, maxBuffer: 16 << 20, timeout: 240_000 });
    return "";
  } catch (e) {
    const err = e as { stdout?: string; stderr?: string; message: string };
    return `${err.stdout ?? ""}${err.stderr ?? ""}` || err.message;
  }
}

describe("static checks", () => {
  it("typechecks (tsc --noEmit over src, test, bench and scripts)", async () => {
    expect(await check(bin("tsc"), ["--noEmit", "-p", "."])).toBe("");
  }, 300_000);

  it("passes lint (biome check)", async () => {
    expect(
      await check(bin("biome"), ["check", "--error-on-warnings", "src", "test", "bench", "scripts"]),
    ).toBe("");
  }, 300_000);
});
