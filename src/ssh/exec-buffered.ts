/**
 * Buffered exec (SSHConnection.exec, SSHClient.run): wraps the command (shell, env, cwd, run id),
 * collects its output up to maxOutputBytes, and ends with a CommandResult, or, at the deadline
 * or signal, kills the command remotely and throws the timeout carrying the output so far.
 */
import { type AnyCommandResult, type ExecExtras, OutputCollector, type RunOptions } from "../command.js";
import type { Deadline } from "../common/deadline.js";
import { OperationTimeoutError } from "../errors.js";
import { roundMs } from "./events.js";
import { taggedCommand } from "./exec-channel.js";
import type { ExecHost } from "./session-host.js";

/** Grace for the server to confirm a killed channel closed before we report the timeout. */
const KILL_GRACE_MS = 1000;

/** Runs `command` on `conn` under `deadline` (options validated by the caller). */
export async function execBuffered(
  conn: ExecHost,
  command: string,
  options: RunOptions & ExecExtras,
  deadline: Deadline,
): Promise<AnyCommandResult> {
  const { wrapped, runId } = taggedCommand(command, options);
  const started = deadline.startedAt;
  const events = conn.events;
  events?.emit("EXEC", { phase: "start", command, host: conn.host });
  const collector = new OutputCollector(options.maxOutputBytes, options.onStdout, options.onStderr);
  const encoding = options.encoding ?? "utf8";
  const st = await conn.openExec(wrapped.command, deadline.signal, false, runId).catch((e) => {
    throw e instanceof OperationTimeoutError
      ? e.withPartial(collector.result(null, null, performance.now() - started, encoding))
      : e;
  });
  const ch = st.channel;
  return new Promise((resolve, reject) => {
    let settled = false;
    let graceTimer: NodeJS.Timeout | undefined;
    ch.on("data", (d: Buffer) => collector.push("stdout", d));
    ch.stderr.on("data", (d: Buffer) => collector.push("stderr", d));
    const onAbort = () => {
      if (settled) return;
      settled = true;
      conn.terminate(st);
      // Report once the server confirms the channel (and so the process group) is gone.
      graceTimer = setTimeout(finishAbort, KILL_GRACE_MS);
    };
    const finishAbort = () => {
      clearTimeout(graceTimer);
      graceTimer = undefined;
      reject(
        deadline.reason!.withPartial(
          collector.result(st.exitCode, st.signal, performance.now() - started, encoding),
        ),
      );
    };
    deadline.signal.addEventListener("abort", onAbort, { once: true });
    const onClose = () => {
      deadline.signal.removeEventListener("abort", onAbort);
      if (settled) {
        if (graceTimer) finishAbort();
        return;
      }
      settled = true;
      const { exitCode, signal } = st;
      const durationMs = performance.now() - started;
      const result = collector.result(exitCode, signal, durationMs, encoding);
      if (exitCode === null && signal === null && !conn.alive) {
        reject(
          Object.assign(conn.lostError("while the command ran (it may or may not have finished)"), {
            partial: result,
          }),
        );
        return;
      }
      events?.emit("EXEC", {
        phase: "end",
        command,
        exitCode,
        signal,
        durationMs: roundMs(durationMs),
        bytesStdout: collector.bytesStdout,
        bytesStderr: collector.bytesStderr,
      });
      resolve(result);
    };
    // Buffered data events flush before 'close' (both are queued on the stream), so the
    // result is complete by the time onClose runs.
    if (st.closed) setImmediate(onClose);
    else st.onClose = onClose;
    // stdin: env prefix, the caller's bytes, then EOF, without waiting for anything.
    if (wrapped.stdinPrefix) ch.write(wrapped.stdinPrefix);
    if (options.stdin?.length) ch.write(options.stdin);
    ch.end();
  });
}
