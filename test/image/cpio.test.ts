import { execFileSync } from "node:child_process";
import { lstatSync, mkdtempSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { ValidationError } from "../../src/errors.js";
import { buildVmConfigCpio, composeInitrd, writeCpio } from "../../src/image/cpio.js";

const dirs: string[] = [];
function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), "smolvm-cpio-"));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** Extracts with the real GNU cpio, as root keeps modes exactly (umask 0). */
function extract(archive: Buffer): string {
  const out = tmp();
  execFileSync("sh", ["-c", "umask 0; cpio -idm --quiet --no-absolute-filenames"], {
    cwd: out,
    input: archive,
  });
  return out;
}

const mode = (p: string) => lstatSync(p).mode & 0o7777;

describe("writeCpio / buildVmConfigCpio", () => {
  it("round-trips bytes and modes through cpio -idm", () => {
    const key = Buffer.from("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n");
    const binary = Buffer.from(Array.from({ length: 1027 }, (_, i) => (i * 37) & 0xff));
    const archive = buildVmConfigCpio([
      { path: "/smolvm/config/ssh_host_ed25519_key", mode: 0o600, data: key },
      { path: "smolvm/config/authorized_keys", mode: 0o644, data: "ssh-ed25519 AAAA test\n" },
      { path: "smolvm/config/blob", mode: 0o755, data: binary },
      { path: "smolvm/config/empty", mode: 0o400, data: "" },
    ]);
    expect(archive.length % 4).toBe(0);
    const out = extract(archive);
    expect(readFileSync(join(out, "smolvm/config/ssh_host_ed25519_key")).equals(key)).toBe(true);
    expect(mode(join(out, "smolvm/config/ssh_host_ed25519_key"))).toBe(0o600);
    expect(readFileSync(join(out, "smolvm/config/authorized_keys"), "utf8")).toBe("ssh-ed25519 AAAA test\n");
    expect(mode(join(out, "smolvm/config/authorized_keys"))).toBe(0o644);
    expect(readFileSync(join(out, "smolvm/config/blob")).equals(binary)).toBe(true);
    expect(mode(join(out, "smolvm/config/blob"))).toBe(0o755);
    expect(statSync(join(out, "smolvm/config/empty")).size).toBe(0);
    expect(mode(join(out, "smolvm/config/empty"))).toBe(0o400);
    // Parent directories carry secrets: 0700.
    expect(mode(join(out, "smolvm"))).toBe(0o700);
    expect(mode(join(out, "smolvm/config"))).toBe(0o700);
  });

  it("lists entries owned by root with the exact names (cpio -tv)", () => {
    const archive = writeCpio([
      { type: "dir", path: "etc", mode: 0o755 },
      { type: "file", path: "etc/x", mode: 0o640, data: "x" },
      { type: "symlink", path: "bin/sh", target: "busybox" },
    ]);
    const listing = execFileSync("cpio", ["-tv", "--quiet"], { input: archive }).toString();
    const lines = listing.trim().split("\n");
    expect(lines).toHaveLength(3);
    expect(lines[0]).toMatch(/^drwxr-xr-x\s+2 root\s+root\s+0 .* etc$/);
    expect(lines[1]).toMatch(/^-rw-r-----\s+1 root\s+root\s+1 .* etc\/x$/);
    expect(lines[2]).toMatch(/^lrwxrwxrwx\s+1 root\s+root\s+7 .* bin\/sh -> busybox$/);
  });

  it("writes symlinks and sticky/setuid bits", () => {
    const archive = writeCpio([
      { type: "dir", path: "tmp", mode: 0o1777 },
      { type: "dir", path: "bin", mode: 0o755 },
      { type: "file", path: "bin/busybox", mode: 0o4755, data: "#!/bin/true\n" },
      { type: "symlink", path: "bin/sh", target: "busybox" },
    ]);
    const out = extract(archive);
    expect(mode(join(out, "tmp"))).toBe(0o1777);
    expect(mode(join(out, "bin/busybox"))).toBe(0o4755);
    expect(readlinkSync(join(out, "bin/sh"))).toBe("busybox");
  });

  it("rejects paths escaping the root, NUL bytes and non-permission modes", () => {
    expect(() => buildVmConfigCpio([{ path: "../etc/passwd", mode: 0o600, data: "x" }])).toThrow(
      ValidationError,
    );
    expect(() => buildVmConfigCpio([{ path: "a/\0b", mode: 0o600, data: "x" }])).toThrow(ValidationError);
    expect(() => buildVmConfigCpio([{ path: "/", mode: 0o600, data: "x" }])).toThrow(ValidationError);
    expect(() => buildVmConfigCpio([{ path: "a", mode: 0o100600, data: "x" }])).toThrow(ValidationError);
    expect(() => writeCpio([{ type: "symlink", path: "a", target: "" }])).toThrow(ValidationError);
  });
});

describe("composeInitrd", () => {
  it("appends the config archive on a 4-byte boundary, mode 0600, base unchanged", async () => {
    const d = tmp();
    const base = join(d, "base.cpio");
    // An odd-length base (e.g. a compressed archive) still gets the config aligned.
    const baseBytes = Buffer.concat([
      writeCpio([{ type: "file", path: "init", mode: 0o755, data: "x" }]),
      Buffer.from("zz1"),
    ]);
    writeFileSync(base, baseBytes);
    const config = buildVmConfigCpio([{ path: "smolvm/config/env", mode: 0o600, data: "export A='1'\n" }]);
    const out = join(d, "vm", "..", "initrd.img");
    await composeInitrd(base, config, out);
    const composed = readFileSync(out);
    expect(composed.subarray(0, baseBytes.length).equals(baseBytes)).toBe(true);
    expect(composed.subarray(baseBytes.length, baseBytes.length + 1).equals(Buffer.alloc(1))).toBe(true);
    expect(composed.length).toBe(baseBytes.length + 1 + config.length);
    expect((baseBytes.length + 1) % 4).toBe(0);
    expect(composed.subarray(baseBytes.length + 1).equals(config)).toBe(true);
    expect(statSync(out).mode & 0o777).toBe(0o600);
  });

  it("fails on a missing base without leaving a temp file", async () => {
    const d = tmp();
    await expect(composeInitrd(join(d, "nope"), Buffer.alloc(4), join(d, "out"))).rejects.toMatchObject({
      code: "ENOENT",
    });
    expect(execFileSync("ls", ["-A", d]).toString()).toBe("");
  });
});
