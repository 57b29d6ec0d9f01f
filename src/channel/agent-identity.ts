/**
 * IDENTITY over the agent (agent/identity.c): what a VM restored from a snapshot changes before
 * its first user command (secret, entropy, clock, hostname, files), in one request.
 */
import type { Deadline } from "../common/deadline.js";
import { agentError, requireCapability } from "./agent-errors.js";
import { encodeFields, Field, type FieldValue, FrameType } from "./agent-protocol.js";
import { type Requester, simpleRequest } from "./agent-request.js";

/** What a VM restored from a snapshot changes before its first user command (agent/identity.c). */
export interface IdentityRequest {
  /** The agent secret the next session must prove (32 bytes). */
  secret?: Buffer;
  /** Host entropy credited to the guest's RNG, which then reseeds at once (16-512 bytes). */
  entropy?: Buffer;
  /** The wall clock to set, in ns since the epoch. */
  timeNs?: bigint;
  hostname?: string;
  /** Files written atomically (temp + rename, parents made), before anything else changes. */
  files?: Array<{ path: string; mode: number; data: string | Buffer }>;
  /** A shell command started in the background once the rest is applied (not waited for). */
  run?: string;
}

export async function setIdentity(ch: Requester, req: IdentityRequest, deadline: Deadline): Promise<void> {
  await simpleRequest(
    ch,
    FrameType.IDENTITY,
    (info) => {
      requireCapability(info, "identity", "re-keying a restored VM");
      const f: Array<[number, FieldValue]> = [];
      if (req.secret) f.push([Field.SECRET, req.secret]);
      if (req.entropy) f.push([Field.ENTROPY, req.entropy]);
      if (req.timeNs !== undefined) {
        const t = Buffer.alloc(8);
        t.writeBigUInt64BE(req.timeNs);
        f.push([Field.TIME_NS, t]);
      }
      if (req.hostname) f.push([Field.HOSTNAME, req.hostname]);
      for (const file of req.files ?? []) {
        const path = Buffer.from(file.path);
        const head = Buffer.alloc(6);
        head.writeUInt32BE(file.mode & 0o7777, 0);
        head.writeUInt16BE(path.length, 4);
        f.push([Field.FILE, Buffer.concat([head, path, Buffer.from(file.data)])]);
      }
      if (req.run) f.push([Field.RUN, req.run]);
      return encodeFields(f);
    },
    deadline,
    (m) => agentError(m, "setting the identity of a restored VM"),
  );
}
