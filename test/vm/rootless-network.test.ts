/**
 * The network policy without root: an ordinary user (smolvmtest, made by scripts/setup.sh) runs
 * test/fixtures/rootless-vm.ts, which creates real microVMs with the default policy and with an
 * allow-list. QEMU runs in its own user + network namespace; the guest must not reach the host's
 * 127.0.0.1 or its own addresses, must reach allowed.test and not denied.test (network namespaces
 * with documentation addresses, named in /etc/hosts), and SSH and exposeLocal must work. After
 * delete nothing of the user's is left: no QEMU, daemon or relay, no network namespace.
 */
import { execFile, execFileSync, spawnSync } from "node:child_process";
import {
  accessSync,
  chmodSync,
  constants,
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { cacheDir } from "../../src/common/paths.js";
import { ensureImage } from "../../src/image/index.js";
import { networkMechanisms } from "../../src/vm/network/firewall.js";
import type { NetworkLogEntry } from "../../src/vm/network/policy.js";
import { type HostServices, hostAddresses, startHostServices } from "../fixtures/guest-net.js";
import { createTestHosts, type TestHosts } from "../fixtures/test-hosts.js";
import { processesUnder } from "../global-setup.js";

const pexec = promisify(execFile);
const USER = "smolvmtest";
const REPO = resolve(import.meta.dirname, "../..");
const FIXTURE = join(REPO, "test/fixtures/rootless-vm.ts");
const MECHANISMS = join(REPO, "test/fixtures/network-mechanisms.ts");
const ALLOWED_IP = "198.51.100.10";
const DENIED_IP = "203.0.113.10";

/** The test user's environment: its own home, temp, data and cache dirs under `dir`. */
function userEnv(dir: string): NodeJS.ProcessEnv {
  return {
    PATH: process.env.PATH,
    HOME: join(dir, "home"),
    TMPDIR: join(dir, "home"),
    SMOLVM_DATA_DIR: join(dir, "data"),
    SMOLVM_CACHE_DIR: join(dir, "cache"),
  };
}

function userIds(): { uid: number; gid: number } {
  const id = (flag: string) => Number(execFileSync("id", [flag, USER], { encoding: "utf8" }).trim());
  try {
    return { uid: id("-u"), gid: id("-g") };
  } catch (e) {
    throw new Error(
      `the test user ${USER} is missing: run scripts/setup.sh as root (${(e as Error).message})`,
    );
  }
}

const UNREADABLE = "( ! -perm -o+r -o -type d ! -perm -o+x ) -print -quit".split(" ");

/** The user must read the checkout (sources, node_modules) and pass through every parent directory. */
function makeReadable(repo: string): void {
  const repoMode = statSync(repo).mode;
  if ((repoMode & 0o005) !== 0o005) chmodSync(repo, repoMode | 0o005);
  for (let d = dirname(repo); d !== dirname(d); d = dirname(d)) {
    const mode = statSync(d).mode;
    if ((mode & 0o001) === 0) chmodSync(d, mode | 0o001);
  }
  for (const p of ["src", "test", "node_modules", "package.json", "tsconfig.json"]) {
    const path = join(repo, p);
    if (!existsSync(path)) continue;
    // The first file the user cannot read, or directory it cannot enter (find's errors on broken links aside).
    const unreadable = spawnSync("find", ["-L", path, ...UNREADABLE], { encoding: "utf8" }).stdout;
    if (unreadable) execFileSync("chmod", ["-R", "a+rX", path]);
  }
}

/** Every live process (of `uid`, or of anyone), with its network namespace ("net:[inode]"). */
function processes(uid?: number): { pid: number; netns: string; args: string }[] {
  const out: { pid: number; netns: string; args: string }[] = [];
  for (const name of readdirSync("/proc")) {
    const pid = Number(name);
    if (!Number.isInteger(pid)) continue;
    try {
      if (uid !== undefined && statSync(`/proc/${pid}`).uid !== uid) continue;
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      if (stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) === "Z") continue;
      out.push({
        pid,
        netns: readlinkSync(`/proc/${pid}/ns/net`),
        args: readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").join(" ").trim(),
      });
    } catch {
      /* gone meanwhile */
    }
  }
  return out;
}

