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
out="$here/out"
mkdir -p "$out"
nix --version
for dir in "$here"/dirs/*/; do
  dir=${dir%/}
  name=$(basename "$dir")
  envs=(PATH="$PATH" NIX_CONF_DIR="$dir" NIX_USER_CONF_FILES=)
  if [[ -f "$dir/NIX_CONFIG" ]]; then
    envs+=(NIX_CONFIG="$(cat "$dir/NIX_CONFIG")")
  fi
  env -i "${envs[@]}" nix --extra-experimental-features nix-command show-config 2>/dev/null \
    | sed "s|$dir|@CONFDIR@|g" > "$out/$name.show-config"
  echo "wrote $out/$name.show-config"
done
