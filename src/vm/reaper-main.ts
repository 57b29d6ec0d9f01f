/**
 * The TTL reaper process (see ttl.ts): `node reaper-main.js <dataDir>`, started detached by
 * create()/setTtl(). Deletes every VM whose expiresAt passed; exits when none has a TTL.
 */
import { sleep } from "../common/deadline.js";
import { SmolVM } from "./smolvm.js";
import { VmStore } from "./store.js";
import { REAPER_POLL_MS, releaseReaperLock, takeReaperLock } from "./ttl.js";

const dataDir = process.argv[2];
if (!dataDir) process.exit(2);

async function reapOnce(store: VmStore): Promise<number> {
  const now = Date.now();
  const vms = store.expiring();
  for (const rec of vms) {
    if (rec.expiresAt === null || rec.expiresAt > now) continue;
    try {
      const vm = await SmolVM.fromId(rec.id, { dataDir: dataDir! });
      // Re-check under the fresh record: setTtl may have extended or cleared it meanwhile.
      if (vm.expiresAt !== null && vm.expiresAt.getTime() <= Date.now())
        await vm.delete({ timeoutMs: 10_000 });
      else await vm.close();
    } catch {
      // gone already, or a transient failure: the next round tries again
    }
  }
  return store.expiring().length;
}

async function main(): Promise<void> {
  if (!takeReaperLock(dataDir!)) return;
  const store = VmStore.open(dataDir!);
  try {
    for (;;) {
      let left = await reapOnce(store);
      if (left === 0) {
        // Release, then look once more: a VM may have got a TTL while we were deciding to exit.
        releaseReaperLock(dataDir!);
        left = store.expiring().length;
        if (left === 0 || !takeReaperLock(dataDir!)) return;
      }
      await sleep(REAPER_POLL_MS);
    }
  } finally {
    releaseReaperLock(dataDir!);
    store.close();
  }
}

main().then(
  () => process.exit(0),
  () => process.exit(1),
);
