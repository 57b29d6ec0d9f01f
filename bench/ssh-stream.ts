/**
 * `npm run bench:ssh-stream`: bulk throughput, side by side against OpenSSH on the same loopback
 * sshd. (1) streamExec of `head -c N /dev/zero` versus forking `ssh host head -c N /dev/zero`;
 * (2) a -L forward (forwardLocal) versus `ssh -N -L`, downloading N bytes from a local server.
 * BENCH_MIB (default 256) sets N, BENCH_RUNS (default 3) the interleaved runs; medians are
 * reported with ours/OpenSSH ratios. Writes bench/results/ssh-stream.json.
 */
import { spawn } from "node:child_process";
import net from "node:net";
import { createKeyAuth } from "../src/ssh/auth.js";
import { SSHConnection } from "../src/ssh/connection.js";
import { forwardLocal } from "../src/ssh/forward.js";
import { SshdFixture } from "../test/fixtures/sshd.js";
import { printTable, stats, writeResults } from "./lib/stats.js";

const MIB = Number(process.env.BENCH_MIB ?? 256);
const RUNS = Number(process.env.BENCH_RUNS ?? 3);
const SIZE = MIB * 1024 * 1024;

const f = await SshdFixture.start({ logLevel: "ERROR" });
const sshArgs = [
  "-F",
  "/dev/null",
  "-p",
  String(f.port),
  "-i",
  f.clientKey.path,
  "-o",
  "BatchMode=yes",
  "-o",
  "StrictHostKeyChecking=yes",
  "-o",
  `UserKnownHostsFile=${f.knownHostsPath}`,
  `${f.user}@${f.host}`,
];

function mibps(bytes: number, ms: number): number {
  return Math.round((bytes / 1024 / 1024 / (ms / 1000)) * 10) / 10;
}

/** Forks ssh, counts stdout bytes; ms from spawn to exit (includes connect, as a user would see). */
function forkSsh(extra: string[]): Promise<{ ms: number; bytes: number }> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const c = spawn("ssh", [...sshArgs, ...extra], { stdio: ["ignore", "pipe", "inherit"] });
    let bytes = 0;
    c.stdout.on("data", (d: Buffer) => {
      bytes += d.length;
    });
    c.on("error", reject);
    c.on("close", (code) =>
      code === 0 ? resolve({ ms: performance.now() - t0, bytes }) : reject(new Error(`ssh exited ${code}`)),
    );
  });
}

/** Connect + streamExec, byte count, close: the same work the forked ssh does. */
async function ours(cmd: string): Promise<{ ms: number; bytes: number }> {
  const t0 = performance.now();
  const conn = await SSHConnection.connect({
    host: f.host,
    port: f.port,
    username: f.user,
    auth: createKeyAuth(f.clientKey.path),
    hostKey: { knownHostsPath: f.knownHostsPath },
  });
  let bytes = 0;
  for await (const ev of conn.streamExec(cmd, { shell: "raw", timeoutMs: 600_000 })) {
    if (ev.stream === "stdout") bytes += ev.data.length;
  }
  await conn.close();
  return { ms: performance.now() - t0, bytes };
}

function download(port: number): Promise<{ ms: number; bytes: number }> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    let bytes = 0;
    const s = net.connect({ host: "127.0.0.1", port });
    s.on("data", (d: Buffer) => {
      bytes += d.length;
    });
    s.on("end", () => resolve({ ms: performance.now() - t0, bytes }));
    s.on("error", reject);
  });
}

async function waitPort(port: number): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const ok = await new Promise<boolean>((r) => {
      const s = net.connect({ host: "127.0.0.1", port });
      s.on("connect", () => {
        s.destroy();
        r(true);
      });
      s.on("error", () => r(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`port ${port} never opened`);
}

const freePort = () =>
  new Promise<number>((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });

const blob = Buffer.alloc(SIZE, 0x5a);
const blobServer = net.createServer((s) => {
  s.on("error", () => {});
  s.end(blob);
});
await new Promise<void>((r) => blobServer.listen(0, "127.0.0.1", r));
const blobPort = (blobServer.address() as net.AddressInfo).port;

const rows: Record<string, string | number>[] = [];
const results: Record<string, unknown> = {};
try {
  const cmd = `head -c ${SIZE} /dev/zero`;
  const oursExec: number[] = [];
  const sshExec: number[] = [];
  await ours("true");
  for (let i = 0; i < RUNS; i++) {
    const a = await ours(cmd);
    if (a.bytes !== SIZE) throw new Error(`streamExec got ${a.bytes} of ${SIZE} bytes`);
    oursExec.push(mibps(a.bytes, a.ms));
    const b = await forkSsh([cmd]);
    if (b.bytes !== SIZE) throw new Error(`ssh got ${b.bytes} of ${SIZE} bytes`);
    sshExec.push(mibps(b.bytes, b.ms));
  }

  // -L: ours (forwardLocal on one connection) against `ssh -N -L`, both set up once.
  const conn = await SSHConnection.connect({
    host: f.host,
    port: f.port,
    username: f.user,
    auth: createKeyAuth(f.clientKey.path),
    hostKey: { knownHostsPath: f.knownHostsPath },
  });
  const fwd = await forwardLocal(conn, { localPort: 0, remoteHost: "127.0.0.1", remotePort: blobPort });
  const sshPort = await freePort();
  const sshL = spawn("ssh", ["-N", "-L", `${sshPort}:127.0.0.1:${blobPort}`, ...sshArgs], {
    stdio: "ignore",
  });
  await waitPort(sshPort);
  const oursL: number[] = [];
  const sshLs: number[] = [];
  await download(fwd.localPort);
  await download(sshPort);
  for (let i = 0; i < RUNS; i++) {
    const a = await download(fwd.localPort);
    if (a.bytes !== SIZE) throw new Error(`-L (ours) got ${a.bytes} of ${SIZE}`);
    oursL.push(mibps(a.bytes, a.ms));
    const b = await download(sshPort);
    if (b.bytes !== SIZE) throw new Error(`ssh -L got ${b.bytes} of ${SIZE}`);
    sshLs.push(mibps(b.bytes, b.ms));
  }
  sshL.kill("SIGTERM");
  await fwd.close();
  await conn.close();

  const med = (xs: number[]) => stats(xs).p50;
  const add = (name: string, xs: number[]) => {
    results[name] = { mibPerSec: xs, median: med(xs) };
    rows.push({ case: name, "median MiB/s": med(xs), runs: xs.join(" / ") });
  };
  add(`streamExec head -c ${MIB}MiB (connect+stream)`, oursExec);
  add(`ssh host head -c ${MIB}MiB (fork, connect+stream)`, sshExec);
  add(`forwardLocal -L ${MIB}MiB`, oursL);
  add(`ssh -N -L ${MIB}MiB`, sshLs);
  const ratios = {
    "streamExec / ssh": Math.round((med(oursExec) / med(sshExec)) * 100) / 100,
    "forwardLocal / ssh -L": Math.round((med(oursL) / med(sshLs)) * 100) / 100,
  };
  printTable(rows);
  console.log("\nthroughput ratios (ours / OpenSSH, >1 means faster):", ratios);
  console.log(`\nwrote ${writeResults("ssh-stream", { mib: MIB, runs: RUNS, results, ratios })}`);
} finally {
  blobServer.close();
  await f.stop();
}
