{
  description = "Ferry: Nix remote builds and binary caches that never get in your way";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAll (pkgs: rec {
        # One derivation builds the workspace; the three binaries land in $out/bin.
        ferry = pkgs.rustPlatform.buildRustPackage {
          pname = "ferry";
          version = "0.1.0";
          src = self;
          cargoLock.lockFile = ./Cargo.lock;
          cargoBuildFlags = [ "-p" "ferry-build-hook" "-p" "ferry-post-build" "-p" "ferry-substituter" ];
          # The workspace tests need root, namespaces and a nix-daemon fleet: they run in
          # `dev/test` and in the VM tests, not in the sandbox.
          doCheck = false;
          meta = {
            description = "Ferry build hook, post-build uploader and substituter for Nix";
            license = with pkgs.lib.licenses; [ mit asl20 ];
            mainProgram = "ferry-build-hook";
          };
        };
        default = ferry;
      });

      nixosModules.default = import ./vm-tests/module.nix self;

      checks = forAll (pkgs:
        nixpkgs.lib.optionalAttrs pkgs.stdenv.isLinux {
          build-hook = import ./vm-tests/build-hook.nix { inherit pkgs self; };
        });
    };
}
