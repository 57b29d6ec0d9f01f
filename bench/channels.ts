/**
 * `npm run bench:channels`: the guest agent versus SSH, in one run on one host.
 *   1. create to first command with the agent (default create) versus SSH (commChannel "ssh"),
 *      BENCH_BOOTS boots each (default 3), alternated, medians, with the bootTimings breakdown;
 *   2. warm `run("true")` over the agent versus over SSH on the SAME VM (the created handle and a
 *      `fromId(id, { commChannel: "ssh" })` handle), raw and login, BENCH_N runs each (default
 *      200) in alternating blocks so load drift hits both channels alike;
 *   3. 64 MiB upload and download over the agent versus SFTP on that VM, sha256-verified once.
 * Checks the targets, records the accelerator and host, writes bench/results/channels.json.
 * Uses the default data dir (SMOLVM_DATA_DIR respected) and deletes every VM it creates.
 */
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { createReadStream, createWriteStream, mkdtempSync, readFileSync, rmSync } from "node:fs";
import * as os from "node:os";
import { join } from "node:path";
import { AgentChannel } from "../src/channel/agent-channel.js";
import { connectUnix } from "../src/channel/agent-transport.js";
import { ensureImage } from "../src/image/index.js";
import { serialMilestones } from "../src/vm/serial-log.js";
import { SmolVM } from "../src/vm/smolvm.js";
import { vmFiles } from "../src/vm/store.js";
import { measureInterleaved, printTable, type Stats, stats, writeResults } from "./lib/stats.js";

const BOOTS = Number(process.env.BENCH_BOOTS ?? 3);
const WARM_N = Number(process.env.BENCH_N ?? 200);
const BLOCK = 20;
const FILE_MIB = Number(process.env.BENCH_FILE_MIB ?? 64);
const XFER_REPS = Number(process.env.BENCH_XFER_REPS ?? 2);

const round = (n: number, d = 1) => Math.round(n * 10 ** d) / 10 ** d;
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const cell = (n: number | null | undefined) => (n === null || n === undefined ? "n/a" : round(n).toFixed(0));

// ------------------------------------------------------------ cleanup: every VM we create dies with us

const owned = new Set<SmolVM>();
const handles = new Set<SmolVM>();
let tmp: string | undefined;
let cleaning: Promise<void> | undefined;
/** Aborted on SIGINT/SIGTERM: a create() in flight then deletes its own half-made VM. */
const stop = new AbortController();
let creating: Promise<unknown> | undefined;
function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    stop.abort();
    await creating?.catch(() => {});
    for (const h of handles) await h[Symbol.asyncDispose]().catch(() => {});
    for (const v of owned) await v.delete({ timeoutMs: 30_000 }).catch(() => {});
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  })();
  return cleaning;
}
for (const sig of ["SIGINT", "SIGTERM"] as const) {
  process.once(sig, () => {
    console.error(`\n${sig}: deleting the benchmark's VMs`);
    void cleanup().finally(() => process.exit(sig === "SIGINT" ? 130 : 143));
  });
}

async function create(channel: "agent" | "ssh", opts: { memoryMib?: number; name: string }): Promise<SmolVM> {
  if (stop.signal.aborted) throw new Error("interrupted");
  const p = SmolVM.create({
    name: `${opts.name}-${randomBytes(3).toString("hex")}`,
    memoryMib: opts.memoryMib,
    signal: stop.signal,
    // Channels are compared on cold boots; bench:snapshot measures templates.
    template: false,
    ...(channel === "ssh" ? { commChannel: "ssh" as const } : {}),
  });
  creating = p;
  const vm = await p;
  owned.add(vm);
  return vm;
}
async function destroy(vm: SmolVM): Promise<void> {
  owned.delete(vm);
  await vm.delete({ timeoutMs: 30_000 });
}

// ------------------------------------------------------------ 1. create to first command

interface BootSample {
  channel: "agent" | "ssh";
  /** The channel create() actually waited for (auto may fall back). */
  readyOn: "agent" | "ssh";
  createOverheadMs: number;
  qemuStartMs: number;
  kernelMs: number | null;
  /** /init start until the agent was launched (serial milestones). */
  initToAgentMs: number | null;
  initToSshdMs: number | null;
  bootToChannelMs: number;
  createMs: number;
  firstCommandMs: number;
  createToFirstCommandMs: number;
}

