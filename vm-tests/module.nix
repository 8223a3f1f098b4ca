# NixOS module for Ferry. Each part has its own enable flag and safe defaults; nothing is
# enabled by default.
self:
{ config, lib, pkgs, ... }:
let
  cfg = config.services.ferry;
  pkg = self.packages.${pkgs.stdenv.hostPlatform.system}.ferry;
in
{
  options.services.ferry = {
    package = lib.mkOption {
      type = lib.types.package;
      default = pkg;
      description = "The Ferry package.";
    };
    buildHook.enable = lib.mkEnableOption "ferry-build-hook as the nix-daemon's build hook";
  };

  config = lib.mkIf cfg.buildHook.enable {
    # Set through the daemon's own options rather than nix.conf: Nix 2.25.0 to 2.33.x ignore
    # `build-hook` in /etc/nix/nix.conf (see docs/hook-protocol.md §1.1).
    nix.settings.build-hook = "${cfg.package}/bin/ferry-build-hook";
    systemd.services.nix-daemon.environment.NIX_CONFIG =
      "build-hook = ${cfg.package}/bin/ferry-build-hook";
  };
}
