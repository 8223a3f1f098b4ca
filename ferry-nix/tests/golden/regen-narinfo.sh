#!/usr/bin/env bash
# Regenerates ferry-nix/tests/golden/narinfo/ with the real Nix on PATH (Nix 2.8.0).
#
# In a throwaway chroot store it creates a few deterministic store paths:
#   - `nix-store --add` of a file and of a directory (CA fixed:r:sha256, no references),
#   - `nix-store --add-fixed sha256` of a file (CA fixed:sha256, flat),
#   - `builtins.toFile` text that mentions the first file (CA text:sha256, one reference),
#   - a tiny `builtins.derivation` whose output mentions the first file and itself
#     (input-addressed: Deriver, two references including a self-reference, no CA).
# It signs them in the store with test key 1 (`nix store sign`), records Nix's signatures
# (`nix path-info --json`), then `nix copy`s them to two file:// caches signed with test key 2,
# one uncompressed and one xz-compressed.
#
# The key pairs are test keys committed next to this data. They are generated only when
# missing, so a rerun reuses them and rewrites byte-identical files.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# FERRY_NIX_LABEL (set by regen-version.sh): another Nix version, written to narinfo/nix-LABEL/;
# the test keys stay shared in narinfo/.
keys="$here/narinfo"
out="$here/narinfo${FERRY_NIX_LABEL:+/nix-$FERRY_NIX_LABEL}"
mkdir -p "$out"

tmp=$(mktemp -d)
trap 'chmod -R u+w "$tmp" 2>/dev/null || true; rm -rf "$tmp"' EXIT

# Isolate Nix from the user's and the system's settings and caches.
export HOME="$tmp/home" XDG_CACHE_HOME="$tmp/cache" XDG_CONFIG_HOME="$tmp/config"
export NIX_CONFIG=$'experimental-features = nix-command\nsubstituters =\n'
unset NIX_REMOTE NIX_USER_CONF_FILES || true
mkdir -p "$HOME"
store="local?root=$tmp/root"

for k in 1 2; do
  if [[ ! -f "$keys/ferry-test-$k.sec" || ! -f "$keys/ferry-test-$k.pub" ]]; then
    nix-store --generate-binary-cache-key "ferry-test-$k" "$keys/ferry-test-$k.sec" "$keys/ferry-test-$k.pub"
  fi
done

# Fixed inputs. nix-store --add records only the executable bit, not other modes or times.
mkdir -p "$tmp/in/tree/sub"
printf 'hello ferry\n' >"$tmp/in/hello.txt"
printf 'flat fixed-output content\n' >"$tmp/in/flat.txt"
printf 'data\n' >"$tmp/in/tree/data"
printf '#!/bin/sh\necho run\n' >"$tmp/in/tree/sub/run"
chmod +x "$tmp/in/tree/sub/run"
ln -s ../data "$tmp/in/tree/sub/link"

hello=$(nix-store --store "$store" --add "$tmp/in/hello.txt")
tree=$(nix-store --store "$store" --add "$tmp/in/tree")
flat=$(nix-store --store "$store" --add-fixed sha256 "$tmp/in/flat.txt")

# --read-write-mode: without it `--eval` only computes the toFile path and writes nothing.
text=$(nix-instantiate --store "$store" --eval --read-write-mode \
  -E "builtins.toFile \"mentions-hello\" \"see \${builtins.storePath \"$hello\"}\n\"" | tr -d '"')

cat >"$tmp/drv.nix" <<EOF
builtins.derivation {
  name = "with-refs";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo \${builtins.storePath "$hello"} \$out > \$out" ];
}
EOF
# A chroot store builds in a chroot, so /bin/sh and its libraries are bind-mounted in.
built=$(nix-build --store "$store" --no-out-link --option substituters '' \
  --option sandbox true --option sandbox-paths "/bin=/usr/bin /usr /lib /lib64" "$tmp/drv.nix")

paths=("$hello" "$tree" "$flat" "$text" "$built")

nix store sign --store "$store" --key-file "$keys/ferry-test-1.sec" "${paths[@]}"

# Nix's own signatures from the store DB: one "<store path> <sig>" line per signature.
# Perl's core JSON::PP rather than jq, which the Debian root file systems lack; it reads both
# shapes: an array of objects with "path" (Nix 2.8-2.18) and an object keyed by path (2.19+).
nix path-info --store "$store" --json "${paths[@]}" |
  perl -MJSON::PP -0777 -ne '$j = decode_json($_);
    @e = ref $j eq "ARRAY" ? map { [$_->{path}, $_] } @$j : map { [$_, $j->{$_}] } keys %$j;
    for $e (@e) { print "$e->[0] $_\n" for @{ $e->[1]{signatures} || [] } }' |
  LC_ALL=C sort >"$out/sigs.txt"

for c in none xz; do
  rm -rf "${out:?}/$c"
  mkdir -p "$out/$c"
  nix copy --store "$store" --to "file://$tmp/cache-$c?compression=$c&secret-key=$keys/ferry-test-2.sec" "${paths[@]}"
  cp "$tmp/cache-$c"/*.narinfo "$out/$c/"
  cp "$tmp/cache-$c/nix-cache-info" "$out/$c/nix-cache-info"
done

# A small index so the tests know which golden file is which path.
for p in "${paths[@]}"; do
  b=${p##*/}
  printf '%s %s\n' "${b%%-*}" "$p"
done >"$out/paths.txt"

ls -l "$out" "$out/none" "$out/xz"
