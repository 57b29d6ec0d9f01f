import { mkdtempSync, rmSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { OperationTimeoutError, ProtocolError, QmpCommandError, VMStateError } from "../../src/errors.js";
import { launchQemu, stopQemu } from "../../src/vm/process.js";
import { LineSplitter, MAX_LINE_BYTES, parseQmpLine, QmpClient, type QmpEvent } from "../../src/vm/qmp.js";
import { type PausedVmDir, pausedVmSpec, pgrep } from "./helpers/paused-vm.js";

describe("QMP codec", () => {
  it("parses greetings, returns, errors and events", () => {
    expect(
      parseQmpLine(
        '{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}',
      ),
    ).toMatchObject({ kind: "greeting" });
    expect(parseQmpLine('{"return": {}, "id": "smolvm-1"}')).toEqual({
      kind: "return",
      id: "smolvm-1",
      value: {},
    });
    expect(parseQmpLine('{"error": {"class": "GenericError", "desc": "nope"}, "id": "x"}')).toEqual({
      kind: "error",
      id: "x",
      errorClass: "GenericError",
      desc: "nope",
    });
    expect(parseQmpLine('{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}')).toEqual({
      kind: "event",
      event: { event: "STOP", data: {}, timestamp: { seconds: 1, microseconds: 2 } },
    });
  });

  it.each([
    ["not JSON", "hello"],
    ["an array", "[1,2]"],
    ["a number", "42"],
    ["a bad greeting", '{"QMP": 1}'],
    ["an error without class", '{"error": {"desc": "x"}}'],
    ["an event without a name", '{"event": 5}'],
    ["an unknown object", '{"foo": 1}'],
  ])("rejects %s with ProtocolError", (_what, line) => {
    expect(() => parseQmpLine(line)).toThrow(ProtocolError);
  });

  it("splits lines across chunks and bounds their length", () => {
    const s = new LineSplitter(10);
    expect(s.push('{"a"')).toEqual([]);
    expect(s.push(':1}\r\n\n{"b":2}\n{')).toEqual(['{"a":1}', '{"b":2}']);
    expect(() => s.push("x".repeat(11))).toThrow(ProtocolError);
    expect(() => new LineSplitter(10).push(`${"y".repeat(11)}\n`)).toThrow(ProtocolError);
    expect(MAX_LINE_BYTES).toBe(1024 * 1024);
  });
});

describe("QmpClient against a real QEMU", () => {
  let vm: PausedVmDir;
  let pid: number;
  beforeAll(async () => {
    vm = await pausedVmSpec();
    pid = (await launchQemu(vm.spec)).pid;
  });
  afterAll(async () => {
    await stopQemu({ pid, qmpSocketPath: vm.spec.qmpSocketPath }, { force: true });
    expect(pgrep(vm.dir)).toEqual([]);
    vm.cleanup();
  });

  it("reads the greeting and runs typed commands", async () => {
    await using qmp = await QmpClient.connect(vm.spec.qmpSocketPath, { timeoutMs: 5_000 });
    expect(qmp.greeting.version.qemu.major).toBeGreaterThanOrEqual(7);
    expect(await qmp.queryStatus()).toMatchObject({ status: "prelaunch", running: false });
    const name = await qmp.execute<{ name: string }>("query-name");
    expect(name).toEqual({ name: vm.spec.name });
  });

  it("maps QMP errors to QmpCommandError with class and desc", async () => {
    await using qmp = await QmpClient.connect(vm.spec.qmpSocketPath);
    const e1 = await qmp.execute<never>("no-such-command").catch((e: QmpCommandError) => e);
    expect(e1).toBeInstanceOf(QmpCommandError);
    expect(e1.errorClass).toBe("CommandNotFound");
    expect(e1.code).toBe("QMP_COMMAND");
    const e2 = await qmp.execute<never>("query-status", { bogus: 1 }).catch((e: QmpCommandError) => e);
    expect(e2).toBeInstanceOf(QmpCommandError);
    expect(e2.errorClass).toBe("GenericError");
    // The connection survives command errors.
    expect((await qmp.queryStatus()).running).toBe(false);
  });

  it("delivers events through the iterator and waitForEvent", async () => {
    await using qmp = await QmpClient.connect(vm.spec.qmpSocketPath);
    const seen: QmpEvent[] = [];
    qmp.on("event", (e) => seen.push(e));
    await qmp.cont();
    await qmp.stop();
    await qmp.systemPowerdown();
    const it = qmp.events()[Symbol.asyncIterator]();
    const names: string[] = [];
    for (let i = 0; i < 3; i++) names.push((await it.next()).value!.event);
    expect(names).toEqual(["RESUME", "STOP", "POWERDOWN"]);
    expect(seen.map((e) => e.event)).toEqual(["RESUME", "STOP", "POWERDOWN"]);
    expect(seen[0]!.timestamp.seconds).toBeGreaterThan(1_600_000_000);
    await expect(qmp.waitForEvent("SHUTDOWN", { timeoutMs: 100 })).rejects.toBeInstanceOf(
      OperationTimeoutError,
    );
    await it.return?.(undefined);
  });

  it("close is idempotent and later calls fail clearly", async () => {
    const qmp = await QmpClient.connect(vm.spec.qmpSocketPath);
    await qmp.close();
    await qmp.close();
    expect(qmp.isClosed).toBe(true);
    await expect(qmp.queryStatus()).rejects.toMatchObject({ code: "QMP_CLOSED" });
  });

  it("validates command names and hostfwd ports", async () => {
    await using qmp = await QmpClient.connect(vm.spec.qmpSocketPath);
    await expect(qmp.execute('x"}\n{"execute":"quit"')).rejects.toMatchObject({ code: "VALIDATION" });
    await expect(qmp.hostfwdAdd(0, 22)).rejects.toMatchObject({ code: "VALIDATION" });
    await expect(qmp.hostfwdRemove(70000)).rejects.toMatchObject({ code: "VALIDATION" });
  });
});

describe("QmpClient quit", () => {
  it("quit ends QEMU with a SHUTDOWN event and closes the connection", async () => {
    const vm = await pausedVmSpec();
    const { pid } = await launchQemu(vm.spec);
    try {
      const qmp = await QmpClient.connect(vm.spec.qmpSocketPath);
      const closed = new Promise((r) => qmp.once("close", r));
      await qmp.quit();
      await closed;
      expect(qmp.isClosed).toBe(true);
      await expect(qmp.queryStatus()).rejects.toBeInstanceOf(VMStateError);
    } finally {
      await stopQemu({ pid, qmpSocketPath: vm.spec.qmpSocketPath }, { force: true });
      expect(pgrep(vm.dir)).toEqual([]);
      vm.cleanup();
    }
  });
});

// QEMU never misbehaves on purpose, so a hostile monitor is a local unix server we script.
describe("QmpClient against a hostile peer", () => {
  let dir: string;
  let server: Server;
  let script: (sock: Socket) => void;
  const sockets = new Set<Socket>();
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "smolvm-qmp-"));
    server = createServer((s) => {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => {});
      script(s);
    });
    await new Promise<void>((r) => server.listen(join(dir, "q.sock"), r));
  });
  afterEach(() => {
    for (const s of sockets) s.destroy();
  });
  afterAll(async () => {
    await new Promise((r) => server.close(r));
    rmSync(dir, { recursive: true, force: true });
  });
  const GREETING =
    '{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}\n';
  const path = () => join(dir, "q.sock");
  /** Greets, acknowledges capabilities, then hands each later command line to `after`. */
  function greeter(after: (s: Socket, line: string) => void) {
    return (s: Socket) => {
      s.write(GREETING);
      let n = 0;
      const split = new LineSplitter();
      s.on("data", (d) => {
        for (const line of split.push(d.toString())) {
          const id = JSON.parse(line).id;
          if (n++ === 0) s.write(`{"return": {}, "id": ${JSON.stringify(id)}}\n`);
          else after(s, line);
        }
      });
    };
  }

  it("rejects a peer that does not greet", async () => {
    script = (s) => s.write("SSH-2.0-OpenSSH\n");
    await expect(QmpClient.connect(path(), { timeoutMs: 2_000 })).rejects.toBeInstanceOf(ProtocolError);
  });

  it("times out on a silent peer", async () => {
    script = () => {};
    const t0 = performance.now();
    await expect(QmpClient.connect(path(), { timeoutMs: 300 })).rejects.toBeInstanceOf(OperationTimeoutError);
    expect(performance.now() - t0).toBeLessThan(1_500);
  });

  it("times out a command the peer never answers, and ignores its late reply", async () => {
    let late: (() => void) | undefined;
    script = greeter((s, line) => {
      const id = JSON.parse(line).id;
      late = () =>
        s.write(`{"return": {"status": "running", "running": true}, "id": ${JSON.stringify(id)}}\n`);
    });
    await using qmp = await QmpClient.connect(path());
    await expect(qmp.queryStatus({ timeoutMs: 200 })).rejects.toBeInstanceOf(OperationTimeoutError);
    late!();
    await new Promise((r) => setTimeout(r, 50));
    expect(qmp.isClosed).toBe(false);
  });

  it.each([
    ["a line that is not JSON", "garbage\n"],
    ["a reply to an id never sent", '{"return": {}, "id": "other-1"}\n'],
    ["a second greeting", GREETING],
    ["an over-long line", `{"return": "${"A".repeat(MAX_LINE_BYTES + 10)}"}\n`],
  ])("fails pending commands with ProtocolError on %s", async (_what, reply) => {
    script = greeter((s) => s.write(reply));
    const qmp = await QmpClient.connect(path());
    const err = await qmp.queryStatus({ timeoutMs: 5_000 }).catch((e) => e);
    expect(err).toBeInstanceOf(ProtocolError);
    expect(qmp.isClosed).toBe(true);
    await qmp.close();
  });

  it("aborts a command through the caller's signal", async () => {
    script = greeter(() => {});
    await using qmp = await QmpClient.connect(path());
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 50);
    await expect(qmp.queryStatus({ signal: ac.signal })).rejects.toMatchObject({ code: "ABORTED" });
  });
});
