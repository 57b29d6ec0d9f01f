/**
 * private-ram.ts against a real process: a Python child maps a file private, as a restored
 * QEMU maps its snapshot's memory, and writes some pages; exactly those pages, at their offsets,
 * must land over a copy of the file, and the file itself must stay as it was.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { openPrivateRam } from "../../src/vm/private-ram.js";

const PAGE = 4096;
const PAGES = 64;
const WRITTEN = [3, 4, 5, 40, 63];

/** Page i of the file is filled with byte i. */
const original = () => Buffer.concat(Array.from({ length: PAGES }, (_, i) => Buffer.alloc(PAGE, i)));

const MAPPER = `
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, ${PAGES * PAGE}, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
total = 0
for i in range(${PAGES}):
    total += m[i * ${PAGE}]          # every page read (mapped from the file, not copied)
for i in [${WRITTEN.join(", ")}]:
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

  async function mapped(file: string): Promise<number> {
    child = spawn("python3", ["-c", MAPPER, file], { stdio: ["ignore", "pipe", "inherit"] });
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
