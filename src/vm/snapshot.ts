/**
 * Snapshots: a running VM captured so new VMs start from it in a fraction of a cold boot.
 *
 * A cold-booted VM's RAM is a shared file on tmpfs (VmLaunchSpec.memoryFile). Capture: QMP
 * `stop`, `migrate` to a file with x-ignore-shared (only device state is written: tens of KB),
 * a sparse copy of the RAM file and of debian's disk overlay, `cont`. Restore: a new QEMU with
 * the same devices and the snapshot's RAM file mapped private (copy-on-write: clones share its
 * pages until they write them), `-incoming defer`, `migrate-incoming` from the state file, `cont`.
 * A VM restored that way maps its RAM private, so x-ignore-shared cannot skip it: its capture
 * saves the device state alone (`xen-save-devices-state`) and makes the RAM file from its
 * snapshot's plus the pages its guest wrote (private-ram.ts); its clones load that state with
 * QEMU told to expect no configuration section.
 * The same mechanism serves templates (template.ts), fork and user snapshots. Identity (secret,
 * RNG, clock, hostname, host key) is made new by the caller after restore.
 */
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { chmod, link, mkdir, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { quoteSh } from "../command.js";
import { type Deadline, sleep } from "../common/deadline.js";
import { ValidationError, VMNotFoundError, VMStateError } from "../errors.js";
import { openPrivateRam, type PrivateRam } from "./private-ram.js";
import { QmpClient } from "./qmp.js";
import { checkVmConfig, type VmConfig } from "./vm-config.js";

export interface SnapshotInfo {
  id: string;
  name: string;
  /** The VM it was taken from. */
  vmId: string;
  image: string;
  createdAt: string;
  memoryMib: number;
  vcpus: number;
  /** Bytes on disk (RAM copy, device state, disk overlay, initrd). */
  sizeBytes: number;
}

/** What a restore needs besides the files: kept in snapshot.json next to them. */
export interface SnapshotMeta extends SnapshotInfo {
  /** VmRecord.config of the source, minus per-VM identity. */
  config: Omit<VmConfig, "hostPublicKey" | "clientKeyPath" | "restoredFrom">;
  /** How long the source's vCPUs were stopped for the capture. */
  pauseMs: number;
  /** True for a snapshot made by fork(): deleted with its last clone. */
  ephemeral?: boolean;
  /**
   * "devices": `state` holds device state only (xen-save-devices-state) and `memory` all of the
   * RAM; absent: `state` is a migration stream (with the RAM when there is no `memory`).
   */
  stateFormat?: "devices";
}

export const SNAPSHOT_ID_RE = /^snap-[0-9a-f]{12}$/;
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

/** The files of a snapshot directory. */
export function snapshotFiles(dir: string) {
  return {
    dir,
    meta: join(dir, "snapshot.json"),
    state: join(dir, "state"),
    memory: join(dir, "memory"),
    disk: join(dir, "disk.qcow2"),
    initrd: join(dir, "initrd.img"),
    agentSecret: join(dir, "agent_secret"),
  };
}

export function snapshotsDir(dataDir: string): string {
  return join(dataDir, "snapshots");
}

export function validateSnapshotName(name: string): void {
  if (!NAME_RE.test(name) || SNAPSHOT_ID_RE.test(name)) {
    throw new ValidationError(
      `snapshot name ${JSON.stringify(name)} is invalid: use 1-63 letters, digits, '.', '_' or '-' (and not the snap-<hex> id form).`,
    );
  }
}

function run(file: string, args: string[], signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(file, args, { signal, maxBuffer: 1 << 20 }, (err, _out, stderr) =>
      err
        ? reject(new VMStateError(`${file} failed: ${String(stderr).trim() || err.message}`, { cause: err }))
        : resolve(),
    );
  });
}

/** Copies a file keeping its holes: guest RAM is mostly never-touched pages. */
export function sparseCopy(from: string, to: string, signal?: AbortSignal): Promise<void> {
  return run("cp", ["--sparse=always", "--", from, to], signal);
}

/** Waits until QEMU's outgoing migration finished; throws on failure. */
async function migrationDone(qmp: QmpClient, deadline: Deadline): Promise<void> {
  for (;;) {
    const m = await qmp.execute<{ status?: string; "error-desc"?: string }>("query-migrate", undefined, {
      timeoutMs: deadline.remaining(5_000),
      signal: deadline.signal,
    });
    if (m.status === "completed") return;
    if (m.status === "failed" || m.status === "cancelled") {
      throw new VMStateError(`saving the VM's device state failed: ${m["error-desc"] ?? m.status}.`, {
        code: "SNAPSHOT_FAILED",
      });
    }
    await sleep(2, deadline.signal);
  }
}

