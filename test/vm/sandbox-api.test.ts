/**
 * The sandbox API on one real microVM (tiny image, agent channel): vm.files, vm.processes and
 * vm.pty, labels and list filters; then SFTP files and the typed refusals on an SSH-only handle
 * of the same VM; and a TTL VM created by another host process that exits at once.
 */
import { execFile } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CommandExecutionUnavailableError, SmolVMError } from "../../src/errors.js";
import type { WatchEvent } from "../../src/vm/files.js";
import { SmolVM } from "../../src/vm/smolvm.js";

const WORKER = join(__dirname, "helpers/sandbox-worker.ts");

function worker(...args: string[]): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    execFile("node", ["--import", "tsx", WORKER, ...args], { timeout: 120_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${err.message}\n${stderr}`));
      else resolve(JSON.parse(stdout) as Record<string, unknown>);
    });
  });
}

async function until(what: string, cond: () => boolean | Promise<boolean>, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe("sandbox API on one microVM", () => {
  let dataDir: string;
  let vm: SmolVM;
  beforeAll(async () => {
    dataDir = mkdtempSync(join(tmpdir(), "smolvm-sandbox-"));
    vm = await SmolVM.create({ dataDir, memoryMib: 768, labels: { team: "infra", tier: "test" } });
  }, 240_000);
  afterAll(async () => {
    await vm?.delete();
    rmSync(dataDir, { recursive: true, force: true });
  });

  it("files: write, read, stat, exists, mkdir, list, rename, remove", async () => {
    const bin = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
    await vm.files.write("/work/a/b/bin.dat", bin, { mode: 0o600 });
    expect((await vm.files.read("/work/a/b/bin.dat", { encoding: "buffer" })).equals(bin)).toBe(true);
    await vm.files.write("/work/hello.txt", "héllo\n");
    expect(await vm.files.read("/work/hello.txt")).toBe("héllo\n");
    const st = await vm.files.stat("/work/a/b/bin.dat");
    expect(st).toMatchObject({
      name: "bin.dat",
      path: "/work/a/b/bin.dat",
      type: "file",
      size: 256,
      mode: 0o600,
    });
    expect(Math.abs(st.mtimeMs - Date.now())).toBeLessThan(120_000);
    expect(await vm.files.exists("/work/hello.txt")).toBe(true);
    expect(await vm.files.exists("/work/nope")).toBe(false);
    await vm.files.mkdir("/work/x/y/z", { recursive: true });
    await vm.files.mkdir("/work/x/y/z", { recursive: true });
    await expect(vm.files.mkdir("/work/x")).rejects.toMatchObject({ code: "FILE_EXISTS" });
    await vm.run("ln -s / /work/x/root-link");
    const top = await vm.files.list("/work");
    expect(top.map((e) => `${e.name}:${e.type}`).sort()).toEqual(["a:dir", "hello.txt:file", "x:dir"]);
    const deep = await vm.files.list("/work", { depth: 5 });
    expect(deep.map((e) => e.path).sort()).toEqual([
      "/work/a",
      "/work/a/b",
      "/work/a/b/bin.dat",
      "/work/hello.txt",
      "/work/x",
      "/work/x/root-link",
      "/work/x/y",
      "/work/x/y/z",
    ]);
    expect(deep.find((e) => e.name === "root-link")).toMatchObject({ type: "symlink", target: "/" });
    await vm.files.rename("/work/hello.txt", "/work/x/moved.txt");
    expect(await vm.files.exists("/work/hello.txt")).toBe(false);
    expect(await vm.files.read("/work/x/moved.txt")).toBe("héllo\n");
    await expect(vm.files.remove("/work/x")).rejects.toBeInstanceOf(SmolVMError);
    await vm.files.remove("/work/x", { recursive: true });
    expect(await vm.files.exists("/work/x")).toBe(false);
    expect((await vm.run("ls / | grep -c bin")).stdout.trim()).not.toBe("0"); // the symlink was not followed
    await expect(vm.files.read("/work/missing")).rejects.toMatchObject({ code: "FILE_NOT_FOUND" });
    await expect(vm.files.read("relative/path")).rejects.toMatchObject({ code: "VALIDATION" });
    expect((await vm.files.list("/")).some((e) => e.path === "/work" && e.type === "dir")).toBe(true);
  }, 60_000);

  it("files.watch sees a file that a run creates, coalesced, and close ends it", async () => {
    await vm.files.mkdir("/watched", { recursive: true });
    const events: WatchEvent[] = [];
    const w = await vm.files.watch("/watched", (ev) => events.push(ev), { recursive: true });
    await vm.run("mkdir /watched/sub && for i in 1 2 3 4 5; do echo $i >> /watched/sub/new.txt; done");
    await until("the create event", () =>
      events.some((e) => e.type === "create" && e.path === "/watched/sub/new.txt"),
    );
    await until("a modify event", () =>
      events.some((e) => e.type === "modify" && e.path === "/watched/sub/new.txt"),
    );
    expect(events.some((e) => e.type === "create" && e.path === "/watched/sub")).toBe(true);
    // five appends within one burst arrive as one modify
    expect(
      events.filter((e) => e.type === "modify" && e.path === "/watched/sub/new.txt").length,
    ).toBeLessThanOrEqual(2);
    await vm.run("mv /watched/sub/new.txt /watched/renamed.txt && rm /watched/renamed.txt");
    await until(
      "rename and delete",
      () =>
        events.some((e) => e.type === "rename") &&
        events.some((e) => e.type === "delete" && e.path === "/watched/renamed.txt"),
    );
    await w.close();
    await expect(w.ended).resolves.toBeUndefined();
  }, 60_000);

  it("files: a 64 MiB binary round trip streams within bounded host memory", async () => {
    const MiB = 1 << 20;
    const sent = createHash("sha256");
    const seed = randomBytes(MiB);
    let peak = 0;
    const base = process.memoryUsage().arrayBuffers + process.memoryUsage().heapUsed;
    const sample = setInterval(() => {
      const m = process.memoryUsage();
      peak = Math.max(peak, m.arrayBuffers + m.heapUsed - base);
    }, 20);
    try {
      const source = Readable.from(
        (function* () {
          for (let i = 0; i < 64; i++) {
            const chunk = Buffer.from(seed);
            chunk.writeUInt32BE(i, 0);
            sent.update(chunk);
            yield chunk;
          }
        })(),
      );
      await vm.files.write("/root/big.bin", source, { timeoutMs: 240_000 });
      const got = createHash("sha256");
      let n = 0;
      for await (const c of vm.files.readStream("/root/big.bin", { timeoutMs: 240_000 })) {
        got.update(c as Buffer);
        n += (c as Buffer).length;
      }
      expect(n).toBe(64 * MiB);
      expect(got.digest("hex")).toBe(sent.digest("hex"));
      expect((await vm.files.stat("/root/big.bin")).size).toBe(64 * MiB);
    } finally {
      clearInterval(sample);
    }
    expect(peak).toBeLessThan(40 * MiB);
    await vm.files.remove("/root/big.bin");
  }, 300_000);

  it("processes: start, stdout callbacks, stdin, wait, list", async () => {
    const seen: string[] = [];
    const p = await vm.processes.start("echo out; echo err >&2; exit 7", {
      onStdout: (d) => seen.push(d.toString()),
    });
    const r = await p.wait({ timeoutMs: 20_000 });
    expect(r).toMatchObject({ exitCode: 7, stdout: "out\n", stderr: "err\n" });
    expect(seen.join("")).toBe("out\n");
    const cat = await vm.processes.start("cat; echo done", { stdin: true, env: { X: "1" } });
    await cat.sendStdin("hello ");
    await cat.sendStdin(Buffer.from("world\n"));
    await cat.closeStdin();
    expect((await cat.wait({ timeoutMs: 20_000 })).stdout).toBe("hello world\ndone\n");
    const list = await vm.processes.list();
    expect(list.find((x) => x.pid === p.pid)).toMatchObject({
      running: false,
      exitCode: 7,
      command: "echo out; echo err >&2; exit 7",
    });
    expect(list.find((x) => x.pid === cat.pid)?.startedAt.getTime()).toBeGreaterThan(Date.now() - 120_000);
    const env = await vm.processes.start('printf "%s" "$X $PWD"', { env: { X: "a b" }, cwd: "/tmp" });
    expect((await env.wait({ timeoutMs: 20_000 })).stdout).toBe("a b /tmp");
  }, 60_000);

  it("processes: started by another host process, listed, re-attached with the missed output once, killed", async () => {
    await vm.close(); // the agent socket takes one host connection at a time
    const { pid } = (await worker(
      "start",
      dataDir,
      vm.id,
      "echo early-line; sleep 0.3; echo second-line; exec sleep 600",
    )) as { pid: number };
    expect(pid).toBeGreaterThan(1);
    await until("the worker to exit and its output", async () => {
      const l = await vm.processes.list();
      return l.some((x) => x.pid === pid && x.running);
    });
    await new Promise((r) => setTimeout(r, 800)); // both lines written while nobody is attached
    const out1: string[] = [];
    const h1 = await vm.processes.connect(pid, { onStdout: (d) => out1.push(d.toString()) });
    await until("the replay", () => out1.join("") === "early-line\nsecond-line\n");
    h1.detach();
    const out2: string[] = [];
    const h2 = await vm.processes.connect(pid, { onStdout: (d) => out2.push(d.toString()) });
    await new Promise((r) => setTimeout(r, 300));
    expect(out2.join("")).toBe(""); // replayed once only
    const all: string[] = [];
    const h3 = await vm.processes.connect(pid, { replay: "all", onStdout: (d) => all.push(d.toString()) });
    await until("replay all", () => all.join("") === "early-line\nsecond-line\n");
    await h2.kill();
    const r = await h2.wait({ timeoutMs: 10_000 });
    expect(r.signal).toBe("KILL");
    expect((await h3.wait({ timeoutMs: 10_000 })).signal).toBe("KILL");
    expect((await vm.processes.list()).find((x) => x.pid === pid)).toMatchObject({
      running: false,
      signal: "KILL",
    });
    expect((await vm.run(`kill -0 ${pid} 2>/dev/null; echo $?`)).stdout.trim()).toBe("1");
    await expect(vm.processes.connect(999_999)).rejects.toMatchObject({ code: "PROCESS_NOT_FOUND" });
  }, 120_000);

  it("processes: kill reaches the whole process group", async () => {
    const p = await vm.processes.start("sleep 300 & echo $! > /tmp/c1; sleep 301 & echo $! > /tmp/c2; wait");
    const alive = async () =>
      (await vm.run("for f in /tmp/c1 /tmp/c2; do kill -0 $(cat $f) 2>/dev/null && echo y; done")).stdout;
    await until("children", async () => (await alive()) === "y\ny\n");
    await p.kill("TERM");
    expect((await p.wait({ timeoutMs: 10_000 })).signal).toBe("TERM");
    await until("group gone", async () => (await alive()) === "");
  }, 60_000);

  it("pty: TERM, stty size follows resize, binary-safe input, exit code", async () => {
    let out = "";
    const t = await vm.pty.create({ cols: 80, rows: 24, onData: (d) => (out += d.toString("latin1")) });
    await t.write("echo T=$TERM; stty size\n");
    await until("TERM and size", () => out.includes("T=xterm-256color") && /\r\n24 80\r\n/.test(out));
    await t.resize({ cols: 132, rows: 40 });
    await t.write("stty size\n");
    await until("resized", () => /\r\n40 132\r\n/.test(out));
    await t.write("printf '%s\\n' \"$(printf '\\303\\251x' | od -An -tx1 | tr -d ' ')\"\n");
    await until("bytes", () => out.includes("c3a978"));
    await t.write("exit 3\n");
    expect(await t.wait({ timeoutMs: 10_000 })).toBe(3);
    const t2 = await vm.pty.create({ command: "sleep 100", onData: () => {} });
    await t2.kill();
    expect(await t2.wait({ timeoutMs: 10_000 })).toBe(137);
  }, 60_000);

  it("labels persist and filter list; status filters", async () => {
    expect(vm.labels).toEqual({ team: "infra", tier: "test" });
    const again = await SmolVM.fromId(vm.id, { dataDir });
    expect(again.labels).toEqual({ team: "infra", tier: "test" });
    await again.close();
    expect((await SmolVM.list({ dataDir, labels: { team: "infra" } })).map((v) => v.id)).toEqual([vm.id]);
    expect(await SmolVM.list({ dataDir, labels: { team: "web" } })).toEqual([]);
    expect((await SmolVM.list({ dataDir, status: "running" })).map((v) => v.id)).toContain(vm.id);
    expect(await SmolVM.list({ dataDir, status: "stopped", labels: { team: "infra" } })).toEqual([]);
    expect(vm.expiresAt).toBeNull();
    await vm.setTtl(3_600_000);
    expect(Math.abs(vm.expiresAt!.getTime() - (Date.now() + 3_600_000))).toBeLessThan(5_000);
    await vm.setTtl(null);
    expect(vm.expiresAt).toBeNull();
  });

  it("SSH-only handle: files over SFTP; processes and pty are typed refusals", async () => {
    await vm.close();
    const ssh = await SmolVM.fromId(vm.id, { dataDir, commChannel: "ssh" });
    try {
      await ssh.waitForSsh({ timeoutMs: 60_000 });
      const bin = randomBytes(200_000);
      await ssh.files.write("/sftp/d/x.bin", bin);
      expect((await ssh.files.read("/sftp/d/x.bin", { encoding: "buffer" })).equals(bin)).toBe(true);
      expect(await ssh.files.stat("/sftp/d/x.bin")).toMatchObject({
        type: "file",
        size: 200_000,
        mode: 0o644,
      });
      await ssh.files.mkdir("/sftp/e/f", { recursive: true });
      expect((await ssh.files.list("/sftp", { depth: 3 })).map((e) => e.path).sort()).toEqual([
        "/sftp/d",
        "/sftp/d/x.bin",
        "/sftp/e",
        "/sftp/e/f",
      ]);
      await ssh.files.rename("/sftp/d/x.bin", "/sftp/y.bin");
      expect(await ssh.files.exists("/sftp/d/x.bin")).toBe(false);
      await ssh.files.remove("/sftp", { recursive: true });
      expect(await ssh.files.exists("/sftp")).toBe(false);
      await expect(ssh.files.read("/nope")).rejects.toMatchObject({ code: "FILE_NOT_FOUND" });
      await expect(ssh.processes.start("true")).rejects.toBeInstanceOf(CommandExecutionUnavailableError);
      await expect(ssh.processes.list()).rejects.toBeInstanceOf(CommandExecutionUnavailableError);
      await expect(ssh.pty.create({ onData: () => {} })).rejects.toBeInstanceOf(
        CommandExecutionUnavailableError,
      );
      await expect(ssh.files.watch("/", () => {})).rejects.toBeInstanceOf(CommandExecutionUnavailableError);
    } finally {
      await ssh.close();
    }
  }, 120_000);

  it("diskMib caps tiny's writable RAM filesystems", async () => {
    await using small = await SmolVM.create({ dataDir, diskMib: 96, labels: { role: "disk" } });
    const mounts = await small.run(`awk '$2=="/" || $2=="/tmp" {print $2, $4}' /proc/mounts`);
    expect(
      mounts.stdout
        .trim()
        .split("\n")
        .map((l) => [l.split(" ")[0], /size=(\d+)k/.exec(l)?.[1]]),
    ).toEqual([
      ["/", "98304"],
      ["/tmp", "98304"],
    ]);
    const fill = await small.run("dd if=/dev/zero of=/root/fill bs=1M count=200 2>&1; echo rc=$?");
    expect(fill.stdout).toContain("No space left");
  }, 120_000);

  it("ttlMs: the VM is deleted within 3 s of expiry although its creator exited", async () => {
    const { id, expiresAt } = (await worker("create-ttl", dataDir, "4000")) as {
      id: string;
      expiresAt: number;
    };
    const vmDir = join(dataDir, "vms", id);
    expect(existsSync(vmDir)).toBe(true);
    expect((await SmolVM.list({ dataDir, labels: { role: "ttl" } })).map((v) => v.id)).toEqual([id]);
    await until(
      "the TTL VM to be deleted",
      async () => (await SmolVM.list({ dataDir, labels: { role: "ttl" } })).length === 0,
      30_000,
    );
    const goneAt = Date.now();
    expect(goneAt - expiresAt).toBeLessThan(3_000);
    expect(existsSync(vmDir)).toBe(false);
    expect((await SmolVM.list({ dataDir })).map((v) => v.id)).toEqual([vm.id]);
  }, 120_000);
});
