/**
 * `npm run bench:network`: what the network policy costs. One VM downloads 64 MiB over HTTP from
 * a test host (a network namespace at 198.51.100.10, named bench.test) and opens BENCH_CONN_N
 * short connections to it, in three arms in the same run:
 *  - plain: the VM's own nftables table is told to let this host's traffic past the policy
 *    daemon, so it is QEMU user networking exactly as without a policy;
 *  - public: the default policy (the kernel passes public addresses itself, see firewall.ts);
 *  - allow: through the daemon, allow-list { allow: ["bench.test"] } (HTTP Host sniffed too).
 * Targets: throughput >= 0.5x plain, connection setup p50 overhead < 5 ms. Guest timings are taken
 * in the guest (/proc/timer_list), so the control channel is not in them; a host probe (curl from
 * inside the VM's cgroup, so through the same nftables + daemon path) measures the same overhead
 * without the emulated guest's noise. Arms are interleaved round by round so load drift on a
 * shared host hits them alike. Writes bench/results/network.json.
 * Needs root (network namespaces, nftables).
 */
import { execFileSync } from "node:child_process";
import { ensureImage } from "../src/image/index.js";
import { tableName, vmCgroup } from "../src/vm/network/firewall.js";
import type { NetworkPolicy } from "../src/vm/network/policy.js";
import { SmolVM } from "../src/vm/smolvm.js";
import { createTestHosts } from "../test/fixtures/test-hosts.js";
import { printTable, type Stats, stats, writeResults } from "./lib/stats.js";

const IP = "198.51.100.10";
const BYTES = 64 * 1024 * 1024;
const DOWNLOADS = Number(process.env.BENCH_DOWNLOADS ?? 3);
const CONN_N = Number(process.env.BENCH_CONN_N ?? 40);
const CONN_ROUNDS = 4;
const HOST_PROBE_N = Number(process.env.BENCH_HOST_N ?? 60);

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const round = (n: number, d = 2) => Math.round(n * 10 ** d) / 10 ** d;

async function guest(vm: SmolVM, script: string): Promise<string> {
  const r = await vm.run(script, { timeoutMs: 300_000, shell: "raw" });
  if (!r.ok) throw new Error(`guest script failed (${r.exitCode}): ${r.stderr}`);
  return r.stdout;
}

/**
 * A shell function printing the guest's monotonic clock in ns with builtins only (busybox date
 * has no %N): /proc/timer_list's third line is "now at <ns> nsecs".
 */
const NOW = "now() { { read -r l; read -r l; read -r _ _ ns _; } < /proc/timer_list; echo $ns; }; ";

/** MiB/s of one 64 MiB download, timed in the guest. */
async function download(vm: SmolVM): Promise<number> {
  const out = await guest(
    vm,
    `${NOW}t0=$(now); n=$(printf 'GET /bytes/${BYTES} HTTP/1.0\\r\\nHost: bench.test\\r\\n\\r\\n' | nc -w 30 ${IP} 80 | wc -c); t1=$(now); echo $n $(( (t1 - t0) / 1000 ))`,
  );
  const [n, us] = out.trim().split(" ").map(Number);
  if (!n || n < BYTES) throw new Error(`download got ${n} bytes`);
  return BYTES / 1024 / 1024 / (us! / 1e6);
}

/** Milliseconds per short HTTP request on a fresh connection (connect, request, response, close). */
async function connections(vm: SmolVM, n: number): Promise<number[]> {
  const out = await guest(
    vm,
    `${NOW}i=0; while [ $i -lt ${n + 5} ]; do t0=$(now); printf 'GET / HTTP/1.0\\r\\nHost: bench.test\\r\\n\\r\\n' | nc -w 5 ${IP} 80 >/dev/null; t1=$(now); echo $(( (t1 - t0) / 1000 )); i=$((i+1)); done`,
  );
  const us = out.trim().split("\n").map(Number).slice(5); // 5 warm-up connections
  return us.map((u) => u / 1000);
}

/**
 * The same path without the emulated guest's noise: curl on the host, once as itself (plain) and
 * once from inside the VM's cgroup, so nftables sends it through the VM's daemon exactly like the
 * guest's connections. time_starttransfer: connect + request + first response byte, in ms.
 */
function hostProbe(vmId: string, viaPolicy: boolean): number {
  const curl = `exec curl -s -o /dev/null -H 'Host: bench.test' -w '%{time_starttransfer}' http://${IP}/`;
  const procs = `${vmCgroup(vmId).dir}/cgroup.procs`;
  const script = viaPolicy ? `echo $$ > ${procs} && ${curl}` : curl;
  return Number(execFileSync("sh", ["-c", script]).toString()) * 1000;
}

