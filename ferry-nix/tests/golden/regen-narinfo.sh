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
out="$here/narinfo"
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
  if [[ ! -f "$out/ferry-test-$k.sec" || ! -f "$out/ferry-test-$k.pub" ]]; then
    nix-store --generate-binary-cache-key "ferry-test-$k" "$out/ferry-test-$k.sec" "$out/ferry-test-$k.pub"
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

nix store sign --store "$store" --key-file "$out/ferry-test-1.sec" "${paths[@]}"

# Nix's own signatures from the store DB: one "<store path> <sig>" line per signature.
nix path-info --store "$store" --json "${paths[@]}" |
  jq -r '.[] | .path as $p | (.signatures // [])[] | "\($p) \(.)"' | LC_ALL=C sort >"$out/sigs.txt"

for c in none xz; do
  rm -rf "${out:?}/$c"
  mkdir -p "$out/$c"
  nix copy --store "$store" --to "file://$tmp/cache-$c?compression=$c&secret-key=$out/ferry-test-2.sec" "${paths[@]}"
  cp "$tmp/cache-$c"/*.narinfo "$out/$c/"
  cp "$tmp/cache-$c/nix-cache-info" "$out/$c/nix-cache-info"
done

# A small index so the tests know which golden file is which path.
for p in "${paths[@]}"; do
  b=${p##*/}
  printf '%s %s\n' "${b%%-*}" "$p"
done >"$out/paths.txt"

ls -l "$out" "$out/none" "$out/xz"
