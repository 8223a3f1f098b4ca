# Every key each Ferry binary accepts in its section of /etc/ferry/ferry.toml, as the Rust
# structs declare them (hook/src/config.rs `HookConfig`, post-build/src/config.rs
# `PostBuildConfig`, substituter/src/config/raw.rs `SubstituterConfig`, `UpstreamConfig` and
# `LocalConfig`). The module refuses any other key; integration/tests/e2e/nixos_module/mod.rs
# checks this list against the structs, so a key added to a binary must be added here too.
{
  build-hook = [
    "probe-timeout-ms"
    "probe-grace-ms"
    "slot-wait-ms"
    "backoff-base-secs"
    "backoff-cap-secs"
    "stale-after-secs"
    "prefer-remote"
    "stock-hook"
    "probe-transport"
    "build-transport"
    "import-method"
  ];
  post-build = [
    "targets"
    "secret-key-files"
    "state-dir"
    "store-dir"
    "nix-state-dir"
    "gc-roots"
    "concurrency"
    "compression"
    "access-key-id-file"
    "secret-access-key-file"
    "zstd-level"
    "xz-level"
    "zstd-threads"
    "retry-initial-ms"
    "retry-max-secs"
    "poll-ms"
    "connect-timeout-secs"
    "multipart-threshold-mib"
    "multipart-part-mib"
    "multipart-parallel"
  ];
  substituter = [
    "listen"
    "store-dir"
    "priority"
    "narinfo-deadline-ms"
    "narinfo-patience-ms"
    "head-start-ms"
    "negative-ttl-secs"
    "positive-ttl-secs"
    "trusted-public-keys"
    "nix-conf-dir"
    "netrc-file"
    "serve-untrusted"
    "nar-idle-timeout-ms"
    "upstream"
    "cache-dir"
    "cache-max-size"
    "cache-max-age"
    "local"
  ];
  local = [
    "secret-key-files"
    "nix-state-dir"
    "verify-nar-hash"
  ];
  upstream = [
    "url"
    "priority"
    "connect-timeout-ms"
    "read-timeout-ms"
    "rate-limit"
    "max-in-flight"
    "breaker-failures"
    "breaker-cooldown-ms"
    "access-key-id-file"
    "secret-access-key-file"
  ];
}
