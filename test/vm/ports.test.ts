import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { leasePort, releasePorts } from "../../src/vm/ports.js";
import { VmStore } from "../../src/vm/store.js";

const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const c of cleanups.splice(0).reverse()) c();
});
function setup(): { dir: string; store: VmStore } {
  const dir = mkdtempSync(join(tmpdir(), "smolvm-ports-"));
  const store = VmStore.open(dir);
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  cleanups.push(() => store.close());
  store.insert({ id: "a", name: "a", image: "tiny", vmDir: "/d/a" });
  store.insert({ id: "b", name: "b", image: "tiny", vmDir: "/d/b" });
  return { dir, store };
}

function bindable(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once("error", () => resolve(false));
    s.listen(port, "127.0.0.1", () => s.close(() => resolve(true)));
  });
}

describe("leasePort / releasePorts", () => {
  it("leases distinct, bindable 127.0.0.1 ports recorded in the store", async () => {
    const { store } = setup();
    const ssh = await leasePort(store, "a", "ssh");
    const fwd = await leasePort(store, "a", "forward:8080");
    const other = await leasePort(store, "b", "ssh");
    expect(new Set([ssh, fwd, other]).size).toBe(3);
    for (const p of [ssh, fwd, other]) {
      expect(p).toBeGreaterThan(1023);
      expect(await bindable(p)).toBe(true);
    }
    expect(
      store
        .leases()
        .map((l) => [l.port, l.vmId, l.purpose])
        .sort(),
    ).toEqual(
      [
        [ssh, "a", "ssh"],
        [fwd, "a", "forward:8080"],
        [other, "b", "ssh"],
      ].sort(),
    );
    expect(releasePorts(store, "a", fwd)).toBe(1);
    expect(releasePorts(store, "a")).toBe(1);
    expect(releasePorts(store, "a")).toBe(0);
    expect(store.leases().map((l) => l.port)).toEqual([other]);
  });

  it("never hands out a port leased through another connection to the same database", async () => {
    const { dir, store } = setup();
    const second = VmStore.open(dir);
    cleanups.push(() => second.close());
    const leased = await Promise.all(
      Array.from({ length: 60 }, (_, i) => leasePort(i % 2 ? store : second, i % 3 ? "a" : "b", `p${i}`)),
    );
    expect(new Set(leased).size).toBe(60);
    // The same port offered twice: exactly one lease wins.
    const p = await leasePort(store, "a", "x");
    expect(second.tryLeasePort(p, "b", "y")).toBe(false);
  });

  it("does not return a port someone is listening on", async () => {
    const { store } = setup();
    const server = createServer();
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    cleanups.push(() => server.close());
    const busy = (server.address() as { port: number }).port;
    const got = await Promise.all(Array.from({ length: 20 }, (_, i) => leasePort(store, "a", `p${i}`)));
    expect(got).not.toContain(busy);
  });

  it("gives up with NO_FREE_PORT when it may try nothing", async () => {
    const { store } = setup();
    await expect(leasePort(store, "a", "ssh", { attempts: 0 })).rejects.toMatchObject({
      code: "NO_FREE_PORT",
    });
  });
});
