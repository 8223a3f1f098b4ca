#!/usr/bin/env bash
# Regenerates tests/golden/nixconf/out/*.show-config with the real Nix 2.8.0 on PATH.
#
# For every config dir under nixconf/dirs/ it runs
#   NIX_CONF_DIR=<dir> nix --extra-experimental-features nix-command show-config
# in a clean environment (no user config files, no NIX_PATH), with NIX_CONFIG set to the
# contents of <dir>/NIX_CONFIG when that file exists. The absolute path of the dir is replaced
# by @CONFDIR@ so the output does not depend on where the repository is checked out.
# `dirs/empty` records the defaults (some are computed on this machine: cores,
# system-features, extra-platforms). Warnings on stderr (unknown settings) are not recorded.
#
# The config dirs themselves and machines-fixture/ (an ssh-keygen ed25519 key, not
# reproducible) are committed inputs; this script writes only nixconf/out/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)/nixconf
# FERRY_NIX_LABEL (set by regen-version.sh): another Nix version, written to out/nix-LABEL/.
out="$here/out${FERRY_NIX_LABEL:+/nix-$FERRY_NIX_LABEL}"
mkdir -p "$out"
nix --version
# `nix show-config` became `nix config show` in Nix 2.20 (the old name warns since); 2.8 has
# only the old one. https://github.com/NixOS/nix/blob/2.20.0/src/nix/config.cc
show=(show-config)
if nix --extra-experimental-features nix-command config show >/dev/null 2>&1; then
  show=(config show)
fi
for dir in "$here"/dirs/*/; do
  dir=${dir%/}
  name=$(basename "$dir")
  envs=(PATH="$PATH" NIX_CONF_DIR="$dir" NIX_USER_CONF_FILES=)
  if [[ -f "$dir/NIX_CONFIG" ]]; then
    envs+=(NIX_CONFIG="$(cat "$dir/NIX_CONFIG")")
  fi
  env -i "${envs[@]}" nix --extra-experimental-features nix-command "${show[@]}" 2>/dev/null \
    | sed "s|$dir|@CONFDIR@|g" > "$out/$name.show-config"
  echo "wrote $out/$name.show-config"
done
