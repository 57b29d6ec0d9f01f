/**
 * The network daemon's bundle in a checkout (daemon-bundle.ts): built once per source version
 * into the cache dir, and bundles of other versions left for a week are removed when a new one
 * is built (every checkout and edit makes one).
 */
import { existsSync, mkdirSync, mkdtempSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { daemonArgv, daemonEnv } from "../../src/vm/network/daemon-bundle.js";

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

    const argv = await daemonArgv("daemon");
    const bundle = argv.at(-1);
    expect(argv[0]).toBe(process.execPath);
    expect(bundle!.startsWith(`${dir}/daemon-`)).toBe(true);
    expect(existsSync(bundle!)).toBe(true);
    expect(existsSync(old)).toBe(false);
    expect(existsSync(recent)).toBe(true);
    // Another program's bundles are its own to prune.
    expect(existsSync(relay)).toBe(true);
  });

  it("starts the programs without the CA bundle they never use, keeping the rest", () => {
    const saved = process.env.NODE_EXTRA_CA_CERTS;
    process.env.NODE_EXTRA_CA_CERTS = "/etc/ssl/certs/ca-certificates.crt";
    try {
      const env = daemonEnv({ SMOLVM_NET_RELAY: "[]" });
      expect("NODE_EXTRA_CA_CERTS" in env).toBe(false);
      expect(env.SMOLVM_NET_RELAY).toBe("[]");
      expect(env.PATH).toBe(process.env.PATH);
      // The caller's own environment is left as it was.
      expect(process.env.NODE_EXTRA_CA_CERTS).toBe("/etc/ssl/certs/ca-certificates.crt");
    } finally {
      if (saved === undefined) delete process.env.NODE_EXTRA_CA_CERTS;
      else process.env.NODE_EXTRA_CA_CERTS = saved;
    }
  });
});
