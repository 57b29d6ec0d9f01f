/**
 * Byte streams to the guest agent: a Unix socket (QEMU's host side of the virtio-serial port,
 * or a test agent) and a guest vsock port behind a Firecracker-style Unix socket. Each returns a
 * connected Duplex; the session (agent-session.ts) knows nothing of how it was opened.
 */
import { connect as netConnect, type Socket } from "node:net";
import type { Duplex } from "node:stream";
import { ConnectionRefusedError, ProtocolError, ValidationError } from "../errors.js";
import { connectError } from "./agent-errors.js";

function socketConnect(path: string, signal?: AbortSignal): Promise<Socket> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const sock = netConnect({ path });
    const onAbort = () => {
      sock.destroy();
      reject(signal?.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    sock.once("connect", () => {
      signal?.removeEventListener("abort", onAbort);
      sock.removeAllListeners("error");
      resolve(sock);
    });
    sock.once("error", (err) => {
      signal?.removeEventListener("abort", onAbort);
      reject(connectError(err, `the agent socket ${path}`));
    });
  });
}

/** Connects to a Unix socket (QEMU's host side of the virtio-serial port, or a test agent). */
export function connectUnix(path: string, signal?: AbortSignal): Promise<Duplex> {
  return socketConnect(path, signal);
}

/**
 * Connects to a guest vsock port through a Firecracker-style Unix socket: writes
 * `CONNECT <port>\n` and expects one `OK <assigned>\n` line before the byte stream begins.
 */
export async function connectVsockUds(path: string, port: number, signal?: AbortSignal): Promise<Duplex> {
  if (!Number.isInteger(port) || port <= 0 || port > 0xffffffff) {
    throw new ValidationError(`vsock port must be a positive 32-bit integer, got ${String(port)}.`);
  }
  const sock = await socketConnect(path, signal);
  return new Promise((resolve, reject) => {
    let line = Buffer.alloc(0);
    const finish = (err?: Error) => {
      sock.off("data", onData);
      sock.off("error", onError);
      sock.off("close", onClose);
      signal?.removeEventListener("abort", onAbort);
      if (err) {
        sock.destroy();
        reject(err);
      }
    };
    const onData = (chunk: Buffer) => {
      line = Buffer.concat([line, chunk]);
      const nl = line.indexOf(10);
      if (nl < 0) {
        if (line.length > 64)
          finish(new ProtocolError(`vsock proxy ${path} sent an overlong handshake line.`));
        return;
      }
      const text = line.subarray(0, nl).toString("latin1");
      if (!/^OK \d+$/.test(text.trim())) {
        finish(
          new ConnectionRefusedError(
            `vsock proxy ${path} refused port ${port}: nothing listens there in the guest yet.`,
            { code: "AGENT_CONNECTION_REFUSED" },
          ),
        );
        return;
      }
      finish();
      sock.pause();
      const rest = line.subarray(nl + 1);
      if (rest.length) sock.unshift(rest);
      resolve(sock);
    };
    const onError = (err: Error) => finish(connectError(err, `vsock proxy ${path}`));
    const onClose = () =>
      finish(
        new ConnectionRefusedError(`vsock proxy ${path} closed before accepting port ${port}.`, {
          code: "AGENT_CONNECTION_REFUSED",
        }),
      );
    const onAbort = () => finish(signal?.reason as Error);
    sock.on("data", onData);
    sock.on("error", onError);
    sock.on("close", onClose);
    signal?.addEventListener("abort", onAbort, { once: true });
    sock.write(`CONNECT ${port}\n`);
  });
}
