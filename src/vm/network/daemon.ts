/**
 * The per-VM network daemon: a detached Node process that lives as long as the VM's QEMU and
 * decides, per DNS question and per TCP connection, what the guest may reach.
 *
 * nftables (firewall.ts) sends it every DNS query and every new TCP connection QEMU's user-mode
 * network opens for the guest. It answers DNS through the policy's resolver (getaddrinfo, or
 * SMOLVM_DNS), NXDOMAIN for names the policy refuses, and remembers which addresses it gave for
 * which allowed names. For each connection it reads the original destination from conntrack,
 * reads the TLS SNI or HTTP Host when there is one, decides, and either splices the connection to
 * the destination or resets it. Decisions go to `<vmDir>/network.log` (JSON lines).
 *
 * Rootless (network.json's mechanism "userns", see netns.ts) the same sockets live in QEMU's own
 * network namespace: a relay there hands their file descriptors over, the original destination
 * comes from that namespace's conntrack table, and this daemon also listens on the VM's forwarded
 * host ports (SSH, exposeLocal), tunnelling each connection through the relay to QEMU's forward.
 *
 * Usage: daemon <vmDir> <vmId>. Reads the policy from <vmDir>/network.json; takes new ones (and,
 * rootless, port forwards) on the control socket <vmDir>/net.sock; prints one ready line on stdout,
 * then nothing. Exits (removing its nftables table and cgroup) when the VM's cgroup is empty (or,
 * rootless, QEMU is gone), or on SIGTERM. Rootless, SMOLVM_NET_RELAY holds the relay's argv (JSON).
 */

import { type ChildProcess, spawn } from "node:child_process";
import { createSocket, type Socket as UdpSocket } from "node:dgram";
import { lookup, Resolver } from "node:dns/promises";
import { appendFileSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createServer, connect as netConnect, type Server, type Socket } from "node:net";
import { networkInterfaces, setPriority } from "node:os";
import { setTimeout as sleep } from "node:timers/promises";
import { isPort } from "../../common/port.js";
import { originalDestination } from "./conntrack.js";
import { buildResponse, parseQuery, QTYPE_A, RCODE_NXDOMAIN, RCODE_SERVFAIL } from "./dns-wire.js";
import { networkFiles } from "./files.js";
import {
  applyRuleset,
  cgroupEmpty,
  removeCgroup,
  removeRuleset,
  renderRuleset,
  vmCgroup,
} from "./firewall.js";
import { RELAY_TCP_PORT, toolPath } from "./netns.js";
import {
  type CompiledPolicy,
  compilePolicy,
  connectionVerdict,
  type NetworkLogEntry,
  type NetworkPolicy,
  nameVerdict,
  normalizePolicy,
} from "./policy.js";
import { SNIFF_LIMIT, sniffHost } from "./sniff.js";

const [vmDirArg, vmIdArg] = process.argv.slice(2);
if (!vmDirArg || !vmIdArg) {
  process.stderr.write("usage: daemon <vmDir> <vmId>\n");
  process.exit(2);
}
const vmDir: string = vmDirArg;
const vmId: string = vmIdArg;
const files = networkFiles(vmDir);
const saved = JSON.parse(readFileSync(files.policy, "utf8")) as { policy: NetworkPolicy; mechanism?: string };
const rootless = saved.mechanism === "userns";
const cg = rootless ? undefined : vmCgroup(vmId);
/** Rootless: the conntrack table of QEMU's namespace (/proc/<QEMU pid>/net/nf_conntrack). */
let conntrackPath: string | undefined;

/** How long a name's addresses stay admitted after the resolver gave them. */
const GRANT_MS = 60 * 60_000;
/** Server-first protocols (SSH, SMTP) send nothing: decide on the address after this. */
const FIRST_BYTES_MS = 300;
const HEADER_MS = 2_000;
const CONNECT_MS = 10_000;
const LOG_MAX_BYTES = 1024 * 1024;

let policy: CompiledPolicy = compilePolicy(normalizePolicy(saved.policy));
/** ip -> (allowed name -> expiry) */
const grants = new Map<string, Map<string, number>>();

/**
 * Appends one decision, synchronously: a refused connection is in the log before the guest sees
 * its reset, so `networkLog()` right after a failed request shows why. Rotated at 1 MiB.
 */
