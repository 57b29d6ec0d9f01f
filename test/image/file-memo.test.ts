import { createHash } from "node:crypto";
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { FileMemo } from "../../src/image/file-memo.js";

const dir = mkdtempSync(join(tmpdir(), "smolvm-memo-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const sha = (s: string) => createHash("sha256").update(s).digest("hex");

describe("FileMemo", () => {
  it("hashes a file once per identity, across processes' opens, and again when it changes", async () => {
    const f = join(dir, "bin");
    writeFileSync(f, "version-1");
    const mtime = new Date(1_700_000_000_000); // whole seconds: utimes can set it back exactly
    utimesSync(f, mtime, mtime);
    const memo = await FileMemo.open(dir);
    expect(await memo.sha256(f)).toBe(sha("version-1"));
    await memo.save();
    expect(statSync(join(dir, "host-files.json")).isFile()).toBe(true);

    // Same size, same mtime, same inode: a fresh memo answers from disk without reading.
    writeFileSync(f, "version-2");
    utimesSync(f, mtime, mtime);
    expect(await (await FileMemo.open(dir)).sha256(f)).toBe(sha("version-1"));

    // A changed mtime (what any package upgrade does) is seen.
    utimesSync(f, mtime, new Date(mtime.getTime() + 5000));
    expect(await (await FileMemo.open(dir)).sha256(f)).toBe(sha("version-2"));
  });

  it("recomputes a remembered value when any file it depends on changes or disappears", async () => {
    const a = join(dir, "a");
    const b = join(dir, "b");
    writeFileSync(a, "a");
    writeFileSync(b, "b");
    let runs = 0;
    const compute = async () => {
      runs++;
      return [`run-${runs}`];
    };
    const memo = await FileMemo.open(dir);
    expect(await memo.remember("k", [a, b], compute)).toEqual(["run-1"]);
    expect(await memo.remember("k", [a, b], compute)).toEqual(["run-1"]);
    expect(await memo.remember("k", [a], compute)).toEqual(["run-2"]); // another file list
    expect(await memo.remember("k", [a, b], compute)).toEqual(["run-3"]);
    writeFileSync(b, "bb");
    expect(await memo.remember("k", [a, b], compute)).toEqual(["run-4"]);
    rmSync(b);
    await expect(memo.remember("k", [a, b], compute)).rejects.toMatchObject({ code: "ENOENT" });
    expect(runs).toBe(4);
  });

  it("starts empty from a damaged memo file and repairs it", async () => {
    const d = mkdtempSync(join(dir, "damaged-"));
    writeFileSync(join(d, "host-files.json"), "{not json");
    const f = join(d, "x");
    writeFileSync(f, "x");
    const memo = await FileMemo.open(d);
    expect(await memo.sha256(f)).toBe(sha("x"));
    await memo.save();
    expect(Object.keys(JSON.parse(readFileSync(join(d, "host-files.json"), "utf8")))).toEqual([
      `sha256:${f}`,
    ]);
  });

  it("saves from concurrent memos without failing, and never fails on an unwritable cache", async () => {
    const d = mkdtempSync(join(dir, "race-"));
    const f = join(d, "x");
    writeFileSync(f, "x");
    const memos = await Promise.all(Array.from({ length: 8 }, () => FileMemo.open(d)));
    await Promise.all(memos.map((m) => m.sha256(f)));
    await Promise.all(memos.map((m) => m.save()));
    expect(readdirSync(d).sort()).toEqual(["host-files.json", "x"]);

    const gone = await FileMemo.open(join(d, "missing-dir"));
    expect(await gone.sha256(f)).toBe(sha("x"));
    await expect(gone.save()).resolves.toBeUndefined();
  });
});
