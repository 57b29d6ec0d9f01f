/**
 * The guest's boot scripts, as text (pure, so the fingerprint covers them and tests can read
 * them). Shell that runs under both busybox ash (tiny) and dash (debian).
 *
 * Boot contract with the runtime:
 * - Per-VM secrets arrive in a second cpio archive appended to the initramfs, unpacked by the
 *   kernel to /smolvm/config/ (see cpio.ts): ssh_host_ed25519_key, authorized_keys, and
 *   optionally hostname, env (the managed env file) and agent_secret. Nothing secret is in the
 *   image or on the kernel command line.
 * - Milestones go to the serial console as `smolvm: <ms-since-boot> <milestone>`.
 * - Network: QEMU user-mode defaults (guest 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3).
 */

export const CONFIG_DIR = "/smolvm/config";
/** Where the debian image's rootfs init finds the config (a tmpfs: secrets never touch the disk). */
export const ROOTFS_CONFIG_DIR = "/run/smolvm/config";
export const AGENT_PATH = "/sbin/smolvm-agent";
export const AGENT_PORT_NAME = "org.smolvm.agent";
/** In boot order: every module (tiny has none) is loaded before the agent starts. */
export const MILESTONES = [
  "init-start",
  "modules-loaded",
  "agent-started",
  "sshd-started",
  "network-up",
] as const;

export const SSHD_CONFIG = `# Written by the smolvm image builder.
Port 22
ListenAddress 0.0.0.0
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile .ssh/authorized_keys
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
PidFile /run/sshd.pid
# Lets smolvm tag each command so a timed-out one can be killed: root logins get no
# SSH signal requests from OpenSSH.
AcceptEnv SMOLVM_RUN_ID
MaxSessions 64
MaxStartups 100:30:200
Subsystem sftp /usr/lib/openssh/sftp-server
`;

export const PROFILE = `# Written by the smolvm image builder.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME="\${HOME:-/root}"
for f in /etc/profile.d/*.sh; do
  [ -r "$f" ] && . "$f"
done
unset f
`;

/** Prints to the console and appends to /run/smolvm/milestones (the agent reports that file). */
const MILESTONE_FN = `milestone() {
  read up _ < /proc/uptime
  ms="\${up%.*}\${up#*.}0"
  while [ "\${#ms}" -gt 1 ] && [ "\${ms#0}" != "$ms" ]; do ms="\${ms#0}"; done
  echo "smolvm: $ms $1"
  if [ -d /run/smolvm ]; then echo "smolvm: $ms $1" >> /run/smolvm/milestones; fi
}`;

const EARLY_MOUNTS = `mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/smolvm
chmod 700 /run/smolvm`;

function loadModules(modules: readonly string[]): string {
  return modules.map((m) => `insmod /lib/modules/smolvm/${m}.ko`).join("\n");
}

/** udev is absent: create the /dev/virtio-ports/<name> links it would make (builtins, no forks). */
const VIRTIO_PORT_LINKS = `mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
  [ -r "$p/name" ] || continue
  read -r n < "$p/name"
  [ -n "$n" ] && ln -sf "../\${p##*/}" "/dev/virtio-ports/$n"
done`;

/**
 * Everything after the early modules: shared by tiny's /init and the debian rootfs init.
 */
