#!/usr/bin/env bash
# Installs what smolvm needs on a Debian/Ubuntu host, idempotently: Debian packages (with
# apt-get as root or through sudo; otherwise it stops and names them) and npm packages.
# Fast when everything is already there, so `npm start` and `npm test` can call it every time.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package that provides it
declare -A NEED=(
  [sshd]=openssh-server [ssh]=openssh-client [ssh-keygen]=openssh-client
  [qemu-system-x86_64]=qemu-system-x86 [cpio]=cpio [mkfs.ext4]=e2fsprogs
  [debootstrap]=debootstrap [gcc]=build-essential [make]=build-essential
  [zstd]=zstd [xz]=xz-utils [curl]=curl [ip]=iproute2 [socat]=socat [nft]=nftables
  [qemu-img]=qemu-utils
  # compiling the tiny image's kernel (src/image/kernel-build.ts)
  [flex]=flex [bison]=bison [bc]=bc
  # the rootless network policy (QEMU in its own user + network namespace) and its test
  [unshare]=util-linux [nsenter]=util-linux [setpriv]=util-linux
  # the SSH server matrix the tests run (test/fixtures/ssh-servers.ts)
  [dropbear]=dropbear-bin [dropbearkey]=dropbear-bin [tinysshd]=tinysshd [tcpserver]=ucspi-tcp
)
missing=()
for cmd in "${!NEED[@]}"; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
[ -e /usr/share/doc/busybox-static ] || missing+=(busybox-static)
[ -e /usr/include/gelf.h ] || missing+=(libelf-dev)
# asyncssh for the system python the matrix's asyncssh server runs on; sftp-server for tinysshd
[ -e /usr/lib/python3/dist-packages/asyncssh ] || missing+=(python3-asyncssh)
[ -x /usr/lib/openssh/sftp-server ] || missing+=(openssh-sftp-server)

if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "smolvm setup: missing Debian packages: ${missing[*]}" >&2
    echo "Install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "smolvm setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# npm packages: install when missing or when package.json changed since the last install.
stamp=node_modules/.smolvm-install-stamp
if [ ! -f "$stamp" ] || [ package.json -nt "$stamp" ] || { [ -f package-lock.json ] && [ package-lock.json -nt "$stamp" ]; }; then
  echo "smolvm setup: installing npm packages" >&2
  if [ -f package-lock.json ]; then npm ci --no-fund --no-audit >&2; else npm install --no-fund --no-audit >&2; fi
  touch "$stamp"
fi

# The ordinary (non-root) user test/vm/rootless-network.test.ts runs real VMs as.
if ! id smolvmtest >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" != none ]; then
    $SUDO useradd --system --no-create-home --home-dir /nonexistent --shell /bin/sh smolvmtest
  fi
fi

# tiny's kernel is compiled on first use, once per host (a few minutes on two cores): do it
# here, with its progress on a terminal, rather than inside the first test or example.
node_modules/.bin/tsx src/cli/smolvm.ts image build tiny >/dev/null
