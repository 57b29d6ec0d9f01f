// Runs in a separate process: re-attaches to a VM by id and runs one command (argv[2], argv[3]).
import { SmolVM } from "../../../src/vm/smolvm.js";

const vm = await SmolVM.fromId(process.argv[2]!);
const r = await vm.run(process.argv[3]!, { timeoutMs: 20_000 });
process.stdout.write(JSON.stringify({ status: vm.status, exitCode: r.exitCode, stdout: r.stdout }));
await vm.close();
