/**
 * `npm run bench:vm`: in one run, create-to-first-command of the tiny image broken down by phase
 * over BENCH_BOOTS boots (default 3), then warm `run("true")` over the VM's persistent SSH
 * connection versus forking OpenSSH `ssh` into the same VM per command. Records the accelerator
 * and host. Writes bench/results/vm.json. The image build (cached after the first run) is not timed.
 */
import { execFile, execFileSync } from "node:child_process";
import { promisify } from "node:util";
import { ensureImage } from "../src/image/index.js";
import { SmolVM } from "../src/vm/smolvm.js";
import { measure, printTable, type Stats, stats, writeResults } from "./lib/stats.js";

const execFileP = promisify(execFile);
const BOOTS = Number(process.env.BENCH_BOOTS ?? 3);
const WARM_N = Number(process.env.BENCH_N ?? 200);
const FORK_N = Number(process.env.BENCH_FORK_N ?? 30);

interface BootSample {
  qemuStartMs: number;
  kernelMs: number | null;
  initMs: number | null;
  /** Firmware and kernel loading before the guest clock starts, the connection's sshd start, SSH handshake. */
  sshdHandshakeMs: number | null;
  /** Host-side work before QEMU starts: keys, per-VM initrd, store. */
  createOverheadMs: number;
  firstCommandMs: number;
  createToFirstCommandMs: number;
}

const round = (n: number) => Math.round(n * 10) / 10;
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const cell = (n: number | null) => (n === null ? "n/a" : round(n).toFixed(0));

await ensureImage("tiny");
const vms: SmolVM[] = [];
const cleanup = async () => {
  for (const v of vms.splice(0)) await v.delete().catch(() => {});
};
process.once("SIGINT", () => void cleanup().finally(() => process.exit(130)));

try {
  // --- create to first command, BOOTS times (the last VM stays up for the warm runs)
  const boots: BootSample[] = [];
  let accel = "unknown";
  let accelReason = "";
  for (let i = 0; i < BOOTS; i++) {
    const t0 = performance.now();
    // This benchmark is about the SSH path; bench:channels compares it with the agent.
    const vm = await SmolVM.create({ name: `bench-${i}`, commChannel: "ssh", template: false });
    vms.push(vm);
    const r = await vm.run("true");
    const t1 = performance.now();
    if (!r.ok) throw new Error(`first command in ${vm.id} exited ${r.exitCode}`);
    const bt = vm.bootTimings!;
    const firstCommandMs = t1 - t0 - bt.totalMs;
    const kernel = bt.kernelMs ?? null;
    const init = bt.initToSshdMs ?? null;
    boots.push({
      qemuStartMs: bt.qemuStartMs,
      kernelMs: kernel,
      initMs: init,
      sshdHandshakeMs:
        kernel !== null && init !== null ? bt.bootToChannelMs - bt.qemuStartMs - kernel - init : null,
      createOverheadMs: bt.totalMs - bt.bootToChannelMs,
      firstCommandMs,
      createToFirstCommandMs: t1 - t0,
    });
    const rec = (await SmolVM.list()).find((x) => x.id === vm.id);
    accel = String(rec?.config.accel ?? accel);
    accelReason = String(rec?.config.accelReason ?? accelReason);
    if (i < BOOTS - 1) await vms.pop()!.delete();
  }
  const vm = vms[0]!;
  const guestKernel = (await vm.run("uname -r", { shell: "raw" })).output;

  const phases: [string, keyof BootSample][] = [
    ["create overhead", "createOverheadMs"],
    ["QEMU start", "qemuStartMs"],
    ["kernel (to /init)", "kernelMs"],
    ["init (to port 22 listening)", "initMs"],
    ["pre-kernel, sshd start, handshake", "sshdHandshakeMs"],
    ["first command", "firstCommandMs"],
    ["create to first command", "createToFirstCommandMs"],
  ];
  const medians: Record<string, number | null> = {};
  for (const [, k] of phases) {
    const xs = boots.map((b) => b[k]).filter((x): x is number => x !== null);
    medians[k] = xs.length ? median(xs) : null;
  }
  console.log(`\ncreate to first command (ms), tiny image, accelerator ${accel}: ${BOOTS} boots`);
  printTable(
    phases.map(([label, k]) => ({
      phase: label,
      ...Object.fromEntries(boots.map((b, i) => [`boot ${i + 1}`, cell(b[k])])),
      median: cell(medians[k]!),
    })),
  );

  // --- warm commands: persistent connection vs forking ssh
  const login = await measure(() => vm.run("true"), WARM_N, 10);
  const raw = await measure(() => vm.run("true", { shell: "raw" }), WARM_N, 10);
  const ssh = vm.sshCommands().ssh.replace(/^ssh /, "ssh -o BatchMode=yes -o LogLevel=ERROR ");
  const fork = await measure(() => execFileP("/bin/sh", ["-c", `exec ${ssh} true`]), FORK_N, 2);
  const rows: [string, Stats][] = [
    ['run("true") persistent, login shell', login],
    ['run("true") persistent, raw', raw],
    ["fork OpenSSH `ssh … true` per command", fork],
  ];
  console.log(`\nwarm command latency (ms), same VM`);
  printTable(
    rows.map(([method, s]) => ({
      method,
      n: s.n,
      p50: s.p50.toFixed(2),
      p99: s.p99.toFixed(2),
      mean: s.mean.toFixed(2),
    })),
  );
  const ratios = {
    forkVsPersistentRawP50: round(fork.p50 / raw.p50),
    forkVsPersistentLoginP50: round(fork.p50 / login.p50),
  };
  console.log(
    `\nforking ssh is ${ratios.forkVsPersistentRawP50}x slower (p50) than the persistent connection in raw mode, ${ratios.forkVsPersistentLoginP50}x than through the login shell`,
  );
  const qemuVersion = execFileSync("qemu-system-x86_64", ["--version"]).toString().split("\n")[0];
  console.log(`accelerator: ${accel} (${accelReason}); ${qemuVersion}; guest kernel ${guestKernel}`);

  const file = writeResults("vm", {
    accel,
    accelReason,
    qemu: qemuVersion,
    guestKernel,
    image: "tiny",
    boots,
    bootMedians: medians,
    warm: { loginPersistent: login, rawPersistent: raw, forkSsh: fork },
    ratios,
    createToFirstCommand: stats(boots.map((b) => b.createToFirstCommandMs)),
  });
  console.log(`results: ${file}`);
} finally {
  await cleanup();
}
