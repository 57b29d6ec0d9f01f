/**
 * Runs a host tool for the image builder: bounded by an AbortSignal, output captured (tail
 * only in errors), a missing tool reported as HostDependencyError naming its Debian package.
 */
import { spawn } from "node:child_process";
import { HostDependencyError, ImageBuildError, OperationAbortedError } from "../errors.js";

/** Debian package providing each tool, for error messages. */
const PROVIDER: Record<string, string> = {
  "apt-get": "apt",
  "apt-cache": "apt",
  "dpkg-deb": "dpkg",
  "dpkg-query": "dpkg",
  ldd: "libc-bin",
  "ssh-keygen": "openssh-client",
  debootstrap: "debootstrap",
  "mkfs.ext4": "e2fsprogs",
  xz: "xz-utils",
  zstd: "zstd",
  tar: "tar",
  sudo: "sudo",
};

export interface ExecOptions {
  signal?: AbortSignal;
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  input?: Buffer | string;
  /** Called with each stderr/stdout line, e.g. to surface debootstrap's progress. */
  onLine?: (line: string) => void;
  /** Run it in its own process group and kill the whole group on abort (make and its compilers). */
  processGroup?: boolean;
}

export interface ExecResult {
  stdout: Buffer;
  stderr: Buffer;
}

const PATH_EXTRA = "/usr/local/sbin:/usr/sbin:/sbin";

/** The PATH exec() gives the tools it runs: the caller's, plus the sbin dirs. */
export function toolPath(env: NodeJS.ProcessEnv = process.env): string {
  return `${env.PATH ?? "/usr/bin:/bin"}:${PATH_EXTRA}`;
}

export function exec(cmd: string, args: readonly string[], options: ExecOptions = {}): Promise<ExecResult> {
  const { signal } = options;
  if (signal?.aborted)
    return Promise.reject(signal.reason ?? new OperationAbortedError(`${cmd} was aborted.`));
  return new Promise((resolve, reject) => {
    const env = { ...(options.env ?? process.env) };
    env.PATH = toolPath(env);
    const child = spawn(cmd, args, {
      cwd: options.cwd,
      env,
      stdio: ["pipe", "pipe", "pipe"],
      detached: options.processGroup === true,
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let errLen = 0;
    let partial = "";
    const lines = (b: Buffer) => {
      if (!options.onLine) return;
      partial += b.toString("utf8");
      const parts = partial.split(/\r?\n/);
      partial = parts.pop() ?? "";
      for (const l of parts) if (l.trim()) options.onLine(l);
    };
    child.stdout.on("data", (b: Buffer) => {
      out.push(b);
      lines(b);
    });
    child.stderr.on("data", (b: Buffer) => {
      // Keep stderr bounded: only its tail goes into errors.
      err.push(b);
      errLen += b.length;
      while (errLen > 64 * 1024 && err.length > 1) errLen -= err.shift()!.length;
      lines(b);
    });
    const onAbort = () => {
      try {
        if (options.processGroup && child.pid) process.kill(-child.pid, "SIGKILL");
        else child.kill("SIGKILL");
      } catch {
        // already gone
      }
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    child.on("error", (e: NodeJS.ErrnoException) => {
      signal?.removeEventListener("abort", onAbort);
      if (e.code === "ENOENT") {
        const pkg = PROVIDER[cmd] ?? cmd;
        reject(
          new HostDependencyError(
            `${cmd} is not installed on this host: install the Debian package ${pkg} (apt-get install ${pkg}) and retry.`,
            { details: { command: cmd, package: pkg }, cause: e },
          ),
        );
      } else reject(e);
    });
    child.on("close", (code, sig) => {
      signal?.removeEventListener("abort", onAbort);
      if (signal?.aborted) return reject(signal.reason ?? new OperationAbortedError(`${cmd} was aborted.`));
      const stdout = Buffer.concat(out);
      const stderr = Buffer.concat(err);
      if (code === 0) return resolve({ stdout, stderr });
      const tail = stderr.toString("utf8").trim().split("\n").slice(-8).join("\n");
      reject(
        new ImageBuildError(
          `${cmd} ${args.slice(0, 3).join(" ")}${args.length > 3 ? " ..." : ""} failed (${sig ?? `exit ${code}`}): ${tail || "no output"}`,
          {
            code: "IMAGE_BUILD_COMMAND",
            details: { command: cmd, args: [...args], exitCode: code, signal: sig },
          },
        ),
      );
    });
    child.stdin.on("error", () => {});
    child.stdin.end(options.input ?? "");
  });
}
