/**
 * `npm start`: builds the default image if needed, boots a sandbox, runs the everyday examples
 * (uname, an env var through the login shell, a file round trip, a failing command, a 16 MiB
 * upload checked by sha256 in the guest), prints boot and command timings, then deletes the VM,
 * also on failure or Ctrl-C.
 */
import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { progressLine } from "../src/cli/progress-line.js";
import { ensureImage } from "../src/image/index.js";
import { detectAccelerator } from "../src/vm/accel.js";
import { SmolVM } from "../src/vm/smolvm.js";

export interface StartOptions {
  /** Default: SMOLVM_DATA_DIR / the XDG state dir, so the image is reused across runs. */
  dataDir?: string;
  /** Where result lines go. Default console.log. */
  log?: (line: string) => void;
  /** Aborting stops the demo; the VM is still deleted. */
  signal?: AbortSignal;
  /** Runs of `true` for the warm-command p50. Default 20. */
  warmRuns?: number;
}

export interface StartSummary {
  vmId: string;
  accel: string;
  /** The channel commands went through ("agent" on images with the guest agent, else "ssh"). */
  channel: "agent" | "ssh";
  bootToChannelMs: number;
  firstCommandMs: number;
  warmP50Ms: number;
}

class DemoFailure extends Error {}

function check(cond: boolean, what: string): asserts cond {
  if (!cond) throw new DemoFailure(what);
}

const ms = (n: number | undefined) => (n === undefined ? "n/a" : `${Math.round(n)} ms`);

