/** Where a VM's network-policy state lives in its directory (shared by the daemon and the SDK). */
import { join } from "node:path";

export function networkFiles(vmDir: string) {
  return {
    /**
     * `{ policy, mechanism }`: the policy in force (written by the SDK at start, by the daemon on
     * change) and what enforces it ("cgroup" as root, "userns" rootless).
     */
    policy: join(vmDir, "network.json"),
    /** JSON lines, one per decision; rotated to network.log.1 at 1 MiB. */
    log: join(vmDir, "network.log"),
    /** The daemon's control socket (JSON lines: {"op":"set","policy":...}). */
    control: join(vmDir, "net.sock"),
    pid: join(vmDir, "net.pid"),
    /** The daemon's own stdout/stderr. */
    daemonLog: join(vmDir, "net-daemon.log"),
    /** Rootless: the nftables rules loaded inside QEMU's network namespace before QEMU starts. */
    netnsRules: join(vmDir, "netns.nft"),
    /** Rootless: QEMU's pid, written once its namespace is set up (the daemon enters it). */
    netnsPid: join(vmDir, "netns.pid"),
  };
}
