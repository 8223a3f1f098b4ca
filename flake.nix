{
  description = "Ferry: Nix remote builds and binary caches that never get in your way";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      # One derivation builds the workspace; the three binaries land in $out/bin.
      packages = forAll (pkgs: rec {
        ferry = pkgs.callPackage ./nix/package.nix { };
        default = ferry;
      });

      overlays.default = final: prev: {
        ferry = final.callPackage ./nix/package.nix { };
      };

      # The module works imported by path too (./nix/module.nix); from the flake, its package
      # defaults to this flake's build.
      nixosModules.default = { lib, pkgs, ... }: {
        imports = [ ./nix/module.nix ];
        services.ferry.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.ferry;
      };
      nixosModules.ferry = self.nixosModules.default;

      # For hosts that are not NixOS (Docker images, other distributions): the machines file
      # and nix.conf a NixOS host would get from nix.buildMachines and nix.settings.
      lib = import ./nix/lib.nix { inherit (nixpkgs) lib; };

      # The NixOS VM tests, for users' CI (they need KVM; the same behaviours run on every
      # change on Ferry's namespaced fleet, see integration/tests/e2e/).
      checks = forAll (pkgs:
        nixpkgs.lib.optionalAttrs pkgs.stdenv.isLinux {
          build-hook = import ./vm-tests/build-hook.nix { inherit pkgs self; };
          post-build = import ./vm-tests/post-build.nix { inherit pkgs self; };
          substituter = import ./vm-tests/substituter.nix { inherit pkgs self; };
        });

      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.ferry ];
          packages = with pkgs; [ cargo rustc clippy rustfmt rust-analyzer nix openssh nginx iproute2 ];
        };
      });
    };
}
