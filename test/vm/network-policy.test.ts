/**
 * Network policies on real microVMs against real peers: "internet" hosts in network namespaces
 * this file creates (allowed.test 198.51.100.10, denied.test 203.0.113.10, named in /etc/hosts),
 * HTTP servers on the host's own 127.0.0.1 and on all its addresses that no guest may reach,
 * live policy changes, and forwards plus both control channels under "none".
 */
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ValidationError } from "../../src/errors.js";
import { cgroup2Mount, tableName } from "../../src/vm/network/firewall.js";
import type { NetworkPolicy } from "../../src/vm/network/policy.js";
import { SmolVM } from "../../src/vm/smolvm.js";
import {
  guestHttp,
  guestLookup,
  type HostServices,
  hostAddresses,
  startHostServices,
} from "../fixtures/guest-net.js";
import { httpGet } from "../fixtures/http-get.js";
import { createTestHosts, type TestHosts } from "../fixtures/test-hosts.js";

const pexec = promisify(execFile);
const CLI = join(import.meta.dirname, "../../src/cli/smolvm.ts");
const ALLOWED_IP = "198.51.100.10";
const DENIED_IP = "203.0.113.10";

async function nftTables(): Promise<string> {
  return (await pexec("nft", ["list", "tables"])).stdout;
}

