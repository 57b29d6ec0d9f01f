/**
 * Files at rest: the data dir is private (0700, files 0600) whichever command creates it, a data
 * dir of another user is refused, and cached .debs are verified against the package index.
 */
import { createHash } from "node:crypto";
import {
  chmodSync,
  chownSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { SmolVMError } from "../../src/errors.js";
import { aptShow, fetchDeb } from "../../src/image/apt.js";
import { buildImage } from "../../src/image/index.js";
import { VmStore } from "../../src/vm/store.js";

const dirs: string[] = [];
function fresh(): string {
  const d = mkdtempSync(join(tmpdir(), "smolvm-rest-"));
  dirs.push(d);
  return join(d, "data");
}
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});
const mode = (p: string) => statSync(p).mode & 0o777;

describe("files at rest", () => {
  it("an image build run first creates the data dir 0700", async () => {
    const old = process.umask(0o022);
    try {
      const dir = fresh();
      await buildImage("tiny", { dataDir: dir, timeoutMs: 300_000 });
      expect(mode(dir)).toBe(0o700);
      expect(mode(join(dir, "images"))).toBe(0o700);
    } finally {
      process.umask(old);
    }
  }, 320_000);

  it("state.db and its -wal/-shm are 0600, and a looser data dir we own is tightened", () => {
    const old = process.umask(0o022);
    try {
      const dir = fresh();
      mkdirSync(dir, { recursive: true, mode: 0o755 });
      chmodSync(dir, 0o755);
      const store = VmStore.open(dir);
      try {
        store.insert({ id: "vm-1", name: "one", image: "tiny", vmDir: join(dir, "vms", "vm-1") });
        expect(mode(dir)).toBe(0o700);
        for (const f of ["state.db", "state.db-wal", "state.db-shm"]) expect(mode(join(dir, f))).toBe(0o600);
      } finally {
        store.close();
      }
    } finally {
      process.umask(old);
    }
  });

  it("refuses a data dir owned by another user", () => {
    const dir = fresh();
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    chownSync(dir, 65534, 65534);
    let err: unknown;
    try {
      VmStore.open(dir).close();
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(SmolVMError);
    expect((err as SmolVMError).code).toBe("DATA_DIR_NOT_OWNED");
    expect(() => statSync(join(dir, "state.db"))).toThrow();
  });

  it("re-downloads a cached .deb whose bytes do not match the index, even at the same name and size", async () => {
    const cache = fresh();
    const pkg = (await aptShow(["busybox"])).get("busybox")!;
    expect(pkg.sha256).toMatch(/^[0-9a-f]{64}$/);
    const sha = (p: string) => createHash("sha256").update(readFileSync(p)).digest("hex");
    const path = await fetchDeb(pkg, cache);
    expect(sha(path)).toBe(pkg.sha256);
    // Someone with access to the shared cache swaps in a same-size file.
    writeFileSync(path, Buffer.alloc(statSync(path).size, 0x41));
    const again = await fetchDeb(pkg, cache);
    expect(again).toBe(path);
    expect(sha(again)).toBe(pkg.sha256);
  }, 120_000);
});
