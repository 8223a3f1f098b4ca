# Minimal declarations of the NixOS options that nix/module.nix reads or sets, typed as NixOS
# types them (nixos/modules/...), so that `lib.evalModules` can evaluate the module without
# nixpkgs. Only what the module touches is declared: an option the module sets that is
# missing here makes the evaluation fail, which is the point.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  # nix.settings values (nixos/modules/config/nix.nix: confAtom and lists of them).
  confAtom = types.nullOr (types.oneOf [ types.bool types.int types.float types.str types.path types.package ]);
  # systemd unit values (nixos/lib/systemd-unit-options.nix: unitOption).
  unitOption = types.oneOf [ types.bool types.int types.str types.path (types.listOf (types.oneOf [ types.bool types.int types.str types.path ])) ];
  listOfStr = mkOption { type = types.listOf types.str; default = [ ]; };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };

    nix.package = mkOption { type = types.package; };
    nix.distributedBuilds = mkOption { type = types.bool; default = false; };
    nix.buildMachines = mkOption {
      type = types.listOf (types.submodule {
        options = {
          hostName = mkOption { type = types.str; };
          protocol = mkOption { type = types.nullOr (types.enum [ "ssh" "ssh-ng" ]); default = "ssh"; };
          system = mkOption { type = types.nullOr types.str; default = null; };
          systems = mkOption { type = types.listOf types.str; default = [ ]; };
          sshUser = mkOption { type = types.nullOr types.str; default = null; };
          sshKey = mkOption { type = types.nullOr types.str; default = null; };
          maxJobs = mkOption { type = types.int; default = 1; };
          speedFactor = mkOption { type = types.int; default = 1; };
          supportedFeatures = mkOption { type = types.listOf types.str; default = [ ]; };
          mandatoryFeatures = mkOption { type = types.listOf types.str; default = [ ]; };
          publicHostKey = mkOption { type = types.nullOr types.str; default = null; };
        };
      });
      default = [ ];
    };
    nix.settings = mkOption {
      type = types.submodule {
        freeformType = types.attrsOf (types.either confAtom (types.listOf confAtom));
        options = {
          substituters = mkOption { type = types.listOf types.str; default = [ ]; };
          trusted-public-keys = mkOption { type = types.listOf types.str; default = [ ]; };
          trusted-users = mkOption { type = types.listOf types.str; default = [ "root" ]; };
          max-jobs = mkOption { type = types.either types.int (types.enum [ "auto" ]); default = "auto"; };
        };
      };
      default = { };
    };

    systemd.services = mkOption {
      type = types.attrsOf (types.submodule {
        options = {
          description = mkOption { type = types.str; default = ""; };
          wantedBy = listOfStr;
          requiredBy = listOfStr;
          wants = listOfStr;
          requires = listOfStr;
          after = listOfStr;
          before = listOfStr;
          path = mkOption { type = types.listOf (types.either types.package types.str); default = [ ]; };
          environment = mkOption { type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ])); default = { }; };
          restartTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
          unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
          serviceConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
        };
      });
      default = { };
    };
    systemd.tmpfiles.rules = listOfStr;

    environment.etc = mkOption {
      type = types.attrsOf (types.submodule {
        options.source = mkOption { type = types.path; };
      });
      default = { };
    };
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };

    users.users = mkOption {
      type = types.attrsOf (types.submodule {
        options = {
          isSystemUser = mkOption { type = types.bool; default = false; };
          group = mkOption { type = types.str; default = ""; };
          description = mkOption { type = types.str; default = ""; };
          home = mkOption { type = types.path; default = "/var/empty"; };
          useDefaultShell = mkOption { type = types.bool; default = false; };
          openssh.authorizedKeys.keys = listOfStr;
        };
      });
      default = { };
    };
    users.groups = mkOption { type = types.attrsOf (types.submodule { }); default = { }; };

    services.openssh.enable = mkOption { type = types.bool; default = false; };
    services.openssh.extraConfig = mkOption { type = types.lines; default = ""; };
    networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
  };

  # As NixOS's nix module defines them (definitions, not option defaults, so that other
  # modules' values are merged with them).
  config.nix.settings = {
    substituters = lib.mkAfter [ "https://cache.nixos.org/" ];
    trusted-public-keys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
  };
}
