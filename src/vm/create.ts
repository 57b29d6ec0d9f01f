/**
 * Making a VM: create() (image, keys and accelerator; then the image's template restored, or a
 * cold boot that leaves the template), and the restores behind fromSnapshot() and fork(). Each
 * inserts the VM's record, boots it and returns its VmRuntime; on any failure the half-made VM
 * is deleted.
 */
import { randomBytes } from "node:crypto";
import { setMaxListeners } from "node:events";
import { readFileSync } from "node:fs";
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { validateEnv } from "../command.js";
import { Deadline } from "../common/deadline.js";
import { dataDir as defaultDataDir } from "../common/paths.js";
import { ValidationError, VMStateError } from "../errors.js";
import {
  type ClientKey,
  composeInitrd,
  ensureClientKey,
  ensureImage,
  generateHostKey,
  type HostKey,
} from "../image/index.js";
import { detectAccelerator, findQemu, qemuVersion } from "./accel.js";
import { bootFromSnapshot, bootOrFallBack, reportAccel } from "./boot.js";
import { isAgentChoice, noAgentError } from "./channel-selector.js";
import { deleteVm, setTtl } from "./lifecycle.js";
import { normalizePolicy } from "./network/policy.js";
import { newVmId, safeHostname, validateCreateOptions, validateVmName, vmConfigCpio } from "./provision.js";
import { VmRuntime } from "./runtime.js";
import { findSnapshot, type SnapshotMeta, snapshotFiles, snapshotsDir } from "./snapshot.js";
import { VmStore, vmFiles } from "./store.js";
import { awaitTemplate, loadTemplate, templateDir, templateKey, tryTemplateLock } from "./template.js";
import { captureSnapshot, leaveTemplate } from "./vm-snapshots.js";
import type { FromSnapshotOptions, SmolVMCreateOptions } from "./vm-types.js";

/**
 * SmolVM.create(): see SmolVMCreateOptions. With `standby` (a pool's refill, pool.ts) the VM is
 * restored from the template and not made its own (VmRuntime.pendingIdentity); without a
 * template that raises POOL_TEMPLATE_MISSING instead of booting cold.
 */
