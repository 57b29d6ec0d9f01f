/**
 * Opening one SSH transport: TCP connect (or a given stream), the handshake, host key
 * verification and authentication, all inside connectTimeoutMs and the caller's signal. The
 * server's KEXINIT is kept so a failed negotiation names both algorithm lists; failures become
 * the typed errors of classify.ts. SSHConnection wraps what this returns.
 */
import { createRequire } from "node:module";
import * as net from "node:net";
import type { Duplex } from "node:stream";
import ssh2, { type ConnectConfig, type Client as SSH2Client } from "ssh2";
import { validateTimeout } from "../command.js";
import { validatePort } from "../common/port.js";
import { OperationAbortedError, type SmolVMError, ValidationError } from "../errors.js";
import { createAuthHandler, defaultAuth, prepareAuth } from "./auth.js";
import {
  type AlgorithmLists,
  type ConnectContext,
  classifyConnectError,
  connectTimeoutError,
  parseServerKexInit,
} from "./classify.js";
import type { ConnectOptions } from "./connect-options.js";
import { roundMs } from "./events.js";
import { createHostKeyVerifier } from "./hostkeys.js";
import { type KeepaliveConfig, resolveKeepalive } from "./keepalive.js";

// ssh2 is CommonJS: its named exports are only visible through the default import.
const { Client } = ssh2;
const require = createRequire(import.meta.url);
const SSH2_DEFAULTS = require("ssh2/lib/protocol/constants.js") as Record<string, string[]>;

export interface ConnectTimings {
  tcpMs: number;
  handshakeMs: number;
  authMs: number;
  totalMs: number;
}

/** An authenticated transport, ready for channels. */
export interface Transport {
  client: SSH2Client;
  sock: Duplex;
  port: number;
  timings: ConnectTimings;
  /** The server's identification string, e.g. "OpenSSH_9.2p1 Debian-2+deb12u10". */
  serverVersion: string | undefined;
  /** The keepalive to run on it (resolved from the options), or false. */
  keepalive: KeepaliveConfig | false;
}

export interface TransportHooks {
  /** Called as soon as the ssh2 Client exists, before any byte is exchanged. */
  onClient(client: SSH2Client, port: number): void;
  /** Called with the algorithms agreed in the handshake. */
  onHandshake(negotiated: Record<string, unknown>): void;
}

/**
 * Validates `opts`, then connects, verifies the host key and authenticates within
 * connectTimeoutMs (default 10 000). Keys are loaded before any network I/O, so a bad key or
 * passphrase fails fast. On failure everything opened is closed and the typed error thrown.
 */
