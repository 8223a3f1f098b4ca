#!/usr/bin/env bash
# Regenerates the golden files of one Nix version from integration/nix-versions inside that
# version's Debian root file system (dev/rootfs SUITE), into <area>/nix-LABEL/:
#
#   ferry-nix/tests/golden/regen-version.sh 2.26     # trixie's nix-bin
#   ferry-nix/tests/golden/regen-version.sh 2.34     # sid's nix-bin
#   ferry-nix/tests/golden/regen-version.sh 2.34 cli wire   # only some areas
#
# The cached root is never written to: it is the lower layer of an overlay in a private
# mount namespace, with a tmpfs /tmp (mode 0755: Nix 2.34 refuses a chroot store under a
# world-writable directory) and this directory bind-mounted at /golden; the root is
# switched with pivot_root, not chroot, because Nix's sandbox needs user namespaces, which
# the kernel refuses to a chrooted process. The overlay gets a `nixbld` group with build
# users (what a normal Nix installation has: the default `build-users-group` is nixbld when
# Nix runs as root). Every regen-<area>.sh then runs as it does on this machine, writing to
# <area>/nix-LABEL/ because FERRY_NIX_LABEL is set. No network: each script passes an empty
# `substituters` to every Nix invocation that could reach one. Rerunnable: each script
# replaces its own output directory.
#
# Version 2.8 (suite "-", this machine's nix-bin) is not run here: its files are the
# unversioned ones, written by regen.sh on this machine.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
label=${1:?usage: regen-version.sh LABEL [AREA...]}
shift
areas=("$@")
[ ${#areas[@]} -gt 0 ] || areas=(derivation nar narinfo nixconf wire cli)
suite=$(awk -v l="$label" '$1 == l { print $2 }' "$repo/integration/nix-versions")
[ -n "$suite" ] || { echo "regen-version.sh: no version $label in integration/nix-versions" >&2; exit 1; }
[ "$suite" != - ] || { echo "regen-version.sh: $label is this machine's Nix: run regen.sh" >&2; exit 1; }
root=$("$repo/dev/rootfs" "$suite")

t=$(mktemp -d /tmp/ferry-regen-version.XXXXXX)
trap 'rm -rf "$t"' EXIT
mkdir -p "$t/u" "$t/w" "$t/r"
cat >"$t/u/ferry-regen-inside.sh" <<INSIDE
set -euo pipefail
groupadd -r nixbld 2>/dev/null || true
for i in 1 2 3 4; do
  useradd -r -M -N -g nixbld -G nixbld -d /var/empty -s /usr/sbin/nologin nixbld\$i 2>/dev/null || true
done
nix-store --version
for a in ${areas[*]}; do
  echo "== regen-\$a.sh (Nix $label)"
  FERRY_NIX_LABEL=$label bash /golden/regen-\$a.sh
done
INSIDE
# shellcheck disable=SC2016
unshare -m sh -c '
  set -e
  mount --make-rprivate /
  mount -t overlay overlay -o "lowerdir=$1,upperdir=$2/u,workdir=$2/w" "$2/r"
  mount -t proc proc "$2/r/proc"
  mount --rbind /dev "$2/r/dev"
  mount -t tmpfs -o mode=0755 tmpfs "$2/r/tmp"
  mkdir -p "$2/r/golden"
  mount --bind "$3" "$2/r/golden"
  cd "$2/r"
  pivot_root . .oldroot
  exec chroot . sh -c "umount -l /.oldroot && exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 bash /ferry-regen-inside.sh"
' regen "$root" "$t" "$here"
