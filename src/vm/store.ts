/**
 * VM state shared by every smolvm process on the host: SQLite (WAL, busy timeout) at
 * <dataDir>/state.db. Every write is a short IMMEDIATE transaction, so concurrent processes queue
 * on the lock instead of failing with SQLITE_BUSY, and a port lease is taken atomically (the port
 * is the primary key).
 */
import { existsSync } from "node:fs";
import { basename, join } from "node:path";
import Database from "better-sqlite3";
import { ensureDataDir, ensurePrivateFile } from "../common/data-dir.js";
import { SmolVMError, ValidationError, VMNotFoundError } from "../errors.js";
import { isQemuAlive } from "./process.js";
import { parseVmConfig, type VmConfig } from "./vm-config.js";

export type VmStatus = "creating" | "running" | "paused" | "stopped" | "crashed";

export interface PortMapping {
  hostPort: number;
  guestPort: number;
}

export interface VmRecord {
  id: string;
  name: string;
  status: VmStatus;
  image: string;
  /** Settings and launch inputs, validated when read (see vm-config.ts). */
  config: VmConfig;
  pid: number | null;
  sshPort: number | null;
  ports: PortMapping[];
  channel: string | null;
  vmDir: string;
  hostKeyFingerprint: string | null;
  /** User labels (filter SmolVM.list by them). */
  labels: Record<string, string>;
  /** When the TTL reaper deletes the VM (epoch ms), or null. */
  expiresAt: number | null;
  createdAt: string;
  updatedAt: string;
}

/** The fields a caller may set; the rest (timestamps) the store keeps itself. */
type SettableField =
  | "status"
  | "config"
  | "pid"
  | "sshPort"
  | "ports"
  | "channel"
  | "hostKeyFingerprint"
  | "labels"
  | "expiresAt";

export type NewVm = Pick<VmRecord, "id" | "name" | "image" | "vmDir"> &
  Partial<Pick<VmRecord, SettableField>>;

/** A record's settable fields, and its name (a pool hands a standby out under the caller's). */
export type VmPatch = Partial<Pick<VmRecord, SettableField | "name">>;

export interface PortLease {
  port: number;
  vmId: string;
  purpose: string;
  createdAt: string;
}

export interface ReconcileChange {
  id: string;
  name: string;
  from: VmStatus;
  to: VmStatus;
  pid: number;
}

/** The files of one VM inside its directory; the store and the runtime agree on them. */
export function vmFiles(vmDir: string) {
  return {
    qmpSocket: join(vmDir, "qmp.sock"),
    pidfile: join(vmDir, "qemu.pid"),
    serialLog: join(vmDir, "serial.log"),
    qemuLog: join(vmDir, "qemu.log"),
    agentSocket: join(vmDir, "agent.sock"),
    /** The host's copy of the agent secret (0600). */
    agentSecret: join(vmDir, "agent_secret"),
    /** Who holds the agent socket (agent-lock.ts). */
    agentLock: join(vmDir, "agent.lock"),
    /**
     * Guest RAM of a VM booted cold: a shared file on tmpfs, so a snapshot can copy it while the
     * vCPUs are stopped. Removed when QEMU stops.
     */
    ramFile: `/dev/shm/smolvm-${basename(vmDir)}.ram`,
    /** Substring of QEMU's command line proving a pid is this VM's QEMU. */
    marker: `${vmDir}/`,
  };
}

const SCHEMA_VERSION = 2;
const STATUSES: readonly VmStatus[] = ["creating", "running", "paused", "stopped", "crashed"];

const MIGRATIONS: Record<number, string> = {
  1: `
    CREATE TABLE vms (
      id TEXT PRIMARY KEY,
      name TEXT NOT NULL UNIQUE,
      status TEXT NOT NULL,
      image TEXT NOT NULL,
      config TEXT NOT NULL DEFAULT '{}',
      pid INTEGER,
      ssh_port INTEGER,
      ports TEXT NOT NULL DEFAULT '[]',
      channel TEXT,
      vm_dir TEXT NOT NULL,
      host_key_fingerprint TEXT,
      created_at TEXT NOT NULL,
      updated_at TEXT NOT NULL
    );
    CREATE TABLE port_leases (
      port INTEGER PRIMARY KEY,
      vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
      purpose TEXT NOT NULL,
      created_at TEXT NOT NULL
    );
    CREATE INDEX port_leases_vm ON port_leases(vm_id);
  `,
  2: `
    ALTER TABLE vms ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE vms ADD COLUMN expires_at INTEGER;
    CREATE INDEX vms_expires_at ON vms(expires_at) WHERE expires_at IS NOT NULL;
  `,
};

