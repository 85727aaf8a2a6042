#!/usr/bin/env bash
# Installs the Debian packages nsm needs to build and test, if any is missing:
#   gcc, libc6-dev     the linker (`cc`) and C runtime every Rust build needs; a minimal Debian
#                      with only rustup's toolchain has neither ("linker `cc` not found")
#   protobuf-compiler  protoc, needed only by the etcd-client crate's build (our own .proto files
#                      compile with protox, in pure Rust)
#   etcd-server        a real etcd for the etcd store tests and benchmarks
#   iputils-ping       ping inside test namespaces (end-to-end data-plane tests)
#   util-linux         nsenter, to run test commands inside a namespace
#   iperf3             throughput benchmarks (nsm-bench vwire)
#   nftables           `nft`: the node's source NAT for gateway vWires to address endpoints
#   wireguard-go       stock userspace WireGuard peer: interop tests and benchmarks of nsm-wireguard
#   wireguard-tools    `wg`, to configure it
#   qemu-system-x86, busybox-static, cpio, kmod, binutils, iproute2
#                      a QEMU guest with a kernel that has WireGuard, for the kernel-WireGuard tests
#                      (scripts/kernel-wg-test.sh; this machine's kernel has no WireGuard)
set -euo pipefail
need=()
command -v cc >/dev/null 2>&1 || need+=(gcc)
[[ -e /usr/include/stdio.h ]] || need+=(libc6-dev)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
command -v nft >/dev/null 2>&1 || [[ -x /usr/sbin/nft ]] || need+=(nftables)
command -v wireguard-go >/dev/null 2>&1 || need+=(wireguard-go)
command -v wg >/dev/null 2>&1 || need+=(wireguard-tools)
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v ip >/dev/null 2>&1 || [[ -x /usr/sbin/ip ]] || need+=(iproute2)
[[ -x /bin/busybox || -x /usr/bin/busybox ]] || need+=(busybox-static)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
command -v depmod >/dev/null 2>&1 || [[ -x /usr/sbin/depmod ]] || need+=(kmod)
command -v objcopy >/dev/null 2>&1 || need+=(binutils)
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing packages: ${need[*]}; run as root or: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
  echo "installing: ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