export interface CaptureSource {
  qmpSocket: string;
  /**
   * A cold-booted VM's shared RAM file (copied while stopped). Without it (a VM that was itself
   * restored maps its RAM privately) the RAM travels in the state file instead.
   */
  ramFile?: string;
  /**
   * A restored VM's RAM: `file` (its snapshot's memory) mapped private by QEMU `pid`. The capture
   * copies the file and writes the guest's pages over it (private-ram.ts); without the right to
   * read QEMU's memory, the RAM travels in the state file instead.
   */
  privateRam?: { pid: number; file: string; sizeBytes: number };
  /** debian's overlay, captured as the snapshot's disk. */
  disk?: string;
  initrd: string;
  agentSecret: Buffer;
}

/**
 * Captures a running VM into `dir` (created here, 0700, files 0600). The vCPUs are stopped from
 * QMP `stop` until `cont`; the RAM copy happens inside that window so memory and disk are
 * consistent. Resolves with how long the guest was paused.
 */
export async function captureInto(
  dir: string,
  src: CaptureSource,
  meta: Omit<SnapshotMeta, "sizeBytes" | "pauseMs">,
  deadline: Deadline,
): Promise<SnapshotMeta> {
  const f = snapshotFiles(dir);
  const tmp = `${dir}.tmp-${randomBytes(4).toString("hex")}`;
  const t = snapshotFiles(tmp);
  await mkdir(tmp, { recursive: true, mode: 0o700 });
  let pauseMs = 0;
  let privateRam: PrivateRam | undefined;
  try {
    await writeFile(t.agentSecret, src.agentSecret, { mode: 0o600 });
    if (src.privateRam) {
      const { pid, file, sizeBytes } = src.privateRam;
      privateRam = await openPrivateRam(pid, file, sizeBytes);
      // The file never changes (clones map it): copied before the pause, only the guest's own
      // pages are written over it during it.
      if (privateRam) await sparseCopy(file, t.memory, deadline.signal);
    }
    // The initrd is part of what QEMU loads (its size shapes the firmware's tables): restores
    // boot "the same" machine, so they keep the source's initrd.
    await link(src.initrd, t.initrd).catch(() => sparseCopy(src.initrd, t.initrd, deadline.signal));
    const qmp = await QmpClient.connect(src.qmpSocket, {
      timeoutMs: deadline.remaining(5_000),
      signal: deadline.signal,
    });
    try {
      await qmp.execute(
        "migrate-set-capabilities",
        { capabilities: [{ capability: "x-ignore-shared", state: src.ramFile !== undefined }] },
        { timeoutMs: deadline.remaining(5_000) },
      );
      // QEMU's default cap is 32 MiB/s: a stream with the RAM in it would take seconds.
      await qmp.execute(
        "migrate-set-parameters",
        { "max-bandwidth": UNLIMITED_BANDWIDTH },
        { timeoutMs: deadline.remaining(5_000) },
      );
      const t0 = performance.now();
      await qmp.stop({ timeoutMs: deadline.remaining(5_000) });
      try {
        if (privateRam) {
          await qmp.execute(
            "xen-save-devices-state",
            { filename: t.state, live: false },
            { timeoutMs: deadline.remaining(5_000) },
          );
        } else {
          await qmp.execute(
            "migrate",
            { uri: `exec:cat > ${quoteSh(t.state)}` },
            { timeoutMs: deadline.remaining(5_000) },
          );
          await migrationDone(qmp, deadline);
        }
        await Promise.all([
          src.ramFile ? sparseCopy(src.ramFile, t.memory, deadline.signal) : undefined,
          privateRam?.writeDirtyPages(t.memory),
          src.disk ? sparseCopy(src.disk, t.disk, deadline.signal) : undefined,
        ]);
      } finally {
        await qmp.cont({ timeoutMs: 5_000 }).catch(() => {});
        pauseMs = Math.round(performance.now() - t0);
      }
    } finally {
      await qmp.close();
    }
    // QEMU created the state file itself (0660 less its umask).
    await chmod(t.state, 0o600);
    let sizeBytes = 0;
    for (const name of await readdir(tmp)) {
      const st = await stat(join(tmp, name));
      sizeBytes += st.blocks * 512;
    }
    const full: SnapshotMeta = {
      ...meta,
      sizeBytes,
      pauseMs,
      ...(privateRam ? { stateFormat: "devices" as const } : {}),
    };
    await writeFile(t.meta, `${JSON.stringify(full, null, 2)}\n`, { mode: 0o600 });
    await rename(tmp, f.dir);
    return full;
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    throw e;
  } finally {
    await privateRam?.close();
  }
}

/** migrate-set-parameters max-bandwidth, bytes/s: as fast as the host goes. */
const UNLIMITED_BANDWIDTH = 2 ** 40;

