#!/usr/bin/env bash
# One set-up path for a fresh Debian 12 machine (run as root). Idempotent:
# every step checks first and says whether it did something or found it done.
#   1. Debian packages (BCC, kernel headers, iproute2, ethtool, tshark, dnsmasq, ...)
#   2. kernel build headers where BCC looks for them (/lib/modules/$(uname -r))
#   3. a venv from Debian's python with system site packages (to see bcc)
#   4. pip install of the project (editable) with its test and bench extras
#   5. the benches' C helpers (bench/c/*.c -> build/), rebuilt when their source changes
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${L4LB_VENV:-$ROOT/.venv}"
say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (BPF, netns and apt need it)"
command -v apt-get >/dev/null || die "this script targets Debian 12 (no apt-get found)"

# --- 1. Debian packages -------------------------------------------------------
PKGS=(python3-bpfcc bpfcc-tools python3-venv python3-pip python3-yaml libbpf1
      iproute2 ethtool tshark curl libcap2-bin util-linux iputils-ping procps
      systemd make bird2    # bird2: the BGP speaker l4lbd drives (and the lab's router)
      frr                   # the lab's second router: the README's FRR example, run
      dnsmasq-base openssl  # the health-check tests' DNS server and self-signed certificate
      man-db groff-base     # the man pages make install writes (tests render them with man -l)
      gcc libc6-dev linux-libc-dev)   # the benches' C helpers (bench/c/), l4lb/maglev_assign.c
KVER="$(uname -r)"
# Prefer the running kernel's own headers (a real Debian edge box); fall back
# to the distribution's generic headers when the kernel has no package.
if apt-cache show "linux-headers-$KVER" >/dev/null 2>&1; then
  PKGS+=("linux-headers-$KVER")
else
  PKGS+=(linux-headers-amd64)
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -q >/dev/null
  # Re-check the exact-kernel headers now that the lists are fresh.
  if [[ " ${missing[*]} " == *" linux-headers-amd64 "* ]] && apt-cache show "linux-headers-$KVER" >/dev/null 2>&1; then
    missing=("${missing[@]/linux-headers-amd64/linux-headers-$KVER}")
  fi
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  # The lab runs FRR's daemons itself, in a namespace: not the distribution's service.
  if [[ " ${missing[*]} " == *" frr "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now frr >/dev/null 2>&1 || true
  fi
else
  say "Debian packages: all present"
fi

# --- 2. kernel headers for BCC ---------------------------------------------------
MODDIR="/lib/modules/$KVER"
if [ -e "$MODDIR/build/include/uapi/linux/bpf.h" ] || [ -e "$MODDIR/build/include/generated/uapi/linux/version.h" ] && [ -e "$MODDIR/build/Makefile" ]; then
  say "kernel headers: $MODDIR/build present ($(readlink -f "$MODDIR/build"))"
elif [ -d "/usr/src/linux-headers-$KVER" ]; then
  mkdir -p "$MODDIR"
  ln -sfn "/usr/src/linux-headers-$KVER" "$MODDIR/build"
  say "kernel headers: linked $MODDIR/build -> /usr/src/linux-headers-$KVER (the running kernel's own)"
else
  # No headers for this kernel (custom build, no CONFIG_IKHEADERS): use the
  # newest distribution headers. XDP programs only need the stable UAPI.
  HDR="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)"
  [ -n "$HDR" ] || die "no kernel headers found under /usr/src"
  COMMON="${HDR%-amd64}-common"
  [ -d "$COMMON" ] || die "missing $COMMON next to $HDR"
  mkdir -p "$MODDIR"
  ln -sfn "$HDR" "$MODDIR/build"
  ln -sfn "$COMMON" "$MODDIR/source"
  say "kernel headers: kernel $KVER has no headers package; linked $MODDIR/build -> $HDR and source -> $COMMON (distribution UAPI headers)"
fi

# --- 3. venv -------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV (Debian's /usr/bin/python3, --system-site-packages for bcc)"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
else
  say "venv: $VENV present"
fi
"$VENV/bin/python" -c "import bcc" 2>/dev/null || die "bcc is not importable from $VENV (python3-bpfcc missing?)"

# --- 4. the project ----------------------------------------------------------------
STAMP="$VENV/.l4lb-setup-stamp"
# setup.py and the C it builds (l4lb/maglev_assign.c) count too: pip compiles it.
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/l4lb/maglev_assign.c" | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import l4lb" 2>/dev/null; then
  say "python packages: up to date"
else
  say "pip install -e .[test,bench] into $VENV (the appliance, plus what tests and benches use)"
  # (grep drops the harmless "Location ... is ignored" noise of some pip configs)
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test,bench]" 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$WANT" > "$STAMP"
fi
# --- 5. bench helpers ---------------------------------------------------------------
# bench/traffic.py's frame generator and bench/datapath.py's test-run loop (C: a
# Python sender or loop is too slow, see the sources' headers).
build_helper() {  # build_helper OUTPUT SOURCE GCC-FLAGS...
  local out="$ROOT/build/$1" src="$ROOT/bench/c/$2"; shift 2
  if [ -x "$out" ] && [ "$out" -nt "$src" ]; then
    say "bench helper: build/$(basename "$out") up to date"
  else
    mkdir -p "$ROOT/build"
    gcc -O2 -Wall -Wextra -Werror "$@" -o "$out" "$src"
    say "bench helper: built build/$(basename "$out") from bench/c/$(basename "$src")"
  fi
}
build_helper trafficgen trafficgen.c
build_helper testrun_batch.so testrun_batch.c -shared -fPIC
say "ready: venv $VENV (python: $VENV/bin/python)"