export async function openTransport(opts: ConnectOptions, hooks: TransportHooks): Promise<Transport> {
  if (!opts || typeof opts.host !== "string" || opts.host === "") {
    throw new ValidationError("host is required: pass the SSH server's address.");
  }
  if (typeof opts.username !== "string" || opts.username === "") {
    throw new ValidationError("username is required.");
  }
  const port = validatePort("port", opts.port ?? 22);
  validateTimeout("connectTimeoutMs", opts.connectTimeoutMs);
  const keepalive = resolveKeepalive(opts.keepalive);
  const connectTimeoutMs = opts.connectTimeoutMs ?? 10_000;
  const ctx: ConnectContext = {
    host: opts.host,
    port,
    username: opts.username,
    connectTimeoutMs,
    tried: [],
  };
  const methods = prepareAuth(
    opts.auth === undefined ? defaultAuth() : Array.isArray(opts.auth) ? opts.auth : [opts.auth],
  );
  const verifier = createHostKeyVerifier(opts.hostKey, opts.host, port);
  opts.signal?.throwIfAborted?.();

  const t0 = performance.now();
  const timings: ConnectTimings = { tcpMs: 0, handshakeMs: 0, authMs: 0, totalMs: 0 };
  let sock: Duplex;
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  let failed: ((e: unknown) => void) | undefined;
  let phase = "tcp";
  const fail = new Promise<never>((_, reject) => {
    failed = reject;
  });
  fail.catch(() => {});
  timer = setTimeout(() => failed!(connectTimeoutError(ctx, phase)), connectTimeoutMs);
  if (opts.signal) {
    onAbort = () =>
      failed!(
        new OperationAbortedError(
          `SSH connection to ${opts.host}:${port} was aborted by the caller's signal.`,
        ),
      );
    opts.signal.addEventListener("abort", onAbort, { once: true });
  }
  const cleanupTimers = () => {
    clearTimeout(timer);
    timer = undefined;
    if (onAbort) opts.signal!.removeEventListener("abort", onAbort);
  };

  let client: SSH2Client | undefined;
  try {
    if (opts.sock) {
      sock = opts.sock;
    } else {
      const s = net.connect({ host: opts.host, port });
      s.setNoDelay(true);
      sock = s;
      await Promise.race([
        fail,
        new Promise<void>((resolve, reject) => {
          s.once("connect", resolve);
          s.once("error", reject);
        }),
      ]).catch((e) => {
        s.destroy();
        throw classifyConnectError(e, ctx);
      });
    }
    timings.tcpMs = performance.now() - t0;
    phase = "handshake";
    // The server hanging up before we are in (a restart, a connection limit) is a lost
    // connection, whatever ssh2 makes of it: the caller may retry on a new one.
    sock.once("close", () => {
      ctx.closedDuringSetup = true;
    });

    // The server's KEXINIT is in clear: keep it to name both lists if negotiation fails.
    let head = Buffer.alloc(0);
    const tap = (d: Buffer) => {
      head = Buffer.concat([head, d]);
      try {
        const lists = parseServerKexInit(head);
        if (lists || head.length > 64 * 1024) {
          ctx.theirs = lists;
          sock.off("data", tap);
        }
      } catch {
        sock.off("data", tap);
      }
    };
    ctx.ours = ourLists(opts.algorithms);

    const c = new Client();
    client = c;
    hooks.onClient(c, port);
    const ready = new Promise<void>((resolve, reject) => {
      c.once("ready", resolve);
      c.once("error", reject);
      c.once("close", () => reject(c.listenerCount("ready") ? new Error("closed before ready") : undefined));
    });
    c.once("handshake", (negotiated) => {
      hooks.onHandshake(negotiated as unknown as Record<string, unknown>);
      timings.handshakeMs = performance.now() - t0 - timings.tcpMs;
      phase = "auth";
    });
    c.connect({
      sock: sock as never,
      username: opts.username,
      // Our own timer governs the deadline; ssh2's would only duplicate it.
      readyTimeout: 0,
      // Keepalive is ours (KeepaliveMonitor, with events), never ssh2's timer as well.
      keepaliveInterval: 0,
      authHandler: createAuthHandler(methods, opts.username, ctx.tried),
      hostVerifier: ((key: Buffer, verify: (ok: boolean) => void) => {
        verifier(key).then(
          (err) => {
            if (err) ctx.hostKeyError = err;
            verify(!err);
          },
          (err) => {
            ctx.hostKeyError = err as SmolVMError;
            verify(false);
          },
        );
      }) as never,
      ...(opts.algorithms ? { algorithms: opts.algorithms } : {}),
    });
    sock.on("data", tap);
    await Promise.race([fail, ready]).catch((e) => {
      c.removeAllListeners("ready");
      throw classifyConnectError(e, ctx);
    });
    cleanupTimers();
    c.removeAllListeners("ready");
    sock.off("data", tap);
    timings.totalMs = performance.now() - t0;
    timings.authMs = timings.totalMs - timings.tcpMs - timings.handshakeMs;
    const serverVersion = (c as unknown as { _remoteVer?: string })._remoteVer;
    opts.events?.emit("CONNECT", {
      host: opts.host,
      port,
      tcpMs: roundMs(timings.tcpMs),
      handshakeMs: roundMs(timings.handshakeMs),
      serverVersion,
    });
    opts.events?.emit("AUTH", {
      username: opts.username,
      methods: ctx.tried,
      ok: true,
      authMs: roundMs(timings.authMs),
    });
    return { client: c, sock, port, timings, serverVersion, keepalive };
  } catch (e) {
    cleanupTimers();
    client?.removeAllListeners("error");
    client?.on("error", () => {});
    client?.end();
    (sock! as net.Socket | undefined)?.destroy?.();
    if (ctx.tried?.length && (e as SmolVMError).code === "SSH_AUTH_FAILED") {
      opts.events?.emit("AUTH", { username: opts.username, methods: ctx.tried, ok: false });
    }
    opts.events?.emit("ERROR", { phase, code: (e as SmolVMError).code });
    throw e;
  }
}

/** The algorithm lists we offer (the caller's exact lists, else ssh2's defaults). */
function ourLists(algorithms: ConnectConfig["algorithms"] | undefined): AlgorithmLists {
  const pick = (given: unknown, def: string[] | undefined): string[] =>
    Array.isArray(given) && given.length ? (given as string[]) : (def ?? []);
  const a = (algorithms ?? {}) as Record<string, unknown>;
  return {
    kex: pick(a.kex, SSH2_DEFAULTS.DEFAULT_KEX),
    serverHostKey: pick(a.serverHostKey, SSH2_DEFAULTS.DEFAULT_SERVER_HOST_KEY),
    cipher: pick(a.cipher, SSH2_DEFAULTS.DEFAULT_CIPHER),
    mac: pick(a.hmac, SSH2_DEFAULTS.DEFAULT_MAC),
    compress: pick(a.compress, SSH2_DEFAULTS.DEFAULT_COMPRESSION),
  };
}
