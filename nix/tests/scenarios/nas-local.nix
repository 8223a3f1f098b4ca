# A NAS (or an always-on desktop) that serves its own store to the LAN, signed on the fly,
# in place of services.nix-serve; cache.nixos.org behind it through the disk cache.
{
  services.ferry.substituter = {
    enable = true;
    address = "0.0.0.0";
    port = 5000;
    openFirewall = true;
    addToNixSettings = false;
    local = {
      enable = true;
      secretKeyFiles = [ "/var/lib/secrets/nas-01.sec" ];
    };
    cache.enable = true;
  };
}
