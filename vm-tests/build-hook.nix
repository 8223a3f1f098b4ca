# NixOS VM test for users' CI: a client offloads a build to a builder through
# ferry-build-hook. The same behaviour is covered on every change by integration/tests/
# on a namespaced fleet (VM tests cannot run on Ferry's development machines).
{ pkgs, self }:
let
  sshKeys = import "${pkgs.path}/nixos/tests/ssh-keys.nix" pkgs;
in
pkgs.testers.runNixOSTest {
  name = "ferry-build-hook";
  nodes = {
    builder = { ... }: {
      services.openssh.enable = true;
      users.users.root.openssh.authorizedKeys.keys = [ sshKeys.snakeOilPublicKey ];
      nix.settings.sandbox = false;
    };
    client = { ... }: {
      imports = [ self.nixosModules.default ];
      services.ferry.buildHook.enable = true;
      nix.distributedBuilds = true;
      nix.buildMachines = [{
        hostName = "builder";
        sshUser = "root";
        sshKey = "/root/.ssh/id_ed25519";
        system = pkgs.stdenv.hostPlatform.system;
        maxJobs = 2;
      }];
      nix.settings.max-jobs = 0;
      nix.settings.sandbox = false;
    };
  };
  testScript = ''
    start_all()
    builder.wait_for_unit("sshd.service")
    client.succeed("mkdir -p /root/.ssh && install -m 600 ${sshKeys.snakeOilPrivateKey} /root/.ssh/id_ed25519")
    client.succeed("ssh -o StrictHostKeyChecking=accept-new builder true")
    out = client.succeed(
      "nix-build --no-out-link -E 'builtins.derivation { name = \"ferry-vm\"; system = builtins.currentSystem; "
      + "builder = \"/bin/sh\"; args = [ \"-c\" \"echo ok > $out\" ]; }'"
    ).strip()
    builder.succeed(f"test -e {out}")
    client.succeed(f"nix-store --verify-path {out}")
  '';
}