/**
 * After QEMU was started with `-incoming defer` and `-S`: loads the device state from `incomingUri`
 * (a migration URI such as `fd:3`) and, once `runnable`
 * settled (the VM's closed network table is in), runs the guest, on the QMP connection
 * launchQemu kept (closed here).
 */
export async function restoreFrom(
  qmp: QmpClient,
  incomingUri: string,
  ramInFile: boolean,
  deadline: Deadline,
  runnable: Promise<void> = Promise.resolve(),
): Promise<void> {
  try {
    await qmp.execute(
      "migrate-set-capabilities",
      { capabilities: [{ capability: "x-ignore-shared", state: ramInFile }] },
      { timeoutMs: deadline.remaining(5_000) },
    );
    await qmp.execute("migrate-incoming", { uri: incomingUri }, { timeoutMs: deadline.remaining(5_000) });
    for (;;) {
      const s = await qmp.queryStatus({ timeoutMs: deadline.remaining(5_000) });
      if (s.status !== "inmigrate") break;
      await sleep(2, deadline.signal);
    }
    const m = await qmp.execute<{ status?: string; "error-desc"?: string }>("query-migrate", undefined, {
      timeoutMs: deadline.remaining(5_000),
    });
    if (m.status === "failed") {
      throw new VMStateError(
        `restoring the snapshot's device state failed: ${m["error-desc"] ?? "unknown"}.`,
        {
          code: "SNAPSHOT_RESTORE_FAILED",
        },
      );
    }
    await deadline.race(runnable);
    await qmp.cont({ timeoutMs: deadline.remaining(5_000) });
  } finally {
    await qmp.close();
  }
}

export async function readSnapshotMeta(dir: string): Promise<SnapshotMeta> {
  const meta = JSON.parse(await readFile(snapshotFiles(dir).meta, "utf8")) as SnapshotMeta;
  if (
    !meta ||
    typeof meta.id !== "string" ||
    !SNAPSHOT_ID_RE.test(meta.id) ||
    typeof meta.config !== "object"
  ) {
    throw new VMStateError(`${dir} holds no valid snapshot.json.`, { code: "SNAPSHOT_DAMAGED" });
  }
  try {
    meta.config = checkVmConfig(meta.config, `snapshot ${meta.id}`, "Take the snapshot again.");
  } catch (cause) {
    throw new VMStateError(`${dir} holds a damaged snapshot.json: ${String(cause)}`, {
      code: "SNAPSHOT_DAMAGED",
      cause,
    });
  }
  for (const p of [snapshotFiles(dir).state, snapshotFiles(dir).initrd]) {
    if (!existsSync(p))
      throw new VMStateError(`snapshot ${meta.id} is missing ${p}.`, { code: "SNAPSHOT_DAMAGED" });
  }
  return meta;
}

/** Every user snapshot in the data dir (damaged ones are skipped). */
export async function listSnapshotMetas(dataDir: string): Promise<SnapshotMeta[]> {
  const dir = snapshotsDir(dataDir);
  const names = await readdir(dir).catch(() => [] as string[]);
  const out: SnapshotMeta[] = [];
  for (const n of names.filter((x) => SNAPSHOT_ID_RE.test(x)).sort()) {
    try {
      out.push(await readSnapshotMeta(join(dir, n)));
    } catch {
      // a snapshot being written or removed right now, or a damaged one
    }
  }
  return out.sort((a, b) => a.createdAt.localeCompare(b.createdAt));
}

/** Finds a snapshot by id or name. */
export async function findSnapshot(
  dataDir: string,
  idOrName: string,
): Promise<{ dir: string; meta: SnapshotMeta }> {
  if (SNAPSHOT_ID_RE.test(idOrName)) {
    const dir = join(snapshotsDir(dataDir), idOrName);
    if (existsSync(dir)) return { dir, meta: await readSnapshotMeta(dir) };
  } else {
    const hit = (await listSnapshotMetas(dataDir)).filter((m) => m.name === idOrName).pop();
    if (hit) return { dir: join(snapshotsDir(dataDir), hit.id), meta: hit };
  }
  throw new VMNotFoundError(
    `no snapshot named or with id ${JSON.stringify(idOrName)}: see SmolVM.listSnapshots() or \`smolvm snapshot list\`.`,
    { code: "SNAPSHOT_NOT_FOUND", details: { snapshot: idOrName } },
  );
}

export function newSnapshotId(): string {
  return `snap-${randomBytes(6).toString("hex")}`;
}

export function publicInfo(m: SnapshotMeta): SnapshotInfo {
  const { id, name, vmId, image, createdAt, memoryMib, vcpus, sizeBytes } = m;
  return { id, name, vmId, image, createdAt, memoryMib, vcpus, sizeBytes };
}