function userspace(cfg: string): string {
  return `mkdir -p /dev/pts /dev/shm /tmp /run
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777\${disk_mib:+,size=\${disk_mib}m} tmpfs /tmp
grep -q " /run " /proc/mounts || mount -t tmpfs -o mode=755 tmpfs /run
${VIRTIO_PORT_LINKS}

# Identity and the managed env file come first: the agent can serve a command the moment it
# starts, and that command must already see both.
h=smolvm
[ -s ${cfg}/hostname ] && read -r h < ${cfg}/hostname
hostname "$h"
echo "$h" > /etc/hostname
printf '127.0.0.1 localhost\\n127.0.1.1 %s\\n' "$h" > /etc/hosts

mkdir -p /etc/profile.d
( umask 077; [ -f ${cfg}/env ] && cp ${cfg}/env /etc/profile.d/smolvm_env.sh; touch /etc/profile.d/smolvm_env.sh )
chmod 600 /etc/profile.d/smolvm_env.sh

# The SSH host key and authorized_keys too: a VM restored from a snapshot taken once the agent
# ran gets its own over the agent, and nothing after this point may overwrite them.
umask 077
mkdir -p /root/.ssh /etc/ssh /run/sshd
chmod 700 /root /root/.ssh
chmod 755 /run/sshd
if [ -s ${cfg}/ssh_host_ed25519_key ]; then
  cp ${cfg}/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key
  rm -f ${cfg}/ssh_host_ed25519_key
else
  echo "smolvm: warning no host key delivered, generating one (it cannot be pinned)"
  ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key
fi
chmod 600 /etc/ssh/ssh_host_ed25519_key
[ -f ${cfg}/authorized_keys ] && cp ${cfg}/authorized_keys /root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys 2>/dev/null
umask 022

# ---- smolvm guest agent hook: started before networking and sshd when the image ships it,
# the runtime attached its virtio-serial port and delivered a secret (which it then unlinks).
if [ -x ${AGENT_PATH} ] && [ -e /dev/virtio-ports/${AGENT_PORT_NAME} ] && [ -s ${cfg}/agent_secret ]; then
  ${AGENT_PATH} --serial /dev/virtio-ports/${AGENT_PORT_NAME} --secret-file ${cfg}/agent_secret --unlink-secret \\
    --milestones /run/smolvm/milestones >/dev/console 2>&1 &
  milestone agent-started
fi
# ---- end of agent hook
# sshd runs per connection (\`sshd -i\`) under the agent's listener: none starts at boot (under
# TCG a listening sshd's start costs about a third of a second of guest CPU, in every boot and in
# every VM restored from a template), and each connection's sshd reads the host key file, so a
# restored VM serves the key it was given from its first connection on.
sshd_per_connection=
if [ -x ${AGENT_PATH} ] && ${AGENT_PATH} --inetd 22 /usr/sbin/sshd -i -E /var/log/sshd.log >/dev/null; then
  sshd_per_connection=1
  milestone sshd-started
fi
# Map up to 2 MiB of an already-cached file per page fault (default 64 KiB): under emulation a
# fault costs tens of microseconds and every command's exec faults its binary in (busybox:
# about 1.5 ms less per exec under TCG). Only page-cache pages are mapped; nothing is read.
if mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null; then
  echo 2097152 > /sys/kernel/debug/fault_around_bytes 2>/dev/null
  umount /sys/kernel/debug
fi

ip link set lo up
# No IPv6 on eth0: the host drops the guest's IPv6 traffic (network policy), and its address
# autoconfiguration would otherwise run again in every VM restored from a template.
[ -w /proc/sys/net/ipv6/conf/eth0/disable_ipv6 ] && echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
echo "nameserver 10.0.2.3" > /etc/resolv.conf
milestone network-up

# Without the agent, a listening sshd, at the lowest priority: nothing the user waits for by
# default needs it. Once it listens it gets normal priority back.
if [ -z "$sshd_per_connection" ]; then
  (
    read -r me _ < /proc/self/stat
    renice 19 -p "$me" >/dev/null 2>&1
    exec /usr/sbin/sshd -D -E /var/log/sshd.log
  ) &
  sshd_pid=$!
  (
    read -r me _ < /proc/self/stat
    renice 19 -p "$me" >/dev/null 2>&1
    # "started" means listening: :22 (0x0016) in LISTEN (0A) state. Shell builtins only: under
    # TCG a grep per poll cost the vCPU sshd is starting on several ms every 10 ms.
    listening() {
      while read -r _ addr _ st _; do
        [ "\${addr##*:}" = 0016 ] && [ "$st" = 0A ] && return 0
      done < /proc/net/tcp
      return 1
    }
    i=0
    until listening || [ $i -ge 500 ]; do sleep 0.01; i=$((i + 1)); done
    renice 0 -p "$sshd_pid" >/dev/null 2>&1
    milestone sshd-started
  ) &
fi
# PID 1 stays here: waiting reaps every child, including orphans; SIGTERM powers off.
trap 'poweroff -f 2>/dev/null || echo o > /proc/sysrq-trigger' TERM USR2
while :; do
  wait
  sleep 1 &
  wait $!
done
`;
}

/** What every initramfs /init starts with: mounts, milestones, the (early) virtio modules. */
function initramfsPrologue(title: string, modules: readonly string[]): string {
  return `#!/bin/sh
# smolvm ${title} (busybox sh). Generated: edit src/image/init-script.ts.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
${EARLY_MOUNTS}
${MILESTONE_FN}
milestone init-start
${loadModules(modules)}
milestone modules-loaded`;
}

/** create({ diskMib }) on tiny: cap the RAM root filesystem (and /tmp, mounted later) at that size. */
const TINY_DISK_CAP = `disk_mib=
[ -s ${CONFIG_DIR}/disk_mib ] && read -r disk_mib < ${CONFIG_DIR}/disk_mib
case "$disk_mib" in *[!0-9]*|"") disk_mib= ;; esac
[ -n "$disk_mib" ] && mount -o remount,size=\${disk_mib}m /`;

/**
 * tiny's /init: everything in the initramfs, busybox userland. Its kernel has every driver built
 * in (kernel-build.ts), so there is no module to load.
 */
export function renderTinyInit(): string {
  return `${initramfsPrologue("tiny image init", [])}
${TINY_DISK_CAP}
${userspace(CONFIG_DIR)}`;
}

/** debian's initramfs /init: modules, mount /dev/vda, hand the config over on a tmpfs, switch_root. */
export function renderDebianStage1(modules: readonly string[]): string {
  return `${initramfsPrologue("debian image initramfs", modules)}
${VIRTIO_PORT_LINKS}
i=0
while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i + 1)); done
mkdir -p /newroot
if ! mount -t ext4 -o rw,noatime /dev/vda /newroot; then
  echo "smolvm: fatal cannot mount /dev/vda"
  poweroff -f
fi
mount -t tmpfs -o mode=755 tmpfs /newroot/run
mkdir -p /newroot${ROOTFS_CONFIG_DIR}
cp /run/smolvm/milestones /newroot/run/smolvm/milestones 2>/dev/null
chmod 700 /newroot/run/smolvm /newroot${ROOTFS_CONFIG_DIR}
cp -a ${CONFIG_DIR}/. /newroot${ROOTFS_CONFIG_DIR}/ 2>/dev/null
rm -rf /smolvm
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /sbin/smolvm-init
`;
}

/** The debian rootfs's /sbin/smolvm-init (dash), run as PID 1 after switch_root. */
export function renderDebianStage2(): string {
  return `#!/bin/sh
# smolvm debian image init (runs after switch_root). Generated: edit src/image/init-script.ts.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
${MILESTONE_FN}
${userspace(ROOTFS_CONFIG_DIR)}`;
}