export async function createVm(options: SmolVMCreateOptions, standby = false): Promise<VmRuntime> {
  const t0 = performance.now();
  const opts = validateCreateOptions(options);
  const deadline = new Deadline(opts.timeoutMs, opts.signal, "creating the VM");
  const base = opts.dataDir ?? defaultDataDir();
  const store = VmStore.open(base);
  try {
    deadline.phase = "building the image and keys";
    const [image, clientKey, hostKey] = await deadline.race(
      Promise.all([
        ensureImage(opts.image, { dataDir: base, signal: deadline.signal, onProgress: opts.onProgress }),
        ensureClientKey(base, { signal: deadline.signal }),
        generateHostKey({ signal: deadline.signal }),
      ]),
    );
    deadline.phase = "choosing the accelerator";
    const accel = await deadline.race(
      detectAccelerator({ force: opts.accel, dataDir: base, image, signal: deadline.signal }),
    );
    if (accel.probeMs > 0 && !accel.cached) reportAccel(opts.onProgress, accel, t0);
    if (isAgentChoice(opts.commChannel) && !image.capabilities.agent) {
      throw noAgentError(`image ${image.name}`, opts.commChannel);
    }
    // Templates need the agent: it is what gives a restored VM its own identity.
    let template: { dir: string; release: () => void } | undefined;
    if (opts.template && image.capabilities.agent) {
      const key = templateKey({
        imageFingerprint: image.fingerprint,
        memoryMib: opts.memoryMib,
        vcpus: opts.vcpus,
        accel: accel.accel,
        qemuVersion: await qemuVersion(findQemu()),
        diskMib: opts.diskMib,
      });
      const dir = templateDir(base, key);
      await mkdir(join(dir, ".."), { recursive: true, mode: 0o700 });
      deadline.phase = "looking for the template";
      let meta = await loadTemplate(dir, image.fingerprint);
      if (!meta) {
        const release = tryTemplateLock(dir);
        if (release) template = { dir, release };
        else meta = await awaitTemplate(dir, image.fingerprint, deadline);
      }
      if (meta) {
        store.close();
        const rt = await restoreVm(
          base,
          dir,
          meta,
          opts,
          "template",
          deadline,
          { clientKey, hostKey },
          standby,
        );
        if (rt.bootTimings) rt.bootTimings.totalMs = Math.round(performance.now() - t0);
        return rt;
      }
    }
    if (standby) {
      template?.release();
      throw new VMStateError(
        `image ${image.name} has no template for this size and accelerator yet: create a VM with template: true first.`,
        { code: "POOL_TEMPLATE_MISSING" },
      );
    }
    const id = newVmId();
    const name = opts.name ?? id;
    const vmDir = join(base, "vms", id);
    await mkdir(vmDir, { recursive: true, mode: 0o700 });
    const record = store.insert({
      id,
      name,
      status: "creating",
      image: image.name,
      vmDir,
      channel: opts.commChannel === "auto" ? null : opts.commChannel,
      hostKeyFingerprint: hostKey.fingerprint,
      labels: opts.labels,
      config: {
        ...(opts.diskMib !== undefined ? { diskMib: opts.diskMib } : {}),
        memoryMib: opts.memoryMib,
        vcpus: opts.vcpus,
        accel: accel.accel,
        accelReason: accel.reason,
        imageFingerprint: image.fingerprint,
        kernelPath: image.kernelPath,
        kernelCmdline: image.kernelCmdline,
        initrdPath: image.initrdPath,
        capabilities: image.capabilities,
        hostPublicKey: hostKey.publicKey,
        clientKeyPath: clientKey.privateKeyPath,
        creatorPid: process.pid,
        network: opts.network,
      },
    });
    const rt = new VmRuntime(store, record, base, true, opts.commChannel);
    try {
      const agentSecret = randomBytes(32);
      const cpio = vmConfigCpio({
        hostKeyPem: hostKey.privateKeyPem,
        clientPublicKey: clientKey.publicKey,
        agentSecret,
        env: opts.env,
        hostname: safeHostname(name),
        diskMib: opts.diskMib,
      });
      await composeInitrd(image.initrdPath, cpio, join(vmDir, "initrd.img"));
      await writeFile(vmFiles(vmDir).agentSecret, agentSecret, { mode: 0o600 });
      try {
        await bootOrFallBack(rt, image, deadline, accel, opts, t0);
        // A template is keyed by the accelerator it runs under: none when the boot fell back.
        if (template && rt.config.accel === accel.accel) await leaveTemplate(rt, template.dir, deadline);
      } finally {
        template?.release();
      }
      if (opts.ttlMs !== undefined) await setTtl(rt, opts.ttlMs);
      if (rt.bootTimings) rt.bootTimings.totalMs = Math.round(performance.now() - t0);
      return rt;
    } catch (e) {
      await deleteVm(rt).catch(() => {});
      throw e;
    }
  } catch (e) {
    store.close();
    throw e;
  } finally {
    deadline.dispose();
  }
}

/** SmolVM.fromSnapshot(): a new VM from a snapshot (by id or name). */
export async function restoreSnapshot(idOrName: string, options: FromSnapshotOptions): Promise<VmRuntime> {
  const base = options.dataDir ?? defaultDataDir();
  validateVmName(options.name);
  if (options.env) validateEnv(options.env);
  const deadline = new Deadline(
    options.timeoutMs ?? 60_000,
    options.signal,
    `restoring snapshot ${idOrName}`,
  );
  try {
    const { dir, meta } = await findSnapshot(base, idOrName);
    return await restoreVm(base, dir, meta, options, "snapshot", deadline);
  } finally {
    deadline.dispose();
  }
}

/**
 * vm.fork(): `count` new VMs from an ephemeral snapshot of `rt` (removed with the last of them).
 * All or nothing: when one restore fails, the others are deleted.
 */