let logBytes = -1;
function log(e: Omit<NetworkLogEntry, "time">): void {
  const line = `${JSON.stringify({ time: new Date().toISOString(), ...e })}\n`;
  try {
    if (logBytes < 0) logBytes = statSync(files.log, { throwIfNoEntry: false })?.size ?? 0;
    if (logBytes > LOG_MAX_BYTES) {
      renameSync(files.log, `${files.log}.1`);
      logBytes = 0;
    }
    appendFileSync(files.log, line, { mode: 0o600 });
    logBytes += line.length;
  } catch {
    /* the VM directory is going away */
  }
}

let hostAddrCache: { at: number; set: Set<string> } | undefined;
function hostAddresses(): Set<string> {
  if (!hostAddrCache || Date.now() - hostAddrCache.at > 2_000) {
    const set = new Set<string>();
    for (const list of Object.values(networkInterfaces())) for (const a of list ?? []) set.add(a.address);
    hostAddrCache = { at: Date.now(), set };
  }
  return hostAddrCache.set;
}

function grantedNames(ip: string): string[] {
  const m = grants.get(ip);
  if (!m) return [];
  const now = Date.now();
  for (const [n, exp] of m) if (exp < now) m.delete(n);
  return [...m.keys()];
}

// ------------------------------------------------------------------ DNS

const customDns = process.env.SMOLVM_DNS?.trim();
const resolver = customDns ? new Resolver({ timeout: 3_000, tries: 2 }) : undefined;
if (resolver && customDns) resolver.setServers(customDns.split(",").map((s) => s.trim()));

async function resolve4(name: string): Promise<string[]> {
  if (resolver) return resolver.resolve4(name);
  const r = await lookup(name, { all: true, family: 4 });
  return r.map((a) => a.address);
}

async function answerDns(msg: Buffer): Promise<Buffer | undefined> {
  const q = parseQuery(msg);
  if (!q) return undefined;
  const v = nameVerdict(policy, q.name);
  if (v.verdict === "deny") {
    if (q.qtype === QTYPE_A || q.qtype === 28)
      log({ proto: "dns", host: q.name, ip: "", port: 53, verdict: "deny", rule: v.rule });
    return buildResponse(q, RCODE_NXDOMAIN);
  }
  if (q.qtype !== QTYPE_A) return buildResponse(q, 0); // NODATA: egress is IPv4 only
  let addrs: string[];
  try {
    addrs = await resolve4(q.name);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const nx = code === "ENOTFOUND" || code === "NXDOMAIN" || code === "ENODATA";
    return buildResponse(q, nx ? RCODE_NXDOMAIN : RCODE_SERVFAIL);
  }
  const exp = Date.now() + GRANT_MS;
  for (const ip of addrs) {
    const m = grants.get(ip) ?? new Map<string, number>();
    grants.set(ip, m);
    m.set(q.name, exp);
  }
  log({ proto: "dns", host: q.name, ip: addrs[0] ?? "", port: 53, verdict: "allow", rule: v.rule });
  return buildResponse(q, 0, addrs);
}

// ------------------------------------------------------------------ TCP

/** Reads until the TLS SNI / HTTP Host is known, the client is silent, or it half-closes. */
function firstBytes(sock: Socket): Promise<{ head: Buffer; ended: boolean }> {
  return new Promise((resolve) => {
    let buf: Buffer = Buffer.alloc(0);
    let ended = false;
    let timer = setTimeout(done, FIRST_BYTES_MS);
    function onEnd() {
      ended = true;
      done();
    }
    function done() {
      clearTimeout(timer);
      sock.off("data", onData);
      sock.off("end", onEnd);
      sock.off("close", done);
      sock.pause();
      resolve({ head: buf, ended });
    }
    function onData(d: Buffer) {
      const first = buf.length === 0;
      buf = Buffer.concat([buf, d]);
      const s = sniffHost(buf);
      if (s.kind !== "more" || buf.length >= SNIFF_LIMIT) return done();
      if (first) {
        clearTimeout(timer);
        timer = setTimeout(done, HEADER_MS);
      }
    }
    sock.on("data", onData);
    sock.once("end", onEnd);
    sock.once("close", done);
    sock.resume();
  });
}

