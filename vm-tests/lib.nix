# Shared by the VM tests: derivation files that need nothing but /bin/sh, for nix-build
# inside a VM.
{ pkgs }:
{
  # A file `fileName` holding `builtins.derivation` `name` whose builder runs `script`.
  shDrv = fileName: name: script: pkgs.writeText fileName ''
    builtins.derivation { name = "${name}"; system = builtins.currentSystem;
      builder = "/bin/sh"; args = [ "-c" "${script}" ]; }
  '';
}
