import { execFile } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import http from "node:http";
import net from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { ProtocolError } from "../../src/errors.js";
import { SocksReplyError, SocksServer, type SocksServerOptions, socks5Connect } from "../../src/ssh/socks.js";
import {
  encodeReply,
  encodeRequest,
  encodeUserPass,
  MAX_SOCKS_MESSAGE,
  parseGreeting,
  parseReply,
  parseRequest,
  parseUserPass,
  replyForError,
  SocksReply,
  SocksRequestError,
} from "../../src/ssh/socks-codec.js";

describe("SOCKS5 codec", () => {
  it("parses a greeting only once complete", () => {
    expect(parseGreeting(Buffer.from([5]))).toBeUndefined();
    expect(parseGreeting(Buffer.from([5, 2, 0]))).toBeUndefined();
    expect(parseGreeting(Buffer.from([5, 2, 0, 2, 9]))).toEqual({ value: { methods: [0, 2] }, length: 4 });
    expect(() => parseGreeting(Buffer.from([4, 1, 0]))).toThrow(ProtocolError);
    expect(() => parseGreeting(Buffer.from([5, 0]))).toThrow(ProtocolError);
  });

  it("round-trips IPv4, IPv6 and domain requests", () => {
    for (const [host, atyp] of [
      ["10.1.2.3", 1],
      ["::1", 4],
      ["2001:db8::8:800:200c:417a", 4],
      ["fe80::", 4],
      ["example.internal", 3],
    ] as const) {
      const enc = encodeRequest({ host, port: 8443 });
      const dec = parseRequest(enc);
      expect(dec).toEqual({ value: { command: 1, addressType: atyp, host, port: 8443 }, length: enc.length });
      // Every strict prefix is "need more", never a wrong parse.
      for (let i = 0; i < enc.length; i++) expect(parseRequest(enc.subarray(0, i))).toBeUndefined();
    }
    expect(parseRequest(encodeRequest({ host: "::ffff:1.2.3.4", port: 1 }))?.value.host).toBe(
      "::ffff:102:304",
    );
  });

  it("rejects an unknown address type with reply 0x08", () => {
    const bad = Buffer.from([5, 1, 0, 9, 1, 2, 3, 4, 0, 80]);
    try {
      parseRequest(bad);
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(SocksRequestError);
      expect((e as SocksRequestError).reply).toBe(SocksReply.ADDRESS_TYPE_NOT_SUPPORTED);
    }
  });

  it("round-trips RFC 1929 credentials and replies", () => {
    const enc = encodeUserPass("alice", "pässword");
    expect(parseUserPass(enc)).toEqual({
      value: { username: "alice", password: "pässword" },
      length: enc.length,
    });
    expect(parseUserPass(enc.subarray(0, enc.length - 1))).toBeUndefined();
    expect(parseReply(encodeReply(5))?.value).toEqual({ code: 5, bindHost: "0.0.0.0", bindPort: 0 });
    expect(parseReply(encodeReply(0, "::1", 1080))?.value).toEqual({
      code: 0,
      bindHost: "::1",
      bindPort: 1080,
    });
  });

  it("maps failures to reply codes by code, not by message", () => {
    const errno = (code: string) => Object.assign(new Error("whatever text"), { code });
    expect(replyForError(errno("ECONNREFUSED"))).toBe(SocksReply.CONNECTION_REFUSED);
    expect(replyForError(errno("EHOSTUNREACH"))).toBe(SocksReply.HOST_UNREACHABLE);
    expect(replyForError(errno("ENOTFOUND"))).toBe(SocksReply.HOST_UNREACHABLE);
    expect(replyForError(errno("ENETUNREACH"))).toBe(SocksReply.NETWORK_UNREACHABLE);
    expect(replyForError(errno("ETIMEDOUT"))).toBe(SocksReply.TTL_EXPIRED);
    expect(replyForError(Object.assign(new Error("Connection refused"), { reason: 1 }))).toBe(
      SocksReply.NOT_ALLOWED,
    );
    expect(replyForError(Object.assign(new Error("x"), { reason: 2 }))).toBe(SocksReply.CONNECTION_REFUSED);
    expect(replyForError(new Error("Connection refused"))).toBe(SocksReply.GENERAL_FAILURE);
    expect(replyForError(new Error("wrapped", { cause: errno("ECONNREFUSED") }))).toBe(
      SocksReply.CONNECTION_REFUSED,
    );
  });
});

