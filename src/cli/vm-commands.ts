/**
 * `smolvm create|list|run|ssh|stop|start|rm|prune|env|file|expose|unexpose|network|logs` and the
 * sandbox verbs `shell|ps|attach|kill|fs`: thin wrappers over the SmolVM facade. Parsing and
 * printing only; every behaviour lives in the SDK.
 */
import { spawnSync } from "node:child_process";
import type { Command } from "commander";
import { quoteSh } from "../command.js";
import { printable } from "../common/guest-text.js";
import { ValidationError } from "../errors.js";
import { parsePolicyArg } from "../vm/network/policy.js";
import type { SignalName } from "../vm/processes.js";
import { type CommChannelChoice, SmolVM, type VmStatus } from "../vm/smolvm.js";
import { parseDuration } from "../vm/ttl.js";
import { collectEnv } from "./env-input.js";
import { progressLine } from "./progress-line.js";

const collect = (v: string, acc: string[]) => [...acc, v];

function parseLabels(pairs: string[]): Record<string, string> | undefined {
  if (!pairs.length) return undefined;
  const labels: Record<string, string> = {};
  for (const p of pairs) {
    const i = p.indexOf("=");
    if (i <= 0) throw new ValidationError(`expected --label key=value, got ${JSON.stringify(p)}`);
    labels[p.slice(0, i)] = p.slice(i + 1);
  }
  return labels;
}
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
    .option(
      "-e, --env <NAME[=value]>",
      "env var for login shells (repeatable); a bare NAME takes its value from stdin",
      collect,
      [],
    )
    .option("--env-file <path>", "env vars from a NAME=value file (repeatable)", collect, [])
    .option("--env-stdin", "env vars from NAME=value lines on stdin")
    .option("--comm-channel <ch>", "ssh | agent | vsock | auto", "auto")
    .option("--ttl <duration>", "delete the VM after this long (90s, 10m, 2h, 1d)")
    .option("--label <k=v>", "a label to find the VM by (repeatable)", collect, [])
    .option("--disk <mib>", "writable disk size in MiB (debian image)", int)
    .option("--from-snapshot <snap>", "restore a snapshot (id or name) instead of booting an image")
    .option("--no-template", "boot cold instead of restoring the image's template")
    .option("--network <policy>", "none | public | allow=host,*.domain,10.0.0.0/8[;deny=...]", "public")
    .option("--json", "print the VM record as JSON")
    .action(async (o) => {
      const common = {
        network: parsePolicyArg(o.network),
        name: o.name,
        env: collectEnv(o.env, o.envFile, o.envStdin),
        commChannel: o.commChannel,
        ttlMs: o.ttl === undefined ? undefined : parseDuration(o.ttl),
        labels: parseLabels(o.label),
      };
      const line = progressLine();
      const vm = await (o.fromSnapshot
        ? SmolVM.fromSnapshot(o.fromSnapshot, common)
        : SmolVM.create({
            network: common.network,
            image: o.image,
            memoryMib: o.memory,
            vcpus: o.vcpus,
            name: o.name,
            env: common.env,
            commChannel: o.commChannel,
            ttlMs: o.ttl === undefined ? undefined : parseDuration(o.ttl),
            labels: parseLabels(o.label),
            diskMib: o.disk,
            template: o.template,
            onProgress: line.onProgress,
          })
      ).finally(() => line.close());
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
    .option("--label <k=v>", "only VMs with this label (repeatable)", collect, [])
    .option("--status <status>", "only VMs in this status (running, stopped, crashed, creating)")
    .option("--json", "print JSON")
    .action(async (o) => {
      const vms = await SmolVM.list({
        labels: parseLabels(o.label),
        status: o.status as VmStatus | undefined,
      });
      if (o.json) return console.log(JSON.stringify(vms, null, 2));
      if (!vms.length) return console.log("no VMs");
      console.log(
        [
          "ID".padEnd(18),
          "NAME".padEnd(20),
          "STATUS".padEnd(9),
          "IMAGE".padEnd(7),
          "SSH".padEnd(6),
          "EXPIRES".padEnd(24),
          "LABELS",
        ].join(" "),
      );
      for (const v of vms) {
        const expires = v.expiresAt === null ? "-" : new Date(v.expiresAt).toISOString();
        const labels =
          Object.entries(v.labels)
            .map(([k, val]) => `${k}=${val}`)
            .join(",") || "-";
        console.log(
          [
            v.id.padEnd(18),
            v.name.padEnd(20),
            v.status.padEnd(9),
            v.image.padEnd(7),
            String(v.sshPort ?? "-").padEnd(6),
            expires.padEnd(24),
            labels,
          ].join(" "),
        );
      }
    });

  program
    .command("run <vm> <command...>")
    .description("run a command in a sandbox; exits with its exit code")
    .option("--timeout <ms>", "deadline in ms", int, 30_000)
    .option("--raw", "skip the login shell")
    .option("--detach", "start it in the background and print its pid (see ps, attach, kill)")
    .option("--comm-channel <ch>", "ssh | agent | vsock | auto")
    .action(async (id: string, words: string[], o) => {
      if (o.detach) {
        const pid = await withVm(id, o.commChannel, async (vm) => {
          const p = await vm.processes.start(words.join(" "), { shell: o.raw ? "raw" : "login" });
          p.detach();
          return p.pid;
        });
        console.log(pid);
        return;
      }
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

  for (const verb of ["stop", "start", "pause", "resume"] as const) {
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

  program
    .command("prune")
    .description(
      "remove stopped and crashed sandboxes and leftover directories; kill QEMU processes no sandbox owns",
    )
    .option("--json", "print what was removed as JSON")
    .action(async (o) => {
      const r = await SmolVM.prune();
      if (o.json) return console.log(JSON.stringify(r));
      for (const id of r.removedVms) console.log(`removed ${id}`);
      for (const d of r.removedDirs) console.log(`removed orphaned directory ${d}`);
      for (const pid of r.killedPids) console.log(`killed orphaned QEMU ${pid}`);
      if (!r.removedVms.length && !r.removedDirs.length && !r.killedPids.length)
        console.log("nothing to prune");
    });

  const env = program.command("env").description("env vars for the sandbox's login shells");
  env
    .command("set <vm> [pairs...]")
    .description("set NAME=value pairs; for secrets use a bare NAME (value from stdin) or --env-file")
    .option("--env-file <path>", "NAME=value lines from a file (repeatable)", collect, [])
    .option("--env-stdin", "NAME=value lines from stdin")
    .option("--comm-channel <ch>", "ssh | agent | vsock | auto")
    .action(async (id: string, pairs: string[], o) => {
      const vars = collectEnv(pairs ?? [], o.envFile, o.envStdin);
      if (!Object.keys(vars).length)
        throw new ValidationError(
          "nothing to set: give NAME=value, NAME (value on stdin), --env-file or --env-stdin.",
        );
      await withVm(id, o.commChannel, (vm) => vm.setEnvVars(vars));
    });
  env
    .command("unset <vm> <names...>")
    .option("--comm-channel <ch>", "ssh | agent | vsock | auto")
    .action(async (id: string, names: string[], o) =>
      withVm(id, o.commChannel, (vm) => vm.unsetEnvVars(names)),
    );
  env
    .command("list <vm>")
    .description(
      "print the env vars (values come from the guest: control characters are dropped, --json keeps them escaped)",
    )
    .option("--json", "print exact values as JSON")
    .option("--comm-channel <ch>", "ssh | agent | vsock | auto")
    .action(async (id: string, o) => {
      const vars = await withVm(id, o.commChannel, (vm) => vm.listEnvVars());
      if (o.json) return console.log(JSON.stringify(vars, null, 2));
      for (const [k, v] of Object.entries(vars)) console.log(`${k}=${printable(v)}`);
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

  const network = program.command("network").description("what the sandbox may reach");
  network
    .command("set <vm> <policy>")
    .description("change the policy live: none | public | allow=host,*.domain,10.0.0.0/8[;deny=...]")
    .action(async (id: string, policy: string) => {
      const p = parsePolicyArg(policy);
      await withVm(id, undefined, (vm) => vm.setNetwork(p));
    });
  network
    .command("log <vm>")
    .description("recent network decisions (DNS and TCP), oldest first")
    .option("--limit <n>", "how many", int, 100)
    .option("--json", "print JSON")
    .action(async (id: string, o: { limit: number; json?: boolean }) => {
      const log = await withVm(id, undefined, (vm) => vm.networkLog({ limit: o.limit }));
      if (o.json) return console.log(JSON.stringify(log, null, 2));
      for (const e of log) {
        const what = e.host ? `${e.host} (${e.ip || "-"})` : e.ip || "-";
        console.log(
          [e.time, e.proto.padEnd(3), e.verdict.padEnd(5), `${what}:${e.port}`, e.rule ?? ""].join(" "),
        );
      }
    });

  program
    .command("shell <vm>")
    .description("an interactive terminal over the guest agent; exits with the shell's code")
    .action(async (id: string) => {
      const code = await withVm(id, undefined, async (vm) => {
        const out = process.stdout;
        const t = await vm.pty.create({
          cols: out.columns || 80,
          rows: out.rows || 24,
          onData: (d) => out.write(d),
        });
        const stdin = process.stdin;
        const raw = stdin.isTTY === true;
        if (raw) stdin.setRawMode(true);
        const onInput = (d: Buffer) => void t.write(d).catch(() => {});
        const onResize = () => void t.resize({ cols: out.columns || 80, rows: out.rows || 24 });
        stdin.on("data", onInput);
        process.on("SIGWINCH", onResize);
        stdin.resume();
        try {
          return await t.wait();
        } finally {
          stdin.off("data", onInput);
          process.off("SIGWINCH", onResize);
          if (raw) stdin.setRawMode(false);
          stdin.pause();
        }
      });
      process.exitCode = code;
    });

  program
    .command("ps <vm>")
    .description("background processes in a sandbox (running and recently finished)")
    .option("--json", "print JSON")
    .action(async (id: string, o) => {
      const list = await withVm(id, undefined, (vm) => vm.processes.list());
      if (o.json) return console.log(JSON.stringify(list, null, 2));
      console.log(["PID".padEnd(7), "STATE".padEnd(12), "STARTED".padEnd(24), "COMMAND"].join(" "));
      for (const p of list) {
        const state = p.running ? "running" : p.signal ? `killed ${p.signal}` : `exit ${p.exitCode}`;
        console.log(
          [String(p.pid).padEnd(7), state.padEnd(12), p.startedAt.toISOString().padEnd(24), p.command].join(
            " ",
          ),
        );
      }
    });

  program
    .command("attach <vm> <pid>")
    .description("print a background process's missed output, then follow it; exits with its code")
    .action(async (id: string, pid: string) => {
      const code = await withVm(id, undefined, async (vm) => {
        const p = await vm.processes.connect(int(pid), {
          onStdout: (d) => process.stdout.write(d),
          onStderr: (d) => process.stderr.write(d),
          maxOutputBytes: 0,
        });
        const r = await p.wait();
        return r.exitCode ?? 128;
      });
      process.exitCode = code;
    });

  program
    .command("kill <vm> <pid>")
    .description("signal a background process's whole process group")
    .option("--signal <name>", "TERM, INT, KILL, HUP, QUIT, USR1, USR2, STOP, CONT, WINCH", "KILL")
    .action(async (id: string, pid: string, o) => {
      await withVm(id, undefined, async (vm) => {
        const p = await vm.processes.connect(int(pid), { replay: "none" });
        try {
          await p.kill(String(o.signal).toUpperCase().replace(/^SIG/, "") as SignalName);
        } finally {
          p.detach();
        }
      });
    });

  const fs = program.command("fs").description("files in a sandbox");
  fs.command("ls <vm> [path]")
    .option("--depth <n>", "levels to descend", int, 1)
    .option("--json", "print JSON")
    .action(async (id: string, path: string | undefined, o) => {
      const entries = await withVm(id, undefined, (vm) => vm.files.list(path ?? "/", { depth: o.depth }));
      if (o.json) return console.log(JSON.stringify(entries, null, 2));
      for (const e of entries) {
        const mode = e.mode.toString(8).padStart(4, "0");
        console.log(
          `${e.type.padEnd(7)} ${mode} ${String(e.size).padStart(10)} ${e.path}${e.target ? ` -> ${e.target}` : ""}`,
        );
      }
    });
  fs.command("stat <vm> <path>").action(async (id: string, path: string) => {
    console.log(JSON.stringify(await withVm(id, undefined, (vm) => vm.files.stat(path)), null, 2));
  });
  fs.command("cat <vm> <paths...>").action(async (id: string, paths: string[]) => {
    await withVm(id, undefined, async (vm) => {
      for (const p of paths) {
        for await (const chunk of vm.files.readStream(p)) {
          if (!process.stdout.write(chunk as Buffer))
            await new Promise((r) => process.stdout.once("drain", r));
        }
      }
    });
  });
  fs.command("rm <vm> <paths...>")
    .option("-r, --recursive", "remove directories and their contents")
    .action(async (id: string, paths: string[], o) =>
      withVm(id, undefined, async (vm) => {
        for (const p of paths) await vm.files.remove(p, { recursive: !!o.recursive });
      }),
    );
  fs.command("mkdir <vm> <paths...>")
    .option("-p, --parents", "create parents; an existing directory is fine")
    .action(async (id: string, paths: string[], o) =>
      withVm(id, undefined, async (vm) => {
        for (const p of paths) await vm.files.mkdir(p, { recursive: !!o.parents });
      }),
    );
  fs.command("mv <vm> <from> <to>").action(async (id: string, from: string, to: string) =>
    withVm(id, undefined, (vm) => vm.files.rename(from, to)),
  );

  program
    .command("logs <vm>")
    .description("print the sandbox's serial console")
    .action(async (id: string) => {
      // Guest text: printed without the control sequences a hostile guest could drive the terminal with.
      process.stdout.write(printable(await withVm(id, undefined, (vm) => vm.serialLog())));
    });
}