async function handleConnection(sock: Socket, proxyPort: number): Promise<void> {
  sock.on("error", () => {});
  sock.setNoDelay(true);
  sock.pause();
  const dst = originalDestination(
    { address: sock.remoteAddress ?? "", port: sock.remotePort ?? 0 },
    proxyPort,
    conntrackPath,
  );
  if (!dst) {
    log({ proto: "tcp", ip: "", port: 0, verdict: "deny", rule: "no-original-destination" });
    sock.resetAndDestroy();
    return;
  }
  let head: Buffer = Buffer.alloc(0);
  let ended = false;
  let sniffed: string | undefined;
  if (policy.mode === "allow") {
    ({ head, ended } = await firstBytes(sock));
    const s = sniffHost(head);
    if (s.kind === "host") sniffed = s.host;
  }
  const p = policy; // decided under the policy in force now
  const names = grantedNames(dst.ip);
  const v = connectionVerdict(p, {
    ip: dst.ip,
    port: dst.port,
    resolvedNames: names,
    sniffedHost: sniffed,
    hostAddresses: hostAddresses(),
  });
  const host = sniffed ?? names[0];
  const entry = { proto: "tcp" as const, ...(host ? { host } : {}), ip: dst.ip, port: dst.port, ...v };
  if (v.verdict === "deny" || sock.destroyed) {
    log(entry);
    sock.resetAndDestroy();
    return;
  }
  const up = netConnect({ host: dst.ip, port: dst.port, noDelay: true, allowHalfOpen: true });
  log(entry); // the connect is under way
  up.setTimeout(CONNECT_MS, () => up.destroy());
  up.once("connect", () => {
    up.setTimeout(0);
    if (head.length) up.write(head);
    if (ended) up.end();
    else sock.pipe(up);
    up.pipe(sock);
    sock.resume();
  });
  up.on("error", () => sock.resetAndDestroy());
  sock.on("error", () => up.destroy());
  up.on("close", () => sock.destroy());
  sock.on("close", () => up.destroy());
}

// ------------------------------------------------------------------ servers

function listenTcp(server: Server, port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen({ host: "127.0.0.1", port }, () => {
      server.off("error", reject);
      resolve((server.address() as { port: number }).port);
    });
  });
}

function bindUdp(sock: UdpSocket, port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    sock.once("error", reject);
    sock.bind({ address: "127.0.0.1", port }, () => {
      sock.off("error", reject);
      resolve(sock.address().port);
    });
  });
}

/** DNS over TCP: two-byte length prefix per message. */
function dnsTcpServer(): Server {
  return createServer(serveDnsTcp);
}

function serveDnsTcp(c: Socket): void {
  {
    c.on("error", () => {});
    let buf: Buffer = Buffer.alloc(0);
    c.on("data", async (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) {
        const msg = buf.subarray(2, 2 + buf.readUInt16BE(0));
        buf = buf.subarray(2 + msg.length);
        const r = await answerDns(Buffer.from(msg));
        if (!r) return c.destroy();
        const len = Buffer.alloc(2);
        len.writeUInt16BE(r.length);
        c.write(Buffer.concat([len, r]));
      }
    });
  }
}

function serveDnsUdp(u: UdpSocket): void {
  u.on("message", (msg, rinfo) => {
    void answerDns(msg)
      .then((r) => r && u.send(r, rinfo.port, rinfo.address))
      .catch(() => {});
  });
  u.on("error", () => {});
}

let shuttingDown = false;
const closers: Array<() => void> = [];
function shutdown(code = 0): void {
  if (shuttingDown) return;
  shuttingDown = true;
  // Only once QEMU is gone: removing the table under a live QEMU would lift the policy.
  if (cg && cgroupEmpty(cg)) {
    removeRuleset(vmId);
    removeCgroup(cg);
  }
  for (const c of closers) c();
  rmSync(files.control, { force: true });
  rmSync(files.pid, { force: true });
  process.exit(code);
}

/**
 * The control socket: {"op":"set","policy"} changes the policy (and, as root, the rules follow
 * its mode); rootless, {"op":"forward"|"unforward","port"} opens or closes a host port forward.
 */
async function listenControl(onPolicy: () => void): Promise<Server> {
  rmSync(files.control, { force: true });
  const control = createServer((c) => {
    c.on("error", () => {});
    let buf = "";
    c.on("data", (d) => {
      buf += d.toString("utf8");
      let i = buf.indexOf("\n");
      while (i >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        i = buf.indexOf("\n");
        void (async () => {
          const req = JSON.parse(line) as { op: string; policy?: unknown; port?: number };
          if (req.op === "set") {
            const next = normalizePolicy(req.policy);
            policy = compilePolicy(next);
            onPolicy();
            writeFileSync(files.policy, JSON.stringify({ ...saved, policy: next }), { mode: 0o600 });
          } else if (req.op === "forward" && rootless) await forwardPort(Number(req.port));
          else if (req.op === "unforward" && rootless) unforwardPort(Number(req.port));
        })().then(
          () => c.write(`${JSON.stringify({ ok: true })}\n`),
          (e) => c.write(`${JSON.stringify({ ok: false, error: (e as Error).message })}\n`),
        );
      }
    });
  });
  await new Promise<void>((resolve, reject) => {
    control.once("error", reject);
    control.listen(files.control, () => resolve());
  });
  return control;
}