// ---------------------------------------------------------------- server over plain TCP

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

async function echoServer(host = "127.0.0.1"): Promise<number> {
  const sockets = new Set<net.Socket>();
  const srv = net.createServer((s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
    s.pipe(s);
  });
  await new Promise<void>((r) => srv.listen(0, host, r));
  cleanups.push(
    () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        srv.close(() => r());
      }),
  );
  return (srv.address() as net.AddressInfo).port;
}

const tcpConnectOut =
  (calls: string[] = []) =>
  (host: string, port: number) =>
    new Promise<net.Socket>((resolve, reject) => {
      calls.push(`${host}:${port}`);
      const s = net.connect({ host, port });
      s.once("connect", () => {
        s.off("error", reject);
        resolve(s);
      });
      s.once("error", reject);
    });

async function startSocks(opts: Partial<SocksServerOptions> = {}, calls: string[] = []) {
  const srv = await SocksServer.listen({ connectOut: tcpConnectOut(calls), ...opts });
  cleanups.push(() => srv.close());
  return srv;
}

async function roundTrip(sock: net.Socket, payload: Buffer): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let n = 0;
  return new Promise((resolve, reject) => {
    sock.on("data", (d: Buffer) => {
      chunks.push(d);
      n += d.length;
      if (n >= payload.length) resolve(Buffer.concat(chunks));
    });
    sock.on("error", reject);
    sock.resume();
    sock.write(payload);
  });
}

/** Raw client: write bytes, collect whatever comes back until the server closes. */
function rawExchange(port: number, bytes: Buffer, waitMs = 3000): Promise<{ data: Buffer; closed: boolean }> {
  return new Promise((resolve) => {
    const s = net.connect({ host: "127.0.0.1", port });
    const chunks: Buffer[] = [];
    const t = setTimeout(() => {
      s.destroy();
      resolve({ data: Buffer.concat(chunks), closed: false });
    }, waitMs);
    s.on("data", (d) => chunks.push(d));
    s.on("error", () => {});
    s.on("close", () => {
      clearTimeout(t);
      resolve({ data: Buffer.concat(chunks), closed: true });
    });
    s.write(bytes);
  });
}

