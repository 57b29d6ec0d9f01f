/**
 * Builds `tiny` into a throw-away data dir and boots it in QEMU (TCG) with a minimal command line
 * of our own, then logs in over SSH with the host key pinned. Downloaded .debs and the unpacked
 * kernel are shared through the cache dir (SMOLVM_CACHE_DIR, else ~/.cache/smolvm), so only the
 * first run on a machine downloads anything.
 */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  truncateSync,
  writeFileSync,
} from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { OperationAbortedError, OperationTimeoutError } from "../../src/errors.js";
import {
  buildImage,
  buildVmConfigCpio,
  composeInitrd,
  ensureClientKey,
  ensureImage,
  generateHostKey,
  type ImageBuildProgress,
  type ImageManifest,
  kernelCmdline,
  knownHostsLine,
  listImages,
  removeImage,
} from "../../src/image/index.js";
import { TCG_CPU } from "../../src/vm/qemu.js";

const work = mkdtempSync(join(tmpdir(), "smolvm-tiny-"));
const dataDir = join(work, "data");
let manifest: ImageManifest;
let coldMs = 0;
const steps: ImageBuildProgress[] = [];

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

function run(
  cmd: string,
  args: string[],
  timeoutMs = 20_000,
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs }, (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? -1) : 0, stdout, stderr });
    });
  });
}

beforeAll(async () => {
  const t = performance.now();
  manifest = await buildImage("tiny", { dataDir, onProgress: (p) => steps.push(p) });
  coldMs = performance.now() - t;
}, 300_000);

afterAll(() => {
  rmSync(work, { recursive: true, force: true });
});

describe("tiny image build", () => {
  it("builds a verified image with a manifest and reports progress", async () => {
    console.log(`tiny build (fresh data dir, shared .deb cache): ${Math.round(coldMs)} ms`);
    expect(manifest.name).toBe("tiny");
    expect(manifest.dir).toBe(join(dataDir, "images", `tiny-${manifest.fingerprint.slice(0, 16)}`));
    // Our own build of Debian's kernel source (kernel-build.ts).
    expect(manifest.kernelRelease).toMatch(/^\d+\.\d+\.\d+-smolvm$/);
    expect(Object.keys(manifest.packages)).toContain(
      manifest.kernelRelease.replace(/^(\d+\.\d+)\..*/, "linux-source-$1"),
    );
    // This host has gcc and a static libc (scripts/setup.sh), so tiny ships the guest agent.
    // Its sshd runs per connection under the agent, so it reads its host key per connection.
    expect(manifest.capabilities).toEqual({ ssh: true, agent: true, sshHostKeyPerConnection: true });
    expect(manifest.artifacts.initrd.size).toBeGreaterThan(1_000_000);
    expect(readFileSync(manifest.kernelPath).subarray(0, 4).toString("latin1")).toBe("\x7fELF");
    expect(steps.at(-1)?.done).toBe(true);
    expect(steps.map((s) => s.step)).toContain("writing the initramfs");
    const again = performance.now();
    const cached = await ensureImage("tiny", { dataDir });
    const warmMs = performance.now() - again;
    console.log(`tiny ensureImage (cached): ${Math.round(warmMs)} ms`);
    expect(cached.fingerprint).toBe(manifest.fingerprint);
    expect(warmMs).toBeLessThan(3000);
    const list = await listImages({ dataDir });
    expect(list.map((i) => [i.name, i.ok])).toEqual([["tiny", true]]);
  });

  it("never uses a damaged image: ensureImage rebuilds it", async () => {
    const scratch = join(work, "scratch");
    const m = await buildImage("tiny", { dataDir: scratch });
    truncateSync(m.initrdPath, 1000);
    const list = await listImages({ dataDir: scratch });
    expect(list[0]?.ok).toBe(false);
    const rebuilt = await ensureImage("tiny", { dataDir: scratch });
    expect(rebuilt.artifacts.initrd.size).toBe(m.artifacts.initrd.size);
    expect(readFileSync(rebuilt.initrdPath).length).toBe(m.artifacts.initrd.size);
    expect(await removeImage("tiny", { dataDir: scratch })).toEqual([rebuilt.dir]);
    expect(existsSync(rebuilt.dir)).toBe(false);
  }, 120_000);

  it("a build past its timeout fails with OperationTimeoutError and leaves nothing behind", async () => {
    const scratch = join(work, "timeout");
    const started = performance.now();
    const err = await buildImage("tiny", { dataDir: scratch, force: true, timeoutMs: 100 }).catch((e) => e);
    expect(err).toBeInstanceOf(OperationTimeoutError);
    expect(err).not.toBeInstanceOf(OperationAbortedError);
    expect(performance.now() - started).toBeLessThan(5000);
    const left = existsSync(join(scratch, "images")) ? readdirSync(join(scratch, "images")) : [];
    expect(left).toEqual([]);
    const ac = new AbortController();
    ac.abort();
    await expect(buildImage("tiny", { dataDir: scratch, signal: ac.signal })).rejects.toBeInstanceOf(
      OperationAbortedError,
    );
    rmSync(scratch, { recursive: true, force: true });
  });

  it("two processes building the same image at once agree and leave no temp dirs", async () => {
    const scratch = join(work, "race");
    const child = (force: boolean) =>
      new Promise<{ code: number | null; out: string; err: string }>((resolve) => {
        const p = spawn(
          process.execPath,
          ["--import", "tsx", join(import.meta.dirname, "build-child.ts"), scratch, force ? "force" : ""],
          { stdio: ["ignore", "pipe", "pipe"] },
        );
        let out = "";
        let err = "";
        p.stdout!.on("data", (b) => (out += b));
        p.stderr!.on("data", (b) => (err += b));
        p.on("exit", (code) => resolve({ code, out, err }));
      });
    const [a, b] = await Promise.all([child(true), child(false)]);
    expect([a.code, a.err, b.code, b.err]).toEqual([0, "", 0, ""]);
    const ra = JSON.parse(a.out) as { dir: string; fingerprint: string };
    const rb = JSON.parse(b.out) as { dir: string; fingerprint: string };
    expect(ra).toEqual(rb);
    expect(readdirSync(join(scratch, "images"))).toEqual([`tiny-${ra.fingerprint.slice(0, 16)}`]);
    expect((await listImages({ dataDir: scratch }))[0]?.ok).toBe(true);
    rmSync(scratch, { recursive: true, force: true });
  }, 120_000);
});

