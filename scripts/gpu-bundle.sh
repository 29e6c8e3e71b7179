#!/usr/bin/env bash
# Builds the GPU bundle: one archive to copy to a GPU host and run the GPU check there
# without a Rust toolchain or LLVM on that host.
#
#   scripts/gpu-bundle.sh [OUT.tar.xz]        (default dist/diep-gpu.tar.xz)
#
# Contents (top directory diep-gpu/):
#   bin/xtask       release xtask with the cuda and wgpu backends (and cpu), stripped
#   lib/            shared libraries the binaries need beyond glibc, libgcc_s and libstdc++,
#                   found with ldd, plus the Vulkan loader wgpu opens at run time; never the
#                   NVIDIA driver (libcuda), which must come from the host
#   gpu-check.sh    the check (scripts/gpu-check.sh)
# The archive must stay at or under 60 MiB (fails otherwise). libLLVM and libz3 must not be
# run-time dependencies (LLVM is linked statically; fails otherwise).
# GPU_BUNDLE_PROFILE=dev builds the dev profile instead of release, GPU_BUNDLE_FEATURES=cuda
# leaves wgpu out (both quicker; for testing this script, not for a bundle to measure with).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=${1:-dist/diep-gpu.tar.xz}
profile=${GPU_BUNDLE_PROFILE:-release}
features=${GPU_BUNDLE_FEATURES:-cuda,wgpu}
max_bytes=$((60 * 1024 * 1024))
case "$profile" in dev) pdir=debug ;; *) pdir=$profile ;; esac
target=${CARGO_TARGET_DIR:-target}

scripts/setup-cuda-build.sh
cargo build --profile "$profile" -p xtask --features "$features"

stage_root=$(mktemp -d)
trap 'rm -rf "$stage_root"' EXIT
stage="$stage_root/diep-gpu"
mkdir -p "$stage/bin" "$stage/lib"
cp "$target/$pdir/xtask" "$stage/bin/xtask"
strip "$stage/bin/xtask"
cp scripts/gpu-check.sh "$stage/gpu-check.sh"

# Libraries every Linux host with a GPU driver has; everything else ldd reports is shipped.
base='^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+)\.'
for b in "$stage/bin/xtask"; do
  deps=$(ldd "$b")
  if echo "$deps" | grep -Eq 'libLLVM|libz3|not found'; then
    echo "gpu-bundle: $(basename "$b") needs a library it must not (or one that is missing):" >&2
    echo "$deps" | grep -E 'libLLVM|libz3|not found' >&2
    exit 1
  fi
  echo "$deps" | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }' | while read -r name path; do
    echo "$name" | grep -Eq "$base" && continue
    cp -L "$path" "$stage/lib/$name"
  done
done
# wgpu opens the Vulkan loader with dlopen, so ldd does not list it.
for d in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib; do
  if [ -e "$d/libvulkan.so.1" ]; then cp -L "$d/libvulkan.so.1" "$stage/lib/"; break; fi
done

cat >"$stage/README.txt" <<EOF
diep GPU bundle, built $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD 2>/dev/null || echo unknown) ($profile profile, features $features).
Unpack inside a copy of the repository (the check reads fixtures/) and run:
  diep-gpu/gpu-check.sh [--out DIR]
Needs on the host: the NVIDIA driver (libcuda.so.1) for cuda; a Vulkan driver for wgpu.
See docs/GPU.md.
EOF
{ echo "ldd of the stripped binaries at build time:"; ldd "$stage/bin/xtask"; } >>"$stage/README.txt"

mkdir -p "$(dirname "$out")"
XZ_OPT=${XZ_OPT:--9 -T0} tar -C "$stage_root" -cJf "$out" diep-gpu
size=$(stat -c %s "$out")
echo "gpu-bundle: $out: $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1048576 }') MiB); contents:"
tar -tvJf "$out" | awk '{ print "  " $3, $6 }'
if [ "$size" -gt "$max_bytes" ]; then
  echo "gpu-bundle: $out is larger than 60 MiB" >&2
  exit 1
fi
