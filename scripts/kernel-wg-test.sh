#!/usr/bin/env bash
# Runs the tests that need the kernel's WireGuard in a QEMU guest whose kernel has it, because the
# CI machine's kernel has none (and cannot load modules). The guest runs Debian's cloud kernel
# (the version `linux-image-cloud-amd64` points at, CONFIG_WIREGUARD=m) under TCG, so no KVM is
# needed, from an initramfs holding busybox, iproute2, the kernel modules the tests need, the nsm
# binaries and the test binaries, each at the absolute path it has here (the end-to-end tests
# find `nsm` and `nsmctl` by the path compiled into them). NSM_TEST_KERNEL_WIREGUARD=1 in the
# guest makes a kernel without WireGuard a test failure rather than a skip.
#
# Needs: qemu-system-x86, busybox-static, kmod, cpio, binutils, iproute2 (scripts/deps.sh installs
# them), and Debian's archive (apt-get download) the first time.
# Usage: scripts/kernel-wg-test.sh           (builds what it needs; exit status 0 = all passed)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
target=$(realpath "${CARGO_TARGET_DIR:-target}")
work="$target/kernel-wg"
rm -rf "$work/root" "$work/initrd.cpio"
mkdir -p "$work/root" "$work/kernel"

# 1. The guest kernel and its modules, from Debian's archive (kept between runs).
kernel_pkg() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n1; }
pkg=$(kernel_pkg || true)
if [ -z "$pkg" ]; then apt-get update -qq && pkg=$(kernel_pkg || true); fi
[ -n "$pkg" ] || { echo "kernel-wg-test: cannot tell which linux-image-cloud-amd64 to use (apt-get update?)" >&2; exit 1; }
ver=${pkg#linux-image-}
if [ ! -f "$work/kernel/$ver/boot/vmlinuz-$ver" ]; then
    echo "kernel-wg-test: fetching $pkg"
    rm -rf "$work/kernel/$ver" && mkdir -p "$work/kernel/$ver"
    (cd "$work/kernel" && apt-get download -q -o APT::Sandbox::User=root "$pkg" && dpkg-deb -x "$pkg"_*.deb "$ver" && rm -f "$pkg"_*.deb)
    depmod -b "$work/kernel/$ver" "$ver"
fi
kroot="$work/kernel/$ver"

# 2. The test binaries (tests that need root and the kernel's WireGuard) and the nsm binaries, from
#    the same workspace build `scripts/test.sh` makes (so nothing is compiled twice).
tests=()
build_log="$work/build.log"
while IFS= read -r exe; do tests+=("$exe"); done < <(
    cargo test --workspace --locked --no-run --message-format=json 2>"$build_log" |
        grep -E '"src_path":"[^"]*/(crates/wireguard/tests/kernel\.rs|crates/bin/nsm/tests/kernel_wireguard\.rs)"' |
        grep -o '"executable":"[^"]*"' | sed 's/"executable":"\(.*\)"/\1/'
)
if [ "${#tests[@]}" -ne 2 ]; then
    echo "kernel-wg-test: expected 2 test binaries, got: ${tests[*]:-none}; cargo said:" >&2
    tail -n 30 "$build_log" >&2
    exit 1
fi
bins=("${tests[@]}" "$target/debug/nsm" "$target/debug/nsmctl" "$(command -v ip)")

# 3. The initramfs: each binary (debug info stripped: the guest only runs them) with its shared
#    libraries, busybox for the rest of userland, the modules with their dependencies.
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,lib/modules}
copy_with_libs() {
    local f=$1 to=${2:-$1}
    mkdir -p "$root$(dirname "$to")"
    objcopy --strip-debug "$f" "$root$to" 2>/dev/null || cp "$f" "$root$to"
    { ldd "$f" 2>/dev/null || true; } | { grep -o '/[^ ]*' || true; } | while read -r lib; do
        if [ ! -e "$root$lib" ]; then mkdir -p "$root$(dirname "$lib")" && cp -L "$lib" "$root$lib"; fi
    done
}
for b in "${bins[@]}"; do copy_with_libs "$b"; done
copy_with_libs "$(command -v busybox)" /bin/busybox
modules=(wireguard veth tun bridge)
insmods=$(modprobe -a -d "$kroot" -S "$ver" --show-depends "${modules[@]}" | sed -n 's/^insmod \([^ ]*\).*/\1/p' | awk '!seen[$0]++')
for m in $insmods; do mkdir -p "$root$(dirname "${m#"$kroot"}")" && cp "$m" "$root${m#"$kroot"}"; done
echo "nameserver 127.0.0.1" > "$root/etc/resolv.conf"
{
    echo '#!/bin/busybox sh'
    echo '/bin/busybox --install -s /bin'
    echo 'export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root NSM_TEST_KERNEL_WIREGUARD=1 RUST_BACKTRACE=1'
    echo 'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev'
    # The initramfs root is writable already; nothing is mounted over /tmp, where the binaries
    # may sit (a checkout under /tmp).
    echo 'mkdir -p /tmp; mount -t tmpfs run /run; mkdir -p /run/netns'
    echo 'ip link set lo up'
    for m in $insmods; do echo "insmod ${m#"$kroot"} || echo 'NSM-KWG insmod failed: $m'"; done
    echo 'status=0'
    for t in "${tests[@]}"; do
        echo "echo 'NSM-KWG running $t'"
        echo "(cd /tmp && '$t' --test-threads=1 --nocapture) || status=1"
    done
    echo 'echo "NSM-KWG-RESULT $status"'
    echo 'poweroff -f'
} > "$root/init"
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$work/initrd.cpio"
echo "kernel-wg-test: guest $ver, initramfs $(du -m "$work/initrd.cpio" | cut -f1) MiB, ${#tests[@]} test binaries"

# 4. Boot it. TCG (KVM is not assumed); -no-reboot with panic=-1 ends QEMU on a guest panic.
log="$work/guest.log"
timeout "${NSM_KWG_TIMEOUT:-1500}" qemu-system-x86_64 -accel tcg -smp 2 -m 3072 -nographic -no-reboot \
    -kernel "$kroot/boot/vmlinuz-$ver" -initrd "$work/initrd.cpio" \
    -append "console=ttyS0 quiet panic=-1 rdinit=/init" | tee "$log" || true
rm -rf "$root" "$work/initrd.cpio"
if grep -q '^NSM-KWG-RESULT 0' "$log"; then
    echo "kernel-wg-test: passed"
    exit 0
fi
echo "kernel-wg-test: FAILED (guest log: $log)" >&2
exit 1
