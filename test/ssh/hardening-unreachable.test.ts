/**
 * HostUnreachableError for real, without sending a packet anywhere: SSHClient runs in a fresh
 * network namespace whose only interface is loopback, so the kernel itself refuses the connect
 * (ENETUNREACH with no route, EHOSTUNREACH with an `unreachable` route) before anything is sent.
 */
import { execFile } from "node:child_process";
import { fileURLToPath, pathToFileURL } from "node:url";
import { promisify } from "node:util";
import { describe, expect, it } from "vitest";

const run = promisify(execFile);
const root = fileURLToPath(new URL("../../", import.meta.url));
const clientModule = pathToFileURL(`${root}src/ssh/client.ts`).href;
const errorsModule = pathToFileURL(`${root}src/errors.ts`).href;

/** Runs in the namespace: tries each host, prints one JSON line per attempt. */
const probe = `
import { SSHClient } from ${JSON.stringify(clientModule)};
import { HostUnreachableError } from ${JSON.stringify(errorsModule)};
for (const host of process.argv.slice(1)) {
  const client = new SSHClient({ host, port: 22, user: "nobody", password: "x",
    hostKey: { policy: "insecure" }, connectTimeoutMs: 5000 });
  const t0 = performance.now();
  try {
    await client.run("true", { timeoutMs: 8000 });
    console.log(JSON.stringify({ host, ok: true }));
  } catch (e) {
    console.log(JSON.stringify({ host, name: e.name, unreachable: e instanceof HostUnreachableError,
      code: e.code, errno: e.details?.errno, ms: performance.now() - t0, message: e.message }));
  } finally {
    await client.close();
  }
}
`;

describe("HostUnreachableError", () => {
  it("is what an unroutable host gives, in under 1 s, inside a loopback-only namespace", async () => {
    // 192.0.2.0/24 and 198.51.100.0/24 are documentation ranges (RFC 5737); here they are only
    // routes inside the namespace, which has no interface but lo.
    const script = [
      "ip link set lo up",
      "ip route add unreachable 192.0.2.0/24",
      "echo LINKS $(ip -o link show | awk -F': ' '{print $2}')",
      `exec node --import tsx --input-type=module -e "$PROBE" 192.0.2.7 198.51.100.7`,
    ].join(" && ");
    const { stdout } = await run("unshare", ["--net", "sh", "-c", script], {
      cwd: root,
      env: { ...process.env, PROBE: probe },
      timeout: 60_000,
    });
    const lines = stdout.trim().split("\n");
    // Nothing can leave: loopback is the namespace's only link.
    expect(lines[0]).toBe("LINKS lo");
    const results = lines.slice(1).map((l) => JSON.parse(l));
    expect(results).toHaveLength(2);
    const [viaRoute, noRoute] = results;
    expect(viaRoute).toMatchObject({
      host: "192.0.2.7",
      name: "HostUnreachableError",
      unreachable: true,
      code: new (await import("../../src/errors.js")).HostUnreachableError("x").code,
      errno: "EHOSTUNREACH",
    });
    expect(noRoute).toMatchObject({ host: "198.51.100.7", unreachable: true, errno: "ENETUNREACH" });
    for (const r of results) {
      expect(r.ms).toBeLessThan(1000);
      expect(r.message).toContain(`${r.host}:22 is unreachable`);
    }
  }, 60_000);
});
