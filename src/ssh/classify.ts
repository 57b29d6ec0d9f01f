/**
 * Turns socket and ssh2 failures into the typed errors of ../errors.ts, by errno code and ssh2
 * error level, never by message text. Also parses the server's cleartext KEXINIT so a failed
 * negotiation can name both algorithm lists. Pure: no I/O here.
 */
import {
  AgentError,
  AuthFailedError,
  ConnectionLostError,
  ConnectionRefusedError,
  ConnectionTimeoutError,
  HostUnreachableError,
  NoMutualKexError,
  ProtocolError,
  SmolVMError,
  SSHConnectionError,
} from "../errors.js";

export interface ConnectContext {
  host: string;
  port: number;
  username: string;
  connectTimeoutMs: number;
  /** Auth methods tried (names only). */
  tried?: string[];
  /** Error the host key verifier decided on, if it rejected the key. */
  hostKeyError?: SmolVMError;
  /** The socket closed before the session was ready (set by the handshake). */
  closedDuringSetup?: boolean;
  /** Our offered algorithm lists and the server's, when the server's KEXINIT was seen. */
  ours?: AlgorithmLists;
  theirs?: AlgorithmLists;
}

export interface AlgorithmLists {
  kex: string[];
  serverHostKey: string[];
  cipher: string[];
  mac: string[];
  compress: string[];
}

const UNREACHABLE = new Set(["EHOSTUNREACH", "ENETUNREACH", "ENOTFOUND", "EAI_AGAIN", "EADDRNOTAVAIL"]);
const LOST = new Set(["ECONNRESET", "EPIPE", "ECONNABORTED"]);

function where(ctx: { host: string; port: number }): string {
  return `${ctx.host}:${ctx.port}`;
}

/** The error for a connect attempt that ran past connectTimeoutMs. */
export function connectTimeoutError(
  ctx: ConnectContext,
  phase: string,
  cause?: unknown,
): ConnectionTimeoutError {
  return new ConnectionTimeoutError(
    `SSH connection to ${where(ctx)} did not complete within ${ctx.connectTimeoutMs} ms (${phase}): ` +
      "check that the host is up and reachable, or raise connectTimeoutMs.",
    { cause, details: { host: ctx.host, port: ctx.port, connectTimeoutMs: ctx.connectTimeoutMs, phase } },
  );
}

/** Classifies a failure during connect (TCP, handshake or auth). */
export function classifyConnectError(err: unknown, ctx: ConnectContext): SmolVMError {
  if (err instanceof SmolVMError) return err;
  if (ctx.hostKeyError) return ctx.hostKeyError;
  const e = err as NodeJS.ErrnoException & { level?: string };
  const details = { host: ctx.host, port: ctx.port, errno: e?.code, level: e?.level };
  const code = e?.code;
  if (code === "ECONNREFUSED") {
    return new ConnectionRefusedError(
      `SSH connection to ${where(ctx)} was refused: is sshd running and listening on that port?`,
      { cause: err, details },
    );
  }
  if (code === "ETIMEDOUT") return connectTimeoutError(ctx, "tcp", err);
  if (code && UNREACHABLE.has(code)) {
    return new HostUnreachableError(
      `SSH host ${where(ctx)} is unreachable (${code}): check the address, DNS and routing.`,
      { cause: err, details },
    );
  }
  switch (e?.level) {
    case "client-authentication":
      return new AuthFailedError(
        `SSH authentication as ${ctx.username} on ${where(ctx)} failed` +
          (ctx.tried?.length
            ? ` (tried ${ctx.tried.join(", ")})`
            : " (no usable method: give a key, password or agent)") +
          ": check the user name and credentials, and that the server allows the method.",
        { cause: err, details: { ...details, tried: ctx.tried ?? [] } },
      );
    case "agent":
      return new AgentError(
        `ssh-agent failed during authentication to ${where(ctx)}: check that the agent is running and holds a key.`,
        {
          cause: err,
          details,
        },
      );
    case "client-timeout":
      return connectTimeoutError(ctx, "handshake", err);
    case "handshake": {
      const failed = ctx.ours && ctx.theirs ? noMutual(ctx.ours, ctx.theirs) : undefined;
      if (failed) {
        return new NoMutualKexError(
          `SSH negotiation with ${where(ctx)} failed: no ${failed.what} algorithm both sides support ` +
            `(ours: ${failed.ours.join(",")}; server: ${failed.theirs.join(",")}). Enable a common algorithm on one side.`,
          { ours: failed.ours, theirs: failed.theirs },
          { cause: err, details: { ...details, category: failed.what } },
        );
      }
      return new ProtocolError(
        `SSH handshake with ${where(ctx)} failed: the server may not speak SSH-2 properly.`,
        {
          cause: err,
          details,
        },
      );
    }
  }
  if ((code && LOST.has(code)) || ctx.closedDuringSetup) {
    return new ConnectionLostError(
      `SSH connection to ${where(ctx)} was cut during setup (${code ?? "closed by the server"}): retry; if it persists check the server log.`,
      { cause: err, details },
    );
  }
  return new SSHConnectionError(`SSH connection to ${where(ctx)} failed: see the cause for details.`, {
    cause: err,
    details,
  });
}

