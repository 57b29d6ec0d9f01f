#!/usr/bin/env node
/**
 * `smolssh [user@]host [command]`: an OpenSSH-like client on the smolvm SSH library. Exit
 * status is the remote command's, 255 on connection errors (as ssh does). --events writes the
 * session's JSONL events as they happen; --evidence writes an evidence bundle on failure.
 */
import { Command } from "commander";
import { SmolVMError } from "../errors.js";
import { connectSession, type SSHConnection } from "../ssh/connection.js";
import { EventCollector } from "../ssh/events.js";
import { getEvidenceBundle } from "../ssh/evidence.js";
import { forwardDynamic, forwardLocal, forwardRemote } from "../ssh/forward.js";
import { openShell } from "../ssh/shell.js";
import { buildPlan, exitStatusFor, type SmolsshFlags } from "./smolssh-options.js";

const collect = (v: string, prev: string[] = []) => [...prev, v];

const program = new Command("smolssh")
  .description("SSH client with typed errors, structured events and evidence bundles")
  .argument("<destination>", "[user@]host or ssh://[user@]host[:port]")
  .argument("[command...]", "remote command (omit for an interactive shell)")
  .option("-p, --port <port>", "port to connect to")
  .option("-i, --identity <file>", "identity (private key) file; repeatable", collect)
  .option("-l, --login <user>", "user to log in as")
  .option("-J, --jump <hops>", "jump hosts: [user@]host[:port][,...]")
  .option("-L, --local <spec>", "[bind_address:]port:host:hostport; repeatable", collect)
  .option("-R, --remote <spec>", "[bind_address:]port:host:hostport; repeatable", collect)
  .option("-D, --dynamic <spec>", "[bind_address:]port SOCKS5 proxy; repeatable", collect)
  .option("-N, --no-command", "do not run a remote command (forwarding only)")
  .option("-o, --option <Key=Value>", "OpenSSH option; repeatable", collect)
  .option("-F, --config-file <file>", "OpenSSH config file (default ~/.ssh/config)")
  .option("--events <file>", "write JSONL events to this file as they happen")
  .option("--evidence <file>", "write an evidence bundle (redacted) to this file on failure")
  .passThroughOptions()
  .showHelpAfterError();

async function main(): Promise<number> {
  program.parse(process.argv);
  const [dest, words] = program.processedArgs as [string, string[]];
  const opts = program.opts() as SmolsshFlags & { command?: boolean };
  const flags: SmolsshFlags = { ...opts, noCommand: opts.command === false };
  const plan = buildPlan(dest, words ?? [], flags, process.env);
  for (const w of plan.warnings) process.stderr.write(`smolssh: ${w}\n`);
  const events = new EventCollector(plan.eventsPath ? { logPath: plan.eventsPath } : {});
  let conn: SSHConnection | undefined;
  try {
    conn = await connectSession({ ...plan.connect, events });
    for (const l of plan.local) {
      await forwardLocal(
        conn,
        { localHost: l.bindHost, localPort: l.port, remoteHost: l.host, remotePort: l.hostPort },
        { events },
      );
    }
    for (const r of plan.remote) {
      await forwardRemote(
        conn,
        { remoteHost: r.bindHost, remotePort: r.port, localHost: r.host, localPort: r.hostPort },
        { events },
      );
    }
    for (const d of plan.dynamic)
      await forwardDynamic(conn, { localHost: d.bindHost, localPort: d.port }, { events });
    if (plan.noCommand) return await holdUntilSignal(conn);
    if (plan.command === undefined) return await interactive(conn);
    return await runCommand(conn, plan.command, events);
  } catch (e) {
    if (plan.evidencePath) {
      await getEvidenceBundle(conn, {
        events,
        error: e,
        host: { host: plan.connect.host, port: plan.connect.port ?? 22 },
      })
        .toFile(plan.evidencePath, { redact: true })
        .catch((w) => process.stderr.write(`smolssh: could not write evidence: ${(w as Error).message}\n`));
    }
    throw e;
  } finally {
    await conn?.close().catch(() => {});
    await events.close();
  }
}

async function runCommand(conn: SSHConnection, command: string, events: EventCollector): Promise<number> {
  const forwardStdin = !process.stdin.isTTY;
  const t0 = performance.now();
  const bytes = { stdout: 0, stderr: 0 };
  // streamExec does not emit EXEC itself (exec does): record the command's start and end here.
  events.emit("EXEC", { phase: "start", command, streaming: true });
  const stream = conn.streamExec(command, { shell: "raw", stdin: forwardStdin, timeoutMs: 2 ** 31 - 1 });
  if (forwardStdin) {
    process.stdin.on("data", (d: Buffer) => stream.write(d));
    process.stdin.on("end", () => stream.end());
  }
  let status = 255;
  try {
    for await (const ev of stream) {
      if (ev.stream === "exit") {
        status = exitStatusFor(ev.exitCode);
        events.emit("EXEC", {
          phase: "end",
          command,
          streaming: true,
          exitCode: ev.exitCode,
          signal: ev.signal,
          durationMs: Math.round(performance.now() - t0),
          bytesStdout: bytes.stdout,
          bytesStderr: bytes.stderr,
        });
      } else {
        bytes[ev.stream] += ev.data.length;
        await write(ev.stream === "stdout" ? process.stdout : process.stderr, ev.data);
      }
    }
  } finally {
    process.stdin.pause();
    process.stdin.removeAllListeners("data");
  }
  return status;
}

function write(out: NodeJS.WriteStream, data: Buffer): Promise<void> {
  return new Promise((resolve) => (out.write(data) ? resolve() : out.once("drain", resolve)));
}

async function interactive(conn: SSHConnection): Promise<number> {
  const tty = process.stdin.isTTY;
  const shell = await openShell(conn, { rows: process.stdout.rows, cols: process.stdout.columns });
  if (tty) process.stdin.setRawMode(true);
  const onResize = () => shell.resize(process.stdout.rows, process.stdout.columns);
  process.stdout.on("resize", onResize);
  process.stdin.on("data", (d: Buffer) => shell.write(d));
  process.stdin.on("end", () => shell.end());
  shell.channel.pipe(process.stdout, { end: false });
  shell.channel.stderr.pipe(process.stderr, { end: false });
  try {
    const r = await shell.wait();
    return exitStatusFor(r.exitCode);
  } finally {
    process.stdout.off("resize", onResize);
    if (tty) process.stdin.setRawMode(false);
    process.stdin.pause();
  }
}

async function holdUntilSignal(conn: SSHConnection): Promise<number> {
  return new Promise((resolve) => {
    const stop = () => resolve(0);
    process.once("SIGINT", stop);
    process.once("SIGTERM", stop);
    conn.onClose(() => resolve(255));
  });
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    if (e instanceof SmolVMError) process.stderr.write(`smolssh: ${e.message}\n`);
    else process.stderr.write(`smolssh: unexpected error: ${(e as Error)?.stack ?? String(e)}\n`);
    process.exitCode = 255;
  },
);
