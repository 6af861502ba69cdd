#!/usr/bin/env bash
# Install l4lbd as a systemd service on a Debian 12 edge box (as root):
#
#   make install                          # = scripts/install.sh
#   make install DESTDIR=/tmp/root        # into a staging root (tests); nothing outside it changes
#   make install PREFIX=/usr/local/l4lb   # another home for the venv and helper
#   scripts/install.sh --no-venv          # everything but the venv step (fast; tests)
#
# What goes where (every path below is under $DESTDIR):
#   $PREFIX/venv                          venv from Debian's /usr/bin/python3 --system-site-packages
#                                         (BCC's python3-bpfcc), l4lb pip-installed (not editable)
#   $PREFIX/libexec/l4lbd-prepare-bpffs   the unit's ExecStartPre (mounts bpffs if missing, pin dir)
#   $PREFIX/share/l4lbd/                  the sample config and the README, always current
#   /etc/systemd/system/l4lbd.service     the unit (paths rewritten to $PREFIX)
#   /etc/l4lbd/l4lbd.toml                 the config: installed once (with a random maglev_seed),
#                                         never overwritten
#   /usr/local/share/man/man1/l4lbctl.1   man pages, made from the commands' own help by the venv
#   /usr/local/share/man/man8/l4lbd.8
#   /etc/sysusers.d/l4lbd.conf            the service user l4lbd (created now unless DESTDIR is set)
#   /usr/local/bin/l4lbd, l4lbctl         symlinks into the venv
#
# Idempotent: every step says what it did, or that nothing needed doing. It
# never starts, stops or enables the service: edit the config first.
# Debian packages and kernel headers come from scripts/setup.sh (`make setup`).
set -euo pipefail
umask 022

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DESTDIR="${DESTDIR:-}"
DESTDIR="${DESTDIR%/}"
PREFIX="${PREFIX:-/opt/l4lb}"
while [[ "$PREFIX" = */ ]]; do PREFIX="${PREFIX%/}"; done
DEFAULT_PREFIX=/opt/l4lb
SERVICE_USER=l4lbd
DEFAULT_SEED=bDRsYi1kZWZhdWx0   # base64("l4lb-default"), l4lb.config.DEFAULT_SEED
WITH_VENV=1

say() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

for arg in "$@"; do
  case "$arg" in
    --no-venv) WITH_VENV=0 ;;
    -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $arg (see --help)" ;;
  esac