export async function main(opts: StartOptions = {}): Promise<StartSummary> {
  const log = opts.log ?? ((l: string) => console.log(l));
  const signal = opts.signal;
  const warmRuns = opts.warmRuns ?? 20;

  // A progress line on a TTY while the image builds; and whether it was cached.
  let imageState = "cached";
  const t0 = performance.now();
  const line = progressLine();
  await ensureImage("tiny", {
    dataDir: opts.dataDir,
    signal,
    onProgress: (p) => {
      line.onProgress(p);
      if (p.done) imageState = p.step === "cached" ? "cached" : p.step;
    },
  }).finally(() => line.close());
  log(`image tiny: ${imageState} (${ms(performance.now() - t0)})`);
  const verdict = await detectAccelerator({ dataDir: opts.dataDir, signal });
  log(
    `accelerator: ${verdict.accel} (${verdict.reason}; ${verdict.cached ? "cached verdict" : `probed in ${ms(verdict.probeMs)}`})`,
  );

  let vm: SmolVM | undefined;
  const tmp = await mkdtemp(join(tmpdir(), "smolvm-start-"));
  try {
    vm = await SmolVM.create({ dataDir: opts.dataDir, signal });
    const record = (await SmolVM.list({ dataDir: opts.dataDir })).find((r) => r.id === vm!.id);
    const accel = String(record?.config.accel ?? "unknown");
    // The reason's first clause is enough here; the full probe error is in the VM record.
    const accelReason = String(record?.config.accelReason ?? "").split(" (")[0]!;
    const bt = vm.bootTimings!;
    log(`booted ${vm.id} in ${ms(bt.totalMs)} (accelerator ${accel}, channel ${bt.channel}, ${bt.source})`);

    const tFirst = performance.now();
    const uname = await vm.run("uname -a", { signal });
    const firstCommandMs = performance.now() - tFirst;
    check(uname.ok, `uname -a failed with exit code ${uname.exitCode}: ${uname.stderr.trim()}`);
    log(`uname -a: ${uname.output}`);

    const secret = "secret-123";
    await vm.setEnvVars({ API_KEY: secret }, { signal });
    const env = await vm.run("echo $API_KEY", { signal });
    check(env.output === secret, "API_KEY set with setEnvVars did not reach the login shell");
    log("env var: API_KEY from setEnvVars reached the login shell (value matched, not shown)");

    const w = await vm.run("mkdir -p /app/data && echo 'Hello World' > /app/data/test.txt", { signal });
    check(w.ok, `writing /app/data/test.txt failed with exit code ${w.exitCode}: ${w.stderr.trim()}`);
    const rd = await vm.run("cat /app/data/test.txt", { signal });
    check(rd.output === "Hello World", `/app/data/test.txt read back ${JSON.stringify(rd.output)}`);
    log(`file: /app/data/test.txt written and read back: ${JSON.stringify(rd.output)}`);

    const bad = await vm.run("ls /nonexistent", { signal });
    check(!bad.ok && bad.exitCode !== 0, `ls /nonexistent unexpectedly succeeded`);
    log(`failing command: ls /nonexistent -> exit code ${bad.exitCode}, ok ${bad.ok}`);

    const data = randomBytes(16 * 1024 * 1024);
    const want = createHash("sha256").update(data).digest("hex");
    await writeFile(join(tmp, "upload.bin"), data);
    const tUp = performance.now();
    await vm.uploadFile(join(tmp, "upload.bin"), "/tmp/upload.bin", { signal, timeoutMs: 120_000 });
    const upMs = performance.now() - tUp;
    const sum = await vm.run("sha256sum /tmp/upload.bin", { signal });
    const got = sum.output.split(/\s+/)[0];
    check(got === want, `sha256 of the upload in the guest is ${got}, expected ${want}`);
    log(`upload: 16 MiB in ${ms(upMs)}, sha256 in the guest matches (${want.slice(0, 16)}…)`);

    const warm: number[] = [];
    for (let i = 0; i < warmRuns; i++) {
      const t = performance.now();
      const r = await vm.run("true", { signal });
      warm.push(performance.now() - t);
      check(r.ok, `\`true\` exited with ${r.exitCode}`);
    }
    warm.sort((a, b) => a - b);
    const warmP50 = warm[Math.ceil(warm.length / 2) - 1]!;

    // The same create twice more, side by side: a cold boot, and a restore of the image's
    // template (the first create on this host left it).
    const createToFirst = async (template: boolean) => {
      const t = performance.now();
      const v = await SmolVM.create({ dataDir: opts.dataDir, signal, template });
      try {
        await v.run("true", { signal });
        return { ms: performance.now() - t, source: v.bootTimings!.source };
      } finally {
        await v.delete();
      }
    };
    const cold = await createToFirst(false);
    const fromTemplate = await createToFirst(true);
    // And through a warm pool of one (SmolVM.pool()): the restore and the guest's first-run
    // costs are paid before the create.
    let fromPool: number;
    {
      await using pool = await SmolVM.pool({ dataDir: opts.dataDir, signal, size: 1 });
      const t = performance.now();
      await using v = await pool.create({ signal });
      const r = await v.run("true", { signal });
      fromPool = performance.now() - t;
      check(r.ok, `\`true\` in a pooled VM exited with ${r.exitCode}`);
    }

    const rest = bt.kernelMs !== undefined ? bt.bootToChannelMs - bt.qemuStartMs - bt.kernelMs : undefined;
    const rows: [string, string][] = [
      [`boot to ${bt.channel}`, ms(bt.bootToChannelMs)],
      ["  QEMU start", ms(bt.qemuStartMs)],
      ["  kernel (to /init)", ms(bt.kernelMs)],
      ["  guest network up (guest clock)", ms(bt.networkMs)],
      [`  rest (init, ${bt.channel} handshake)`, ms(rest)],
      ["first command", ms(firstCommandMs)],
      [`warm command p50 (${warmRuns}x true)`, `${warmP50.toFixed(1)} ms`],
      ["create to first command, cold boot", ms(cold.ms)],
      [
        `create to first command, from the template`,
        `${ms(fromTemplate.ms)} (${(fromTemplate.ms / cold.ms).toFixed(2)}x${fromTemplate.source === "template" ? "" : `, ${fromTemplate.source}`})`,
      ],
      ["create to first command, from a warm pool", `${ms(fromPool)} (${(fromPool / cold.ms).toFixed(2)}x)`],
      ["accelerator", accelReason ? `${accel} (${accelReason})` : accel],
    ];
    const width = Math.max(...rows.map(([k]) => k.length));
    log("");
    for (const [k, v] of rows) log(`${k.padEnd(width)}  ${v}`);
    log("");
    return {
      vmId: vm.id,
      accel,
      channel: bt.channel,
      bootToChannelMs: bt.bootToChannelMs,
      firstCommandMs,
      warmP50Ms: warmP50,
    };
  } finally {
    await rm(tmp, { recursive: true, force: true });
    if (vm) {
      await vm.delete();
      log(`deleted ${vm.id}`);
    }
  }
}

/** Run as a script: Ctrl-C/SIGTERM abort the demo (the VM is deleted), a second one exits at once. */
async function cli(): Promise<void> {
  const ac = new AbortController();
  let interrupted = false;
  const onSignal = (sig: NodeJS.Signals) => {
    if (interrupted) process.exit(130);
    interrupted = true;
    process.stderr.write(`\n${sig}: stopping, deleting the VM…\n`);
    ac.abort(new Error(`interrupted by ${sig}`));
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  try {
    await main({ signal: ac.signal });
  } catch (e) {
    const msg = e instanceof Error ? e.message : String(e);
    process.stderr.write(`npm start failed: ${interrupted ? "interrupted" : msg}\n`);
    process.exitCode = interrupted ? 130 : 1;
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) await cli();
