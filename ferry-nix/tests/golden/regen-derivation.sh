#!/usr/bin/env bash
# Regenerates tests/golden/derivation/: `.drv` files written by Nix (2.8.0 on this machine)
# with `nix-instantiate` for ferry-nix/tests/derivation.rs.
#
#   simple.drv     builder /bin/sh with arguments, env values with quotes, backslashes,
#                  newlines, tabs and a carriage return, one input source (builtins.toFile)
#   fixed.drv      a flat fixed-output derivation (outputHash, sha256)
#   fixed-rec.drv  a recursive fixed-output derivation (outputHashMode = "recursive", sha1)
#   multi.drv      three outputs (out, dev, lib)
#   dependent.drv  input derivations (simple's out, multi's dev and lib) and an input source
#   paths.txt      `<file> <store path of the .drv>` per file, as nix-instantiate printed it
#
# Everything runs against a throwaway chroot store (store dir /nix/store, so the .drv bytes
# do not depend on where the scratch directory is); no daemon, no network, nothing is built.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# FERRY_NIX_LABEL (set by regen-version.sh): another Nix version, written to derivation/nix-LABEL/.
out=$here/derivation${FERRY_NIX_LABEL:+/nix-$FERRY_NIX_LABEL}
work=$(mktemp -d /tmp/ferry-regen-derivation.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/conf" "$out"
export NIX_CONF_DIR=$work/conf NIX_USER_CONF_FILES= NIX_CONFIG= NIX_PATH= HOME=$work XDG_CACHE_HOME=$work/cache
unset NIX_REMOTE
store="local?root=$work/root"

cat >"$work/drvs.nix" <<'NIX'
let
  src = builtins.toFile "ferry-input.txt" "an input source\n";
  simple = derivation {
    name = "ferry-simple";
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" "echo \"hello\" > $out" "a\\b" "tab\there" ];
    PATH = "/usr/bin:/bin";
    quotes = "say \"hi\" and 'bye'";
    backslashes = "C:\\dir\\ and \\n literally";
    newlines = "line one\nline two\r\nline three\n";
    unicode = "naïve – ✓";
    inherit src;
  };
  fixed = derivation {
    name = "ferry-fixed";
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" "printf hello > $out" ];
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
  };
  fixedRec = derivation {
    name = "ferry-fixed-rec";
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" "mkdir $out" ];
    outputHashMode = "recursive";
    outputHashAlgo = "sha1";
    outputHash = "0000000000000000000000000000000000000000";
  };
  multi = derivation {
    name = "ferry-multi";
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" "echo > $out; echo > $dev; echo > $lib" ];
    outputs = [ "out" "dev" "lib" ];
  };
  dependent = derivation {
    name = "ferry-dependent";
    system = "aarch64-linux";
    builder = "${simple}/bin/tool";
    args = [ "${multi.dev}" "${multi.lib}/lib" ];
    inherit src;
    extra = builtins.toFile "ferry-extra.txt" "extra";
  };
in { inherit simple fixed fixedRec multi dependent; }
NIX

: >"$out/paths.txt"
for attr in simple:simple fixed:fixed fixedRec:fixed-rec multi:multi dependent:dependent; do
  name=${attr#*:}
  drv=$(nix-instantiate --store "$store" --option substituters '' "$work/drvs.nix" -A "${attr%%:*}" 2>/dev/null)
  cp "$work/root$drv" "$out/$name.drv"
  chmod 644 "$out/$name.drv"
  echo "$name.drv $drv" >>"$out/paths.txt"
done