async function bootOnce(channel: "agent" | "ssh", i: number): Promise<BootSample> {
  const t0 = performance.now();
  const vm = await create(channel, { name: `bench-ch-${channel}-${i}` });
  const t1 = performance.now();
  const r = await vm.run("true", { timeoutMs: 60_000 });
  const t2 = performance.now();
  try {
    if (!r.ok) throw new Error(`first command in ${vm.id} exited ${r.exitCode}`);
    const bt = vm.bootTimings!;
    const ms = serialMilestones(await vm.serialLog());
    return {
      channel,
      readyOn: bt.channel,
      createOverheadMs: bt.totalMs - bt.bootToChannelMs,
      qemuStartMs: bt.qemuStartMs,
      kernelMs: bt.kernelMs ?? null,
      initToAgentMs:
        ms["agent-started"] !== undefined && ms["init-start"] !== undefined
          ? ms["agent-started"] - ms["init-start"]
          : null,
      initToSshdMs: bt.initToSshdMs ?? null,
      bootToChannelMs: bt.bootToChannelMs,
      createMs: t1 - t0,
      firstCommandMs: t2 - t1,
      createToFirstCommandMs: t2 - t0,
    };
  } finally {
    await destroy(vm);
  }
}

// ------------------------------------------------------------ 2. warm run("true"), interleaved

// ------------------------------------------------------------ 3. file transfer

async function randomFile(path: string, mib: number): Promise<string> {
  const h = createHash("sha256");
  const out = createWriteStream(path);
  for (let i = 0; i < mib; i++) {
    const chunk = randomBytes(1024 * 1024);
    h.update(chunk);
    if (!out.write(chunk)) await new Promise<void>((r) => out.once("drain", () => r()));
  }
  await new Promise<void>((ok, no) => out.end((e?: Error | null) => (e ? no(e) : ok())));
  return h.digest("hex");
}
async function sha256File(path: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest("hex");
}
async function guestSha(vm: SmolVM, path: string): Promise<string> {
  const r = await vm.run(`sha256sum ${path}`, { shell: "raw", timeoutMs: 120_000 });
  return r.stdout.split(" ")[0]!;
}

// ------------------------------------------------------------ process costs inside the guest

const GUEST_SPAWNS = 100;

/**
 * Compiles bench/lib/spawn-cost.c statically, runs it in the guest and returns ms per child
 * (null where it could not run, e.g. no C compiler).
 */
async function guestProcessCosts(
  vm: SmolVM,
): Promise<Array<{ key: string; label: string; ms: number | null }>> {
  const modes = [
    { key: "forkExit", label: "fork + _exit + wait", args: "fork" },
    { key: "vforkExit", label: "vfork + _exit + wait", args: "vfork" },
    { key: "vforkTrue", label: "vfork + exec /bin/true", args: "vfork /bin/true" },
    { key: "shTrue", label: "vfork + exec sh -c true", args: "vfork /bin/sh -c true" },
  ];
  const bin = join(tmp!, "spawn-cost");
  try {
    execFileSync(process.env.CC ?? "cc", [
      "-O2",
      "-static",
      "-o",
      bin,
      join(import.meta.dirname, "lib", "spawn-cost.c"),
    ]);
  } catch (e) {
    console.error(
      `spawn-cost not built (${(e as Error).message.split("\n")[0]}): guest process costs skipped`,
    );
    return modes.map((m) => ({ key: m.key, label: m.label, ms: null }));
  }
  await vm.uploadFile(bin, "/tmp/spawn-cost", { mode: 0o755 });
  await vm.run("/tmp/spawn-cost 10 vfork /bin/sh -c true", { shell: "raw" }); // warm the page cache
  const out = [];
  for (const m of modes) {
    const r = await vm.run(`/tmp/spawn-cost ${GUEST_SPAWNS} ${m.args}`, { shell: "raw", timeoutMs: 120_000 });
    const ms = Number(r.stdout.trim());
    out.push({ key: m.key, label: m.label, ms: r.exitCode === 0 && Number.isFinite(ms) ? ms : null });
  }
  return out;
}

