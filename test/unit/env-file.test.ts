import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { mergeEnv, parseEnvFile, renderEnvFile } from "../../src/channel/env-file.js";
import { ProtocolError, ValidationError } from "../../src/errors.js";

const tricky = {
  PLAIN: "value",
  QUOTES: `it's "quoted"`,
  MULTI: "line1\nline2\n",
  DOLLAR: "$(touch /tmp/x) `id` $HOME",
  EMPTY: "",
  UNICODE: "héllo ✓",
};

describe("env file", () => {
  it("round-trips any value through render and parse", () => {
    expect(parseEnvFile(renderEnvFile(tricky))).toEqual(tricky);
  });

  it("is what a real shell reads back exactly", () => {
    const dir = mkdtempSync(join(tmpdir(), "envfile-"));
    try {
      const file = join(dir, "env.sh");
      writeFileSync(file, renderEnvFile(tricky));
      for (const [k, v] of Object.entries(tricky)) {
        const out = execFileSync("/bin/sh", ["-c", `. ${file}; printf %s "$${k}"`]).toString();
        expect(out).toBe(v);
      }
    } finally {
      rmSync(dir, { recursive: true });
    }
  });

  it("rejects bytes it did not write", () => {
    for (const bad of ["rm -rf /\n", "export A='x", "export A='x' ; id\n", "export 1A='x'\n"]) {
      expect(() => parseEnvFile(bad)).toThrow(ProtocolError);
    }
  });

  it("merges set and unset with validation", () => {
    expect(mergeEnv({ A: "1", B: "2" }, { C: "3" }, ["A"])).toEqual({ B: "2", C: "3" });
    expect(() => mergeEnv({}, { "BAD-NAME": "x" })).toThrow(ValidationError);
    expect(() => mergeEnv({}, {}, ["9X"])).toThrow(ValidationError);
  });
});