done
[[ "$PREFIX" = /?* ]] || die "PREFIX must be an absolute path other than /, not '${PREFIX:-/}'"
[ -z "$DESTDIR" ] || [[ "$DESTDIR" = /* ]] || die "DESTDIR must be an absolute path, not $DESTDIR"
[ "$(id -u)" = 0 ] || [ -n "$DESTDIR" ] || die "must run as root (or with DESTDIR=... for a staging root)"

VENV="$PREFIX/venv"
if [ -n "$DESTDIR" ]; then
  say "staging into DESTDIR=$DESTDIR (PREFIX=$PREFIX); the running system is not touched"
else
  say "installing into / (PREFIX=$PREFIX)"
fi

# --- host prerequisites (only checked for a real install) -----------------------------
if [ -z "$DESTDIR" ]; then
  /usr/bin/python3 -c "import bcc" 2>/dev/null \
    || die "Debian's python3 cannot import bcc: run \`make setup\` first (Debian packages, kernel headers)"
  [ -e "/lib/modules/$(uname -r)/build" ] \
    || die "no kernel headers at /lib/modules/$(uname -r)/build (BCC compiles against them): run \`make setup\` first"
  command -v systemctl >/dev/null || die "systemctl not found: this installs a systemd service"
fi

# --- files ---------------------------------------------------------------------------
# put SRC DST MODE: install SRC as $DESTDIR/DST unless it is already identical.
put() {
  local src=$1 dst="$DESTDIR$2" mode=$3 what
  if [ -f "$dst" ] && cmp -s "$src" "$dst" && [ "$(stat -c %a "$dst")" = "${mode#0}" ]; then
    say "unchanged  $2"
    return
  fi
  what=installed
  [ -e "$dst" ] && what=updated
  install -D -m "$mode" "$src" "$dst"
  say "$what  $2 (mode $mode)"
}

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# The unit names /opt/l4lb; another PREFIX is written into the installed copy.
sed "s#$DEFAULT_PREFIX/#$PREFIX/#g" "$ROOT/systemd/l4lbd.service" > "$TMP/l4lbd.service"
put "$TMP/l4lbd.service" /etc/systemd/system/l4lbd.service 0644
put "$ROOT/systemd/l4lbd-prepare-bpffs" "$PREFIX/libexec/l4lbd-prepare-bpffs" 0755
put "$ROOT/systemd/l4lbd.sysusers" /etc/sysusers.d/l4lbd.conf 0644
put "$ROOT/systemd/l4lbd.toml" "$PREFIX/share/l4lbd/l4lbd.toml.sample" 0644
put "$ROOT/README.md" "$PREFIX/share/l4lbd/README.md" 0644

# BGP (optional): BIRD 2 runs as its own service (the distribution's bird.service)
# and includes what l4lbd generates; l4lbd needs BIRD's group for its socket.
BIRD_CONF=/etc/bird/bird.conf
BIRD_INCLUDE='include "/run/l4lbd/bird/*.conf";   # l4lbd: VIPs this box announces (see l4lbd.toml [bgp])'
if getent group bird >/dev/null && [ -f "$BIRD_CONF" ]; then
  put "$ROOT/systemd/l4lbd-bgp.conf" /etc/systemd/system/l4lbd.service.d/bgp.conf 0644
  if [ -n "$DESTDIR" ]; then
    say "bird       $BIRD_CONF not changed (DESTDIR set); on the target add: $BIRD_INCLUDE"
  elif grep -qF '/run/l4lbd/bird/*.conf' "$BIRD_CONF"; then
    say "unchanged  $BIRD_CONF (includes l4lbd's file)"
  else
    printf '\n%s\n' "$BIRD_INCLUDE" >> "$BIRD_CONF"
    say "updated    $BIRD_CONF: added $BIRD_INCLUDE (then: systemctl reload bird)"
  fi
else
  say "bird       not installed: BGP announcements need bird2 (scripts/setup.sh installs it), then make install again"
fi

# The config is the operator's: never overwritten. It names no secret (an API
# token lives in its own file), so it is world-readable like most of /etc.
CONF=/etc/l4lbd/l4lbd.toml
if [ -e "$DESTDIR$CONF" ]; then
  if cmp -s "$ROOT/systemd/l4lbd.toml" "$DESTDIR$CONF"; then
    say "kept       $CONF (same as the sample)"
  else
    say "kept       $CONF (yours, never overwritten; compare with $PREFIX/share/l4lbd/l4lbd.toml.sample)"
  fi
  # A config that still uses the public default seed: say so (it is not ours to edit).
  if ! grep -Eq '^[[:space:]]*maglev_seed[[:space:]]*=' "$DESTDIR$CONF" || grep -q "$DEFAULT_SEED" "$DESTDIR$CONF"; then
    say "WARNING    $CONF uses the public default datapath.maglev_seed: set your own, the same on every box"
    say "           of a tier (README: A tier of boxes); e.g. maglev_seed = \"$(head -c12 /dev/urandom | base64)\""
  fi
else
  # The sample names no seed (the public default would apply): a new box gets a random one.
  # Every box behind one ECMP group needs the same seed: copy it from the first box's config.
  SEED="$(head -c12 /dev/urandom | base64)"
  sed "s|^# maglev_seed = .*|maglev_seed = \"$SEED\"   # random, by make install: the same on every box of a tier|" \
    "$ROOT/systemd/l4lbd.toml" > "$TMP/l4lbd.toml"
  grep -q "^maglev_seed = \"$SEED\"" "$TMP/l4lbd.toml" || die "the sample config has no '# maglev_seed = ' line to fill"
  install -D -m 0644 "$TMP/l4lbd.toml" "$DESTDIR$CONF"
  say "installed  $CONF (mode 0644) from the sample, with a random datapath.maglev_seed (copy it to the"
  say "           other boxes of a tier); set datapath.interfaces before starting"
fi

for tool in l4lbd l4lbctl; do
  link="$DESTDIR/usr/local/bin/$tool"
  if [ "$(readlink "$link" 2>/dev/null)" = "$VENV/bin/$tool" ]; then
    say "unchanged  /usr/local/bin/$tool -> $VENV/bin/$tool"
  else
    mkdir -p "$(dirname "$link")"
    ln -sfn "$VENV/bin/$tool" "$link"
    say "linked     /usr/local/bin/$tool -> $VENV/bin/$tool"
  fi
done

# --- the service user -------------------------------------------------------------------
if [ -n "$DESTDIR" ]; then
  say "user       $SERVICE_USER not created (DESTDIR set); on the target: systemd-sysusers /etc/sysusers.d/l4lbd.conf"
elif getent passwd "$SERVICE_USER" >/dev/null; then
  say "user       $SERVICE_USER exists"
elif command -v systemd-sysusers >/dev/null; then
  systemd-sysusers /etc/sysusers.d/l4lbd.conf
  getent passwd "$SERVICE_USER" >/dev/null || die "systemd-sysusers did not create $SERVICE_USER"
  say "user       $SERVICE_USER created (systemd-sysusers)"
else
  useradd --system --user-group --home-dir /var/lib/l4lbd --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
  say "user       $SERVICE_USER created (useradd)"
fi

# --- the venv ---------------------------------------------------------------------------------
# The project's files, hashed: the venv is rebuilt only when they change.
SRC_PARTS=(pyproject.toml setup.py README.md l4lb api recorder bpf_src)
src_hash() {
  (cd "$ROOT" && find "${SRC_PARTS[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -name '*.so' -print0 \
     | LC_ALL=C sort -z | xargs -0 sha256sum; /usr/bin/python3 --version) | sha256sum | cut -d' ' -f1
}

if [ "$WITH_VENV" = 0 ]; then
  say "venv       skipped (--no-venv): $VENV is not created or updated"
else
  V="$DESTDIR$VENV"
  STAMP="$V/.l4lb-install-stamp"
  WANT="$(src_hash)"
  if [ -x "$V/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
     && "$V/bin/python" -c "import bcc, l4lb" 2>/dev/null; then
    say "venv       $VENV up to date"
  else
    if [ ! -x "$V/bin/python" ]; then
      /usr/bin/python3 -m venv --system-site-packages "$V"
      say "venv       created $VENV (Debian's /usr/bin/python3, --system-site-packages for bcc)"
    fi
    "$V/bin/python" -c "import bcc" 2>/dev/null \
      || die "bcc is not importable from $VENV (python3-bpfcc missing? run \`make setup\`)"
    # Build from a snapshot: pip builds in the source tree otherwise, and the
    # checkout is shared with whoever is editing it.
    mkdir "$TMP/src"
    (cd "$ROOT" && tar --exclude=__pycache__ --exclude='*.pyc' --exclude='*.so' -cf - "${SRC_PARTS[@]}") | tar -C "$TMP/src" -xf -
    # pip always reinstalls a local directory, so new code with an unchanged
    # version number still lands. (grep drops some pip configs' harmless noise.)
    "$V/bin/pip" install -q --disable-pip-version-check "$TMP/src" 2> >(grep -v "is ignored: it is neither" >&2)
    "$V/bin/python" -c "import bcc, l4lb" || die "the venv cannot import bcc and l4lb"
    "$V/bin/python" -c "from l4lb import maglevc; assert maglevc.library()" \
      || die "pip did not build l4lb/maglev_assign.c (gcc missing? run \`make setup\`)"
    echo "$WANT" > "$STAMP"
    say "venv       installed l4lb $("$V/bin/l4lbd" --version | cut -d' ' -f2) into $VENV (pip, not editable)"
  fi
  if [ -n "$DESTDIR" ]; then
    say "venv       note: its scripts name $V; a venv is not relocatable, so install on the box itself"
  fi
fi

# --- man pages ---------------------------------------------------------------------------------------
# Made by the venv from the commands' own parsers (l4lb/manpages.py), so they match --help.
# (-I, from /: the installed package, not the checkout this script runs from)
if [ -x "$DESTDIR$VENV/bin/python" ] && (cd / && "$DESTDIR$VENV/bin/python" -I -c "import l4lb.manpages" 2>/dev/null); then
  (cd / && "$DESTDIR$VENV/bin/python" -I -m l4lb.manpages "$TMP/man" >/dev/null)
  put "$TMP/man/man1/l4lbctl.1" /usr/local/share/man/man1/l4lbctl.1 0644
  put "$TMP/man/man8/l4lbd.8" /usr/local/share/man/man8/l4lbd.8 0644
else
  say "man pages  skipped: no venv at $VENV yet (run make install without --no-venv)"
fi

# --- systemd ---------------------------------------------------------------------------------------
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  say "systemd    daemon-reload done"
elif [ -z "$DESTDIR" ]; then
  say "systemd    not running as PID 1 here: no daemon-reload"
fi
say "done. Next: edit $CONF (datapath.interfaces), then"
say "  l4lbd --check-config --config $CONF && systemctl enable --now l4lbd"