interface Row {
  id: string;
  name: string;
  status: string;
  image: string;
  config: string;
  pid: number | null;
  ssh_port: number | null;
  ports: string;
  channel: string | null;
  vm_dir: string;
  host_key_fingerprint: string | null;
  labels: string;
  expires_at: number | null;
  created_at: string;
  updated_at: string;
}

function fromRow(r: Row): VmRecord {
  return {
    id: r.id,
    name: r.name,
    status: r.status as VmStatus,
    image: r.image,
    config: parseVmConfig(r.config, `VM ${r.id} (in the state database)`),
    pid: r.pid,
    sshPort: r.ssh_port,
    ports: JSON.parse(r.ports) as PortMapping[],
    channel: r.channel,
    vmDir: r.vm_dir,
    hostKeyFingerprint: r.host_key_fingerprint,
    labels: JSON.parse(r.labels) as Record<string, string>,
    expiresAt: r.expires_at,
    createdAt: r.created_at,
    updatedAt: r.updated_at,
  };
}

function checkStatus(s: unknown): void {
  if (!STATUSES.includes(s as VmStatus)) {
    throw new ValidationError(`VM status must be one of ${STATUSES.join(", ")}, got ${JSON.stringify(s)}.`);
  }
}

function isSqliteConstraint(e: unknown, kind: "UNIQUE" | "PRIMARYKEY"): boolean {
  return (e as { code?: string })?.code === `SQLITE_CONSTRAINT_${kind}`;
}

export interface OpenOptions {
  /** How long a writer waits for another process's lock. Default 10 s. */
  busyTimeoutMs?: number;
}

export class VmStore {
  private closed = false;

  private constructor(
    private readonly db: Database.Database,
    readonly path: string,
  ) {}

  static open(dataDir: string, options: OpenOptions = {}): VmStore {
    ensureDataDir(dataDir);
    const path = join(dataDir, "state.db");
    // 0600 before SQLite opens it: its -wal and -shm files take the main file's mode.
    ensurePrivateFile(path, [`${path}-wal`, `${path}-shm`]);
    let db: Database.Database;
    try {
      db = new Database(path, { timeout: options.busyTimeoutMs ?? 10_000 });
    } catch (cause) {
      throw new SmolVMError(
        `Cannot open the smolvm state database ${path}: check the data dir's permissions.`,
        {
          code: "STATE_DB",
          cause,
          details: { path },
        },
      );
    }
    try {
      db.pragma("journal_mode = WAL");
      db.pragma("synchronous = NORMAL");
      db.pragma("foreign_keys = ON");
      const store = new VmStore(db, path);
      store.migrate();
      return store;
    } catch (e) {
      db.close();
      throw e;
    }
  }

  private migrate(): void {
    const current = this.db.pragma("user_version", { simple: true }) as number;
    if (current > SCHEMA_VERSION) {
      throw new SmolVMError(
        `${this.path} has schema version ${current}, newer than this smolvm understands (${SCHEMA_VERSION}): upgrade smolvm or use another SMOLVM_DATA_DIR.`,
        { code: "STATE_DB_TOO_NEW", details: { current, supported: SCHEMA_VERSION } },
      );
    }
    if (current === SCHEMA_VERSION) return;
    this.db
      .transaction(() => {
        // Re-read under the write lock: another process may have migrated meanwhile.
        let v = this.db.pragma("user_version", { simple: true }) as number;
        while (v < SCHEMA_VERSION) {
          v++;
          this.db.exec(MIGRATIONS[v]!);
          this.db.pragma(`user_version = ${v}`);
        }
      })
      .immediate();
  }

