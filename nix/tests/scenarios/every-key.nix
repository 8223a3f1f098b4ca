# Every typed key of every section set to a valid value that differs from the binary's
# default: the rendered ferry.toml must pass each binary's check-config.
{
  services.ferry.buildHook = {
    enable = true;
    settings = {
      probe-timeout-ms = 900; probe-grace-ms = 100; backoff-base-secs = 5; backoff-cap-secs = 60;
      stale-after-secs = 30; prefer-remote = false; stock-hook = "/run/current-system/sw/bin/nix __build-remote";
      probe-transport = "russh"; build-transport = "openssh"; import-method = "restore";
    };
  };
  services.ferry.postBuild = {
    enable = true;
    targets = [ "file:///srv/cache?compression=xz" "https://cache.example/upload" ];
    secretKeyFiles = [ "/etc/nix/a.sec" "/etc/nix/b.sec" ];
    settings = {
      state-dir = "/var/lib/ferry/post-build"; store-dir = "/nix/store"; nix-state-dir = "/nix/var/nix";
      gc-roots = false; concurrency = 2; compression = "none"; zstd-level = 9; xz-level = 3;
      retry-initial-ms = 500; retry-max-secs = 60; poll-ms = 100; connect-timeout-secs = 3;
    };
  };
  services.ferry.substituter = {
    enable = true;
    port = 37600;
    workers = 2;
    cache = { enable = true; maxSize = "1G"; maxAge = "7d"; };
    upstreams = [{
      url = "http://127.0.0.1:5000"; priority = 15; connect-timeout-ms = 150; read-timeout-ms = 1000;
      rate-limit = 0; max-in-flight = 8; breaker-failures = 5; breaker-cooldown-ms = 1000;
    }];
    settings = {
      store-dir = "/nix/store"; priority = 25; narinfo-deadline-ms = 1500; head-start-ms = 100;
      negative-ttl-secs = 30; positive-ttl-secs = 600; trusted-public-keys = [ ];
      nix-conf-dir = "/etc/nix"; serve-untrusted = true; nar-idle-timeout-ms = 20000;
    };
  };
}
