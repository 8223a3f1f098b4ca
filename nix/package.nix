# Ferry's three binaries from this source tree (callPackage-able; the flake's
# `packages.ferry` and `overlays.default` use it).
{ lib, rustPlatform, pkg-config, zstd }:
rustPlatform.buildRustPackage {
  pname = "ferry";
  version = "0.1.0";
  src = lib.cleanSource ../.;
  cargoLock.lockFile = ../Cargo.lock;
  # The uploader links the system libzstd through pkg-config (zstd-sys' `pkg-config` feature).
  nativeBuildInputs = [ pkg-config ];
  buildInputs = [ zstd ];
  cargoBuildFlags = [ "-p" "ferry-build-hook" "-p" "ferry-post-build" "-p" "ferry-substituter" ];
  # The workspace tests need root, namespaces and a nix-daemon fleet: they run in `dev/test`
  # and in the VM tests, not in the build sandbox.
  doCheck = false;
  meta = {
    description = "Ferry build hook, post-build uploader and substituter for Nix";
    license = with lib.licenses; [ mit asl20 ];
    platforms = lib.platforms.linux;
    mainProgram = "ferry-build-hook";
  };
}
