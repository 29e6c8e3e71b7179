#!/usr/bin/env bash
# Prepares an offline machine to build the `cuda` feature (burn-cuda) of this workspace.
#
# Why: burn-cuda 0.22's CubeCL compiler links LLVM through cubecl-llvm, whose dependency
# tracel-llvm-bundler downloads a prebuilt LLVM bundle from github.com in its build script
# and installs it under "${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-<version>".
# Machines without access to github.com (CI runners here) cannot fetch it. The bundler
# skips the download when its install sentinel `.tracel-llvm-installed` exists in that
# directory, so this script points the directory at Debian's LLVM 22 (llvm-22-dev, in
# bookworm-security; with libpolly-22-dev, libz3-dev, libzstd-dev, libxml2-dev for the
# static link) and creates the sentinel. cubecl-llvm links LLVM statically
# (`llvm-config --link-static`), so the resulting binaries do not need libLLVM at run time.
#
# Users with network access do not need this script: a plain `cargo build --features cuda`
# downloads the bundle. Running it there anyway is harmless but replaces the bundled LLVM
# with Debian's.
#
# Idempotent. Refuses (exit 1, one message) where it cannot work: not Debian/apt, no root
# and no sudo, no llvm-22 package (another LLVM major alone is not enough), an incomplete
# install in the bundler directory, or a bundler version in Cargo.lock this script does not
# know. A complete downloaded bundle already in place is used as is.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() {
  echo "setup-cuda-build: $*" >&2
  exit 1
}

LLVM_MAJOR=22
LLVM_PREFIX=/usr/lib/llvm-$LLVM_MAJOR
# Bundler versions whose build script this recipe was checked against (sentinel name,
# directory layout, `llvm-config --link-static` use). A newer bundler needs a new check.
KNOWN_BUNDLERS="23.1.0-4"

# 1. The bundler version, from Cargo.lock (the directory name derives from it).
bundler=$(awk '/^name = "tracel-llvm-bundler"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
[ -n "$bundler" ] || die "Cargo.lock has no tracel-llvm-bundler; nothing to set up (or the lock file moved)"
case " $KNOWN_BUNDLERS " in
  *" $bundler "*) ;;
  *) die "tracel-llvm-bundler $bundler in Cargo.lock is not one this script was checked against ($KNOWN_BUNDLERS); read its build.rs and update KNOWN_BUNDLERS" ;;
esac

data_home=${XDG_DATA_HOME:-}
case "$data_home" in /*) ;; *) data_home="$HOME/.local/share" ;; esac # dirs ignores relative XDG paths
dir="$data_home/tracel/tracel-llvm-$bundler"
sentinel="$dir/.tracel-llvm-installed"

# 2. Packages.
need_pkgs=()
[ -x "$LLVM_PREFIX/bin/llvm-config" ] || need_pkgs+=("llvm-$LLVM_MAJOR-dev")
[ -e /usr/lib/x86_64-linux-gnu/libz3.so ] || [ -e /usr/lib/aarch64-linux-gnu/libz3.so ] || need_pkgs+=(libz3-dev)
dpkg -s libzstd-dev >/dev/null 2>&1 || need_pkgs+=(libzstd-dev)
dpkg -s libxml2-dev >/dev/null 2>&1 || need_pkgs+=(libxml2-dev)
# `llvm-config --link-static --libs` lists Polly, which llvm-22-dev does not ship.
[ -e "$LLVM_PREFIX/lib/libPolly.a" ] || need_pkgs+=("libpolly-$LLVM_MAJOR-dev")
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null || die "need ${need_pkgs[*]} but apt-get is not available (this script supports Debian 12 only)"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      sudo="sudo -n"
    else
      die "need to install ${need_pkgs[*]}: run as root or with passwordless sudo"
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  # `grep -q` would exit at the first match and make apt-cache die of SIGPIPE, which
  # `pipefail` turns into a failed test: read the whole output instead.
  has_candidate() { apt-cache policy "llvm-$LLVM_MAJOR-dev" 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; }
  # A fresh machine's package lists may be empty or stale: update them (retried on failure).
  for try in 1 2 3; do
    has_candidate && break
    $sudo apt-get update -qq || echo "setup-cuda-build: apt-get update failed (try $try of 3)" >&2
    sleep $((try * 2))
  done
  has_candidate || die "no llvm-$LLVM_MAJOR-dev package in the configured apt sources (on Debian 12 it comes from bookworm-security); installed LLVMs: $(ls -d /usr/lib/llvm-* 2>/dev/null | xargs -n1 basename 2>/dev/null | paste -sd' ' || true) — only LLVM $LLVM_MAJOR was checked against this bundler"
  echo "setup-cuda-build: installing ${need_pkgs[*]}"
  $sudo apt-get install -y -qq "${need_pkgs[@]}" >/dev/null || die "apt-get install ${need_pkgs[*]} failed"
fi
[ -x "$LLVM_PREFIX/bin/llvm-config" ] || die "$LLVM_PREFIX/bin/llvm-config missing after installing llvm-$LLVM_MAJOR-dev"

# 3. A bundler directory that already holds something else is left alone.
if [ -e "$dir" ]; then
  for x in bin include lib; do
    if [ -e "$dir/$x" ] || [ -L "$dir/$x" ]; then
      target=$(readlink "$dir/$x" || true)
      [ "$target" = "$LLVM_PREFIX/$x" ] && continue
      if [ -x "$dir/bin/llvm-config" ]; then
        have=$("$dir/bin/llvm-config" --version 2>/dev/null || echo unknown)
      else
        have=unknown
      fi
      if [ -e "$sentinel" ] && [ "$have" != unknown ]; then
        echo "setup-cuda-build: $dir already holds an installed LLVM $have (the downloaded bundle); using it as is"
        exit 0
      fi
      die "$dir holds an incomplete LLVM install ($x is not a link to $LLVM_PREFIX/$x, no sentinel or no llvm-config); remove the directory and run this again"
    fi
  done
fi

# 4. Links, sentinel.
# Nothing is rewritten when already in place: the bundler's build script reruns when the
# sentinel's mtime changes, and with it everything that depends on cubecl-llvm.
mkdir -p "$dir"
for x in bin include lib; do
  [ "$(readlink "$dir/$x" 2>/dev/null || true)" = "$LLVM_PREFIX/$x" ] || ln -sfn "$LLVM_PREFIX/$x" "$dir/$x"
done
[ -e "$sentinel" ] || touch "$sentinel"

# llvm-config --system-libs names libz3 by full path; the bundler turns that into
# `-llibz3`, so the linker looks for liblibz3.so.
libz3=$("$LLVM_PREFIX/bin/llvm-config" --link-static --system-libs | tr ' ' '\n' | grep -m1 '/libz3\.so' || true)
if [ -n "$libz3" ]; then
  [ -e "$libz3" ] || die "llvm-config names $libz3, which does not exist (install libz3-dev)"
  link="$LLVM_PREFIX/lib/liblibz3.so"
  if [ "$(readlink "$link" 2>/dev/null || true)" != "$libz3" ]; then
    if [ -w "$LLVM_PREFIX/lib" ]; then
      ln -sfn "$libz3" "$link"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      sudo -n ln -sfn "$libz3" "$link"
    else
      die "cannot create $link (run as root or with passwordless sudo)"
    fi
  fi
fi

echo "setup-cuda-build: $dir -> $LLVM_PREFIX (LLVM $("$LLVM_PREFIX/bin/llvm-config" --version)), bundler $bundler; ready for --features cuda"
