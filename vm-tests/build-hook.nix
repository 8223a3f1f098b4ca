# NixOS VM test for users' CI (needs KVM; it cannot run on Ferry's development machines).
# The seed scenario: a client offloads through services.ferry.buildHook to two builders set up
# with services.ferry.builder; one is down, so builds go to the other; with both down the
# client builds locally; with max-jobs = 0 and both down, the build fails at once with a clear
# error. On the fleet: integration/tests/e2e/hook.rs, hook_health.rs (dead builders, fallback,
# max-jobs = 0) and nixos_module.rs (the module's rendered hook and builder).
{ pkgs, self }:
let
  sshKeys = import "${pkgs.path}/nixos/tests/ssh-keys.nix" pkgs;
  builderNode = { ... }: {
    imports = [ self.nixosModules.default ];
    services.ferry.builder = { enable = true; authorizedKeys = [ sshKeys.snakeOilPublicKey ]; };
    nix.settings.sandbox = false;
  };
  inherit (import ./lib.nix { inherit pkgs; }) shDrv;
  drv = tag: shDrv "ferry-vm-${tag}.nix" "ferry-vm-${tag}" "echo ${tag} > $out";
in
pkgs.testers.runNixOSTest {
  name = "ferry-build-hook";
  nodes = {
    up = builderNode;
    down = builderNode;
    client = { ... }: {
      imports = [ self.nixosModules.default ];
      services.ferry.buildHook.enable = true;
      nix.distributedBuilds = true;
      nix.buildMachines = map (h: {
        hostName = h;
        sshUser = "nix-builder";
        sshKey = "/root/.ssh/id_ed25519";
        system = pkgs.stdenv.hostPlatform.system;
        maxJobs = 2;
      }) [ "down" "up" ];
      nix.settings.sandbox = false;
    };
  };
  testScript = ''
    # Fleet counterpart (runs on every change): integration/tests/e2e/hook.rs, hook_health.rs, nixos_module.rs
    start_all()
    up.wait_for_unit("sshd.service")
    down.shutdown()
    client.succeed("mkdir -p /root/.ssh && install -m 600 ${sshKeys.snakeOilPrivateKey} /root/.ssh/id_ed25519")
    client.succeed("ssh-keyscan up >> /root/.ssh/known_hosts")
    # One builder down: the build goes to the other, -j0 so it cannot be local.
    out = client.succeed("nix-build -j0 --no-out-link ${drv "remote"}").strip()
    up.succeed(f"test -e {out}")
    client.succeed("ferry-build-hook status | grep -i down")
    # Both down: local fallback.
    up.shutdown()
    client.succeed("nix-build --no-out-link ${drv "local"}")
    # Both down and max-jobs = 0: a clear error, quickly.
    client.fail("timeout 30 nix-build -j0 --no-out-link ${drv "nowhere"} 2> err")
    client.succeed("grep -i 'ferry\\|builder' err")
  '';
}
