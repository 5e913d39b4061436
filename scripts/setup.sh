#!/usr/bin/env bash
# Installs and starts everything mrte-collector needs to build, run and be tested, on Debian 12
# with rustup's stable and nightly toolchains. Idempotent: safe to run again; it only does
# what is missing. Needs root (apt-get, starting services).
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (it installs packages and starts MariaDB and RabbitMQ)" >&2
  exit 1
fi

packages=(llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev mariadb-server mariadb-client
          rabbitmq-server iproute2 nftables sysbench tcpdump tshark openssl
          # The kernel matrix (xtask/src/vm.rs): qemu, the guest's init, its relays, modprobe.
          qemu-system-x86 busybox-static socat kmod cpio
          # The package (scripts/package.sh) and its test: strip, man, systemd-analyze, setpriv.
          binutils man-db systemd util-linux)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi

if ! command -v bpf-linker >/dev/null 2>&1; then
  log "building bpf-linker against LLVM 22 (a few minutes)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --no-default-features --features llvm-22
fi

# MariaDB, without systemd.
if ! mariadb-admin ping --silent >/dev/null 2>&1; then
  log "starting MariaDB"
  mkdir -p /run/mysqld && chown mysql: /run/mysqld
  start-stop-daemon --start --oknodo --background --chuid mysql --exec /usr/sbin/mariadbd
  for _ in $(seq 60); do mariadb-admin ping --silent >/dev/null 2>&1 && break; sleep 1; done
  mariadb-admin ping --silent >/dev/null 2>&1 || { log "MariaDB did not start"; exit 1; }
fi
# A TCP user for the collector and the tests (root uses socket auth).
mariadb -e "CREATE USER IF NOT EXISTS 'mrte'@'%' IDENTIFIED BY 'mrte';
            CREATE USER IF NOT EXISTS 'mrte'@'localhost' IDENTIFIED BY 'mrte';
            GRANT ALL ON *.* TO 'mrte'@'%' WITH GRANT OPTION;
            GRANT ALL ON *.* TO 'mrte'@'localhost' WITH GRANT OPTION;"

# RabbitMQ, without systemd.
if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  log "starting RabbitMQ"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 90); do rabbitmq-diagnostics -q ping >/dev/null 2>&1 && break; sleep 1; done
  rabbitmq-diagnostics -q ping >/dev/null 2>&1 || { log "RabbitMQ did not start"; exit 1; }
  rabbitmqctl -q await_startup >/dev/null
fi
# Debian 12's own kernel for the kernel matrix, unpacked (not installed) with its initramfs.
bash "$(dirname "$0")/vm-kernel.sh"

log "ready: MariaDB on 127.0.0.1:3306 (user mrte/mrte), RabbitMQ on 127.0.0.1:5672 (guest/guest)"
