# The few parts of nixpkgs the module uses, for evaluation without nixpkgs.
# `formats.toml` keeps the value it would render (nixpkgs renders it to TOML with a builder;
# the test renders it with Rust's `toml` crate and feeds it to the binaries' check-config).
{ lib }:
{
  stdenv.hostPlatform.system = "x86_64-linux";
  formats.toml = { }: {
    # As nixpkgs types TOML values: scalars, lists and tables of them.
    type = with lib.types;
      let
        valueType = oneOf [ bool int float str path (attrsOf valueType) (listOf valueType) ] // {
          description = "TOML value";
        };
      in
      attrsOf valueType;
    generate = name: value: {
      type = "derivation";
      inherit name value;
      outPath = "/nix/store/00000000000000000000000000000000-${name}";
    };
  };
}
