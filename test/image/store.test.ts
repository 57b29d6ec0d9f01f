import { execFileSync, spawn } from "node:child_process";
import {
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  truncateSync,
  utimesSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { progressLine } from "../../src/cli/progress-line.js";
import { ImageBuildError } from "../../src/errors.js";
import { ensureClientKey, generateHostKey } from "../../src/image/keys.js";
import { acquireLock, sweepDeadBuilds } from "../../src/image/lock.js";
import {
  describeArtifact,
  type ImageManifest,
  loadVerifiedManifest,
  writeManifest,
} from "../../src/image/manifest.js";
import { ProgressReporter } from "../../src/image/progress.js";

const dirs: string[] = [];
function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), "smolvm-img-"));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

async function fakeImage(): Promise<string> {
  const dir = tmp();
  writeFileSync(join(dir, "vmlinux"), Buffer.alloc(4096, 7));
  writeFileSync(join(dir, "initrd.cpio"), Buffer.alloc(10_000, 9));
  const m: ImageManifest = {
    name: "tiny",
    fingerprint: "f".repeat(64),
    dir,
    kernelPath: join(dir, "vmlinux"),
    initrdPath: join(dir, "initrd.cpio"),
    kernelRelease: "6.1.0-56-amd64",
    kernelCmdline: "console=ttyS0",
    artifacts: {
      kernel: await describeArtifact(dir, "vmlinux"),
      initrd: await describeArtifact(dir, "initrd.cpio"),
    },
    capabilities: { ssh: true, agent: false },
    packages: {},
    createdAt: new Date().toISOString(),
    buildMs: 1,
  };
  await writeManifest(dir, m);
  return dir;
}

describe("manifest verification", () => {
  it("loads an intact image and recomputes paths from its directory", async () => {
    const dir = await fakeImage();
    const m = await loadVerifiedManifest(dir);
    expect(m.initrdPath).toBe(join(dir, "initrd.cpio"));
    expect(m.artifacts.initrd.size).toBe(10_000);
  });

  it("rejects a truncated artifact", async () => {
    const dir = await fakeImage();
    await loadVerifiedManifest(dir);
    truncateSync(join(dir, "initrd.cpio"), 5000);
    await expect(loadVerifiedManifest(dir)).rejects.toMatchObject({
      name: "ImageBuildError",
      code: "IMAGE_CORRUPT",
    });
  });

  it("rejects a same-size corruption even after a successful verification", async () => {
    const dir = await fakeImage();
    await loadVerifiedManifest(dir);
    const p = join(dir, "vmlinux");
    const b = readFileSync(p);
    b[100] = 0;
    writeFileSync(p, b);
    utimesSync(p, new Date(), new Date(Date.now() + 5000)); // a different mtime, as any rewrite has
    const err = await loadVerifiedManifest(dir).catch((e) => e);
    expect(err).toBeInstanceOf(ImageBuildError);
    expect(err.code).toBe("IMAGE_CORRUPT");
    expect(err.message).toContain("sha256");
  });

  it("rejects a missing artifact and a missing or unparsable manifest", async () => {
    const dir = await fakeImage();
    rmSync(join(dir, "vmlinux"));
    await expect(loadVerifiedManifest(dir)).rejects.toMatchObject({ code: "IMAGE_CORRUPT" });
    const dir2 = await fakeImage();
    rmSync(join(dir2, "manifest.json"));
    await expect(loadVerifiedManifest(dir2)).rejects.toMatchObject({ code: "IMAGE_MISSING" });
    writeFileSync(join(dir2, "manifest.json"), '{"name":"tiny"');
    await expect(loadVerifiedManifest(dir2)).rejects.toMatchObject({ code: "IMAGE_CORRUPT" });
  });
});

describe("keys", () => {
  it("creates the client key once, 0600 in a 0700 dir, and returns it again", async () => {
    const data = tmp();
    const [a, b] = await Promise.all([ensureClientKey(data), ensureClientKey(data)]);
    expect(a).toEqual(b);
    expect(a.privateKeyPath).toBe(join(data, "keys", "id_ed25519"));
    expect(statSync(a.privateKeyPath).mode & 0o777).toBe(0o600);
    expect(statSync(join(data, "keys")).mode & 0o777).toBe(0o700);
    expect(a.publicKey).toMatch(/^ssh-ed25519 AAAA\S+ smolvm$/);
    // The public key belongs to the private key.
    const derived = execFileSync("ssh-keygen", ["-y", "-f", a.privateKeyPath]).toString().trim();
    expect(a.publicKey.startsWith(derived)).toBe(true);
    expect(await ensureClientKey(data)).toEqual(a);
    expect(
      execFileSync("ls", ["-A", join(data, "keys")])
        .toString()
        .trim()
        .split("\n"),
    ).toEqual(["id_ed25519", "id_ed25519.pub"]);
  });

  it("generates distinct host keys whose fingerprint matches ssh-keygen -l", async () => {
    const [k1, k2] = await Promise.all([generateHostKey(), generateHostKey()]);
    expect(k1.privateKeyPem).toMatch(/^-----BEGIN OPENSSH PRIVATE KEY-----\n/);
    expect(k1.publicKey).not.toBe(k2.publicKey);
    const d = tmp();
    writeFileSync(join(d, "k.pub"), `${k1.publicKey}\n`);
    const line = execFileSync("ssh-keygen", ["-l", "-E", "sha256", "-f", join(d, "k.pub")]).toString();
    expect(line.split(" ")[1]).toBe(k1.fingerprint);
  });
});

