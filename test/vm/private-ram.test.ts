/**
 * private-ram.ts against a real process: a Python child maps a file private, as a restored
 * QEMU maps its snapshot's memory, and writes some pages; exactly those pages, at their offsets,
 * must land over a copy of the file, and the file itself must stay as it was.
 */
import { type ChildProcess, spawn } from "node:child_process";
import {
  closeSync,
  copyFileSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { openPrivateRam } from "../../src/vm/private-ram.js";

const PAGE = 4096;
const PAGES = 64;
const WRITTEN = [3, 4, 5, 40, 63];

/** Page i of the file is filled with byte i. */
const original = () => Buffer.concat(Array.from({ length: PAGES }, (_, i) => Buffer.alloc(PAGE, i)));

/** Maps `pages` of the file private, reads the first `read` of them, writes `written`. */
const mapper = (pages: number, read: number, written: number[]) => `
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, ${pages * PAGE}, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
total = 0
for i in range(${read}):
    total += m[i * ${PAGE}]          # read (mapped from the file, not copied)
for i in [${written.join(", ")}]:
    m[i * ${PAGE}:(i + 1) * ${PAGE}] = bytes([0xEE]) * ${PAGE}
print("ready", flush=True)
time.sleep(60)
`;

describe("a private mapping's written pages", () => {
  let dir: string;
  let child: ChildProcess | undefined;
  afterEach(() => {
    child?.kill("SIGKILL");
    child = undefined;
    rmSync(dir, { recursive: true, force: true });
  });

  async function mapped(file: string, script = mapper(PAGES, PAGES, WRITTEN)): Promise<number> {
    child = spawn("python3", ["-c", script, file], { stdio: ["ignore", "pipe", "inherit"] });
    await new Promise<void>((resolve, reject) => {
      child!.stdout!.on("data", (d: Buffer) => d.toString().includes("ready") && resolve());
      child!.once("exit", (code) => reject(new Error(`the mapper exited ${code}`)));
    });
    return child.pid!;
  }

  it("are copied over a copy of the file, each at its offset, and only they", async () => {
    dir = mkdtempSync(join(tmpdir(), "smolvm-private-ram-"));
    const file = join(dir, "memory");
    writeFileSync(file, original());
    const pid = await mapped(file);

    const ram = await openPrivateRam(pid, file, PAGES * PAGE);
    expect(ram).toBeDefined();
    const out = join(dir, "snapshot-memory");
    copyFileSync(file, out);
    try {
      expect(await ram!.writeDirtyPages(out)).toBe(WRITTEN.length);
    } finally {
      await ram!.close();
    }
    const expected = original();
    for (const i of WRITTEN) expected.fill(0xee, i * PAGE, (i + 1) * PAGE);
    expect(readFileSync(out).equals(expected)).toBe(true);
    expect(readFileSync(file).equals(original())).toBe(true);
  });

  it("are found across the pagemap's windows (256 MiB each), a run crossing one included", async () => {
    dir = mkdtempSync(join(tmpdir(), "smolvm-private-ram-"));
    const file = join(dir, "memory");
    const pages = 2 * 65_536 + 8;
    const written = [0, 65_534, 65_535, 65_536, 65_537, pages - 1];
    // Sparse: 512 MiB of holes, as most of a guest's RAM file is.
    writeFileSync(file, "");
    truncateSync(file, pages * PAGE);
    const pid = await mapped(file, mapper(pages, 0, written));
    const ram = await openPrivateRam(pid, file, pages * PAGE);
    expect(ram).toBeDefined();
    const out = join(dir, "snapshot-memory");
    writeFileSync(out, "");
    truncateSync(out, pages * PAGE);
    try {
      expect(await ram!.writeDirtyPages(out)).toBe(written.length);
    } finally {
      await ram!.close();
    }
    const fd = openSync(out, "r");
    try {
      const page = Buffer.alloc(PAGE);
      for (const i of [...written, 1, 65_533, 65_538, pages - 2]) {
        readSync(fd, page, 0, PAGE, i * PAGE);
        expect([i, page.every((b) => b === (written.includes(i) ? 0xee : 0))]).toEqual([i, true]);
      }
    } finally {
      closeSync(fd);
    }
    // Only the written pages were allocated in the copy.
    expect(statSync(out).blocks * 512).toBeLessThanOrEqual(written.length * PAGE * 4);
  });

  it("cannot be read where the process does not map the file whole: the caller falls back", async () => {
    dir = mkdtempSync(join(tmpdir(), "smolvm-private-ram-"));
    const file = join(dir, "memory");
    writeFileSync(file, original());
    const pid = await mapped(file);
    expect(await openPrivateRam(pid, file, 2 * PAGES * PAGE)).toBeUndefined();
    expect(await openPrivateRam(process.pid, file, PAGES * PAGE)).toBeUndefined();
    expect(await openPrivateRam(2 ** 22 + 1, file, PAGES * PAGE)).toBeUndefined();
  });
});
