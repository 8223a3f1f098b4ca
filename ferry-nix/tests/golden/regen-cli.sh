#!/usr/bin/env bash
# Regenerates tests/golden/cli/ (or cli/nix-LABEL/ under regen-version.sh): what the Nix
# command-line tools print for the calls Ferry makes or parses, with their exit statuses.
#
#   versions/nix-store.txt, nix.txt    `nix-store --version`, `nix --version`
#                                      (ferry-nix/src/nix_version.rs, importer choice)
#   path-info/<case>.json, .stderr     `nix path-info --json ...` (ferry-nix/src/
#                                      path_info.rs parse_path_info_json); <case>.f1 / .f2 the same with
#                                      `--json-format 1` / `2`, which only Nix 2.34 accepts:
#                                      the others' refusal is what is recorded
#       valid        the five valid paths of paths.txt
#       closure      -r of the built output (its references' closure)
#       invalid      one valid path and one that is not
#       drv          -r --derivation of the built output's .drv
#   query/<case>.out, .stderr          nix-store queries the hook's RestoreImporter runs
#                                      (--check-validity --print-invalid, -q --hash) and the
#                                      -q --deriver/--references/--outputs a reader may use
#   post-build/<drv name>.env, .argv   env and argv of a `post-build-hook` (post-build/src)
#   hook/<how>.argv, <how>.stdin       a `build-hook`'s argv and stdin when the hook is set in
#                                      NIX_CONFIG, in nix.conf, or with --option; a hook that
#                                      is not run leaves no files (hook/called.txt says which)
#   statuses.txt                       "<file stem> <exit status>" of every command above
#   paths.txt                          "<name> <store path>" of the objects used
#
# A throwaway chroot store (store dir /nix/store) in a fixed scratch directory, so paths in
# the outputs do not depend on the run; builds are sandboxed with /bin and /usr bind-mounted
# in. Nothing here reaches the network: `substituters` is empty in every configuration.
# registrationTime differs between runs; everything else is stable.
set -euo pipefail
# A clean environment: the post-build hook's recorded env is Nix's plus whatever it inherited.
if [ -z "${FERRY_REGEN_CLEAN:-}" ]; then
  exec env -i FERRY_REGEN_CLEAN=1 ${FERRY_NIX_LABEL:+FERRY_NIX_LABEL=$FERRY_NIX_LABEL} \
    PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 bash "$0" "$@"
fi
here=$(cd "$(dirname "$0")" && pwd)
out=$here/cli${FERRY_NIX_LABEL:+/nix-$FERRY_NIX_LABEL}
work=/tmp/ferry-regen-cli
chmod -R u+w "$work" 2>/dev/null || true
rm -rf "$work" "${out:?}"
mkdir -p "$work/conf" "$work/home" "$out"/{versions,path-info,query,post-build,hook}
trap 'chmod -R u+w "$work" 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"
unset OLDPWD

base_config=$'experimental-features = nix-command\nsubstituters =\n'
export NIX_CONF_DIR=$work/conf NIX_USER_CONF_FILES= NIX_PATH= HOME=$work/home XDG_CACHE_HOME=$work/cache
export NIX_CONFIG=$base_config
unset NIX_REMOTE
store="local?root=$work/root"
# Pinned like regen-wire.sh so that nothing machine-dependent leaks in; sandboxed builds find
# /bin/sh through sandbox-paths. No build users: a root file system need not have them.
nixopts=(--store "$store" --option substituters '' --option cores 1 --option max-jobs 1
  --option build-users-group ''
  --option sandbox true --option sandbox-paths "/bin=/usr/bin /usr /lib /lib64")

: >"$out/statuses.txt"
# run FILE CMD...: stdout to FILE, stderr to FILE's stem + .stderr (kept only if not empty),
# "<stem> <exit status>" to statuses.txt.
run() {
  local file=$1 rc=0
  shift
  local stem=${file%.*}
  "$@" >"$out/$file" 2>"$out/$stem.stderr" || rc=$?
  echo "$stem $rc" >>"$out/statuses.txt"
  [ -s "$out/$stem.stderr" ] || rm -f "$out/$stem.stderr"
}

nix-store --version >"$out/versions/nix-store.txt"
nix --version >"$out/versions/nix.txt"

# --- store objects: the kinds regen-narinfo.sh makes ---
mkdir -p in/tree
printf 'hello cli\n' >in/hello.txt
printf 'flat cli\n' >in/flat.txt
printf 'data\n' >in/tree/data
hello=$(nix-store "${nixopts[@]}" --add in/hello.txt)
tree=$(nix-store "${nixopts[@]}" --add in/tree)
flat=$(nix-store "${nixopts[@]}" --add-fixed sha256 in/flat.txt)
text=$(nix-instantiate "${nixopts[@]}" --eval --read-write-mode \
  -E "builtins.toFile \"mentions-hello\" \"see \${builtins.storePath \"$hello\"}\n\"" | tr -d '"')
