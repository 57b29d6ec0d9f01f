/**
 * The rootless network policy's helper inside QEMU's network namespace (see netns.ts). Sockets
 * belong to the namespace they are made in, so this process, started there by the VM's network
 * daemon (`nsenter` into QEMU's namespaces, with Node's IPC channel), opens the sockets the
 * namespace's nftables rules redirect to and hands them to the daemon: its transparent TCP port
 * and its DNS sockets (UDP and TCP). After that it only opens connections to QEMU's port forwards
 * inside the namespace on the daemon's request ({op:"connect", id, port}) and hands each over too.
 * It decides nothing and keeps no traffic: the policy code runs once, in the daemon. It exits when
 * the daemon goes away.
 */
import { createSocket, type Socket as UdpSocket } from "node:dgram";
import { connect, createServer, type Server } from "node:net";
import { RELAY_DNS_PORT, RELAY_SOURCE, RELAY_TCP_PORT } from "./netns.js";

function send(msg: object, handle?: Server | UdpSocket | import("node:net").Socket): Promise<void> {
  return new Promise((resolve, reject) => {
    if (!process.send) return reject(new Error("no IPC channel"));
    process.send(msg, handle, {}, (e) => (e ? reject(e) : resolve()));
  });
}

function listen(server: Server, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen({ host: "127.0.0.1", port }, () => resolve());
  });
}

async function main(): Promise<void> {
  if (!process.send) throw new Error("start me with an IPC channel (from the network daemon)");
  process.on("disconnect", () => process.exit(0));
  const tcp = createServer();
  await listen(tcp, RELAY_TCP_PORT);
  const dnsTcp = createServer();
  await listen(dnsTcp, RELAY_DNS_PORT);
  const dnsUdp = createSocket("udp4");
  await new Promise<void>((resolve, reject) => {
    dnsUdp.once("error", reject);
    dnsUdp.bind({ address: "127.0.0.1", port: RELAY_DNS_PORT }, () => resolve());
  });
  // The daemon holds copies now; closing ours leaves it the only one accepting and reading.
  await send({ kind: "tcp" }, tcp);
  tcp.close();
  await send({ kind: "dns-tcp" }, dnsTcp);
  dnsTcp.close();
  await send({ kind: "dns-udp" }, dnsUdp);
  dnsUdp.close();

  process.on("message", (m: { op?: string; id?: number; port?: number }) => {
    if (m.op !== "connect" || typeof m.id !== "number" || typeof m.port !== "number") return;
    const id = m.id;
    const c = connect({ host: "127.0.0.1", port: m.port, localAddress: RELAY_SOURCE, noDelay: true });
    // Paused before it connects: no byte (an SSH banner) is read here and lost in the hand-over.
    c.pause();
    c.once("connect", () => {
      send({ id }, c).catch(() => c.destroy());
    });
    c.once("error", (e) => {
      send({ id, error: e.message }).catch(() => {});
    });
  });
  await send({ kind: "ready" });
}

main().catch((e) => {
  process.stderr.write(`smolvm network relay: ${(e as Error).message}\n`);
  process.exit(1);
});
