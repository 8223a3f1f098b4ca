# NixOS VM test for users' CI (needs KVM). services.ferry.postBuild uploads what a client
# builds to a cache on another node served by nginx (WebDAV PUT); the uploader is killed in the
# middle and restarted by systemd; a second client with require-sigs substitutes everything.
# On the fleet: integration/tests/e2e/post_build.rs (builds_are_uploaded_and_substituted_with_signatures,
# uploader_survives_sigkill_at_random_moments) and nixos_module.rs (the rendered uploader).
{ pkgs, self }:
let
  keyName = "ferry-vm-1";
  drvs = pkgs.writeText "ferry-up.nix" ''
    builtins.genList (i: builtins.derivation { name = "ferry-up-''${toString i}"; system = builtins.currentSystem;
      builder = "/bin/sh"; args = [ "-c" "head -c 200000 /dev/urandom > $out" ]; }) 20
  '';
in
pkgs.testers.runNixOSTest {
  name = "ferry-post-build";
  nodes = {
    cache = { ... }: {
      networking.firewall.allowedTCPPorts = [ 80 ];
      services.nginx = {
        enable = true;
        virtualHosts.cache = {
          default = true;
          root = "/var/www/cache";
          locations."/".extraConfig = "dav_methods PUT; create_full_put_path on; client_max_body_size 0;";
        };
      };
      systemd.tmpfiles.rules = [ "d /var/www/cache 0755 nginx nginx - -" ];
      systemd.services.nginx.serviceConfig.ReadWritePaths = [ "/var/www/cache" ];
    };
    builder = { ... }: {
      imports = [ self.nixosModules.default ];
      services.ferry.postBuild = {
        enable = true;
        targets = [ "http://cache" ];
        generateKey = { enable = true; name = keyName; };
      };
      nix.settings.sandbox = false;
    };
    consumer = { ... }: {
      nix.settings.substituters = pkgs.lib.mkForce [ "http://cache" ];
      nix.settings.require-sigs = true;
    };
  };
  testScript = ''
    # Fleet counterpart (runs on every change): integration/tests/e2e/post_build.rs, nixos_module.rs
    start_all()
    cache.wait_for_unit("nginx.service")
    builder.wait_for_unit("ferry-post-build.service")
    pub = builder.succeed("cat /var/lib/ferry/keys/${keyName}.pub").strip()
    cache.succeed("printf 'StoreDir: /nix/store\\nPriority: 30\\n' > /var/www/cache/nix-cache-info")
    outs = builder.succeed("nix-build --no-out-link ${drvs}").split()
    # Kill the uploader in the middle; systemd restarts it and the queue survives.
    builder.succeed("systemctl kill -s KILL ferry-post-build.service")
    builder.wait_for_unit("ferry-post-build.service")
    builder.wait_until_succeeds("ferry-post-build status | grep 'queued jobs: 0'", timeout=120)
    consumer.succeed(f"nix-store -r --option trusted-public-keys '{pub}' {' '.join(outs)}")
    for o in outs:
        consumer.succeed(f"nix-store --verify-path {o}")
  '';
}
