# Plain functions for hosts that are not NixOS (Docker images, other distributions, macOS):
# the machines file and nix.conf that a NixOS host would get from `nix.buildMachines` and
# `nix.settings`. They need only nixpkgs' `lib`: the flake exports them as `lib`.
{ lib }:
let
  inherit (lib) concatStringsSep concatMapStrings isList isBool isAttrs isDerivation
    mapAttrsToList filterAttrs optionalString;
  dash = s: if s == null || s == "" || s == [ ] then "-" else s;
in
rec {
  # One machines-file line per machine, from attribute sets shaped like NixOS's
  # `nix.buildMachines` entries: hostName (required), protocol ("ssh" by default, or
  # "ssh-ng", or null for none), sshUser, sshKey, system or systems, maxJobs, speedFactor,
  # supportedFeatures, mandatoryFeatures, publicHostKey (base64 of the host key line).
  # ferry-build-hook speaks `ssh://` itself and hands `ssh-ng://` to Nix's own hook.
  mkMachineLine = m:
    let
      protocol = m.protocol or "ssh";
      user = m.sshUser or null;
      systems =
        if m ? systems && m.systems != [ ] then m.systems
        else if m ? system && m.system != null then [ m.system ]
        else throw "mkMachinesFile: machine ${m.hostName} names no system (system or systems)";
      features = m.supportedFeatures or [ ];
      mandatory = m.mandatoryFeatures or [ ];
    in
    concatStringsSep " " [
      "${optionalString (protocol != null) "${protocol}://"}${optionalString (user != null) "${user}@"}${m.hostName}"
      (concatStringsSep "," systems)
      (dash (m.sshKey or null))
      (toString (m.maxJobs or 1))
      (toString (m.speedFactor or 1))
      (dash (concatStringsSep "," (features ++ mandatory)))
      (dash (concatStringsSep "," mandatory))
      (dash (m.publicHostKey or null))
    ];

  mkMachinesFile = machines: concatMapStrings (m: mkMachineLine m + "\n") machines;

  # nix.conf text from a `nix.settings`-like attribute set: lists are joined by spaces,
  # booleans are true/false, packages are their store paths, nulls are left out.
  # Remember that Nix 2.25 to 2.33 ignore `build-hook` here: a daemon of those versions needs
  # it in its environment as well (NIX_CONFIG="build-hook = …"; see README.md).
  mkNixConf = settings:
    let
      atom = v:
        if isBool v then (if v then "true" else "false")
        else if isDerivation v then v.outPath
        else toString v;
      value = v: if isList v then concatStringsSep " " (map atom v) else atom v;
      kept = filterAttrs (_: v: v != null && !(isAttrs v && !isDerivation v)) settings;
    in
    concatStringsSep "" (mapAttrsToList (k: v: "${k} = ${value v}\n") kept);
}