  get schemaVersion(): number {
    return this.db.pragma("user_version", { simple: true }) as number;
  }

  insert(vm: NewVm): VmRecord {
    const status = vm.status ?? "creating";
    checkStatus(status);
    const now = new Date().toISOString();
    try {
      this.db
        .prepare(
          `INSERT INTO vms (id, name, status, image, config, pid, ssh_port, ports, channel, vm_dir,
             host_key_fingerprint, labels, expires_at, created_at, updated_at)
           VALUES (@id, @name, @status, @image, @config, @pid, @sshPort, @ports, @channel, @vmDir,
             @hostKeyFingerprint, @labels, @expiresAt, @now, @now)`,
        )
        .run({
          id: vm.id,
          name: vm.name,
          status,
          image: vm.image,
          config: JSON.stringify(vm.config ?? {}),
          pid: vm.pid ?? null,
          sshPort: vm.sshPort ?? null,
          ports: JSON.stringify(vm.ports ?? []),
          channel: vm.channel ?? null,
          vmDir: vm.vmDir,
          hostKeyFingerprint: vm.hostKeyFingerprint ?? null,
          labels: JSON.stringify(vm.labels ?? {}),
          expiresAt: vm.expiresAt ?? null,
          now,
        });
    } catch (e) {
      if (isSqliteConstraint(e, "UNIQUE") || isSqliteConstraint(e, "PRIMARYKEY")) {
        throw new ValidationError(
          `A VM named ${JSON.stringify(vm.name)} (or with id ${vm.id}) already exists: pick another name or delete it first.`,
          { code: "VM_NAME_TAKEN", cause: e, details: { name: vm.name, id: vm.id } },
        );
      }
      throw e;
    }
    return this.get(vm.id)!;
  }

  /** By id, else by name. */
  get(idOrName: string): VmRecord | undefined {
    const row = this.db
      .prepare("SELECT * FROM vms WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1")
      .get(idOrName, idOrName, idOrName) as Row | undefined;
    return row ? fromRow(row) : undefined;
  }

  /** Like get, but a missing VM is a VMNotFoundError. */
  require(idOrName: string): VmRecord {
    const vm = this.get(idOrName);
    if (!vm) {
      throw new VMNotFoundError(
        `No VM with id or name ${JSON.stringify(idOrName)}: list VMs with SmolVM.list().`,
        {
          details: { idOrName },
        },
      );
    }
    return vm;
  }

  list(): VmRecord[] {
    return (this.db.prepare("SELECT * FROM vms ORDER BY created_at, id").all() as Row[]).map(fromRow);
  }

  update(id: string, patch: VmPatch): VmRecord {
    if (patch.status !== undefined) checkStatus(patch.status);
    const cols: Record<keyof VmPatch, [string, (v: never) => unknown]> = {
      name: ["name", (v) => v],
      status: ["status", (v) => v],
      config: ["config", (v) => JSON.stringify(v)],
      pid: ["pid", (v) => v],
      sshPort: ["ssh_port", (v) => v],
      ports: ["ports", (v) => JSON.stringify(v)],
      channel: ["channel", (v) => v],
      hostKeyFingerprint: ["host_key_fingerprint", (v) => v],
      labels: ["labels", (v) => JSON.stringify(v)],
      expiresAt: ["expires_at", (v) => v],
    };
    const sets: string[] = [];
    const params: unknown[] = [];
    for (const [k, v] of Object.entries(patch)) {
      const col = cols[k as keyof VmPatch];
      if (!col || v === undefined) continue;
      sets.push(`${col[0]} = ?`);
      params.push(col[1](v as never));
    }
    sets.push("updated_at = ?");
    params.push(new Date().toISOString(), id);
    let r: { changes: number };
    try {
      r = this.db.prepare(`UPDATE vms SET ${sets.join(", ")} WHERE id = ?`).run(...params);
    } catch (e) {
      if (patch.name !== undefined && isSqliteConstraint(e, "UNIQUE")) {
        throw new ValidationError(
          `A VM named ${JSON.stringify(patch.name)} already exists: pick another name or delete it first.`,
          { code: "VM_NAME_TAKEN", cause: e, details: { name: patch.name, id } },
        );
      }
      throw e;
    }
    if (r.changes === 0) {
      throw new VMNotFoundError(`No VM with id ${id} to update: it was deleted.`, { details: { id } });
    }
    return this.get(id)!;
  }

