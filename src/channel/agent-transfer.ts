/**
 * File bytes over the agent: PUT sends chunks only as the agent grants credit, GET hands each
 * chunk to a sink and grants credit back only once the sink finished it, so memory stays bounded
 * both ways whatever the file size. Targets are a guest path or the managed env file.
 */
import { type FileHandle, open } from "node:fs/promises";
import type { Deadline } from "../common/deadline.js";
import { downloadTo, validateMaxBytes } from "../common/safe-download.js";
import { ProtocolError, ValidationError } from "../errors.js";
import { agentError, transferError } from "./agent-errors.js";
import { decodeU64 } from "./agent-messages.js";
import { encodeGet, encodePut, FrameType, MAX_PAYLOAD } from "./agent-protocol.js";
import { bounded, request, type SessionSource } from "./agent-request.js";
import { validateGuestPath } from "./guest-path.js";
import {
  type CallOptions,
  DEFAULT_FILE_TIMEOUT_MS,
  type GetFileOptions,
  type PutFileOptions,
} from "./types.js";

export type TransferTarget = { path: string } | { envFile: true };

/** PUT: chunks from `source` go out only as the agent grants credit, so memory stays bounded. */
export function putStream(
  from: SessionSource,
  target: TransferTarget,
  mode: number | undefined,
  mkdirs: boolean,
  source: () => AsyncIterable<Buffer>,
  deadline: Deadline,
  what: string,
): Promise<void> {
  return request<void>(
    from,
    {
      type: FrameType.PUT,
      kind: "put",
      payload: encodePut(target, mode, mkdirs),
      onOpen: (ctl) => {
        const stream = ctl.stream!;
        (async () => {
          for await (const chunk of source()) {
            if (ctl.ended) return;
            // The chunk buffer is reused by the reader: copy only what goes on the wire (send copies).
            if (!(await stream.send(chunk))) return;
          }
          stream.control(FrameType.EOF);
        })().catch((err) => ctl.reject(err));
      },
      onEnd: (m, ctl) => {
        if (m.type === "ok") {
          decodeU64(m.payload, "PUT");
          ctl.resolve();
        } else if (m.type === "error")
          ctl.reject(agentError(m, what, "path" in target ? target.path : undefined));
        else ctl.reject(new ProtocolError("PUT ended with EXIT."));
      },
    },
    deadline,
  );
}

/** GET: each chunk is handed to `sink` in order; credit goes back only after the sink finished. */
export function getStream(
  from: SessionSource,
  target: TransferTarget,
  sink: (data: Buffer) => Promise<void> | void,
  onTotal: (total: number) => void,
  deadline: Deadline,
  what: string,
): Promise<void> {
  let chain: Promise<void> = Promise.resolve();
  return request<void>(
    from,
    {
      type: FrameType.GET,
      kind: "get",
      payload: encodeGet(target),
      onData: (_fd, data, ctl) => {
        chain = chain.then(async () => {
          await sink(data);
          ctl.stream!.grant(data.length);
        });
        chain.catch((err) => ctl.reject(err));
      },
      onEnd: (m, ctl) => {
        if (m.type === "ok") {
          const total = decodeU64(m.payload, "GET");
          chain
            .then(() => onTotal(total))
            .then(
              () => ctl.resolve(),
              (err) => ctl.reject(err),
            );
        } else if (m.type === "error")
          ctl.reject(agentError(m, what, "path" in target ? target.path : undefined));
        else ctl.reject(new ProtocolError("GET ended with EXIT."));
      },
    },
    deadline,
  );
}

/** A transfer under the caller's options: DEFAULT_FILE_TIMEOUT_MS by default, local errors typed. */
function transfer<T>(options: CallOptions, what: string, fn: (deadline: Deadline) => Promise<T>): Promise<T> {
  return bounded(
    options,
    what,
    async (deadline) => {
      try {
        return await fn(deadline);
      } catch (err) {
        throw transferError(err, deadline);
      }
    },
    DEFAULT_FILE_TIMEOUT_MS,
  );
}

/** Uploads a local file (atomic in the guest: temp file, then rename). */
export async function putFile(
  from: SessionSource,
  localPath: string,
  guestPath: string,
  options: PutFileOptions,
): Promise<void> {
  validateGuestPath(guestPath);
  const mode = options.mode ?? 0o644;
  if (!Number.isInteger(mode) || mode < 0 || mode > 0o7777)
    throw new ValidationError("mode must be 0..0o7777.");
  const what = `upload to ${guestPath}`;
  let fh: FileHandle | undefined;
  try {
    await transfer(options, what, async (deadline) => {
      fh = await open(localPath, "r");
      const file = fh;
      await putStream(
        from,
        { path: guestPath },
        mode,
        options.mkdirs !== false,
        async function* () {
          const buf = Buffer.allocUnsafe(MAX_PAYLOAD);
          for (;;) {
            const { bytesRead } = await file.read(buf, 0, buf.length, null);
            if (bytesRead === 0) return;
            yield buf.subarray(0, bytesRead);
          }
        },
        deadline,
        what,
      );
    });
  } finally {
    await fh?.close();
  }
}

/** Downloads a guest file to `localPath` (at most `maxBytes`, written atomically). */
export function getFile(
  from: SessionSource,
  guestPath: string,
  localPath: string,
  options: GetFileOptions,
): Promise<void> {
  validateGuestPath(guestPath);
  const what = `download of ${guestPath}`;
  return transfer(options, what, async (deadline) => {
    validateMaxBytes(options.maxBytes);
    await downloadTo(localPath, `guest file ${guestPath}`, options.maxBytes, async (write) => {
      let written = 0;
      await getStream(
        from,
        { path: guestPath },
        async (data) => {
          await write(data);
          written += data.length;
        },
        (total) => {
          if (total !== written)
            throw new ProtocolError(`agent reported ${total} bytes but sent ${written}.`);
        },
        deadline,
        what,
      );
    });
  });
}

/** PUT from any chunk source (streamed within the agent's credit, atomic in the guest). */
export function putFrom(
  from: SessionSource,
  guestPath: string,
  source: () => AsyncIterable<Buffer>,
  options: PutFileOptions,
): Promise<void> {
  validateGuestPath(guestPath);
  const what = `write of ${guestPath}`;
  return transfer(options, what, (deadline) =>
    putStream(from, { path: guestPath }, options.mode, options.mkdirs !== false, source, deadline, what),
  );
}

/** GET into a sink; resolves with the byte count the agent reported. */
export function getTo(
  from: SessionSource,
  guestPath: string,
  sink: (data: Buffer) => Promise<void> | void,
  options: CallOptions,
): Promise<number> {
  validateGuestPath(guestPath);
  const what = `read of ${guestPath}`;
  return transfer(options, what, async (deadline) => {
    let total = 0;
    await getStream(
      from,
      { path: guestPath },
      sink,
      (t) => {
        total = t;
      },
      deadline,
      what,
    );
    return total;
  });
}