/** The first category (kex, host key, cipher, mac) with no common algorithm, if any. */
export function noMutual(
  ours: AlgorithmLists,
  theirs: AlgorithmLists,
): { what: string; ours: string[]; theirs: string[] } | undefined {
  const cats: [string, keyof AlgorithmLists][] = [
    ["key exchange", "kex"],
    ["host key", "serverHostKey"],
    ["cipher", "cipher"],
    ["MAC", "mac"],
    ["compression", "compress"],
  ];
  for (const [what, k] of cats) {
    // Pseudo-algorithms (ext-info-c, kex-strict-*) are signals, not choices.
    const mine = ours[k].filter((a) => !/^ext-info-|^kex-strict-/.test(a));
    if (!mine.length || !theirs[k].length) continue;
    // AEAD ciphers carry their own MAC, so an empty MAC intersection alone is not fatal.
    if (k === "mac") continue;
    if (!mine.some((a) => theirs[k].includes(a))) return { what, ours: mine, theirs: theirs[k] };
  }
  return undefined;
}

/**
 * Parses the server's identification line(s) and its first binary packet (KEXINIT, sent in
 * clear) from the start of the byte stream. Undefined until enough bytes have arrived.
 */
export function parseServerKexInit(buf: Buffer): AlgorithmLists | undefined {
  // Lines before the SSH- identification line are allowed (RFC 4253 §4.2).
  let pos = 0;
  for (;;) {
    const nl = buf.indexOf(0x0a, pos);
    if (nl < 0) return undefined;
    const isIdent = buf.subarray(pos, pos + 4).toString("latin1") === "SSH-";
    pos = nl + 1;
    if (isIdent) break;
  }
  if (buf.length < pos + 5) return undefined;
  const packetLen = buf.readUInt32BE(pos);
  if (packetLen > 256 * 1024) throw new ProtocolError("server's first SSH packet is implausibly large.");
  if (buf.length < pos + 4 + packetLen) return undefined;
  const padLen = buf[pos + 4]!;
  const payload = buf.subarray(pos + 5, pos + 4 + packetLen - padLen);
  if (payload[0] !== 20) return undefined; // not KEXINIT
  let p = 17; // msg byte + 16-byte cookie
  const lists: string[][] = [];
  for (let i = 0; i < 10; i++) {
    if (p + 4 > payload.length) return undefined;
    const len = payload.readUInt32BE(p);
    p += 4;
    const s = payload.subarray(p, p + len).toString("latin1");
    p += len;
    lists.push(s ? s.split(",") : []);
  }
  // Both directions usually match; merge so a one-sided gap still shows.
  return {
    kex: lists[0]!,
    serverHostKey: lists[1]!,
    cipher: intersectOrFirst(lists[2]!, lists[3]!),
    mac: intersectOrFirst(lists[4]!, lists[5]!),
    compress: intersectOrFirst(lists[6]!, lists[7]!),
  };
}

function intersectOrFirst(a: string[], b: string[]): string[] {
  const both = a.filter((x) => b.includes(x));
  return both.length ? both : a;
}

/** SSH_MSG_CHANNEL_OPEN_FAILURE reason codes (RFC 4254 §5.1) as ssh2 exposes them on `reason`. */
export const OPEN_FAILURE = {
  ADMINISTRATIVELY_PROHIBITED: 1,
  CONNECT_FAILED: 2,
  UNKNOWN_CHANNEL_TYPE: 3,
  RESOURCE_SHORTAGE: 4,
} as const;

/** True when the server refused to open a channel (e.g. OpenSSH MaxSessions reached). */
export function isChannelOpenRefused(err: unknown): boolean {
  const reason = (err as { reason?: unknown } | null)?.reason;
  return typeof reason === "number" && reason >= 1 && reason <= 4;
}
