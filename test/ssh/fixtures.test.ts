import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import * as net from "node:net";
import { promisify } from "node:util";
import { afterEach, describe, expect, it } from "vitest";
import { FaultProxy } from "../fixtures/fault-proxy.js";
import { bannerReady, SshdFixture, TEST_USER } from "../fixtures/sshd.js";

const run = promisify(execFile);

function sshArgs(f: SshdFixture, port = f.port): string[] {
  return [
    "-F",
    "/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    `UserKnownHostsFile=${f.knownHostsPath}`,
    "-o",
    "StrictHostKeyChecking=yes",
    "-o",
    "ConnectTimeout=5",
    "-i",
    f.clientKey.path,
    "-p",
    String(port),
    `${TEST_USER}@127.0.0.1`,
  ];
}

/** Reads until the peer closes or `ms` passes; resolves what arrived and how it ended. */
function readAll(port: number, send: Buffer, ms: number): Promise<{ data: Buffer; how: string }> {
  return new Promise((resolve) => {
    const s = net.connect({ host: "127.0.0.1", port });
    const chunks: Buffer[] = [];
    let how = "timeout";
    const t = setTimeout(() => s.destroy(), ms);
    s.on("connect", () => s.write(send));
    s.on("data", (d) => chunks.push(d));
    s.on("error", (e: NodeJS.ErrnoException) => {
      how = e.code ?? "error";
    });
    s.on("end", () => {
      how = "end";
    });
    s.on("close", () => {
      clearTimeout(t);
      resolve({ data: Buffer.concat(chunks), how });
    });
  });
}

describe("sshd fixture", () => {
  let f: SshdFixture | undefined;
  afterEach(async () => {
    await f?.stop();
    f = undefined;
  });

  it("accepts the generated key with strict host key checking, then restarts on the same port and keys", async () => {
    f = await SshdFixture.start({ maxSessions: 3 });
    const first = await run("ssh", [...sshArgs(f), "echo hi; id -un; echo $SHELL"]);
    expect(first.stdout).toBe(`hi\n${TEST_USER}\n/bin/sh\n`);
    expect(f.hostKeyFingerprints).toHaveLength(2);
    expect(f.hostKeyFingerprints.every((fp) => /^SHA256:[A-Za-z0-9+/]{43}$/.test(fp))).toBe(true);
    const { stdout: fpOut } = await run("ssh-keygen", ["-lf", `${f.dir}/ssh_host_ed25519_key.pub`]);
    expect(fpOut).toContain(f.hostKeyFingerprints[0]);
    const port = f.port;
    await f.restart();
    expect(f.port).toBe(port);
    const again = await run("ssh", [...sshArgs(f), "echo again"]);
    expect(again.stdout).toBe("again\n");
    expect(f.connectionCount()).toBe(2);
    expect(f.log()).toContain("Accepted publickey for smolvm-test");
    const dir = f.dir;
    await f.stop();
    await f.stop();
    expect(existsSync(dir)).toBe(false);
    expect(await bannerReady("127.0.0.1", port, 300)).toBe(false);
  });
});

describe("fault proxy", () => {
  let echo: net.Server;
  let proxy: FaultProxy | undefined;
  afterEach(async () => {
    await proxy?.close();
    await new Promise((r) => echo?.close(r));
  });
  async function startEcho(): Promise<number> {
    echo = net.createServer((s) => {
      s.on("error", () => {});
      s.pipe(s);
    });
    await new Promise<void>((r) => echo.listen(0, "127.0.0.1", r));
    return (echo.address() as net.AddressInfo).port;
  }

  it("passes, drops, blackholes, delays, throttles and resets", async () => {
    proxy = await FaultProxy.start({ port: await startEcho() });
    const msg = Buffer.from("hello world");
    // pass: echo comes back; we close after 150 ms
    let r = await readAll(proxy.port, msg, 150);
    expect(r.data.toString()).toBe("hello world");

    proxy.setMode({ kind: "drop" });
    r = await readAll(proxy.port, msg, 1000);
    expect(r.data.length).toBe(0);
    expect(["end", "ECONNRESET"]).toContain(r.how);

    proxy.setMode({ kind: "blackhole" });
    let t0 = Date.now();
    r = await readAll(proxy.port, msg, 300);
    expect(r.how).toBe("timeout");
    expect(r.data.length).toBe(0);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(290);

    proxy.setMode({ kind: "latency", ms: 100 });
    t0 = Date.now();
    const lat = await new Promise<number>((resolve) => {
      const s = net.connect({ host: "127.0.0.1", port: proxy!.port }, () => s.write(msg));
      s.once("data", () => {
        resolve(Date.now() - t0);
        s.destroy();
      });
    });
    expect(lat).toBeGreaterThanOrEqual(195);
    expect(lat).toBeLessThan(600);

    proxy.setMode({ kind: "throttle", bytesPerSecond: 20_000 });
    const big = Buffer.alloc(4000, 7);
    t0 = Date.now();
    r = await new Promise((resolve) => {
      const chunks: Buffer[] = [];
      const s = net.connect({ host: "127.0.0.1", port: proxy!.port }, () => s.write(big));
      s.on("data", (d) => {
        chunks.push(d);
        if (Buffer.concat(chunks).length >= big.length) s.destroy();
      });
      s.on("close", () => resolve({ data: Buffer.concat(chunks), how: "end" }));
    });
    // 4000 bytes each way at 20 kB/s: >= 200 ms each way
    expect(r.data.equals(big)).toBe(true);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(350);

    proxy.setMode({ kind: "resetAfter", bytes: 5 });
    r = await readAll(proxy.port, msg, 1000);
    expect(r.how).toBe("ECONNRESET");
    expect(r.data.length).toBeLessThanOrEqual(5);

    proxy.setMode({ kind: "pass" });
    const live = net.connect({ host: "127.0.0.1", port: proxy.port });
    live.on("error", () => {});
    await new Promise((r) => live.once("connect", r));
    await new Promise((r) => setTimeout(r, 20));
    expect(proxy.connections).toBe(1);
    const closed = new Promise((r) => live.once("close", r));
    proxy.cutAll();
    await closed;
    expect(proxy.connections).toBe(0);
  });
});
