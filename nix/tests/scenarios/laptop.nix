# A laptop that offloads to a desktop which is often switched off, keeps building locally
# when it is, and substitutes through a local Ferry from the desktop's cache first.
{
  services.ferry.buildHook.enable = true;
  nix.distributedBuilds = true;
  nix.buildMachines = [{
    hostName = "desktop.lan";
    sshUser = "nix-builder";
    sshKey = "/etc/nix/builder_key";
    system = "x86_64-linux";
    maxJobs = 8;
    speedFactor = 4;
    supportedFeatures = [ "big-parallel" "kvm" ];
  }];
  services.ferry.substituter = {
    enable = true;
    upstreams = [
      { url = "http://desktop.lan:37515"; priority = 10; publicKeys = [ "desktop.lan-1:6nqQn6bvOk2MrrNBp7mmhSzDYxJkyPMQj4Ux3ouySPc=" ]; }
      { url = "https://cache.nixos.org"; priority = 40; }
    ];
  };
}
