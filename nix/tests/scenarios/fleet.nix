# The coordinator of a small build fleet: three identical ARM boards and an x86 box; builds go
# to the fleet, a fast box is preferred, and the coordinator itself is a builder for the
# boards. Everything built is uploaded to the NAS's cache over HTTP.
{
  services.ferry.buildHook = {
    enable = true;
    settings = { probe-timeout-ms = 1500; backoff-cap-secs = 300; prefer-remote = true; };
  };
  nix.distributedBuilds = true;
  nix.settings.max-jobs = 0;
  nix.buildMachines =
    map (n: { hostName = n; sshUser = "nix-builder"; sshKey = "/etc/nix/fleet_key"; system = "aarch64-linux"; maxJobs = 4; }) [ "opi01" "opi02" "opi03" ]
    ++ [{ hostName = "ser5"; sshUser = "nix-builder"; sshKey = "/etc/nix/fleet_key"; systems = [ "x86_64-linux" "i686-linux" ]; maxJobs = 16; speedFactor = 8; supportedFeatures = [ "big-parallel" ]; protocol = "ssh"; }];
  services.ferry.builder = {
    enable = true;
    authorizedKeys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK1b3s6fA0pL2n8Yq7vW4cX9dE5fG6hJ7kL8mN9oP0qR root@calypso" ];
  };
  services.ferry.postBuild = {
    enable = true;
    targets = [ "http://nas-01.lan/upload" ];
    secretKeyFiles = [ "/etc/nix/fleet-cache.sec" ];
  };
}
