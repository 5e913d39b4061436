#!/usr/bin/env bash
# Prepares Debian 12's own kernel (the one linux-image-amd64 points at: 6.1) for the kernel
# matrix (`cargo xtask vm-test`): the package is downloaded and unpacked, not installed, into
# $VM_DIR/<release>/ with its modules indexed, and an initramfs is built that loads what a
# guest needs to mount the host's root over 9p. Idempotent; called by setup.sh.
set -euo pipefail

VM_DIR=${VM_DIR:-/var/cache/mrte-collector/vm}
log() { printf 'vm-kernel: %s\n' "$*" >&2; }

# The image package linux-image-amd64 depends on: linux-image-6.1.0-N-amd64.
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$pkg" ] || { log "apt knows no linux-image-amd64 dependency"; exit 1; }
release=${pkg#linux-image-}
dir=$VM_DIR/$release
if [ -s "$dir/initramfs.cpio.gz" ] && [ -s "$dir/vmlinuz" ]; then
  ln -sfn "$release" "$VM_DIR/debian-12"
  exit 0
fi

log "fetching $pkg (unpacked into $dir, not installed)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1) || {
  apt-get update -qq
  (cd "$tmp" && apt-get download "$pkg" >/dev/null)
}
rm -rf "$dir.part"
mkdir -p "$dir.part/root"
dpkg-deb -x "$tmp"/"$pkg"_*.deb "$dir.part/root"
depmod -b "$dir.part/root" "$release"
cp "$dir.part/root/boot/vmlinuz-$release" "$dir.part/vmlinuz"

# The initramfs: busybox, the modules for virtio and 9p in load order, and an init that mounts
# the host's root read-only and hands over to the stage the runner passes (`mrte.stage2=`).
init=$tmp/initramfs
mkdir -p "$init"/{bin,dev,proc,sys,newroot,modules}
cp /bin/busybox "$init/bin/busybox"
for m in virtio_pci 9pnet_virtio 9p virtio_net; do
  modprobe -d "$dir.part/root" -S "$release" --show-depends "$m"
done | awk '$1 == "insmod" && !seen[$2]++ {print $2}' > "$tmp/order"
: > "$init/modules/order"
while read -r ko; do
  cp "$ko" "$init/modules/"
  basename "$ko" >> "$init/modules/order"
done < "$tmp/order"
cat > "$init/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r ko; do insmod "/modules/$ko" || echo "vm: insmod $ko failed"; done < /modules/order
stage2=$(sed -n 's/.*mrte\.stage2=\([^ ]*\).*/\1/p' /proc/cmdline)
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /newroot; then
  echo "vm: mounting the host's root failed"; echo o > /proc/sysrq-trigger; sleep 10
fi
for d in tmp run var/tmp; do mount -t tmpfs tmpfs "/newroot/$d"; done
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh "$stage2"
EOF
chmod +x "$init/init"
(cd "$init" && find . | cpio -o -H newc --quiet | gzip -1) > "$dir.part/initramfs.cpio.gz"
rm -rf "$dir"
mv "$dir.part" "$dir"
ln -sfn "$release" "$VM_DIR/debian-12"
log "ready: $dir"
