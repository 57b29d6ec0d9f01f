/**
 * What the agent sends, decoded strictly (agent/PROTOCOL.md), and the handshake's proofs: each
 * frame from the guest becomes a typed AgentMessage or a ProtocolError, never a crash. Pure: no
 * I/O. The framing and the host's requests are in agent-protocol.ts.
 */
import { createHmac, timingSafeEqual } from "node:crypto";
import { ProtocolError } from "../errors.js";
import {
  decodeFields,
  ErrorCode,
  type ErrorCodeName,
  Field,
  type Frame,
  FrameType,
  MAC_SIZE,
  NONCE_SIZE,
  PROTOCOL_VERSION,
} from "./agent-protocol.js";

const ERROR_NAMES = new Map<number, ErrorCodeName>(
  Object.entries(ErrorCode).map(([k, v]) => [v, k as ErrorCodeName]),
);

// ---------------------------------------------------------------- authentication

const HOST_LABEL = Buffer.from("smolvm-agent-v1 host");
const AGENT_LABEL = Buffer.from("smolvm-agent-v1 agent");

export function hostProof(secret: Buffer, agentNonce: Buffer, hostNonce: Buffer): Buffer {
  return createHmac("sha256", secret).update(HOST_LABEL).update(agentNonce).update(hostNonce).digest();
}
export function agentProof(secret: Buffer, hostNonce: Buffer, agentNonce: Buffer): Buffer {
  return createHmac("sha256", secret).update(AGENT_LABEL).update(hostNonce).update(agentNonce).digest();
}
export function proofsEqual(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

// ---------------------------------------------------------------- agent → host messages

export interface AgentInfo {
  version: string;
  capabilities: string[];
  /** Seconds since guest boot when the agent started (from /proc/uptime). */
  startUptimeS: number;
  pid?: number;
  /** The boot milestones file as the init wrote it (text, at most 16 KiB). */
  milestones?: string;
}

export type AgentMessage =
  | { type: "challenge"; stream: 0; nonce: Buffer }
  | { type: "authOk"; stream: 0; proof: Buffer; info: AgentInfo }
  | { type: "data"; stream: number; fd: 0 | 1 | 2; data: Buffer }
  | { type: "credit"; stream: number; bytes: number }
  | {
      type: "exit";
      stream: number;
      exitCode: number | null;
      signal: string | null;
      timedOut: boolean;
      cancelled: boolean;
    }
  | { type: "ok"; stream: number; payload: Buffer }
  | {
      type: "error";
      stream: number;
      code: ErrorCodeName | "UNKNOWN";
      codeNumber: number;
      errno: number;
      message: string;
    };

const SIGNAL_NAME = /^[A-Z][A-Z0-9+-]{0,15}$/;
const VERSION_TEXT = /^[\x20-\x7e]{1,64}$/;

function text(b: Buffer, what: string, max: number): string {
  if (b.length > max) throw new ProtocolError(`agent ${what} is longer than ${max} bytes.`);
  return b.toString("utf8");
}

export function decodeInfoFields(payload: Buffer, offset = 0): AgentInfo {
  let version: string | undefined;
  let caps: string[] | undefined;
  let uptime: number | undefined;
  const info: Partial<AgentInfo> = {};
  for (const [tag, v] of decodeFields(payload, offset)) {
    if (tag === Field.VERSION) {
      version = text(v, "version", 64);
      if (!VERSION_TEXT.test(version))
        throw new ProtocolError("agent version string is not printable ASCII.");
    } else if (tag === Field.CAPS) {
      caps = text(v, "capabilities", 1024).split(",").filter(Boolean);
    } else if (tag === Field.START_UPTIME) {
      const s = text(v, "start uptime", 32);
      if (!/^\d{1,12}(\.\d{1,9})?$/.test(s)) throw new ProtocolError("agent start uptime is not a number.");
      uptime = Number(s);
    } else if (tag === Field.PID) {
      if (v.length !== 4) throw new ProtocolError("agent pid field has the wrong size.");
      info.pid = v.readUInt32BE(0);
    } else if (tag === Field.MILESTONES) {
      info.milestones = text(v, "milestones", 16_384);
    } else if (!(tag & 0x80)) {
      throw new ProtocolError(`agent info has unknown field ${tag}.`);
    }
  }
  if (version === undefined || caps === undefined || uptime === undefined) {
    throw new ProtocolError("agent info lacks version, capabilities or start uptime.");
  }
  return { ...info, version, capabilities: caps, startUptimeS: uptime };
}

/** Strictly decodes one frame the agent sent. Host-only types from the agent are errors. */
export function decodeAgentFrame(f: Frame): AgentMessage {
  const p = f.payload;
  const needStream = () => {
    if (f.stream === 0)
      throw new ProtocolError(`agent sent frame type 0x${f.type.toString(16)} on stream 0.`);
  };
  switch (f.type) {
    case FrameType.CHALLENGE:
      if (f.stream !== 0 || p.length !== 4 + NONCE_SIZE)
        throw new ProtocolError("agent CHALLENGE is malformed.");
      if (p.readUInt16BE(0) !== PROTOCOL_VERSION) {
        throw new ProtocolError(
          `agent speaks protocol version ${p.readUInt16BE(0)}: rebuild the image so agent and SDK match.`,
        );
      }
      return { type: "challenge", stream: 0, nonce: Buffer.from(p.subarray(4)) };
    case FrameType.AUTH_OK:
      if (f.stream !== 0 || p.length < MAC_SIZE) throw new ProtocolError("agent AUTH_OK is malformed.");
      return {
        type: "authOk",
        stream: 0,
        proof: Buffer.from(p.subarray(0, MAC_SIZE)),
        info: decodeInfoFields(p, MAC_SIZE),
      };
    case FrameType.DATA:
      needStream();
      if (p.length === 0) throw new ProtocolError("agent sent an empty DATA frame.");
      return { type: "data", stream: f.stream, fd: f.flags as 0 | 1 | 2, data: p };
    case FrameType.CREDIT: {
      needStream();
      if (p.length !== 4) throw new ProtocolError("agent CREDIT is malformed.");
      const bytes = p.readUInt32BE(0);
      if (bytes === 0) throw new ProtocolError("agent granted zero credit.");
      return { type: "credit", stream: f.stream, bytes };
    }
    case FrameType.EXIT: {
      needStream();
      if (p.length < 5 || p.length > 5 + 16) throw new ProtocolError("agent EXIT is malformed.");
      const code = p.readInt32BE(0);
      const fl = p[4]!;
      if (fl > 3) throw new ProtocolError("agent EXIT has unknown flags.");
      const sig = p.subarray(5).toString("latin1");
      if (sig) {
        if (!SIGNAL_NAME.test(sig) || code !== -1)
          throw new ProtocolError("agent EXIT has an invalid signal.");
        return {
          type: "exit",
          stream: f.stream,
          exitCode: null,
          signal: sig,
          timedOut: !!(fl & 1),
          cancelled: !!(fl & 2),
        };
      }
      if (code < 0 || code > 255) throw new ProtocolError(`agent EXIT has an impossible exit code ${code}.`);
      return {
        type: "exit",
        stream: f.stream,
        exitCode: code,
        signal: null,
        timedOut: !!(fl & 1),
        cancelled: !!(fl & 2),
      };
    }
    case FrameType.OK:
      needStream();
      return { type: "ok", stream: f.stream, payload: p };
    case FrameType.ERROR: {
      if (p.length < 6 || p.length > 6 + 1024) throw new ProtocolError("agent ERROR is malformed.");
      const codeNumber = p.readUInt16BE(0);
      return {
        type: "error",
        stream: f.stream,
        codeNumber,
        code: ERROR_NAMES.get(codeNumber) ?? "UNKNOWN",
        errno: p.readInt32BE(2),
        message: p.subarray(6).toString("utf8"),
      };
    }
    default:
      throw new ProtocolError(
        `agent sent frame type 0x${f.type.toString(16)}, which only the host may send.`,
      );
  }
}

/** Reads a u64 OK payload (PUT/GET byte counts). */
export function decodeU64(p: Buffer, what: string): number {
  if (p.length !== 8) throw new ProtocolError(`agent ${what} reply is malformed.`);
  const n = p.readBigUInt64BE(0);
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError(`agent ${what} reply is out of range.`);
  return Number(n);
}