cat >drv.nix <<NIX
{
  built = derivation {
    name = "cli-built"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo \${builtins.storePath "$hello"} \$out > \$out" ];
  };
  multi = derivation {
    name = "cli-multi"; system = builtins.currentSystem; builder = "/bin/sh";
    outputs = [ "out" "dev" ];
    args = [ "-c" "echo \$dev > \$out; echo \${builtins.storePath "$text"} > \$dev" ];
  };
  hooked = derivation {
    name = "cli-hooked"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo hooked > \$out" ];
    requiredSystemFeatures = [ "ferry-cli" ];
  };
}
NIX
built_drv=$(nix-instantiate "${nixopts[@]}" drv.nix -A built 2>/dev/null)
built=$(nix-build "${nixopts[@]}" --no-out-link drv.nix -A built 2>/dev/null)
missing=/nix/store/00000000000000000000000000000000-ferry-missing
valid=("$hello" "$tree" "$flat" "$text" "$built")
for v in hello:"$hello" tree:"$tree" flat:"$flat" text:"$text" built:"$built" \
  built-drv:"$built_drv" missing:"$missing"; do
  echo "${v%%:*} ${v#*:}"
done >"$out/paths.txt"

# --- nix path-info --json ---
pi() { nix path-info "${nixopts[@]}" "$@"; }
for f in "" 1 2; do
  fmt=() sfx=
  if [ -n "$f" ]; then fmt=(--json-format "$f") sfx=.f$f; fi
  run "path-info/valid$sfx.json" pi --json "${fmt[@]}" "${valid[@]}"
  run "path-info/closure$sfx.json" pi --json "${fmt[@]}" -r "$built"
  run "path-info/invalid$sfx.json" pi --json "${fmt[@]}" "$hello" "$missing"
  run "path-info/drv$sfx.json" pi --json "${fmt[@]}" -r --derivation "$built_drv"
done

# --- nix-store queries ---
ns() { nix-store "${nixopts[@]}" "$@"; }
run query/check-validity-invalid.out ns --check-validity --print-invalid "$hello" "$missing" "$built"
run query/check-validity-valid.out ns --check-validity --print-invalid "$hello" "$built"
run query/hash.out ns -q --hash "$hello" "$built"
run query/hash-invalid.out ns -q --hash "$missing"
run query/deriver.out ns -q --deriver "$built" "$hello"
run query/references.out ns -q --references "$built"
run query/outputs.out ns -q --outputs "$built_drv"

# --- post-build-hook: argv and environment ---
cat >post-build.sh <<HOOK
#!/bin/sh
name=\$(basename "\$DRV_PATH" .drv); name=\${name#*-}
printf '%s\n' "\$0" "\$@" >"$out/post-build/\$name.argv"
env | LC_ALL=C sort >"$out/post-build/\$name.env"
HOOK
chmod +x post-build.sh
run post-build/build.out nix-build "${nixopts[@]}" --option post-build-hook "$work/post-build.sh" \
  --no-out-link drv.nix -A multi

# --- build-hook: argv and the stdin Nix writes (settings, then `try`) ---
# The hook copies its stdin and declines after a pause, so the derivation is built locally
# and Nix closes the pipe; dash gives background jobs /dev/null as stdin, hence fd 3.
# The three ways of setting build-hook, because where it is honoured differs by version.
: >"$out/hook/called.txt"
for how in nix-config nix-conf option; do
  cat >"hook-$how.sh" <<HOOK
#!/bin/sh
printf '%s\n' "\$0" "\$@" >"$out/hook/$how.argv"
exec 3<&0
cat <&3 >"$out/hook/$how.stdin" &
sleep 2
echo "# decline" >&2
wait
HOOK
  chmod +x "hook-$how.sh"
  conf=$base_config
  hopt=()
  : >"$work/conf/nix.conf"
  case $how in
  nix-config) conf+="build-hook = $work/hook-$how.sh"$'\n' ;;
  nix-conf) echo "build-hook = $work/hook-$how.sh" >"$work/conf/nix.conf" ;;
  option) hopt=(--option build-hook "$work/hook-$how.sh") ;;
  esac
  # A fresh store each time, so that the derivation is not built yet.
  chmod -R u+w "$work/root"
  rm -rf "$work/root"
  NIX_CONFIG=$conf run "hook/$how.build" nix-build "${nixopts[@]}" \
    --option builders ssh://ferry-cli-nowhere --option system-features ferry-cli "${hopt[@]}" \
    --no-out-link drv.nix -A hooked
  : >"$work/conf/nix.conf"
  if [ -f "$out/hook/$how.argv" ]; then
    echo "$how called"
  else
    echo "$how not-called"
  fi >>"$out/hook/called.txt"
done
# Only the statuses of the builds are of interest, not the output paths they printed.
rm -f "$out"/hook/*.build "$out"/post-build/build.out
echo "wrote $(find "$out" -type f | wc -l) files to $out"