export async function forkVm(
  rt: VmRuntime,
  options: { count?: number; timeoutMs?: number; signal?: AbortSignal },
): Promise<VmRuntime[]> {
  const count = options.count ?? 1;
  if (!Number.isInteger(count) || count < 1 || count > 64) {
    throw new ValidationError(`fork count must be an integer from 1 to 64, got ${String(options.count)}.`);
  }
  const deadline = new Deadline(options.timeoutMs ?? 120_000, options.signal, `forking VM ${rt.id}`);
  // Every clone's restore waits on this one signal in several places at once: without this, Node
  // prints a listener-leak warning to stderr for any fork of more than one.
  setMaxListeners(Math.max(10, count * 10), deadline.signal);
  try {
    const meta = await captureSnapshot(
      rt,
      { signal: deadline.signal, timeoutMs: deadline.remaining() },
      true,
    );
    const dir = join(snapshotsDir(rt.dataDir), meta.id);
    rt.reload();
    const network = rt.config.network ?? "public";
    const made = await Promise.allSettled(
      Array.from({ length: count }, () =>
        restoreVm(rt.dataDir, dir, meta, { commChannel: rt.channels.choice, network }, "snapshot", deadline),
      ),
    );
    const ok = made.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
    const failed = made.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed) {
      await Promise.all(ok.map((vm) => deleteVm(vm).catch(() => {})));
      throw failed.reason;
    }
    return ok;
  } finally {
    deadline.dispose();
  }
}

/**
 * Creates a VM record and boots it from a snapshot or template directory, then makes it its
 * own. On any failure the half-made VM is deleted.
 */
async function restoreVm(
  base: string,
  dir: string,
  meta: SnapshotMeta,
  o: FromSnapshotOptions & { labels?: Record<string, string>; ttlMs?: number },
  source: "snapshot" | "template",
  deadline: Deadline,
  keys?: { clientKey: ClientKey; hostKey: HostKey },
  deferIdentity = false,
): Promise<VmRuntime> {
  const t0 = performance.now();
  const store = VmStore.open(base);
  let rt: VmRuntime | undefined;
  try {
    deadline.phase = "restoring the VM";
    // create() made both already, beside the image check: a key is not made twice.
    const [clientKey, hostKey] = keys
      ? [keys.clientKey, keys.hostKey]
      : await deadline.race(
          Promise.all([
            ensureClientKey(base, { signal: deadline.signal }),
            generateHostKey({ signal: deadline.signal }),
          ]),
        );
    const id = newVmId();
    const name = o.name ?? id;
    const vmDir = join(base, "vms", id);
    await mkdir(vmDir, { recursive: true, mode: 0o700 });
    const commChannel = o.commChannel ?? "auto";
    const record = store.insert({
      id,
      name,
      status: "creating",
      image: meta.image,
      vmDir,
      channel: commChannel === "auto" ? null : commChannel,
      hostKeyFingerprint: hostKey.fingerprint,
      labels: o.labels,
      config: {
        ...meta.config,
        hostPublicKey: hostKey.publicKey,
        clientKeyPath: clientKey.privateKeyPath,
        restoredFrom: { kind: source, id: meta.id, dir, ephemeral: meta.ephemeral || undefined },
        // A template serves every policy: create() always names one. A snapshot or fork keeps
        // its VM's, unless the caller names another.
        network: normalizePolicy(o.network ?? meta.config.network),
      },
    });
    rt = new VmRuntime(store, record, base, true, commChannel);
    await writeFile(rt.paths.agentSecret, readFileSync(snapshotFiles(dir).agentSecret), { mode: 0o600 });
    await bootFromSnapshot(rt, dir, meta, deadline, {
      hostKey,
      clientPublicKey: clientKey.publicKey,
      env: o.env ?? {},
      t0,
      source,
      deferIdentity,
    });
    if (o.ttlMs !== undefined) await setTtl(rt, o.ttlMs);
    return rt;
  } catch (e) {
    if (rt) await deleteVm(rt).catch(() => {});
    else store.close();
    throw e;
  }
}
