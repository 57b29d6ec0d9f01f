/**
 * `smolvm create|list|run|ssh|stop|start|rm|env|file|expose|unexpose|logs`: thin wrappers over
 * the SmolVM facade. Parsing and printing only; every behaviour lives in the SDK.
 */
import { spawnSync } from "node:child_process";
import type { Command } from "commander";
import { quoteSh } from "../command.js";
import { ValidationError } from "../errors.js";
import { type CommChannelChoice, SmolVM } from "../vm/smolvm.js";

function parseEnvPairs(pairs: string[]): Record<string, string> {
  const env: Record<string, string> = {};
  for (const p of pairs) {
    const i = p.indexOf("=");
    if (i <= 0) throw new ValidationError(`expected NAME=value, got ${JSON.stringify(p.split("=")[0])}=…`);
    env[p.slice(0, i)] = p.slice(i + 1);
  }
  return env;
}

const collect = (v: string, acc: string[]) => [...acc, v];
const int = (v: string) => {
  const n = Number(v);
  if (!Number.isInteger(n)) throw new ValidationError(`expected an integer, got ${JSON.stringify(v)}`);
  return n;
};

async function withVm<T>(
  idOrName: string,
  channel: string | undefined,
  fn: (vm: SmolVM) => Promise<T>,
): Promise<T> {
  const vm = await SmolVM.fromId(idOrName, { commChannel: channel as CommChannelChoice | undefined });
  try {
    return await fn(vm);
  } finally {
    await vm[Symbol.asyncDispose]();
  }
}