function ready(extra: object): void {
  writeFileSync(files.pid, String(process.pid), { mode: 0o600 });
  process.on("SIGTERM", () => shutdown(0));
  process.on("SIGINT", () => shutdown(0));
  process.stdout.on("error", () => {});
  process.stdout.write(`${JSON.stringify({ ready: true, ...extra })}\n`);
}

/** As root: the daemon's sockets are on the host's 127.0.0.1; the VM's nftables table sends QEMU's traffic there. */
async function mainCgroup(vmCg: NonNullable<typeof cg>): Promise<void> {
  const proxy = createServer({ pauseOnConnect: true, allowHalfOpen: true }, (s) => {
    void handleConnection(s, proxyPort).catch(() => s.destroy());
  });
  const proxyPort = await listenTcp(proxy, 0);
  // DNS on one port number for UDP and TCP (the kernel picks it for UDP; TCP follows).
  let dnsPort = 0;
  let udp: UdpSocket | undefined;
  let dnsTcp: Server | undefined;
  for (let i = 0; i < 20 && !dnsTcp; i++) {
    udp = createSocket("udp4");
    dnsPort = await bindUdp(udp, 0);
    const t = dnsTcpServer();
    try {
      await listenTcp(t, dnsPort);
      dnsTcp = t;
    } catch {
      udp.close();
    }
  }
  if (!dnsTcp || !udp) throw new Error("no port free for DNS on both UDP and TCP");
  const u = udp;
  serveDnsUdp(u);

  const ports = { tcp: proxyPort, dns: dnsPort };
  // "public" lets the kernel pass public addresses directly: the rules follow the mode.
  const control = await listenControl(() => applyRuleset(renderRuleset(vmId, vmCg, ports, policy.mode)));
  closers.push(
    () => proxy.close(),
    () => dnsTcp?.close(),
    () => u.close(),
    () => control.close(),
  );

  applyRuleset(renderRuleset(vmId, vmCg, ports, policy.mode));

  // Exit with the VM: once QEMU has joined the cgroup, an empty cgroup means it is gone.
  let seen = false;
  const started = Date.now();
  const watch = setInterval(() => {
    for (const ip of grants.keys()) if (grantedNames(ip).length === 0) grants.delete(ip);
    const empty = cgroupEmpty(vmCg);
    if (!empty) seen = true;
    if ((seen && empty) || (!seen && Date.now() - started > 120_000)) shutdown(0);
  }, 500);
  closers.push(() => clearInterval(watch));
  ready({ tcp: proxyPort, dns: dnsPort });
}

// ------------------------------------------------------------------ rootless

let relay: ChildProcess | undefined;
let connectSeq = 0;
const pendingConnects = new Map<number, (s: Socket | undefined) => void>();
const forwards = new Map<number, Server>();

