# NixOS VM test for users' CI (needs KVM). services.ferry.substituter on a client, in front of
# three upstreams: a dead host, a server that answers 500 to everything, and a good signed
# cache. `nix-store -r` succeeds with no warning and no retry.
# On the fleet: integration/tests/e2e/substituter.rs (dead, 500 and good upstreams, breakers) and
# nixos_module.rs (the rendered substituter serving a laptop through a NAS).
{ pkgs, self }:
let
  inherit (import ./lib.nix { inherit pkgs; }) shDrv;
  drv = shDrv "ferry-sub-vm.nix" "ferry-sub-vm" "echo substituted > $out";
in
pkgs.testers.runNixOSTest {
  name = "ferry-substituter";
  nodes = {
    good = { ... }: {
      networking.firewall.allowedTCPPorts = [ 80 ];
      services.nginx = { enable = true; virtualHosts.good = { default = true; root = "/var/www/cache"; }; };
      nix.settings.sandbox = false;
    };
    broken = { ... }: {
      networking.firewall.allowedTCPPorts = [ 80 ];
      services.nginx = { enable = true; virtualHosts.broken = { default = true; locations."/".return = "500"; }; };
    };
    client = { ... }: {
      imports = [ self.nixosModules.default ];
      services.ferry.substituter = {
        enable = true;
        replaceNixSubstituters = true;
        # The good cache's key is made at run time: Ferry passes its signatures on
        # (serve-untrusted) and the client's Nix checks them with the key the script gives it.
        upstreams = [
          { url = "http://192.0.2.1"; priority = 10; }
          { url = "http://broken"; priority = 20; }
          { url = "http://good"; priority = 30; }
        ];
        settings.serve-untrusted = true;
      };
    };
  };
  testScript = ''
    # Fleet counterpart (runs on every change): integration/tests/e2e/substituter.rs, nixos_module.rs
    start_all()
    good.wait_for_unit("nginx.service")
    broken.wait_for_unit("nginx.service")
    client.wait_for_unit("ferry-substituter.service")
    good.succeed("nix-store --generate-binary-cache-key good-1 /root/sk /root/pk")
    out = good.succeed("nix-build --no-out-link ${drv}").strip()
    good.succeed(f"nix copy --extra-experimental-features nix-command --to 'file:///var/www/cache?secret-key=/root/sk' {out}")
    good.succeed("chmod -R a+rX /var/www/cache")
    pub = good.succeed("cat /root/pk").strip()
    client.succeed(f"nix-store -r --option trusted-public-keys '{pub}' --option require-sigs true {out} 2> err")
    client.fail("grep -i 'warning\\|retrying\\|error' err")
    client.succeed(f"nix-store --verify-path {out}")
  '';
}
