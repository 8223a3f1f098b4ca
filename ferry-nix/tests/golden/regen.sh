#!/usr/bin/env bash
# Regenerates every golden file under this directory with the real Nix on PATH
# (Debian bookworm's nix-bin, Nix 2.8.0). Each area has its own regen-<area>.sh; the
# files they write are committed, and the tests in ferry-nix/tests/ compare against them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
nix-store --version
for s in "$here"/regen-*.sh; do
  # The other versions run in their own root file systems: regen-version.sh LABEL.
  [ "$s" = "$here/regen-version.sh" ] && continue
  echo "== $s"
  bash "$s"
done
