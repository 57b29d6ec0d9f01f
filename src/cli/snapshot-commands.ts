/** `smolvm snapshot create|list|rm` and `smolvm fork`: thin wrappers over SmolVM's snapshot API. */
import type { Command } from "commander";
import { ValidationError } from "../errors.js";
import { SmolVM } from "../vm/smolvm.js";

const positiveInt = (v: string) => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1)
    throw new ValidationError(`expected a positive integer, got ${JSON.stringify(v)}`);
  return n;
};

export function registerSnapshotCommands(program: Command): void {
  const snap = program
    .command("snapshot")
    .description("capture sandboxes and restore them (smolvm create --from-snapshot)");
  snap
    .command("create <vm>")
    .description("capture a running sandbox (memory, processes, disk); it keeps running")
    .option("--name <name>", "a name to restore it by")
    .option("--json", "print the snapshot as JSON")
    .action(async (id: string, o: { name?: string; json?: boolean }) => {
      const vm = await SmolVM.fromId(id);
      try {
        const info = await vm.snapshot({ name: o.name });
        console.log(o.json ? JSON.stringify(info) : info.id);
      } finally {
        await vm.close();
      }
    });
  snap
    .command("list")
    .alias("ls")
    .description("list snapshots")
    .option("--json", "print JSON")
    .action(async (o: { json?: boolean }) => {
      const all = await SmolVM.listSnapshots();
      if (o.json) return console.log(JSON.stringify(all, null, 2));
      if (!all.length) return console.log("no snapshots");
      for (const s of all) {
        console.log(
          `${s.id}  ${s.name.padEnd(20)}  ${s.image.padEnd(7)} ${String(s.memoryMib).padStart(5)} MiB  ${(s.sizeBytes / 2 ** 20).toFixed(1).padStart(7)} MiB on disk  from ${s.vmId}  ${s.createdAt}`,
        );
      }
    });
  snap
    .command("rm <snap...>")
    .alias("delete")
    .description("remove snapshots (refused while a VM restored from one still uses it)")
    .action(async (ids: string[]) => {
      for (const id of ids) await SmolVM.deleteSnapshot(id);
    });

  program
    .command("fork <vm>")
    .description("new sandboxes, each a copy of a running one as it is now; prints their ids")
    .option("--count <n>", "how many", positiveInt, 1)
    .option("--json", "print JSON")
    .action(async (id: string, o: { count: number; json?: boolean }) => {
      const vm = await SmolVM.fromId(id);
      try {
        const kids = await vm.fork({ count: o.count });
        await Promise.all(kids.map((k) => k.close()));
        if (o.json)
          console.log(JSON.stringify(kids.map((k) => ({ id: k.id, name: k.name, sshPort: k.sshPort }))));
        else for (const k of kids) console.log(k.id);
      } finally {
        await vm.close();
      }
    });
}
