/** Shared helpers for the supervisor, forward and reliability tests (real sshd, real sockets). */
import { createHash } from "node:crypto";
import net from "node:net";
import { createKeyAuth } from "../../src/ssh/auth.js";
import type { ConnectOptions } from "../../src/ssh/connect-options.js";
import type { SSHEvent } from "../../src/ssh/events.js";
import type { SshdFixture } from "../fixtures/sshd.js";

/** Options for the fixture's sshd, optionally through a proxy port (host key pinned, so the port does not matter). */
export function sshdOptions(sshd: SshdFixture, viaPort?: number): ConnectOptions {
  return {
    host: "127.0.0.1",
    port: viaPort ?? sshd.port,
    username: sshd.user,
    auth: createKeyAuth(sshd.clientKey.path),
    hostKey: { fingerprint: sshd.hostKeys.find((k) => k.type === "ssh-ed25519")!.fingerprint },
    connectTimeoutMs: 5000,
  };
}

export function sha256(b: Buffer): string {
  return createHash("sha256").update(b).digest("hex");
}

/** Resolves when `pred` holds, polling every 10 ms; rejects after `ms`. */
export async function until(pred: () => boolean, ms: number, what = "condition"): Promise<void> {
  const end = performance.now() + ms;
  while (!pred()) {
    if (performance.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

export function states(events: SSHEvent[]): string[] {
  return events.filter((e) => e.type === "STATE_CHANGE").map((e) => String(e.data.to));
}

/** A TCP server that echoes, tracked for cleanup. */
export async function echoServer(): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const srv = net.createServer((s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
    s.on("error", () => {});
    s.pipe(s);
  });
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  return {
    port: (srv.address() as net.AddressInfo).port,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        srv.close(() => r());
      }),
  };
}

/** Writes `payload` to host:port and reads back exactly payload.length bytes (echo round trip). */
export function echoThrough(port: number, payload: Buffer, timeoutMs = 20_000): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: "127.0.0.1", port });
    const chunks: Buffer[] = [];
    let n = 0;
    const t = setTimeout(() => {
      s.destroy();
      reject(new Error(`echo through port ${port}: got ${n}/${payload.length} bytes in ${timeoutMs} ms`));
    }, timeoutMs);
    s.on("data", (d: Buffer) => {
      chunks.push(d);
      n += d.length;
      if (n >= payload.length) {
        clearTimeout(t);
        s.destroy();
        resolve(Buffer.concat(chunks));
      }
    });
    s.on("error", (e) => {
      clearTimeout(t);
      reject(e);
    });
    s.on("close", () => {
      if (n < payload.length) {
        clearTimeout(t);
        reject(new Error(`echo through port ${port} closed after ${n}/${payload.length} bytes`));
      }
    });
    s.write(payload);
  });
}
