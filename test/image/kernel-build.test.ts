/**
 * The kernel build (kernel-build.ts) stopped halfway: aborting while make and its compilers run
 * kills the whole process group and leaves no build tree, lock or kernel behind. It runs the real
 * build in a throw-away cache dir (the linux-source .deb is hard-linked from the shared cache,
 * where scripts/setup.sh left it, or copied) and aborts it a few seconds into the compile.
 */
import { copyFileSync, linkSync, mkdirSync, mkdtempSync, readdirSync, readlinkSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { cacheDir } from "../../src/common/paths.js";
import { OperationAbortedError } from "../../src/errors.js";
import { resolveImagePackages } from "../../src/image/apt.js";
import { buildKernel } from "../../src/image/kernel-build.js";

/** Pids of live processes whose working directory is under `dir`. */
function processesIn(dir: string): number[] {
  const out: number[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (readlinkSync(`/proc/${name}/cwd`).startsWith(dir)) out.push(Number(name));
    } catch {
      /* gone, or not ours to read */
    }
  }
  return out;
}

describe("kernel build", () => {
  const tmp = mkdtempSync(join(tmpdir(), "smolvm-kernel-build-"));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  it("aborted while compiling: make and its compilers are killed, nothing is left", async () => {
    const shared = cacheDir();
    const { kernelSource } = await resolveImagePackages(["busybox-static"], shared, undefined, {
      kernelSource: true,
    });
    mkdirSync(join(tmp, "debs"));
    for (const f of readdirSync(join(shared, "debs"))) {
      if (!f.startsWith(`${kernelSource!.name}_`)) continue;
      try {
        linkSync(join(shared, "debs", f), join(tmp, "debs", f));
      } catch {
        copyFileSync(join(shared, "debs", f), join(tmp, "debs", f)); // another file system
      }
    }
    const ac = new AbortController();
    const reason = new OperationAbortedError("the test stopped the kernel build");
    const steps: string[] = [];
    let compiling: number[] = [];
    let abortedAt = 0;
    const e = await buildKernel(kernelSource!, tmp, {
      signal: ac.signal,
      onStep: (s) => {
        steps.push(s);
        if (s.startsWith("compiling the kernel")) {
          setTimeout(() => {
            compiling = processesIn(tmp);
            abortedAt = performance.now();
            ac.abort(reason);
          }, 4_000);
        }
      },
    }).catch((x) => x);
    expect(e).toBe(reason);
    // Bounded: the kill is at once; removing the unpacked tree (about 1.5 GB) takes the rest.
    expect(performance.now() - abortedAt).toBeLessThan(10_000);
    expect(steps.map((s) => s.split(" ").slice(0, 2).join(" "))).toEqual([
      "fetching the",
      "unpacking the",
      "configuring the",
      "compiling the",
    ]);
    // make and at least one compiler were running in the build tree when it was aborted.
    expect(compiling.length).toBeGreaterThanOrEqual(2);
    expect(processesIn(tmp)).toEqual([]);
    expect(readdirSync(join(tmp, "kernels"))).toEqual([]);
  }, 180_000);
});
