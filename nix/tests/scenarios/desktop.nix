# The desktop the laptop offloads to: a builder for the laptop's root key, an uploader that
# signs everything it builds into a file:// cache, and a Ferry substituter serving the LAN
# from that cache and cache.nixos.org.
{
  services.ferry.builder = {
    enable = true;
    authorizedKeys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHw2mB0d5vJ1yqZ8kq1m9WcQe3K6b7nN3rYt5oWl1FxQ root@laptop" ];
  };
  services.ferry.postBuild = {
    enable = true;
    targets = [ "file:///srv/nix-cache" ];
    generateKey = { enable = true; name = "desktop.lan-1"; };
  };
  services.ferry.substituter = {
    enable = true;
    address = "0.0.0.0";
    openFirewall = true;
    addToNixSettings = false;
    upstreams = [
      { url = "file:///srv/nix-cache"; priority = 10; }
      { url = "https://cache.nixos.org"; priority = 40; }
    ];
    settings.trusted-public-keys = [ "desktop.lan-1:6nqQn6bvOk2MrrNBp7mmhSzDYxJkyPMQj4Ux3ouySPc=" ];
  };
}
