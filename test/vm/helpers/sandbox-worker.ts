// Runs in a separate host process for sandbox-api.test.ts, then exits:
//   start <dataDir> <vmId> <command>   starts a background process, prints {"pid":N}
//   create-ttl <dataDir> <ttlMs>       creates a VM with a TTL, prints {"id","expiresAt"}
import { SmolVM } from "../../../src/vm/smolvm.js";

const [verb, dataDir, a, b] = process.argv.slice(2);
if (verb === "start") {
  const vm = await SmolVM.fromId(a!, { dataDir });
  const p = await vm.processes.start(b!, { timeoutMs: 20_000 });
  process.stdout.write(JSON.stringify({ pid: p.pid }));
  await vm.close();
} else if (verb === "create-ttl") {
  const vm = await SmolVM.create({ dataDir, ttlMs: Number(a), labels: { role: "ttl" } });
  await vm.close();
  process.stdout.write(JSON.stringify({ id: vm.id, expiresAt: vm.expiresAt?.getTime() }));
}
process.exit(0);