describe("tiny image boot (QEMU TCG)", () => {
  let qemu: ChildProcess | undefined;

  afterAll(async () => {
    if (qemu && qemu.exitCode === null && qemu.signalCode === null) {
      qemu.kill("SIGKILL");
      await new Promise((r) => qemu!.once("exit", r));
    }
  });

  it("boots to sshd, logs milestones, and accepts the pinned host key", async () => {
    const vmDir = join(work, "vm");
    mkdirSync(vmDir, { mode: 0o700 });
    const client = await ensureClientKey(dataDir);
    const host = await generateHostKey();
    const config = buildVmConfigCpio([
      { path: "smolvm/config/ssh_host_ed25519_key", mode: 0o600, data: host.privateKeyPem },
      { path: "smolvm/config/authorized_keys", mode: 0o600, data: `${client.publicKey}\n` },
      { path: "smolvm/config/hostname", mode: 0o644, data: "smolvm-test\n" },
      { path: "smolvm/config/env", mode: 0o600, data: "export GREETING='hello from env'\n" },
      { path: "smolvm/config/agent_secret", mode: 0o600, data: Buffer.alloc(32, 5) },
    ]);
    const initrd = join(vmDir, "initrd.img");
    await composeInitrd(manifest.initrdPath, config, initrd);
    const port = await freePort();
    const knownHosts = join(vmDir, "known_hosts");
    writeFileSync(knownHosts, knownHostsLine("127.0.0.1", port, host.publicKey));
    const serial = join(vmDir, "serial.log");
    const args = [
      ...["-M", "microvm,acpi=on", "-accel", "tcg", "-cpu", TCG_CPU, "-m", "512", "-smp", "1"],
      ...["-no-user-config", "-nographic", "-no-reboot", "-monitor", "none"],
      ...["-kernel", manifest.kernelPath, "-initrd", initrd],
      ...["-append", kernelCmdline(manifest.kernelCmdline, { tcg: true })],
      ...["-serial", `file:${serial}`],
      ...[
        "-netdev",
        `user,id=n0,hostfwd=tcp:127.0.0.1:${port}-:22`,
        "-device",
        "virtio-net-device,netdev=n0",
      ],
      ...["-device", "virtio-serial-device"],
      ...["-chardev", `socket,id=agent,path=${join(vmDir, "agent.sock")},server=on,wait=off`],
      ...["-device", "virtserialport,chardev=agent,name=org.smolvm.agent"],
    ];
    const started = performance.now();
    qemu = spawn("qemu-system-x86_64", args, { stdio: ["ignore", "ignore", "pipe"] });
    let qemuErr = "";
    qemu.stderr!.on("data", (b) => (qemuErr += b));
    let log = "";
    let shellMs = 0;
    while (!log.includes("network-up")) {
      if (qemu.exitCode !== null) throw new Error(`QEMU exited: ${qemuErr}`);
      if (performance.now() - started > 45_000) throw new Error(`no network-up within 45 s; serial:\n${log}`);
      await new Promise((r) => setTimeout(r, 50));
      log = existsSync(serial) ? readFileSync(serial, "utf8") : "";
      if (!shellMs && log.includes("init-start")) shellMs = performance.now() - started;
    }
    const upMs = performance.now() - started;
    const milestones = [...log.matchAll(/^smolvm: (\d+) ([a-z-]+)\r?$/gm)].map(
      (m) => [m[2], Number(m[1])] as const,
    );
    console.log(
      `tiny boot (TCG): init-start seen ${Math.round(shellMs)} ms, network-up seen ${Math.round(upMs)} ms after QEMU spawn; guest milestones ${JSON.stringify(milestones)}`,
    );
    // No module to load (every driver is built in), then the agent, its listener for sshd, and
    // the network.
    expect(milestones.map((m) => m[0])).toEqual([
      "init-start",
      "modules-loaded",
      "agent-started",
      "sshd-started",
      "network-up",
    ]);
    for (let i = 1; i < milestones.length; i++)
      expect(milestones[i]![1]).toBeGreaterThanOrEqual(milestones[i - 1]![1]);

    const ssh = (cmd: string) =>
      run("ssh", [
        ...["-i", client.privateKeyPath, "-p", String(port), "-o", `UserKnownHostsFile=${knownHosts}`],
        ...["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"],
        ...["-F", "/dev/null", "root@127.0.0.1", cmd],
      ]);
    const t = performance.now();
    const r = await ssh("uname -r");
    console.log(`first ssh command: ${Math.round(performance.now() - t)} ms`);
    expect(r.stderr).toBe("");
    expect(r.stdout).toBe(`${manifest.kernelRelease}\n`);
    expect(r.code).toBe(0);

    const env = await ssh(
      "sh -lc 'echo \"$GREETING\"'; hostname; id -un; stat -c %a /etc/profile.d/smolvm_env.sh /root/.ssh/authorized_keys; ls /smolvm/config; readlink /dev/virtio-ports/org.smolvm.agent; cat /etc/resolv.conf; pidof smolvm-agent >/dev/null && echo agent-running; grep -c '^smolvm: [0-9]* ' /run/smolvm/milestones",
    );
    expect(env.stdout).toMatch(
      /^hello from env\nsmolvm-test\nroot\n600\n600\nauthorized_keys\nenv\nhostname\n\.\.\/vport\d+p1\nnameserver 10\.0\.2\.3\nagent-running\n5\n$/,
    );
    // The TSC rate the host passed is final (KERNEL_SOURCE_PATCHES): the kernel registers the TSC
    // clocksource while it boots, not a refinement a second later, after /init has started.
    const clock = await ssh(
      "dmesg | grep -e 'clocksource: tsc:' -e 'Switched to clocksource' -e 'Run /init'",
    );
    expect(clock.stdout.replace(/: mask: .*/g, "")).toBe(
      "clocksource: Switched to clocksource tsc-early\nclocksource: tsc\nclocksource: Switched to clocksource tsc\nRun /init as init process\n",
    );
    // The private host key and the agent secret do not linger in the config dir (listed above).
    expect((await ssh("exit 7")).code).toBe(7);

    // sftp-server works (file transfer).
    const local = join(vmDir, "payload.bin");
    writeFileSync(local, Buffer.from(Array.from({ length: 70_000 }, (_, i) => i & 0xff)));
    writeFileSync(
      join(vmDir, "batch"),
      `put ${local} /tmp/payload.bin\nget /tmp/payload.bin ${local}.back\n`,
    );
    const sftp = await run("sftp", [
      ...["-i", client.privateKeyPath, "-P", String(port), "-o", `UserKnownHostsFile=${knownHosts}`],
      ...[
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-F",
        "/dev/null",
        "-b",
        join(vmDir, "batch"),
      ],
      "root@127.0.0.1",
    ]);
    expect(sftp.code).toBe(0);
    expect(readFileSync(`${local}.back`).equals(readFileSync(local))).toBe(true);

    // A different host key is refused: the pin is real.
    const other = await generateHostKey();
    writeFileSync(knownHosts, knownHostsLine("127.0.0.1", port, other.publicKey));
    const refused = await ssh("true");
    expect(refused.code).toBe(255);
    expect(refused.stderr).toContain("REMOTE HOST IDENTIFICATION HAS CHANGED");

    qemu.kill("SIGKILL");
    await new Promise((r) => qemu!.once("exit", r));
    expect(qemu.exitCode !== null || qemu.signalCode !== null).toBe(true);
  }, 120_000);
});