/** Lets the VM's traffic to IP:80 bypass the daemon (QEMU user networking as without policy). */
function bypass(vmId: string): () => void {
  const t = tableName(vmId);
  const handles: Array<[string, number]> = [];
  for (const chain of ["nat", "vm"]) {
    const out = execFileSync("nft", [
      "--echo",
      "--handle",
      "insert",
      "rule",
      "inet",
      t,
      chain,
      "ip",
      "daddr",
      IP,
      "tcp",
      "dport",
      "80",
      "accept",
    ]).toString();
    handles.push([chain, Number(/# handle (\d+)/.exec(out)![1])]);
  }
  return () => {
    for (const [chain, h] of handles)
      execFileSync("nft", ["delete", "rule", "inet", t, chain, "handle", String(h)]);
  };
}

await ensureImage("tiny");
const hosts = await createTestHosts([["bench.test", IP]]);
let vm: SmolVM | undefined;
try {
  vm = await SmolVM.create({ network: "public", memoryMib: 512 });
  await guest(vm, "i=0; until ip route | grep -q default || [ $i -ge 300 ]; do sleep 0.1; i=$((i+1)); done");
  await guest(vm, "nslookup bench.test >/dev/null"); // the allow arm admits IP only after this
  const arms: Array<{ arm: string; policy: NetworkPolicy; plain: boolean }> = [
    { arm: "plain", policy: "public", plain: true },
    { arm: "public", policy: "public", plain: false },
    { arm: "allow", policy: { allow: ["bench.test"] }, plain: false },
  ];
  const results: Record<
    string,
    {
      mibPerS: number[];
      mibPerSMedian: number;
      connMs: number[];
      conn: Stats;
      host: number[];
      hostProbe: Stats;
    }
  > = {};
  const slot = (arm: string) => {
    const r = results[arm] ?? {
      mibPerS: [],
      mibPerSMedian: 0,
      connMs: [],
      conn: stats([]),
      host: [],
      hostProbe: stats([]),
    };
    results[arm] = r;
    return r;
  };
  // Interleave the arms per round so load drift on a shared host hits them alike.
  for (let round_ = 0; round_ < DOWNLOADS; round_++) {
    for (const a of arms) {
      await vm.setNetwork(a.policy);
      const undo = a.plain ? bypass(vm.id) : undefined;
      try {
        if (a.policy !== "public") await guest(vm, "nslookup bench.test >/dev/null");
        slot(a.arm).mibPerS.push(await download(vm));
      } finally {
        undo?.();
      }
    }
  }
  for (let round_ = 0; round_ < CONN_ROUNDS; round_++) {
    for (const a of arms) {
      await vm.setNetwork(a.policy);
      const undo = a.plain ? bypass(vm.id) : undefined;
      try {
        slot(a.arm).connMs.push(...(await connections(vm, Math.ceil(CONN_N / CONN_ROUNDS))));
        // The host probe goes through the same arm (the plain arm: curl as itself).
        for (let i = 0; i < HOST_PROBE_N / CONN_ROUNDS; i++)
          slot(a.arm).host.push(hostProbe(vm.id, !a.plain));
      } finally {
        undo?.();
      }
    }
  }
  for (const r of Object.values(results)) {
    r.mibPerSMedian = round(median(r.mibPerS), 1);
    r.conn = stats(r.connMs);
    r.hostProbe = stats(r.host);
  }
  const plain = results.plain!;
  const rows = Object.entries(results).map(([arm, r]) => ({
    arm,
    "64 MiB download (MiB/s, median)": r.mibPerSMedian.toFixed(1),
    "vs plain": (r.mibPerSMedian / plain.mibPerSMedian).toFixed(2),
    "conn p50 (ms)": r.conn.p50.toFixed(2),
    "conn p90 (ms)": r.conn.p90.toFixed(2),
    "p50 overhead (ms)": (r.conn.p50 - plain.conn.p50).toFixed(2),
    "host probe p50 (ms)": r.hostProbe.p50.toFixed(2),
    "host probe overhead (ms)": (r.hostProbe.p50 - plain.hostProbe.p50).toFixed(2),
  }));
  printTable(rows);
  const verdicts = Object.fromEntries(
    ["public", "allow"].map((arm) => {
      const r = results[arm]!;
      const ratio = round(r.mibPerSMedian / plain.mibPerSMedian);
      const overhead = round(r.conn.p50 - plain.conn.p50);
      const hostOverhead = round(r.hostProbe.p50 - plain.hostProbe.p50);
      return [
        arm,
        {
          throughputRatio: ratio,
          throughputPass: ratio >= 0.5,
          connSetupP50OverheadMs: overhead,
          connSetupPass: overhead < 5,
          hostProbeP50OverheadMs: hostOverhead,
          hostProbePass: hostOverhead < 5,
        },
      ];
    }),
  );
  for (const [arm, v] of Object.entries(verdicts)) {
    console.log(
      `${arm}: throughput ${v.throughputRatio}x plain (>= 0.5x: ${v.throughputPass ? "PASS" : "FAIL"}), connection setup p50 in the guest ${v.connSetupP50OverheadMs} ms (< 5 ms: ${v.connSetupPass ? "PASS" : "FAIL"}), host probe ${v.hostProbeP50OverheadMs} ms (< 5 ms: ${v.hostProbePass ? "PASS" : "FAIL"})`,
    );
  }
  const accel = vm.bootTimings?.accel ?? "unknown";
  const file = writeResults("network", {
    accel,
    bytes: BYTES,
    downloads: DOWNLOADS,
    connections: CONN_N,
    hostProbes: HOST_PROBE_N,
    results,
    verdicts,
  });
  console.log(`results: ${file}`);
} finally {
  await vm?.delete().catch(() => {});
  hosts.cleanup();
}
