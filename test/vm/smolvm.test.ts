/**
 * The SmolVM facade against real microVMs (TCG here): lifecycle, commands, env, files,
 * forwards, cross-process re-attach, crash detection, and that nothing is left behind.
 */
import { execFile } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  CommandExecutionUnavailableError,
  OperationTimeoutError,
  ValidationError,
  VMNotFoundError,
  VMStateError,
} from "../../src/errors.js";
import { SmolVM } from "../../src/vm/smolvm.js";
import { VmStore } from "../../src/vm/store.js";
import { httpGet } from "../fixtures/http-get.js";
import { pgrepF } from "../fixtures/pgrep.js";

const pexec = promisify(execFile);
const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

describe("SmolVM on a real microVM", () => {
  let dataDir: string;
  let vm: SmolVM;
  let prevEnv: string | undefined;
  beforeAll(async () => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-facade-"));
    prevEnv = process.env.SMOLVM_DATA_DIR;
    process.env.SMOLVM_DATA_DIR = dataDir; // the second-process test reads it
    vm = await SmolVM.create({ dataDir, name: "facade", env: { BOOT_VAR: "from-create" } });
  }, 240_000);
  afterAll(async () => {
    await vm?.delete();
    if (prevEnv === undefined) delete process.env.SMOLVM_DATA_DIR;
    else process.env.SMOLVM_DATA_DIR = prevEnv;
    rmSync(dataDir, { recursive: true, force: true });
  });

  it("boots, reports its timings and runs the seed's examples", async () => {
    expect(vm.status).toBe("running");
    expect(vm.id).toMatch(/^vm-[0-9a-f]{12}$/);
    expect(vm.bootTimings!.channel).toBe("agent");
    expect(vm.bootTimings!.bootToChannelMs).toBeGreaterThan(0);
    const hello = await vm.run("echo 'Hello from SmolVM'");
    expect(hello.stdout).toBe("Hello from SmolVM\n");
    expect(hello.ok).toBe(true);
    expect((await vm.run("whoami", { shell: "raw" })).output).toBe("root");
    const r = await vm.run("ls /nonexistent");
    expect(r.ok).toBe(false);
    expect(r.exitCode).not.toBe(0);
    expect(r.stderr).toContain("nonexistent");
    expect((await vm.run("exit 42")).exitCode).toBe(42);
    await vm.run("mkdir -p /app/data && echo 'Hello World' > /app/data/test.txt");
    expect((await vm.run("cat /app/data/test.txt")).output).toBe("Hello World");
    expect((await vm.run("test -f /app/data/test.txt && echo exists")).output).toBe("exists");
  });

  it('runs the seed\'s "vsock" example: create({ commChannel: "vsock" }) boots on the agent', async () => {
    const v = await SmolVM.create({ dataDir, commChannel: "vsock" });
    try {
      expect(v.bootTimings!.channel).toBe("agent");
      expect((await v.run("uname -s; cat /proc/$PPID/comm", { shell: "raw" })).stdout).toBe(
        "Linux\nsmolvm-agent\n",
      );
    } finally {
      await v.delete();
    }
    expect(pgrepF(`${join(dataDir, "vms", v.id)}/`)).toEqual([]);
  }, 120_000);

  it("maps 2 MiB of a cached file per page fault (cheaper execs under emulation)", async () => {
    const r = await vm.run(
      "mount -t debugfs debugfs /sys/kernel/debug && cat /sys/kernel/debug/fault_around_bytes; umount /sys/kernel/debug",
      { shell: "raw" },
    );
    expect(r.stdout).toBe("2097152\n");
  });

  it("boots the guest CPU without byte-wise string ops, and the kernel finds no modprobe to run", async () => {
    // Only TCG's CPU is ours to shape; under KVM the guest sees the host's.
    const tcg = (await vm.run("grep -c 'QEMU TCG' /proc/cpuinfo", { shell: "raw" })).stdout === "1\n";
    const r = await vm.run(
      "grep -m1 -ow -e erms -e fsrm /proc/cpuinfo; test -e /sbin/modprobe || echo none; which modprobe",
      { shell: "raw" },
    );
    expect(r.stdout.replace(tcg ? /$^/ : /^(erms|fsrm)\n/, "")).toBe("none\n/usr/sbin/modprobe\n");
  });

  it("applies env vars in login mode but not in raw mode, and keeps values out of argv", async () => {
    expect((await vm.run("echo $BOOT_VAR")).output).toBe("from-create");
    await vm.setEnvVars({ API_KEY: "secret-123" });
    expect((await vm.run("echo $API_KEY", { shell: "login" })).output).toBe("secret-123");
    expect((await vm.run('echo "[$API_KEY]"', { shell: "raw" })).output).toBe("[]");
    expect(await vm.listEnvVars()).toEqual({ BOOT_VAR: "from-create", API_KEY: "secret-123" });
    expect((await vm.run("stat -c %a /etc/profile.d/smolvm_env.sh")).output).toBe("600");
    await vm.unsetEnvVars(["API_KEY"]);
    expect((await vm.run('echo "[$API_KEY]"')).output).toBe("[]");
    await expect(vm.setEnvVars({ "BAD-NAME": "x" })).rejects.toThrow(ValidationError);
  });

  it("times out a command, kills it in the guest, and keeps the partial output", async () => {
    const t0 = performance.now();
    const e = await vm.run("echo started; sleep 300 & sleep 301; wait", { timeoutMs: 1_500 }).catch((x) => x);
    const took = performance.now() - t0;
    expect(e).toBeInstanceOf(OperationTimeoutError);
    expect(e.partial.stdout).toBe("started\n");
    expect(took).toBeGreaterThan(1_400);
    expect(took).toBeLessThan(5_000);
    const left = await vm.run("ps -o pid,args | grep -c '[s]leep 30' || true", { shell: "raw" });
    expect(left.output).toBe("0");
  });

  it("round-trips a 16 MiB file with sha256", async () => {
    const dir = mkdtempSync(join(tmpdir(), "smolvm-files-"));
    try {
      const data = randomBytes(16 * 1024 * 1024);
      writeFileSync(join(dir, "up.bin"), data);
      await vm.uploadFile(join(dir, "up.bin"), "/tmp/data/up.bin");
      expect((await vm.run("sha256sum /tmp/data/up.bin")).stdout.split(" ")[0]).toBe(sha(data));
      await vm.downloadFile("/tmp/data/up.bin", join(dir, "down.bin"));
      expect(sha(readFileSync(join(dir, "down.bin")))).toBe(sha(data));
      await expect(vm.uploadFile(join(dir, "up.bin"), "../escape")).rejects.toThrow(ValidationError);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("exposes a guest server on a host port and removes the forward again", async () => {
    await vm.run(
      "mkdir -p /tmp/www && echo served-from-guest > /tmp/www/index.html && busybox httpd -p 8080 -h /tmp/www",
    );
    const hostPort = await vm.exposeLocal(8080);
    expect(await httpGet(hostPort)).toBe("served-from-guest\n");
    await vm.unexposeLocal(hostPort);
    await expect(httpGet(hostPort)).rejects.toThrow();
  });

  it("gives ready-to-paste OpenSSH commands that verify the pinned host key", async () => {
    await vm.waitForSsh({ timeoutMs: 60_000 });
    const cmds = vm.sshCommands();
    expect(cmds.ssh).toContain(`-p ${vm.sshPort} root@127.0.0.1`);
    const { stdout } = await pexec("/bin/sh", ["-c", `${cmds.ssh} -o BatchMode=yes echo via-openssh`]);
    expect(stdout).toBe("via-openssh\n");
    expect(vm.canRunCommands()).toBe(true);
    expect(vm.getIp()).toBe("127.0.0.1");
  });

  it("is reachable by id from another process", async () => {
    await vm.run("echo cross-process > /tmp/marker");
    const { stdout } = await pexec(
      "node",
      ["--import", "tsx", join(__dirname, "helpers/fromid-worker.ts"), vm.id, "cat /tmp/marker"],
      { env: { ...process.env, SMOLVM_DATA_DIR: dataDir }, timeout: 60_000 },
    );
    expect(JSON.parse(stdout)).toEqual({ status: "running", exitCode: 0, stdout: "cross-process\n" });
    const listed = await SmolVM.list({ dataDir });
    expect(listed.map((v) => [v.name, v.status])).toContainEqual(["facade", "running"]);
    await expect(SmolVM.fromId("no-such-vm", { dataDir })).rejects.toThrow(VMNotFoundError);
  });

  it("stops without leaving QEMU behind, refuses commands while stopped, and starts again", async () => {
    const marker = `${join(dataDir, "vms", vm.id)}/`;
    expect(pgrepF(marker)).toHaveLength(1);
    await vm.stop();
    expect(vm.status).toBe("stopped");
    expect(pgrepF(marker)).toEqual([]);
    expect(existsSync(join(marker, "qmp.sock"))).toBe(false);
    const store = VmStore.open(dataDir);
    expect(store.leases(vm.id)).toEqual([]);
    store.close();
    const t0 = performance.now();
    const e = await vm.run("true").catch((x) => x);
    expect(e).toBeInstanceOf(VMStateError);
    expect(e.message).toContain("stopped");
    expect(performance.now() - t0).toBeLessThan(500);
    await vm.start();
    expect((await vm.run("echo $BOOT_VAR")).output).toBe("from-create");
  }, 180_000);
});

describe("two VMs, crash detection and cleanup", () => {
  let dataDir: string;
  beforeAll(() => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-two-"));
  });
  afterAll(() => rmSync(dataDir, { recursive: true, force: true }));

  it("runs two VMs side by side, notices kill -9, and delete leaves nothing", async () => {
    const [a, b] = await Promise.all([SmolVM.create({ dataDir }), SmolVM.create({ dataDir })]);
    try {
      expect(a.sshPort).not.toBe(b.sshPort);
      expect(a.id).not.toBe(b.id);
      await a.run("echo a > /tmp/who");
      await b.run("echo b > /tmp/who");
      expect((await a.run("cat /tmp/who")).output).toBe("a");
      expect((await b.run("cat /tmp/who")).output).toBe("b");

      const pid = VmStore.open(dataDir).get(b.id)!.pid!;
      process.kill(pid, "SIGKILL");
      await new Promise((r) => setTimeout(r, 300));
      expect(b.status).toBe("crashed");
      const t0 = performance.now();
      const e = await b.run("true").catch((x) => x);
      expect(e).toBeInstanceOf(VMStateError);
      expect(e.code).toBe("VM_CRASHED");
      expect(performance.now() - t0).toBeLessThan(1_000);
      expect((await a.run("cat /tmp/who")).output).toBe("a");
    } finally {
      await a.delete();
      await b.delete();
    }
    const store = VmStore.open(dataDir);
    expect(store.list()).toEqual([]);
    expect(store.leases()).toEqual([]);
    store.close();
    expect(pgrepF(`${join(dataDir, "vms")}/`)).toEqual([]);
    expect(existsSync(join(dataDir, "vms", a.id))).toBe(false);
  }, 240_000);

  it("raises CommandExecutionUnavailableError with a remediation when the image has no channel", async () => {
    const store = VmStore.open(dataDir);
    store.insert({
      id: "vm-nochannel",
      name: "nochannel",
      image: "tiny",
      vmDir: join(dataDir, "vms", "vm-nochannel"),
      status: "running",
      pid: process.pid, // a live pid that is not QEMU: the facade must not trust it
      config: { capabilities: { ssh: false, agent: false } },
    });
    store.close();
    const vm = await SmolVM.fromId("nochannel", { dataDir });
    expect(vm.canRunCommands()).toBe(false);
    // its recorded pid is alive but not a QEMU of ours, so the record is not trusted
    expect(vm.status).toBe("stopped");
    const e = await vm.run("true").catch((x) => x);
    expect(e).toBeInstanceOf(CommandExecutionUnavailableError);
    expect(e.remediation).toContain("SmolVM.create");
    await vm.close();
  });

  it("validates create options before doing anything", async () => {
    await expect(SmolVM.create({ dataDir, memoryMib: 0 })).rejects.toThrow(ValidationError);
    await expect(SmolVM.create({ dataDir, name: "bad name!" })).rejects.toThrow(ValidationError);
    await expect(SmolVM.create({ dataDir, env: { "1X": "y" } })).rejects.toThrow(ValidationError);
    await expect(SmolVM.create({ dataDir, commChannel: "carrier-pigeon" as never })).rejects.toThrow(
      ValidationError,
    );
    expect((await SmolVM.list({ dataDir })).filter((v) => v.name !== "nochannel")).toEqual([]);
  });
});
