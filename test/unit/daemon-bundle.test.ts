/**
 * The network daemon's bundle in a checkout (daemon-bundle.ts): built once per source version
 * into the cache dir, and bundles of other versions left for a week are removed when a new one
 * is built (every checkout and edit makes one).
 */
import { existsSync, mkdirSync, mkdtempSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { daemonArgv } from "../../src/vm/network/daemon-bundle.js";

describe("network daemon bundle", () => {
  const cache = mkdtempSync(join(tmpdir(), "smolvm-bundle-cache-"));
  const saved = process.env.SMOLVM_CACHE_DIR;
  afterAll(() => {
    if (saved === undefined) delete process.env.SMOLVM_CACHE_DIR;
    else process.env.SMOLVM_CACHE_DIR = saved;
    rmSync(cache, { recursive: true, force: true });
  });

  it("builds this version's bundle and removes other versions' stale ones", async () => {
    process.env.SMOLVM_CACHE_DIR = cache;
    const dir = join(cache, "network-daemon");
    mkdirSync(dir, { recursive: true });
    const old = join(dir, "daemon-0000000000000000.mjs");
    const recent = join(dir, "daemon-1111111111111111.mjs");
    const relay = join(dir, "relay-2222222222222222.mjs");
    for (const f of [old, recent, relay]) writeFileSync(f, "");
    const eightDaysAgo = (Date.now() - 8 * 24 * 3600_000) / 1000;
    utimesSync(old, eightDaysAgo, eightDaysAgo);
    utimesSync(relay, eightDaysAgo, eightDaysAgo);

    const [node, bundle] = await daemonArgv("daemon");
    expect(node).toBe(process.execPath);
    expect(bundle!.startsWith(`${dir}/daemon-`)).toBe(true);
    expect(existsSync(bundle!)).toBe(true);
    expect(existsSync(old)).toBe(false);
    expect(existsSync(recent)).toBe(true);
    // Another program's bundles are its own to prune.
    expect(existsSync(relay)).toBe(true);
  });
});
