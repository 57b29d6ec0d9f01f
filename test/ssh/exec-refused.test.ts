/**
 * A refused exec request is treated like a refused channel open: the call waits and retries
 * under the adaptive limit while its deadline has time; refused with nothing else open, it is
 * the server's answer. The peer is a FAKE (an ssh2 Server): real servers refuse exec requests
 * only in timing races (dropbear before 2024.86 under load), which cannot be produced on demand.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SSHConnectionError } from "../../src/errors.js";
import { SSHClient } from "../../src/ssh/client.js";
import { EventCollector } from "../../src/ssh/events.js";
import { type HostileServer, startHostileServer } from "../fixtures/hostile-sshd.js";

let fake: HostileServer;
beforeAll(async () => {
  fake = await startHostileServer("refuse-exec-when-busy");
});
afterAll(async () => {
  await fake.close();
});

function client(events?: EventCollector): SSHClient {
  return new SSHClient({
    host: "127.0.0.1",
    port: fake.port,
    user: "anyone",
    password: "x",
    hostKey: { policy: "insecure" },
    events,
  });
}

describe("refused exec requests", () => {
  it("under load are waited out: 40 concurrent calls all succeed", async () => {
    fake.mode = "refuse-exec-when-busy";
    const refusedBefore = fake.refused;
    const events = new EventCollector();
    await using c = client(events);
    const rs = await Promise.all(
      Array.from({ length: 40 }, () => c.run("anything", { shell: "raw", timeoutMs: 20_000 })),
    );
    for (const r of rs) expect(r).toMatchObject({ exitCode: 0, stdout: "ran\n" });
    expect(fake.refused - refusedBefore).toBeGreaterThan(0);
    expect(
      events.getByType("EXEC").some((e) => e.data.phase === "refused" && e.data.request === "exec"),
    ).toBe(true);
  });

  it("refused with no other session open, a few times in a row, fail with SSHConnectionError", async () => {
    fake.mode = "refuse-exec";
    await using c = client();
    const t0 = performance.now();
    const err = await c.run("anything", { timeoutMs: 20_000 }).catch((e) => e);
    expect(err).toBeInstanceOf(SSHConnectionError);
    expect(err.details.reason).toBe("exec_refused");
    expect(performance.now() - t0).toBeLessThan(5000);
  });
});