describe("network policy without root (QEMU in its own user + network namespace)", () => {
  let dir: string;
  let hosts: TestHosts;
  let host: HostServices;
  let ids: { uid: number; gid: number };

  beforeAll(async () => {
    ids = userIds();
    makeReadable(REPO);
    dir = mkdtempSync(join(tmpdir(), "smolvm-rootless-"));
    chmodSync(dir, 0o711);
    for (const d of ["data", "cache", "home"]) mkdirSync(join(dir, d));
    // The image is built here (as root, from root's package cache) and handed to the user: the
    // test is about the network, not about building images without root.
    await ensureImage("tiny", { dataDir: join(dir, "data") });
    const verdict = join(cacheDir(), "accel.json");
    if (existsSync(verdict)) copyFileSync(verdict, join(dir, "cache", "accel.json"));
    execFileSync("chown", [
      "-R",
      `${ids.uid}:${ids.gid}`,
      join(dir, "data"),
      join(dir, "cache"),
      join(dir, "home"),
    ]);

    hosts = await createTestHosts([
      ["allowed.test", ALLOWED_IP],
      ["denied.test", DENIED_IP],
    ]);
    host = await startHostServices();
  }, 120_000);

  afterAll(() => {
    host?.close();
    hosts?.cleanup();
    if (dir) {
      for (const p of processesUnder(dir)) {
        try {
          process.kill(p.pid, "SIGKILL");
        } catch {
          /* gone */
        }
      }
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("default policy and an allow-list hold for an ordinary user; SSH and exposeLocal work; nothing is left", async () => {
    accessSync(FIXTURE, constants.R_OK);
    const { stdout } = await pexec(
      "setpriv",
      ["--reuid", USER, "--regid", USER, "--init-groups", process.execPath, "--import", "tsx", FIXTURE],
      {
        cwd: REPO,
        timeout: 150_000,
        maxBuffer: 16 * 1024 * 1024,
        env: {
          ...userEnv(dir),
          ROOTLESS_CHECK: JSON.stringify({
            loopbackPort: host.loopbackPort,
            wildcardPort: host.wildcardPort,
            hostAddrs: hostAddresses(),
            allowedIp: ALLOWED_IP,
          }),
        },
      },
    );
    const r = JSON.parse(stdout.trim().split("\n").pop()!) as Record<string, unknown>;
    expect(r.uid).toBe(ids.uid);
    expect(r.mechanism).toBe("userns-nftables-proxy");

    // Default policy "public": internet hosts yes, the host never.
    expect(r.publicPolicy).toBe("public");
    expect(r.publicDenied).toContain("host=denied.test name=denied.test");
    expect((r.publicHost as string[]).length).toBe(3 + hostAddresses().length);
    for (const reply of r.publicHost as string[]) expect(reply).toBe("");
    expect(r.exposed).toBe("served\n");
    expect(r.unexposed).toBe("ECONNREFUSED");
    expect(r.ssh).toBe("via-ssh\n");
    const publicLog = r.publicLog as NetworkLogEntry[];
    expect(publicLog.some((e) => e.ip === "169.254.169.254" && e.rule === "public:link-local")).toBe(true);
    expect(
      publicLog.some((e) => e.ip === "127.0.0.1" && e.port === host.loopbackPort && e.verdict === "deny"),
    ).toBe(true);

    // The allow-list.
    expect(r.allowPolicy).toEqual({ allow: ["allowed.test"] });
    expect(r.lookupAllowed).toContain(ALLOWED_IP);
    expect(r.lookupDenied).toContain("NXDOMAIN");
    expect(r.allowed).toContain("host=allowed.test name=allowed.test");
    expect(r.denied).toBe("");
    expect(r.allowedRawIp).toBe("");
    expect(r.allowedIpForeignHost).toBe("");
    for (const reply of r.allowHost as string[]) expect(reply).toBe("");
    expect(r.noneLookup).toContain("NXDOMAIN");
    expect(r.noneHttp).toBe("");
    const allowLog = r.allowLog as NetworkLogEntry[];
    expect(
      allowLog.some(
        (e) =>
          e.proto === "tcp" &&
          e.ip === ALLOWED_IP &&
          e.verdict === "allow" &&
          e.rule === "allow:allowed.test",
      ),
    ).toBe(true);
    expect(allowLog.at(-1)).toMatchObject({
      proto: "tcp",
      ip: ALLOWED_IP,
      port: 80,
      verdict: "deny",
      rule: "none",
    });
    expect(host.hits).toEqual([]);

    // After delete(): no QEMU, daemon or relay of the user's, and so no namespace of theirs.
    expect(processes(ids.uid).map((p) => p.args)).toEqual([]);
    expect(processesUnder(dir)).toEqual([]);
    const namespaces = [r.publicNetns, r.allowNetns] as string[];
    expect(namespaces[0]).toMatch(/^net:\[\d+\]$/);
    expect(namespaces[1]).toMatch(/^net:\[\d+\]$/);
    expect(namespaces[0]).not.toBe(readlinkSync("/proc/self/ns/net"));
    expect(processes().filter((p) => namespaces.includes(p.netns))).toEqual([]);
    expect(readdirSync("/dev/shm").filter((f) => statSync(join("/dev/shm", f)).uid === ids.uid)).toEqual([]);
  }, 180_000);

  it("networkMechanisms and the doctor say what enforces policies; with neither, NETWORK_POLICY_UNAVAILABLE", async () => {
    const asRoot = networkMechanisms({ probeAll: true });
    expect(asRoot).toMatchObject({
      mechanism: "cgroup-nftables-proxy",
      root: true,
      userns: true,
      problems: [],
    });

    const run = async (path: string) => {
      const { stdout } = await pexec(
        "setpriv",
        [
          "--reuid",
          USER,
          "--regid",
          USER,
          "--init-groups",
          "/usr/bin/env",
          `PATH=${path}`,
          process.execPath,
          "--import",
          "tsx",
          MECHANISMS,
        ],
        {
          cwd: REPO,
          timeout: 60_000,
          env: userEnv(dir),
        },
      );
      return JSON.parse(stdout.trim().split("\n").pop()!);
    };
    const user = await run(process.env.PATH ?? "/usr/bin:/bin");
    expect(user).toMatchObject({
      mechanism: "userns-nftables-proxy",
      userns: true,
      prepare: { message: "prepared" },
    });
    expect(user.check.ok).toBe(true);
    expect(user.check.detail).toMatch(/^rootless user namespaces: in use/);

    // No unshare on the PATH: neither mechanism works, and create() would refuse, saying how to fix it.
    const none = await run("/nonexistent");
    expect(none.mechanism).toBe(null);
    expect(none.problems).toEqual([
      "root nftables: run as root (nftables and cgroups need CAP_NET_ADMIN and CAP_SYS_ADMIN)",
      "rootless user namespaces: cannot run unshare (ENOENT): install util-linux",
    ]);
    expect(none.prepare).toMatchObject({ name: "HostDependencyError", code: "NETWORK_POLICY_UNAVAILABLE" });
    expect(none.prepare.message).toContain("install util-linux");
    expect(none.check.ok).toBe(false);
    expect(none.check.detail).toMatch(
      /^none: create\(\) refuses to start VMs \(NETWORK_POLICY_UNAVAILABLE\)/,
    );
  }, 120_000);
});