describe("network policy on real microVMs", () => {
  let dataDir: string;
  let hosts: TestHosts;
  let vm: SmolVM;
  let host: HostServices;

  beforeAll(async () => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-netpolicy-"));
    hosts = await createTestHosts([
      ["allowed.test", ALLOWED_IP],
      ["denied.test", DENIED_IP],
    ]);
    host = await startHostServices();
    vm = await SmolVM.create({ dataDir, network: { allow: ["allowed.test"] } });
  }, 240_000);

  afterAll(async () => {
    await vm?.delete();
    host?.close();
    hosts?.cleanup();
    rmSync(dataDir, { recursive: true, force: true });
  });

  it("its network daemon runs without the CA bundle and V8 trap handler it never uses", () => {
    const pid = readFileSync(join(dataDir, "vms", vm.id, "net.pid"), "utf8").trim();
    const environ = readFileSync(`/proc/${pid}/environ`, "utf8").split("\0");
    expect(environ.some((e) => e.startsWith("NODE_EXTRA_CA_CERTS="))).toBe(false);
    expect(environ).toContain(`PATH=${process.env.PATH}`);
    const argv = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
    expect(argv.includes("--disable-wasm-trap-handler")).toBe(
      process.allowedNodeEnvironmentFlags.has("--disable-wasm-trap-handler"),
    );
  });

  it("an allow-list admits allowed.test and refuses denied.test, its raw IP and a foreign Host", async () => {
    expect(vm.network).toEqual({ allow: ["allowed.test"] });
    expect(await guestLookup(vm, "allowed.test")).toContain(ALLOWED_IP);
    expect(await guestLookup(vm, "denied.test")).toContain("NXDOMAIN");

    expect(await guestHttp(vm, "allowed.test", "allowed.test")).toContain(
      "host=allowed.test name=allowed.test",
    );
    expect(await guestHttp(vm, "denied.test", "denied.test")).toBe("");
    expect(await guestHttp(vm, DENIED_IP, "denied.test")).toBe("");
    // The raw IP of an allowed host, and that IP carrying another name: both refused.
    expect(await guestHttp(vm, ALLOWED_IP, ALLOWED_IP)).toBe("");
    expect(await guestHttp(vm, ALLOWED_IP, "denied.test")).toBe("");

    const log = await vm.networkLog({ limit: 50 });
    expect(log.some((e) => e.proto === "dns" && e.host === "denied.test" && e.verdict === "deny")).toBe(true);
    expect(
      log.some(
        (e) =>
          e.proto === "tcp" &&
          e.ip === ALLOWED_IP &&
          e.port === 80 &&
          e.host === "allowed.test" &&
          e.verdict === "allow" &&
          e.rule === "allow:allowed.test",
      ),
    ).toBe(true);
    expect(log.some((e) => e.ip === ALLOWED_IP && e.host === "denied.test" && e.verdict === "deny")).toBe(
      true,
    );
    expect(log.some((e) => e.ip === ALLOWED_IP && e.host === ALLOWED_IP && e.verdict === "deny")).toBe(true);
    for (const e of log) {
      expect(typeof e.time).toBe("string");
      expect(["allow", "deny"]).toContain(e.verdict);
    }
    expect(await vm.networkLog({ limit: 2 })).toHaveLength(2);
  });

  it("never reaches the host: 10.0.2.2, the host's own addresses, 169.254.169.254", async () => {
    const policies: NetworkPolicy[] = [{ allow: ["allowed.test", "0.0.0.0/0"] }, "public"];
    for (const policy of policies) {
      await vm.setNetwork(policy);
      expect(await guestHttp(vm, "10.0.2.2", "localhost", host.loopbackPort)).toBe("");
      expect(await guestHttp(vm, "10.0.2.2", "localhost", host.wildcardPort)).toBe("");
      for (const ip of hostAddresses()) expect(await guestHttp(vm, ip, ip, host.wildcardPort)).toBe("");
      expect(await guestHttp(vm, "169.254.169.254", "169.254.169.254")).toBe("");
    }
    expect(host.hits).toEqual([]);
    const log = await vm.networkLog({ limit: 100 });
    expect(
      log.some((e) => e.ip === "169.254.169.254" && e.verdict === "deny" && e.rule === "public:link-local"),
    ).toBe(true);
    expect(log.some((e) => e.port === host.loopbackPort && e.verdict === "deny")).toBe(true);
    expect(
      log.filter((e) => e.verdict === "allow" && [host.loopbackPort, host.wildcardPort].includes(e.port)),
    ).toEqual([]);
  });

  it("a network command can be the very first command after create(), cold or from the template", async () => {
    for (const template of [false, true]) {
      await using fresh = await SmolVM.create({ dataDir, template });
      expect(fresh.bootTimings?.source).toBe(template ? "template" : "cold");
      // Nothing run before it: create() returned with lo and eth0 up, a route and a resolver.
      const r = await fresh.run("wget -qO- http://allowed.test/", { timeoutMs: 30_000 });
      expect(r.exitCode).toBe(0);
      expect(r.stdout).toBe("host=allowed.test name=allowed.test\n");
      if (!template) {
        const m = fresh.bootTimings!;
        expect(m.networkMs).toBeGreaterThan(0);
        expect(m.agentMs).toBeGreaterThan(0);
        expect(m.milestones?.["network-up"]).toBe(m.networkMs);
      }
    }
  }, 120_000);

  it('"public" reaches internet hosts by name and by address', async () => {
    await vm.setNetwork("public");
    expect(vm.network).toBe("public");
    expect(await guestHttp(vm, "denied.test", "denied.test")).toContain("name=denied.test");
    // busybox wget, no proxy settings: transparent to ordinary clients.
    expect((await vm.run("wget -qO- http://allowed.test/", { timeoutMs: 30_000 })).stdout).toContain(
      "host=allowed.test name=allowed.test",
    );
    expect(await guestHttp(vm, ALLOWED_IP, "anything")).toContain("host=anything name=allowed.test");
  });

  it('setNetwork("none") on a live VM cuts new connections and DNS', async () => {
    await vm.setNetwork({ allow: ["allowed.test"] });
    expect(await guestHttp(vm, "allowed.test", "allowed.test")).toContain("name=allowed.test");
    await vm.setNetwork("none", { timeoutMs: 5_000 });
    expect(vm.network).toBe("none");
    expect((await SmolVM.fromId(vm.id, { dataDir })).network).toBe("none");
    expect(await guestLookup(vm, "allowed.test")).toContain("NXDOMAIN");
    expect(await guestHttp(vm, ALLOWED_IP, "allowed.test")).toBe("");
    const last = (await vm.networkLog({ limit: 1 }))[0]!;
    expect(last).toMatchObject({ proto: "tcp", ip: ALLOWED_IP, port: 80, verdict: "deny", rule: "none" });
  });

  it("the CLI sets a policy and prints the log", async () => {
    const cli = (args: string[]) =>
      pexec(process.execPath, ["--import", "tsx", CLI, ...args], {
        env: { ...process.env, SMOLVM_DATA_DIR: dataDir },
        timeout: 60_000,
      });
    await cli(["network", "set", vm.id, "allow=allowed.test,10.1.0.0/16;deny=bad.test"]);
    expect(vm.network).toEqual({ allow: ["allowed.test", "10.1.0.0/16"], deny: ["bad.test"] });
    expect(await guestHttp(vm, "allowed.test", "allowed.test")).toContain("name=allowed.test");
    const { stdout } = await cli(["network", "log", vm.id, "--json", "--limit", "1"]);
    expect(JSON.parse(stdout)).toEqual([
      expect.objectContaining({
        proto: "tcp",
        host: "allowed.test",
        ip: ALLOWED_IP,
        port: 80,
        verdict: "allow",
      }),
    ]);
    const text = await cli(["network", "log", vm.id, "--limit", "1"]);
    expect(text.stdout).toMatch(/ tcp allow allowed\.test \(198\.51\.100\.10\):80 allow:allowed\.test\n$/);
    await expect(cli(["network", "set", vm.id, "everything"])).rejects.toMatchObject({ code: 2 }); // ValidationError
  });

  it("rejects malformed policies with ValidationError", async () => {
    await expect(vm.setNetwork({ allow: ["bad host!"] })).rejects.toBeInstanceOf(ValidationError);
    await expect(vm.setNetwork("private" as never)).rejects.toBeInstanceOf(ValidationError);
    await expect(SmolVM.create({ dataDir, network: { deny: [] } as never })).rejects.toBeInstanceOf(
      ValidationError,
    );
  });

  it('"none" from create: exposeLocal, the agent and SSH all work', async () => {
    const quiet = await SmolVM.create({ dataDir, network: "none" });
    try {
      expect(quiet.network).toBe("none");
      // The first VM of this file left the image's template: this one is restored from it, under
      // its own policy.
      expect(quiet.bootTimings!.source).toBe("template");
      expect(quiet.bootTimings!.channel).toBe("agent");
      expect((await quiet.run("echo via-agent")).stdout).toBe("via-agent\n");
      await quiet.waitForSsh({ timeoutMs: 60_000 });
      const ssh = await SmolVM.fromId(quiet.id, { dataDir, commChannel: "ssh" });
      expect((await ssh.run("echo via-ssh")).stdout).toBe("via-ssh\n");
      await ssh.close();
      await quiet.run("mkdir -p /srv && echo served > /srv/index.html && (httpd -p 0.0.0.0:8080 -h /srv &)");
      const port = await quiet.exposeLocal(8080);
      expect(await httpGet(port)).toBe("served\n");
      await quiet.unexposeLocal(port);
      expect(await guestHttp(quiet, "denied.test", "denied.test")).toBe("");

      // A fork keeps its parent's policy.
      const [child] = await quiet.fork({ timeoutMs: 120_000 });
      try {
        expect(child!.network).toBe("none");
        expect(await guestLookup(child!, "allowed.test")).toContain("NXDOMAIN");
        expect(await guestHttp(child!, ALLOWED_IP, "allowed.test")).toBe("");
      } finally {
        await child!.delete();
      }
      expect(await nftTables()).not.toContain(tableName(child!.id));
      expect(existsSync(join(cgroup2Mount()!, "smolvm", child!.id))).toBe(false);

      // QEMU killed: its daemon removes the table and cgroup; start() sets both up again.
      const pid = (await SmolVM.list({ dataDir })).find((r) => r.id === quiet.id)!.pid!;
      process.kill(pid, "SIGKILL");
      const gone = Date.now() + 10_000;
      while ((await nftTables()).includes(tableName(quiet.id)) && Date.now() < gone) {
        await new Promise((r) => setTimeout(r, 100));
      }
      expect(await nftTables()).not.toContain(tableName(quiet.id));
      expect(existsSync(join(cgroup2Mount()!, "smolvm", quiet.id))).toBe(false);
      await quiet.start();
      expect(await nftTables()).toContain(tableName(quiet.id));
      expect(quiet.network).toBe("none");
      expect(await guestLookup(quiet, "allowed.test")).toContain("NXDOMAIN");
      expect((await quiet.run("echo again")).stdout).toBe("again\n");
      // Booted cold now (from its own initramfs, made on this first need): sshd has the VM's
      // own pinned key from the start.
      await quiet.waitForSsh({ timeoutMs: 60_000 });
      const ssh2 = await SmolVM.fromId(quiet.id, { dataDir, commChannel: "ssh" });
      expect((await ssh2.run("hostname")).stdout).toBe(`${quiet.name}\n`);
      await ssh2.close();
    } finally {
      await quiet.delete();
    }
    // Its cgroup and nftables table are gone with it.
    expect(await nftTables()).not.toContain(tableName(quiet.id));
    expect(existsSync(join(cgroup2Mount()!, "smolvm", quiet.id))).toBe(false);
  }, 120_000);
});