  /** VMs with a TTL, soonest expiry first (the reaper's work list). */
  expiring(): VmRecord[] {
    return (
      this.db.prepare("SELECT * FROM vms WHERE expires_at IS NOT NULL ORDER BY expires_at").all() as Row[]
    ).map(fromRow);
  }

  /** Deletes the VM and its port leases. False when it did not exist. */
  delete(id: string): boolean {
    return this.db.prepare("DELETE FROM vms WHERE id = ?").run(id).changes > 0;
  }

  /** Records the lease unless the port is taken; true when it is now ours. */
  tryLeasePort(port: number, vmId: string, purpose: string): boolean {
    try {
      this.db
        .prepare("INSERT INTO port_leases (port, vm_id, purpose, created_at) VALUES (?, ?, ?, ?)")
        .run(port, vmId, purpose, new Date().toISOString());
      return true;
    } catch (e) {
      if (isSqliteConstraint(e, "PRIMARYKEY") || isSqliteConstraint(e, "UNIQUE")) return false;
      if ((e as { code?: string }).code === "SQLITE_CONSTRAINT_FOREIGNKEY") {
        throw new VMNotFoundError(`Cannot lease port ${port} for VM ${vmId}: no such VM.`, {
          details: { vmId },
        });
      }
      throw e;
    }
  }

  leases(vmId?: string): PortLease[] {
    const rows = (
      vmId === undefined
        ? this.db.prepare("SELECT * FROM port_leases ORDER BY port").all()
        : this.db.prepare("SELECT * FROM port_leases WHERE vm_id = ? ORDER BY port").all(vmId)
    ) as Array<{ port: number; vm_id: string; purpose: string; created_at: string }>;
    return rows.map((r) => ({ port: r.port, vmId: r.vm_id, purpose: r.purpose, createdAt: r.created_at }));
  }

  /** Frees the VM's leases (one port, or all). Returns how many were freed. */
  releaseLeases(vmId: string, port?: number): number {
    const r =
      port === undefined
        ? this.db.prepare("DELETE FROM port_leases WHERE vm_id = ?").run(vmId)
        : this.db.prepare("DELETE FROM port_leases WHERE vm_id = ? AND port = ?").run(vmId, port);
    return r.changes;
  }

  /**
   * Marks VMs whose recorded QEMU is gone: "stopped" when QEMU exited cleanly (it removes its
   * pidfile), "crashed" when it was killed (the pidfile is left behind). Their leases are freed.
   */
  reconcile(isAlive: (pid: number, marker: string) => boolean = isQemuAlive): ReconcileChange[] {
    const candidates = (
      this.db
        .prepare("SELECT * FROM vms WHERE status IN ('running', 'paused', 'creating') AND pid IS NOT NULL")
        .all() as Row[]
    ).map(fromRow);
    const changes: ReconcileChange[] = [];
    for (const vm of candidates) {
      const files = vmFiles(vm.vmDir);
      if (isAlive(vm.pid!, files.marker)) continue;
      const to: VmStatus = existsSync(files.pidfile) ? "crashed" : "stopped";
      const applied = this.db
        .transaction(() => {
          // Only if nobody restarted it meanwhile.
          const r = this.db
            .prepare(
              "UPDATE vms SET status = ?, pid = NULL, updated_at = ? WHERE id = ? AND pid = ? AND status = ?",
            )
            .run(to, new Date().toISOString(), vm.id, vm.pid, vm.status);
          if (r.changes > 0) this.db.prepare("DELETE FROM port_leases WHERE vm_id = ?").run(vm.id);
          return r.changes > 0;
        })
        .immediate();
      if (applied) changes.push({ id: vm.id, name: vm.name, from: vm.status, to, pid: vm.pid! });
    }
    return changes;
  }

  /** Runs `fn` in one IMMEDIATE transaction (for multi-step updates by the facade). */
  transaction<T>(fn: () => T): T {
    return this.db.transaction(fn).immediate();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.db.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
