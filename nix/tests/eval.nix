# Evaluates nix/module.nix with nixpkgs' lib and the stubs, under the configuration in the file
# `config`, and returns what it renders, as JSON-able data:
#   nix-instantiate --eval --strict --json nix/tests/eval.nix \
#     --argstr libDir /path/to/nixpkgs-lib/lib --argstr config /path/to/config.nix \
#     --argstr ferry /dir/with/bin --argstr nixPrefix /usr
# `failedAssertions` lists the messages of assertions that fail (a NixOS build would stop
# there); the rest is only computed when none fails.
{ libDir, config, ferry, nixPrefix ? "/usr" }:
let
  lib = import (/. + libDir);
  fakePackage = name: outPath: { type = "derivation"; inherit name outPath; };
  pkgs = import ./pkgs-stub.nix { inherit lib; };
  eval = lib.evalModules {
    modules = [
      ./nixos-stubs.nix
      ../module.nix
      (/. + config)
      {
        _module.args.pkgs = pkgs;
        services.ferry.package = fakePackage "ferry" ferry;
        nix.package = fakePackage "nix" nixPrefix;
      }
    ];
  };
  c = eval.config;
  failed = map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
  ferryLib = import ../lib.nix { inherit lib; };
  service = s: {
    inherit (s) environment serviceConfig unitConfig wantedBy after requires;
    path = map toString s.path;
  };
  toml = c.environment.etc."ferry/ferry.toml".source or null;
in
{
  failedAssertions = failed;
  warnings = c.warnings;
} // lib.optionalAttrs (failed == [ ]) {
  ferryToml = if toml == null then null else toml.value;
  nixSettings = c.nix.settings;
  nixConf = ferryLib.mkNixConf c.nix.settings;
  machines = ferryLib.mkMachinesFile c.nix.buildMachines;
  services = lib.mapAttrs (_: service) c.systemd.services;
  tmpfiles = c.systemd.tmpfiles.rules;
  users = c.users.users;
  sshdExtraConfig = c.services.openssh.extraConfig;
  sshd = c.services.openssh.enable;
  firewallTCP = c.networking.firewall.allowedTCPPorts;
  systemPackages = map toString c.environment.systemPackages;
}