export function registerVmCommands(program: Command): void {
  program
    .command("create")
    .description("boot a new sandbox and print its id")
    .option("--image <name>", "image to boot", "tiny")
    .option("--memory <mib>", "memory in MiB", int, 512)
    .option("--vcpus <n>", "virtual CPUs", int, 1)
    .option("--name <name>", "a name to refer to it by")
    .option("-e, --env <NAME=value>", "env var for login shells (repeatable)", collect, [])
    .option("--comm-channel <ch>", "ssh | agent | vsock | auto", "auto")
    .option("--json", "print the VM record as JSON")
    .action(async (o) => {
      const vm = await SmolVM.create({
        image: o.image,
        memoryMib: o.memory,
        vcpus: o.vcpus,
        name: o.name,
        env: parseEnvPairs(o.env),
        commChannel: o.commChannel,
      });
      // The VM outlives this process: close our connection, do not dispose (that deletes).
      await vm.close();
      if (o.json)
        console.log(
          JSON.stringify({ id: vm.id, name: vm.name, sshPort: vm.sshPort, bootTimings: vm.bootTimings }),
        );
      else console.log(vm.id);
    });

  program
    .command("list")
    .alias("ls")
    .description("list sandboxes")
    .option("--json", "print JSON")
    .action(async (o) => {
      const vms = await SmolVM.list();
      if (o.json) return console.log(JSON.stringify(vms, null, 2));
      if (!vms.length) return console.log("no VMs");
      console.log(
        ["ID".padEnd(18), "NAME".padEnd(20), "STATUS".padEnd(9), "IMAGE".padEnd(7), "SSH"].join(" "),
      );
      for (const v of vms) {
        console.log(
          [v.id.padEnd(18), v.name.padEnd(20), v.status.padEnd(9), v.image.padEnd(7), v.sshPort ?? "-"].join(
            " ",
          ),
        );
      }
    });

  program
    .command("run <vm> <command...>")
    .description("run a command in a sandbox; exits with its exit code")
    .option("--timeout <ms>", "deadline in ms", int, 30_000)
    .option("--raw", "skip the login shell")
    .option("--comm-channel <ch>", "ssh | agent | vsock | auto")
    .action(async (id: string, words: string[], o) => {
      const code = await withVm(id, o.commChannel, async (vm) => {
        const r = await vm.run(words.join(" "), {
          timeoutMs: o.timeout,
          shell: o.raw ? "raw" : "login",
          encoding: "buffer",
          maxOutputBytes: 0,
          onStdout: (d) => process.stdout.write(d),
          onStderr: (d) => process.stderr.write(d),
        });
        return r.exitCode ?? 128;
      });
      process.exitCode = code;
    });

  program
    .command("ssh <vm> [command...]")
    .description("open an interactive OpenSSH session (always SSH)")
    .action(async (id: string, words: string[] = []) => {
      const cmd = await withVm(id, undefined, async (vm) => vm.sshCommands().ssh);
      const r = spawnSync(
        "/bin/sh",
        ["-c", `exec ${cmd}${words.length ? ` -- ${words.map(quoteSh).join(" ")}` : ""}`],
        {
          stdio: "inherit",
        },
      );
      process.exitCode = r.status ?? 255;
    });

  for (const verb of ["stop", "start"] as const) {
    program
      .command(`${verb} <vm>`)
      .description(`${verb} a sandbox`)
      .action(async (id: string) => withVm(id, undefined, (vm) => vm[verb]()));
  }

  program
    .command("rm <vm...>")
    .alias("delete")
    .description("stop and delete sandboxes")
    .action(async (ids: string[]) => {
      for (const id of ids) {
        const vm = await SmolVM.fromId(id);
        await vm.delete();
        console.log(`deleted ${vm.id}`);
      }
    });

  const env = program.command("env").description("env vars for the sandbox's login shells");
  env
    .command("set <vm> <pairs...>")
    .option("--comm-channel <ch>", "ssh | agent | vsock | auto")
    .action(async (id: string, pairs: string[], o) =>
      withVm(id, o.commChannel, (vm) => vm.setEnvVars(parseEnvPairs(pairs))),
    );
  env
    .command("unset <vm> <names...>")
    .option("--comm-channel <ch>", "ssh | agent | vsock | auto")
    .action(async (id: string, names: string[], o) =>
      withVm(id, o.commChannel, (vm) => vm.unsetEnvVars(names)),
    );
  env
    .command("list <vm>")
    .option("--comm-channel <ch>", "ssh | agent | vsock | auto")
    .action(async (id: string, o) => {
      const vars = await withVm(id, o.commChannel, (vm) => vm.listEnvVars());
      for (const [k, v] of Object.entries(vars)) console.log(`${k}=${v}`);
    });

  const file = program.command("file").description("copy files to and from a sandbox");
  file
    .command("upload <vm> <local> <remote>")
    .option("--comm-channel <ch>", "ssh | agent | vsock | auto")
    .action(async (id: string, local: string, remote: string, o) =>
      withVm(id, o.commChannel, (vm) => vm.uploadFile(local, remote)),
    );
  file
    .command("download <vm> <remote> <local>")
    .option("--comm-channel <ch>", "ssh | agent | vsock | auto")
    .action(async (id: string, remote: string, local: string, o) =>
      withVm(id, o.commChannel, (vm) => vm.downloadFile(remote, local)),
    );

  program
    .command("expose <vm> <guestPort> [hostPort]")
    .description("forward 127.0.0.1:<hostPort> on the host to <guestPort> in the sandbox")
    .action(async (id: string, guestPort: string, hostPort?: string) => {
      const p = await withVm(id, undefined, (vm) =>
        vm.exposeLocal(int(guestPort), hostPort ? int(hostPort) : undefined),
      );
      console.log(p);
    });
  program
    .command("unexpose <vm> <hostPort>")
    .action(async (id: string, hostPort: string) =>
      withVm(id, undefined, (vm) => vm.unexposeLocal(int(hostPort))),
    );

  program
    .command("logs <vm>")
    .description("print the sandbox's serial console")
    .action(async (id: string) => {
      process.stdout.write(await withVm(id, undefined, (vm) => vm.serialLog()));
    });
}