describe("SocksServer (plain TCP connectOut)", () => {
  it("binds 127.0.0.1 by default and relays bytes to IPv4, IPv6 and domain targets", async () => {
    const port4 = await echoServer("127.0.0.1");
    const port6 = await echoServer("::1");
    const calls: string[] = [];
    const srv = await startSocks({}, calls);
    expect(srv.host).toBe("127.0.0.1");
    for (const [host, port] of [
      ["127.0.0.1", port4],
      ["::1", port6],
      ["localhost", port4],
    ] as const) {
      const s = await socks5Connect({ proxyPort: srv.port, host, port });
      const payload = randomBytes(256 * 1024);
      const back = await roundTrip(s, payload);
      expect(createHash("sha256").update(back).digest("hex")).toBe(
        createHash("sha256").update(payload).digest("hex"),
      );
      s.destroy();
    }
    expect(calls).toEqual([`127.0.0.1:${port4}`, `::1:${port6}`, `localhost:${port4}`]);
  });

  it("requires username/password when configured and never connects out on bad credentials", async () => {
    const port = await echoServer();
    const calls: string[] = [];
    const srv = await startSocks({ auth: { username: "u", password: "s3cret" } }, calls);
    const ok = await socks5Connect({
      proxyPort: srv.port,
      host: "127.0.0.1",
      port,
      auth: { username: "u", password: "s3cret" },
    });
    expect((await roundTrip(ok, Buffer.from("hi"))).toString()).toBe("hi");
    ok.destroy();
    await expect(
      socks5Connect({
        proxyPort: srv.port,
        host: "127.0.0.1",
        port,
        auth: { username: "u", password: "nope" },
      }),
    ).rejects.toBeInstanceOf(SocksReplyError);
    // A client offering only "no auth" gets 0xFF (no acceptable method).
    const r = await rawExchange(srv.port, Buffer.from([5, 1, 0]));
    expect([...r.data]).toEqual([5, 0xff]);
    expect(r.closed).toBe(true);
    expect(calls).toEqual([`127.0.0.1:${port}`]);
  });

  it("maps a refused target to reply 0x05 and an unsupported command to 0x07", async () => {
    const closed = net.createServer();
    await new Promise<void>((r) => closed.listen(0, "127.0.0.1", r));
    const deadPort = (closed.address() as net.AddressInfo).port;
    await new Promise<void>((r) => closed.close(() => r()));
    const srv = await startSocks();
    const err = await socks5Connect({ proxyPort: srv.port, host: "127.0.0.1", port: deadPort }).catch(
      (e) => e,
    );
    expect(err).toBeInstanceOf(SocksReplyError);
    expect(err.reply).toBe(SocksReply.CONNECTION_REFUSED);
    const bind = Buffer.concat([
      Buffer.from([5, 1, 0]),
      encodeRequest({ command: 2, host: "127.0.0.1", port: 1 }),
    ]);
    const r = await rawExchange(srv.port, bind);
    expect([...r.data.subarray(0, 4)]).toEqual([5, 0, 5, SocksReply.COMMAND_NOT_SUPPORTED]);
  });

  it("replies success only after connectOut resolved", async () => {
    const port = await echoServer();
    let opened = 0;
    const srv = await SocksServer.listen({
      connectOut: async (h, p) => {
        await new Promise((r) => setTimeout(r, 400));
        opened = performance.now();
        return tcpConnectOut()(h, p);
      },
    });
    cleanups.push(() => srv.close());
    const t0 = performance.now();
    const s = await socks5Connect({ proxyPort: srv.port, host: "127.0.0.1", port });
    const replied = performance.now();
    expect(opened).toBeGreaterThan(0);
    expect(replied).toBeGreaterThanOrEqual(opened);
    expect(replied - t0).toBeGreaterThanOrEqual(390);
    s.destroy();
  });

  it("bounds handshake time and size", async () => {
    const srv = await startSocks({ handshakeTimeoutMs: 300 });
    const t0 = performance.now();
    const slow = await rawExchange(srv.port, Buffer.from([5]), 5000);
    expect(slow.closed).toBe(true);
    expect(performance.now() - t0).toBeLessThan(2000);
    // A greeting followed by garbage that never forms a request is cut at the size bound.
    const big = Buffer.concat([
      Buffer.from([5, 1, 0, 5, 1, 0, 3, 255]),
      Buffer.alloc(MAX_SOCKS_MESSAGE * 4, 0x61),
    ]);
    const r = await rawExchange(srv.port, big, 5000);
    expect(r.closed).toBe(true);
  });

  it("close() destroys open relays and stops listening", async () => {
    const port = await echoServer();
    const srv = await SocksServer.listen({ connectOut: tcpConnectOut() });
    const s = await socks5Connect({ proxyPort: srv.port, host: "127.0.0.1", port });
    s.resume();
    const closed = new Promise((r) => s.on("close", r));
    expect(srv.connectionCount).toBe(1);
    await srv.close();
    await srv.close();
    await closed;
    expect(srv.listening).toBe(false);
    await expect(
      socks5Connect({ proxyPort: srv.port, host: "127.0.0.1", port, timeoutMs: 2000 }),
    ).rejects.toThrow();
  });

  it("serves curl --socks5-hostname to a local HTTP server", async () => {
    const body = randomBytes(100_000).toString("hex");
    const web = http.createServer((_req, res) => res.end(body));
    await new Promise<void>((r) => web.listen(0, "127.0.0.1", r));
    cleanups.push(() => new Promise<void>((r) => web.close(() => r())));
    const webPort = (web.address() as net.AddressInfo).port;
    const srv = await startSocks();
    const out = await new Promise<string>((resolve, reject) =>
      execFile(
        "curl",
        [
          "-sS",
          "--max-time",
          "10",
          "--socks5-hostname",
          `127.0.0.1:${srv.port}`,
          `http://localhost:${webPort}/`,
        ],
        { maxBuffer: 1 << 20 },
        (err, stdout) => (err ? reject(err) : resolve(stdout)),
      ),
    );
    expect(out).toBe(body);
  });
});