// ------------------------------------------------------------ main

await ensureImage("tiny"); // built once and cached; never timed
let exitCode = 0;
try {
  tmp = mkdtempSync(join(os.tmpdir(), "smolvm-bench-channels-"));

  // 1. boots, alternated agent/ssh
  const boots: BootSample[] = [];
  for (let i = 0; i < BOOTS; i++) {
    for (const ch of i % 2 ? (["ssh", "agent"] as const) : (["agent", "ssh"] as const)) {
      const b = await bootOnce(ch, i);
      boots.push(b);
      console.error(`boot ${ch} #${i + 1}: ${round(b.createToFirstCommandMs, 0)} ms (ready on ${b.readyOn})`);
    }
  }
  const phases: [string, keyof BootSample][] = [
    ["create overhead (keys, initrd, store)", "createOverheadMs"],
    ["QEMU start", "qemuStartMs"],
    ["kernel (to /init)", "kernelMs"],
    ["/init to agent started", "initToAgentMs"],
    ["/init to sshd started", "initToSshdMs"],
    ["QEMU spawn to channel ready", "bootToChannelMs"],
    ["create() returned", "createMs"],
    ['first run("true")', "firstCommandMs"],
    ["create to first command", "createToFirstCommandMs"],
  ];
  const bootMedians: Record<"agent" | "ssh", Record<string, number | null>> = { agent: {}, ssh: {} };
  for (const ch of ["agent", "ssh"] as const) {
    for (const [, k] of phases) {
      const xs = boots
        .filter((b) => b.channel === ch)
        .map((b) => b[k])
        .filter((x): x is number => typeof x === "number");
      bootMedians[ch][k] = xs.length ? median(xs) : null;
    }
  }

  // 2 and 3 on one VM: the agent handle is the created VM, the SSH handle re-attaches to it.
  const vm = await create("agent", { name: "bench-ch-warm", memoryMib: 1024 });
  if (vm.bootTimings?.channel !== "agent") throw new Error(`VM ${vm.id} did not come up on the agent`);
  const sshVm = await SmolVM.fromId(vm.id, { commChannel: "ssh" });
  handles.add(sshVm);
  await sshVm.waitForSsh({ timeoutMs: 60_000 });
  const rec = (await SmolVM.list()).find((x) => x.id === vm.id);
  const accel = String(rec?.config.accel ?? "unknown");
  const accelReason = String(rec?.config.accelReason ?? "");
  const guestKernel = (await vm.run("uname -r", { shell: "raw" })).stdout.trim();

  const raw = await measureInterleaved(
    {
      agent: () => vm.run("true", { shell: "raw" }),
      ssh: () => sshVm.run("true", { shell: "raw" }),
    },
    WARM_N,
    BLOCK,
  );
  const login = await measureInterleaved(
    { agent: () => vm.run("true"), ssh: () => sshVm.run("true") },
    WARM_N,
    BLOCK,
  );
  // The floors under those numbers. Inside the guest: what starting a process costs there (a
  // static C harness, so no shell loop is timed). On the channel: a PING round trip, which
  // starts no process at all (the VM handle lends its socket: it takes one connection).
  const guestCost = await guestProcessCosts(vm);
  const guestSpawnMs = guestCost.find((c) => c.key === "shTrue")?.ms ?? null;
  await vm.close();
  const files = vmFiles(rec!.vmDir);
  const ping = new AgentChannel({
    connect: (s) => connectUnix(files.agentSocket, s),
    secret: readFileSync(files.agentSecret),
  });
  const pingMs: number[] = [];
  try {
    for (let i = 0; i < WARM_N; i++) {
      const t = performance.now();
      await ping.waitReady({ timeoutMs: 10_000 });
      pingMs.push(performance.now() - t);
    }
  } finally {
    await ping.close();
  }
  const pingStats = stats(pingMs);

  // 3. transfers: rep 1 verifies sha256 on both ends, later reps are timed only.
  const up = join(tmp, "up.bin");
  const want = await randomFile(up, FILE_MIB);
  const xfer = {
    agentUp: [] as number[],
    sftpUp: [] as number[],
    agentDown: [] as number[],
    sftpDown: [] as number[],
  };
  const mibps = (ms: number) => FILE_MIB / (ms / 1000);
  const timed = async (fn: () => Promise<unknown>) => {
    const t = performance.now();
    await fn();
    return mibps(performance.now() - t);
  };
  const verify = async (what: string, got: string) => {
    if (got !== want) throw new Error(`${what}: sha256 ${got} != ${want}`);
  };
  for (let rep = 0; rep < XFER_REPS; rep++) {
    const both = rep % 2 ? (["sftp", "agent"] as const) : (["agent", "sftp"] as const);
    for (const k of both) {
      const h = k === "agent" ? vm : sshVm;
      const g = `/root/bench-${k}.bin`;
      const down = join(tmp, `down-${k}.bin`);
      (k === "agent" ? xfer.agentUp : xfer.sftpUp).push(
        await timed(() => h.uploadFile(up, g, { timeoutMs: 300_000 })),
      );
      if (rep === 0) await verify(`${k} upload`, await guestSha(vm, g));
      (k === "agent" ? xfer.agentDown : xfer.sftpDown).push(
        await timed(() => h.downloadFile(g, down, { timeoutMs: 300_000 })),
      );
      if (rep === 0) await verify(`${k} download`, await sha256File(down));
      rmSync(down, { force: true });
      await vm.run(`rm -f ${g}`, { shell: "raw" }); // tiny's filesystem is RAM
    }
  }
  const xferMedian = {
    agentUp: median(xfer.agentUp),
    sftpUp: median(xfer.sftpUp),
    agentDown: median(xfer.agentDown),
    sftpDown: median(xfer.sftpDown),
  };

  // ---- report
  const qemuVersion = execFileSync("qemu-system-x86_64", ["--version"]).toString().split("\n")[0]!;
  const host = {
    cpuModel: os.cpus()[0]?.model ?? "unknown",
    cpus: os.cpus().length,
    memGiB: round(os.totalmem() / 2 ** 30),
    kernel: `${os.platform()} ${os.release()}`,
    node: process.version,
    loadavg: os.loadavg().map((x) => round(x, 2)),
  };
  console.log(
    `\nhost: ${host.cpuModel}, ${host.cpus} cpus, ${host.memGiB} GiB, ${host.kernel}, node ${host.node}, load ${host.loadavg.join(" ")}`,
  );
  console.log(
    `accelerator: ${accel} (${accelReason}); ${qemuVersion}; guest kernel ${guestKernel}; image tiny`,
  );

  console.log(`\n1. create to first command (ms), ${BOOTS} boots each, alternated; medians`);
  printTable(
    phases.map(([label, k]) => ({
      phase: label,
      agent: cell(bootMedians.agent[k]),
      ssh: cell(bootMedians.ssh[k]),
    })),
  );
  console.log(
    `   per boot (agent): ${boots
      .filter((b) => b.channel === "agent")
      .map((b) => round(b.createToFirstCommandMs, 0))
      .join(", ")}; (ssh): ${boots
      .filter((b) => b.channel === "ssh")
      .map((b) => round(b.createToFirstCommandMs, 0))
      .join(", ")}`,
  );

  console.log(
    `\n2. warm run("true") latency (ms), same VM, ${WARM_N} runs each, alternating blocks of ${BLOCK}`,
  );
  const warmRows: [string, Stats][] = [
    ["agent, raw", raw.agent],
    ["ssh, raw", raw.ssh],
    ["agent, login shell", login.agent],
    ["ssh, login shell", login.ssh],
  ];
  printTable(
    warmRows.map(([method, s]) => ({
      method,
      n: s.n,
      p50: s.p50.toFixed(2),
      p90: s.p90.toFixed(2),
      p99: s.p99.toFixed(2),
      mean: s.mean.toFixed(2),
    })),
  );

  console.log(
    `   agent PING round trip (no guest process): p50 ${pingStats.p50.toFixed(2)}, p99 ${pingStats.p99.toFixed(2)} ms`,
  );
  console.log(`   inside the guest (${accel}), ms per child, mean of ${GUEST_SPAWNS}:`);
  printTable(guestCost.map((c) => ({ child: c.label, ms: c.ms === null ? "n/a" : c.ms.toFixed(2) })));
  if (guestSpawnMs !== null) {
    console.log(
      `   channel overhead at p50 (raw), over one guest \`sh -c true\`: agent ${(raw.agent.p50 - guestSpawnMs).toFixed(2)} ms, ssh ${(raw.ssh.p50 - guestSpawnMs).toFixed(2)} ms`,
    );
  }

  console.log(
    `\n3. ${FILE_MIB} MiB transfer (MiB/s), same VM, median of ${XFER_REPS}, sha256-verified once each`,
  );
  printTable([
    {
      direction: "upload",
      agent: round(xferMedian.agentUp).toFixed(1),
      sftp: round(xferMedian.sftpUp).toFixed(1),
    },
    {
      direction: "download",
      agent: round(xferMedian.agentDown).toFixed(1),
      sftp: round(xferMedian.sftpDown).toFixed(1),
    },
  ]);

  const ratios = {
    warmRawP50: raw.ssh.p50 / raw.agent.p50,
    warmRawP99: raw.ssh.p99 / raw.agent.p99,
    warmLoginP50: login.ssh.p50 / login.agent.p50,
    warmLoginP99: login.ssh.p99 / login.agent.p99,
    createToFirstCommand: bootMedians.agent.createToFirstCommandMs! / bootMedians.ssh.createToFirstCommandMs!,
    /** Informational: SSH's p50 overhead over the guest's own spawn cost / the agent's. */
    warmRawOverheadP50:
      guestSpawnMs === null ? null : (raw.ssh.p50 - guestSpawnMs) / (raw.agent.p50 - guestSpawnMs),
    upload: xferMedian.agentUp / xferMedian.sftpUp,
    download: xferMedian.agentDown / xferMedian.sftpDown,
  };
  const targets = [
    {
      target: "warm run, raw: agent >= 20x faster (p50)",
      measured: `${round(ratios.warmRawP50)}x`,
      pass: ratios.warmRawP50 >= 20,
    },
    {
      target: "warm run, login: agent >= 20x faster (p50)",
      measured: `${round(ratios.warmLoginP50)}x`,
      pass: ratios.warmLoginP50 >= 20,
    },
    {
      target: "create to first command: agent <= 0.5x SSH",
      measured: `${ratios.createToFirstCommand.toFixed(2)}x`,
      pass: ratios.createToFirstCommand <= 0.5,
    },
    { target: "upload: agent >= 2x SFTP", measured: `${round(ratios.upload)}x`, pass: ratios.upload >= 2 },
    {
      target: "download: agent >= 2x SFTP",
      measured: `${round(ratios.download)}x`,
      pass: ratios.download >= 2,
    },
  ];
  console.log(`\ntargets (issue 5)`);
  printTable(
    targets.map((t) => ({ target: t.target, measured: t.measured, result: t.pass ? "PASS" : "FAIL" })),
  );
  console.log(
    `   p99 ratios: raw ${round(ratios.warmRawP99)}x, login ${round(ratios.warmLoginP99)}x (SSH p99 / agent p99)`,
  );

  const file = writeResults("channels", {
    accel,
    accelReason,
    qemu: qemuVersion,
    host,
    guestKernel,
    image: "tiny",
    params: { boots: BOOTS, warmN: WARM_N, block: BLOCK, fileMiB: FILE_MIB, transferReps: XFER_REPS },
    boots,
    bootMedians,
    warm: { raw, login, guestSpawnMs, ping: pingStats, guestProcessCosts: guestCost },
    transferMiBps: { samples: xfer, median: xferMedian },
    ratios,
    targets,
  });
  console.log(`results: ${file}`);
} catch (e) {
  if (!stop.signal.aborted) console.error(e);
  exitCode = 1;
} finally {
  await cleanup();
}
process.exit(exitCode);
