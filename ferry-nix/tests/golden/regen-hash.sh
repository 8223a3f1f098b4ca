#!/usr/bin/env bash
# Golden hashes: for a few fixed inputs, every encoding Nix 2.8 prints for SHA-256 and SHA-512
# (base-16, Nix base-32, base-64, SRI). Output: hash/hashes.txt, one line per input and algorithm:
#   <input file> <algo> <base16> <base32> <base64> <sri>
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/hash"
mkdir -p "$out/inputs"
printf '' > "$out/inputs/empty"
printf 'hello\n' > "$out/inputs/hello"
head -c 1000 /dev/zero | tr '\0' 'x' > "$out/inputs/x1000"
nix=(nix --extra-experimental-features nix-command)
: > "$out/hashes.txt"
for f in empty hello x1000; do
  for algo in sha256 sha512; do
    b16=$("${nix[@]}" hash file --type "$algo" --base16 "$out/inputs/$f")
    b32=$("${nix[@]}" hash file --type "$algo" --base32 "$out/inputs/$f")
    b64=$("${nix[@]}" hash file --type "$algo" --base64 "$out/inputs/$f")
    sri=$("${nix[@]}" hash file --type "$algo" --sri "$out/inputs/$f")
    # And back: Nix's own conversion from the base-32 form to SRI must agree.
    [ "$("${nix[@]}" hash to-sri --type "$algo" "$b32")" = "$sri" ]
    echo "$f $algo $b16 $b32 $b64 $sri" >> "$out/hashes.txt"
  done
done
