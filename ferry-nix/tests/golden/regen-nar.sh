#!/usr/bin/env bash
# Regenerates tests/golden/nar/: the `nix-store --dump` of a few small trees and their
# NAR sizes and hashes, with the real Nix on PATH (Nix 2.8.0 here).
#
# The trees are built from scratch here and again by ferry-nix/tests/nar.rs (`build_case`),
# because git keeps neither empty directories nor exact modes. THE RECIPE (keep both copies
# identical; modes are explicit so the umask does not matter):
#
#   tree/                      directory (0755)
#     empty                    ""                                       0644
#     exec.sh                  "#!/bin/sh\necho hello\n"                0755  executable
#     owner-x                  "owner may execute\n"                    0744  executable (S_IXUSR)
#     group-x                  "group and others may execute\n"         0655  not executable
#     odd.txt                  "hello, nar\n" (11 bytes)                0644
#     eight.bin                "12345678" (exactly 8 bytes)             0644
#     B, a, _, .hidden, é      "<name>\n"                               0644
#     nested/deeper/leaf.txt   "leaf\n"                                 0644
#     nested/empty-dir/        empty directory
#     emptydir/                empty directory
#     link-rel  -> nested/deeper/leaf.txt
#     link-abs  -> /nonexistent/absolute/target
#     link-up   -> ../..
#   file                       "top-level file\n"                       0644
#   exec-file                  "#!/bin/sh\nexit 0\n"                    0755
#   symlink   -> some/relative/target
#   empty-dir/                 empty directory
#   empty-file                 ""                                       0644
#
# Output: <case>.nar for each case, and hashes.txt with one line per case:
#   <case> <NAR size> <sha256 hex of the NAR> <nix-hash --type sha256 --base32 of the tree>
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# FERRY_NIX_LABEL (set by regen-version.sh): another Nix version, written to nar/nix-LABEL/.
out="$here/nar${FERRY_NIX_LABEL:+/nix-$FERRY_NIX_LABEL}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
umask 022

put() { # put FILE MODE CONTENT
  printf '%s' "$3" >"$1"
  chmod "$2" "$1"
}

t="$tmp/tree"
mkdir -p "$t/nested/deeper" "$t/nested/empty-dir" "$t/emptydir"
put "$t/empty" 0644 ''
put "$t/exec.sh" 0755 $'#!/bin/sh\necho hello\n'
put "$t/owner-x" 0744 $'owner may execute\n'
put "$t/group-x" 0655 $'group and others may execute\n'
put "$t/odd.txt" 0644 $'hello, nar\n'
put "$t/eight.bin" 0644 '12345678'
for n in B a _ .hidden $'\xc3\xa9'; do
  put "$t/$n" 0644 "$n"$'\n'
done
put "$t/nested/deeper/leaf.txt" 0644 $'leaf\n'
ln -s nested/deeper/leaf.txt "$t/link-rel"
ln -s /nonexistent/absolute/target "$t/link-abs"
ln -s ../.. "$t/link-up"
chmod 0755 "$t" "$t/nested" "$t/nested/deeper" "$t/nested/empty-dir" "$t/emptydir"

put "$tmp/file" 0644 $'top-level file\n'
put "$tmp/exec-file" 0755 $'#!/bin/sh\nexit 0\n'
ln -s some/relative/target "$tmp/symlink"
mkdir -m 0755 "$tmp/empty-dir"
put "$tmp/empty-file" 0644 ''

mkdir -p "$out"
rm -f "$out"/*.nar "$out/hashes.txt"
for c in tree file exec-file symlink empty-dir empty-file; do
  nix-store --dump "$tmp/$c" >"$out/$c.nar"
  size=$(stat -c %s "$out/$c.nar")
  hex=$(sha256sum <"$out/$c.nar" | cut -d' ' -f1)
  b32=$(nix-hash --type sha256 --base32 "$tmp/$c")
  echo "$c $size $hex $b32" >>"$out/hashes.txt"
  # Sanity check: Nix restores its own dump to an identical tree.
  nix-store --restore "$tmp/restored-$c" <"$out/$c.nar"
  cmp <(nix-store --dump "$tmp/restored-$c") "$out/$c.nar"
done
echo "wrote $(ls "$out" | wc -l) files to $out"
