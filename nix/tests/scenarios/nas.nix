# A NAS that caches for the LAN: Ferry on port 80 with a 100 GiB disk cache in front of the
# NAS's own cache server and cache.nixos.org, and the NAS's builds uploaded to S3 (MinIO).
{
  services.ferry.substituter = {
    enable = true;
    address = "0.0.0.0";
    port = 80;
    openFirewall = true;
    cache = { enable = true; maxSize = "100G"; };
    upstreams = [
      { url = "http://127.0.0.1:5000"; priority = 30; publicKeys = [ "nas-01-1:8ssAaZ9aRmJi+KRQOFgBKT27pzbPXeg/BDL7tuu8y5Q=" ]; connect-timeout-ms = 100; }
      { url = "https://cache.nixos.org"; priority = 40; read-timeout-ms = 3000; }
    ];
    settings = { negative-ttl-secs = 300; narinfo-deadline-ms = 3000; };
  };
  services.ferry.postBuild = {
    enable = true;
    targets = [ "s3://nix-cache?endpoint=http://127.0.0.1:9000&region=us-east-1" ];
    secretKeyFiles = [ "/var/lib/secrets/nas-01.sec" ];
    s3 = {
      accessKeyIdFile = "/var/lib/secrets/minio-access-key-id";
      secretAccessKeyFile = "/var/lib/secrets/minio-secret-access-key";
    };
    settings = { compression = "zstd"; concurrency = 2; };
  };
}
