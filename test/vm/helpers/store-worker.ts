/**
 * A separate process hammering the shared store: inserts VMs, updates them, leases ports.
 * argv: <dataDir> <workerId> <iterations>. Prints one JSON line with what it did.
 */
import { leasePort } from "../../../src/vm/ports.js";
import { VmStore } from "../../../src/vm/store.js";
import type { VmConfig } from "../../../src/vm/vm-config.js";

const [dataDir, worker, n] = process.argv.slice(2) as [string, string, string];
const store = VmStore.open(dataDir);
const ports: number[] = [];
const errors: string[] = [];
for (let i = 0; i < Number(n); i++) {
  try {
    const id = `w${worker}-${i}`;
    store.insert({ id, name: id, image: "tiny", vmDir: `/nonexistent/${id}` });
    store.update(id, { status: "running", pid: 1_000_000 + i, ports: [{ hostPort: i + 1, guestPort: 80 }] });
    ports.push(await leasePort(store, id, "ssh"));
    // A key this version does not know (as a newer smolvm may write): the store keeps it.
    const config: VmConfig & { round: number } = { round: i };
    store.update(id, { status: "stopped", pid: null, config });
    store.list();
  } catch (e) {
    errors.push(`${(e as { code?: string }).code ?? ""} ${(e as Error).message}`);
  }
}
store.close();
process.stdout.write(`${JSON.stringify({ worker, ports, errors })}\n`);