describe("build lock", () => {
  it("serializes holders and is released idempotently", async () => {
    const d = tmp();
    const path = join(d, "x.lock");
    const first = await acquireLock(path);
    let waited = 0;
    let gotSecond = false;
    const second = acquireLock(path, { pollMs: 20, onWait: (pid) => (waited = pid) }).then((l) => {
      gotSecond = true;
      return l;
    });
    await new Promise((r) => setTimeout(r, 100));
    expect(gotSecond).toBe(false);
    expect(waited).toBe(process.pid);
    await first.release();
    await first.release();
    const l2 = await second;
    await l2.release();
  });

  it("takes over a lock left by a dead process", async () => {
    const d = tmp();
    const path = join(d, "x.lock");
    const child = spawn("true");
    const deadPid = await new Promise<number>((r) => child.on("exit", () => r(child.pid!)));
    writeFileSync(path, `${deadPid} ${(await import("node:os")).hostname()}\n`);
    const l = await acquireLock(path, { pollMs: 10 });
    expect(readFileSync(path, "utf8").split(" ")[0]).toBe(String(process.pid));
    await l.release();
  });

  it("sweeps the temp dirs of builders that died, and only theirs", async () => {
    const d = tmp();
    const child = spawn("true");
    const deadPid = await new Promise<number>((r) => child.on("exit", () => r(child.pid!)));
    const dead = [`.build-tiny-${deadPid}-a1`, `.build-kernel-${deadPid}-1700000000000`];
    const kept = [`.build-kernel-${process.pid}-1700000000000`, "smolvm-6.1.192-3-abc", `.x-${deadPid}`];
    for (const n of [...dead, ...kept]) mkdirSync(join(d, n));
    await sweepDeadBuilds(d);
    expect(readdirSync(d).sort()).toEqual([...kept].sort());
  });

  it("gives up waiting when the signal fires", async () => {
    const d = tmp();
    const path = join(d, "x.lock");
    const held = await acquireLock(path);
    const started = Date.now();
    await expect(acquireLock(path, { signal: AbortSignal.timeout(150), pollMs: 20 })).rejects.toBeDefined();
    expect(Date.now() - started).toBeLessThan(1000);
    await held.release();
  });
});

describe("progress display", () => {
  // A stand-in for a terminal: the reporter only needs isTTY and write().
  function sink(isTTY: boolean) {
    const writes: string[] = [];
    return {
      stream: { isTTY, write: (s: string) => writes.push(s) } as unknown as NodeJS.WriteStream,
      writes,
    };
  }

  it("reports each step through onProgress; the CLI draws them as one updating line on a TTY", () => {
    const { stream, writes } = sink(true);
    const line = progressLine(stream);
    const seen: string[] = [];
    const p = new ProgressReporter("tiny", 3, (e) => {
      seen.push(`${e.index}/${e.total} ${e.step} ${e.done}`);
      line.onProgress(e);
    });
    p.begin("resolving");
    p.begin("unpacking");
    p.detail("unpacking: busybox");
    p.finish("built");
    line.close();
    expect(seen).toEqual([
      "1/3 resolving false",
      "2/3 unpacking false",
      "2/3 unpacking: busybox false",
      "3/3 built true",
    ]);
    expect(writes.every((w) => w.startsWith("\r\x1b[2K") || w === "\n")).toBe(true);
    expect(writes.at(-2)).toMatch(/^\r\x1b\[2Ksmolvm image tiny: \[3\/3\] built \(\d+\.\d+s\)$/);
    expect(writes.at(-1)).toBe("\n");
  });

  it("the progress line is silent when stderr is not a TTY", () => {
    const { stream, writes } = sink(false);
    const line = progressLine(stream);
    const p = new ProgressReporter("tiny", 2, line.onProgress);
    p.begin("a");
    p.finish();
    line.close();
    expect(writes).toEqual([]);
  });
});
