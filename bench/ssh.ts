/**
 * `npm run bench:ssh`: SSHClient against the alternatives, side by side in one run against the
 * fixture sshd on loopback. Writes bench/results/ssh.json.
 */
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { NodeSSH } from "node-ssh";
import { wrapCommand } from "../src/command.js";
import { SSHClient } from "../src/ssh/client.js";
import { SSHConnection } from "../src/ssh/connection.js";
import { SshdFixture } from "../test/fixtures/sshd.js";
import { measure, printTable, type Stats, stats, writeResults } from "./lib/stats.js";

const execFileP = promisify(execFile);
const N = Number(process.env.BENCH_N ?? 300);

const f = await SshdFixture.start({ maxSessions: 10, logLevel: "ERROR" });
const results: Record<string, Stats> = {};
try {
  const client = new SSHClient({
    host: f.host,
    port: f.port,
    user: f.user,
    keyPath: f.clientKey.path,
    hostKey: { knownHostsPath: f.knownHostsPath },
  });
  await client.waitForSsh({ timeoutMs: 10_000 });
  const conn = await client.connection();
  const rawExec = (cmd: string) =>
    new Promise<void>((resolve, reject) =>
      conn.client.exec(cmd, (e, ch) => {
        if (e) return reject(e);
        ch.on("close", () => resolve());
        ch.resume();
        ch.stderr.resume();
      }),
    );
  const loginWire = wrapCommand("true").command;

  // Interleave the two closest contenders in rounds so machine load hits them equally.
  const rawS: number[] = [];
  const rawL: number[] = [];
  const runS: number[] = [];
  const runL: number[] = [];
  const time = async (arr: number[], fn: () => Promise<unknown>) => {
    const t = performance.now();
    await fn();
    arr.push(performance.now() - t);
  };
  for (let i = 0; i < 10; i++) await client.run("true");
  for (let i = 0; i < N; i++) {
    await time(runS, () => client.run("true", { shell: "raw" }));
    await time(rawS, () => rawExec("true"));
    await time(runL, () => client.run("true"));
    await time(rawL, () => rawExec(loginWire));
  }
  results['SSHClient run("true", raw)'] = stats(runS);
  results['raw ssh2 exec("true") (floor)'] = stats(rawS);
  results['SSHClient run("true") (login)'] = stats(runL);
  results["raw ssh2 exec(same login wrapper)"] = stats(rawL);

  const nodeSsh = new NodeSSH();
  await nodeSsh.connect({ host: f.host, port: f.port, username: f.user, privateKeyPath: f.clientKey.path });
  results['node-ssh execCommand("true")'] = await measure(() => nodeSsh.execCommand("true"), N);
  nodeSsh.dispose();

  const fresh = Math.min(N, 50);
  results["fresh connection per command"] = await measure(
    async () => {
      const c = await SSHConnection.connect({
        host: f.host,
        port: f.port,
        username: f.user,
        auth: { method: "privateKey", keyPath: f.clientKey.path },
        hostKey: { knownHostsPath: f.knownHostsPath },
      });
      await c.exec("true", { shell: "raw" });
      await c.close();
    },
    fresh,
    3,
  );
  const sshArgs = [
    "-F",
    "/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    `UserKnownHostsFile=${f.knownHostsPath}`,
    "-o",
    "StrictHostKeyChecking=yes",
    "-i",
    f.clientKey.path,
    "-p",
    String(f.port),
    `${f.user}@${f.host}`,
    "true",
  ];
  results["fork OpenSSH ssh per command"] = await measure(() => execFileP("ssh", sshArgs), fresh, 3);

  const conc: number[] = [];
  for (let i = 0; i < 5; i++) {
    const t = performance.now();
    const rs = await Promise.all(
      Array.from({ length: 200 }, (_, k) => client.run(`echo ${k}`, { shell: "raw" })),
    );
    conc.push(performance.now() - t);
    if (!rs.every((r, k) => r.stdout === `${k}\n`)) throw new Error("concurrent outputs were wrong");
  }
  results["200 concurrent runs (MaxSessions 10), whole batch"] = stats(conc);
  await client.close();

  printTable(
    Object.entries(results).map(([name, s]) => ({
      case: name,
      n: s.n,
      "p50 ms": s.p50,
      "p99 ms": s.p99,
      "mean ms": s.mean,
    })),
  );
  const p50 = (k: string) => results[k]!.p50;
  const ratios = {
    forkOverRunRaw: p50("fork OpenSSH ssh per command") / p50('SSHClient run("true", raw)'),
    forkOverRunLogin: p50("fork OpenSSH ssh per command") / p50('SSHClient run("true") (login)'),
    runRawOverRawSsh2: p50('SSHClient run("true", raw)') / p50('raw ssh2 exec("true") (floor)'),
    runLoginOverRawSsh2SameWire:
      p50('SSHClient run("true") (login)') / p50("raw ssh2 exec(same login wrapper)"),
    nodeSshOverRunRaw: p50('node-ssh execCommand("true")') / p50('SSHClient run("true", raw)'),
  };
  console.log("\nratios (p50):");
  for (const [k, v] of Object.entries(ratios)) console.log(`  ${k}: ${v.toFixed(2)}x`);
  console.log(`\nwrote ${writeResults("ssh", { n: N, results, ratios })}`);
} finally {
  await f.stop();
}