function processAlive(pid: number): boolean {
  try {
    const st = readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = st.slice(st.lastIndexOf(")") + 2, st.lastIndexOf(")") + 3);
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

/** QEMU's pid, once its launcher has set up the namespace (prepareVmNetwork removed any old one). */
async function waitForQemu(): Promise<number> {
  const until = Date.now() + 120_000;
  while (Date.now() < until) {
    try {
      const pid = Number(readFileSync(files.netnsPid, "utf8").trim());
      if (Number.isInteger(pid) && pid > 0) return pid;
    } catch {
      /* not yet */
    }
    await sleep(10);
  }
  throw new Error("QEMU did not start its network namespace within 120 s");
}

/** The host-side listener of one forward: each connection is tunnelled to QEMU's 127.0.0.1:port. */
async function forwardPort(port: number): Promise<void> {
  if (!isPort(port)) throw new Error(`bad port ${port}`);
  if (forwards.has(port)) return;
  const server = createServer({ pauseOnConnect: true }, (c) => {
    c.on("error", () => {});
    const id = ++connectSeq;
    const timer = setTimeout(() => pendingConnects.get(id)?.(undefined), CONNECT_MS);
    pendingConnects.set(id, (inner) => {
      clearTimeout(timer);
      pendingConnects.delete(id);
      if (!inner) return c.destroy();
      inner.on("error", () => c.destroy());
      c.on("error", () => inner.destroy());
      inner.on("close", () => c.destroy());
      c.on("close", () => inner.destroy());
      c.pipe(inner);
      inner.pipe(c);
      c.resume();
    });
    if (!relay?.connected) return pendingConnects.get(id)?.(undefined);
    relay.send({ op: "connect", id, port });
  });
  await listenTcp(server, port);
  forwards.set(port, server);
}

function unforwardPort(port: number): void {
  forwards.get(port)?.close();
  forwards.delete(port);
}

/** The forwards QEMU was started with (`hostfwd=tcp:127.0.0.1:H-:G` in its command line). */
function startupForwards(pid: number): number[] {
  const args = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
  const out: number[] = [];
  for (const a of args)
    for (const m of a.matchAll(/hostfwd=tcp:127\.0\.0\.1:(\d+)-/g)) out.push(Number(m[1]));
  return out;
}

/**
 * Rootless: enter QEMU's namespaces with the relay, take its sockets, serve them as the root mode
 * serves its own, and listen on the VM's forwarded host ports.
 */
async function mainUserns(): Promise<void> {
  const relayArgv = JSON.parse(process.env.SMOLVM_NET_RELAY ?? "null") as string[] | null;
  if (!relayArgv?.length) throw new Error("SMOLVM_NET_RELAY (the relay's argv) is not set");
  const qemuPid = await waitForQemu();
  conntrackPath = `/proc/${qemuPid}/net/nf_conntrack`;
  const child = spawn(
    "nsenter",
    ["-t", String(qemuPid), "-U", "-n", "--preserve-credentials", "--", ...relayArgv],
    { stdio: ["ignore", "ignore", "inherit", "ipc"], env: { ...process.env, PATH: toolPath() } },
  );
  relay = child;
  closers.push(() => child.kill("SIGKILL"));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error("the relay in QEMU's namespace did not start within 30 s")),
      30_000,
    );
    child.once("exit", (code) => reject(new Error(`the relay in QEMU's namespace exited (${String(code)})`)));
    child.once("error", reject);
    child.on("message", (m: { kind?: string; id?: number }, handle: unknown) => {
      if (m.kind === "tcp") {
        const proxy = handle as Server;
        // Set as createServer's options would: the guest may half-close; read nothing before the verdict.
        Object.assign(proxy, { allowHalfOpen: true, pauseOnConnect: true });
        proxy.on("connection", (s: Socket) => {
          void handleConnection(s, RELAY_TCP_PORT).catch(() => s.destroy());
        });
        closers.push(() => proxy.close());
      } else if (m.kind === "dns-tcp") {
        const t = handle as Server;
        t.on("connection", serveDnsTcp);
        closers.push(() => t.close());
      } else if (m.kind === "dns-udp") {
        const u = handle as UdpSocket;
        serveDnsUdp(u);
        closers.push(() => u.close());
      } else if (m.kind === "ready") {
        clearTimeout(timer);
        resolve();
      } else if (typeof m.id === "number") {
        pendingConnects.get(m.id)?.(handle instanceof Object ? (handle as Socket) : undefined);
      }
    });
  });
  child.removeAllListeners("exit");
  child.once("exit", () => shutdown(1)); // no relay, no forwards: fail closed, visibly
  for (const port of startupForwards(qemuPid)) await forwardPort(port);
  const control = await listenControl(() => {});
  closers.push(
    () => control.close(),
    () => {
      for (const s of forwards.values()) s.close();
    },
  );
  const watch = setInterval(() => {
    for (const ip of grants.keys()) if (grantedNames(ip).length === 0) grants.delete(ip);
    if (!processAlive(qemuPid)) shutdown(0);
  }, 500);
  closers.push(() => clearInterval(watch));
  ready({ qemuPid });
}

async function main(): Promise<void> {
  // Every guest connection waits on this process: ahead of the (TCG-busy) QEMU on a loaded host.
  try {
    setPriority(-5);
  } catch {
    /* not root: default priority */
  }
  if (cg) await mainCgroup(cg);
  else await mainUserns();
}

main().catch((e) => {
  process.stderr.write(`smolvm network daemon: ${(e as Error).message}\n`);
  shutdown(1);
});
