#!/usr/bin/env bash
# Regenerates tests/golden/wire/: real wire bytes from Nix (2.8.0 on this machine) for
# ferry-nix/tests/wire.rs.
#
#   serve-request.bin   bytes fed to `nix-store --serve`: handshake (client version 2.7),
#                       QueryValidPaths and QueryPathInfos for two valid paths and one missing one
#   serve-reply.bin     what `nix-store --serve` wrote back
#   serve-expected.txt  the same path infos as printed by `nix-store -q` / `nix path-info`
#   hook-stdin.bin      what Nix writes to a build hook's stdin: the settings stream, then `try`
#   hook-expected.txt   the derivation that hook was asked about
#
# Everything runs against a throwaway chroot store; no daemon, no network.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# FERRY_NIX_LABEL (set by regen-version.sh): another Nix version, written to wire/nix-LABEL/.
out=$here/wire${FERRY_NIX_LABEL:+/nix-$FERRY_NIX_LABEL}
# A fixed scratch path rather than mktemp: the store URI and the hook's path are part of the
# settings stream Nix sends to the hook, so a random name would make every run differ.
work=/tmp/ferry-regen-wire
rm -rf "$work"
mkdir -p "$work/conf" "$work/pkg/share" "$out"
trap 'rm -rf "$work"' EXIT

export NIX_CONF_DIR=$work/conf NIX_USER_CONF_FILES= NIX_CONFIG= NIX_PATH= HOME=$work XDG_CACHE_HOME=$work/cache
unset NIX_REMOTE
store="local?root=$work/root"
# Pin every setting whose default depends on the machine, so the settings stream is stable.
nixopts=(--store "$store" --option substituters '' --option cores 1 --option max-jobs 1
  --option extra-platforms '' --option system-features ferry-wire --option netrc-file /dev/null)

# --- wire encoding for the request (independent of the Rust code under test) ---
u64() {
  local v=$1 i
  for i in 0 1 2 3 4 5 6 7; do
    # shellcheck disable=SC2059
    printf "\\x$(printf %02x $(((v >> (8 * i)) & 255)))"
  done
}
str() {
  local s=$1
  u64 "${#s}"
  printf '%s' "$s"
  head -c $(((8 - ${#s} % 8) % 8)) /dev/zero
}
strs() {
  u64 $#
  local s
  for s in "$@"; do str "$s"; done
}

# --- a small store: a flat file added by content, and a built output with references ---
cd "$work"
printf 'hello wire\n' >hello.txt
printf 'dependency\n' >pkg/share/dep.txt
hello=$(nix-store "${nixopts[@]}" --add hello.txt)
# builtin:buildenv runs inside the chroot store without /bin/sh; its output links to `pkg`
# and to the manifest, so the path has a deriver and two references.
cat >golden.nix <<'EOF'
let pkg = builtins.path { path = ./pkg; name = "wire-pkg"; }; in
derivation {
  name = "wire-golden"; system = builtins.currentSystem; builder = "builtin:buildenv";
  manifest = builtins.toFile "manifest.nix" "[]"; derivations = "1 5 1 ${pkg}";
}
EOF
golden=$(nix-build "${nixopts[@]}" --no-out-link golden.nix 2>/dev/null)
missing=/nix/store/00000000000000000000000000000000-ferry-missing

# --- serve protocol session ---
{
  u64 $((0x390c9deb)) # SERVE_MAGIC_1
  u64 $((0x207))      # client version 2.7
  u64 1               # cmdQueryValidPaths
  u64 0               # lock
  u64 0               # substitute
  strs "$hello" "$golden" "$missing"
  u64 2 # cmdQueryPathInfos
  strs "$hello" "$golden" "$missing"
} >"$out/serve-request.bin"
nix-store "${nixopts[@]}" --serve <"$out/serve-request.bin" >"$out/serve-reply.bin"

{
  for p in "$hello" "$golden" "$missing"; do echo "request $p"; done
  for p in "$hello" "$golden"; do
    echo "path $p"
    d=$(nix-store "${nixopts[@]}" -q --deriver "$p")
    [ "$d" = unknown-deriver ] && d=
    echo "deriver $d"
    nix-store "${nixopts[@]}" -q --references "$p" | sed 's/^/reference /'
    echo "nar-size $(nix-store "${nixopts[@]}" -q --size "$p")"
    echo "nar-hash $(nix-store "${nixopts[@]}" -q --hash "$p")"
    echo "ca $(nix --extra-experimental-features nix-command path-info "${nixopts[@]}" --json "$p" |
      perl -MJSON::PP -0777 -ne '$j = decode_json($_);
        ($e) = ref $j eq "ARRAY" ? @$j : values %$j; print $e->{ca} // ""')"
  done
} >"$out/serve-expected.txt"

# --- build-hook stdin ---
# The hook copies its stdin to a file and declines after a pause, so the derivation is
# built locally and Nix closes the pipe at the end. dash gives background jobs /dev/null
# as stdin, hence the copy through fd 3.
cat >hook.sh <<EOF
#!/bin/sh
exec 3<&0
cat <&3 >"$work/hook-stdin.bin" &
sleep 2
echo "# decline" >&2
wait
EOF
chmod +x hook.sh
cat >hook.nix <<'EOF'
derivation {
  name = "wire-hook"; system = builtins.currentSystem; builder = "builtin:buildenv";
  manifest = builtins.toFile "manifest.nix" "[]"; derivations = "";
  requiredSystemFeatures = [ "ferry-wire" ];
}
EOF
drv=$(nix-instantiate "${nixopts[@]}" hook.nix 2>/dev/null)
nix-build "${nixopts[@]}" --option build-hook "$work/hook.sh" --option builders ssh://ferry-wire-nowhere \
  --no-out-link hook.nix >/dev/null 2>&1
cp "$work/hook-stdin.bin" "$out/hook-stdin.bin"
{
  echo "drv $drv"
  echo "system $(nix-instantiate "${nixopts[@]}" --eval -E builtins.currentSystem | tr -d '"')"
  echo "build-hook $work/hook.sh"
  echo "store $store"
  echo "builders ssh://ferry-wire-nowhere"
  echo "system-features ferry-wire"
  echo "nix-version $(nix-store --version)"
} >"$out/hook-expected.txt"
ls -l "$out"
