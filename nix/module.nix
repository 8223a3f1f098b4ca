# NixOS module for every Ferry role. Import it by path (`imports = [ ./ferry/nix/module.nix ]`)
# or as the flake's `nixosModules.default`. Nothing is enabled by default; each role has its
# own enable flag:
#
#   services.ferry.buildHook    ferry-build-hook as the nix-daemon's build hook (a client)
#   services.ferry.builder      a machine other hosts build on over SSH
#   services.ferry.postBuild    post-build-hook + the uploader service (signs, uploads)
#   services.ferry.substituter  the caching substituter proxy as a service
#
# Ferry's own settings are rendered to /etc/ferry/ferry.toml, one section per binary, from
# typed options plus a free-form `settings` attribute set per section. Keys the binaries do
# not accept are refused here (an assertion), not at run time.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkEnableOption mkIf mkMerge mkBefore types optional optionals
    optionalString optionalAttrs concatStringsSep attrNames filterAttrs subtractLists
    hasPrefix hasInfix removePrefix splitString head;

  cfg = config.services.ferry;
  keys = import ./keys.nix;
  tomlFormat = pkgs.formats.toml { };
  bin = name: "${cfg.package}/bin/${name}";

  configPath = "/etc/ferry/ferry.toml";
  credDir = unit: "/run/credentials/${unit}.service";

  # A typed key of a binary's section: unset (null) leaves the binary's own default.
  key = type: description: mkOption {
    type = types.nullOr type;
    default = null;
    inherit description;
  };
  noNulls = filterAttrs (_: v: v != null);

  # `settings` of one section: every key the binary accepts that the module does not render
  # from its own options is declared (typed); anything else is free-form but refused by an
  # assertion, so a typo fails `nixos-rebuild`, not the service.
  settingsOption = what: options: mkOption {
    type = types.submodule {
      freeformType = tomlFormat.type;
      inherit options;
    };
    default = { };
    description = ''
      Further keys of the `[${what}]` section of ${configPath}; see the binary's README.
      Unset keys keep the binary's defaults.
    '';
  };

  # Assertions about the keys of a settings set: unknown ones, and ones the module owns.
  keyAssertions = optionPath: section: binary: owned: settings:
    let
      set = attrNames (noNulls settings);
      unknown = subtractLists keys.${section} set;
      taken = lib.intersectLists owned set;
    in
    [
      {
        assertion = unknown == [ ];
        message = "${optionPath}: ${binary} does not accept ${concatStringsSep ", " unknown} "
          + "in [${section}] (it accepts: ${concatStringsSep ", " keys.${section}}).";
      }
      {
        assertion = taken == [ ];
        message = "${optionPath}: ${concatStringsSep ", " taken} is set by the module's own "
          + "options; set those instead (see services.ferry.* option descriptions).";
      }
    ];

  # Hardening shared by Ferry's services (see systemd.exec(5)).
  hardening = {
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = "read-only";
    PrivateTmp = true;
    PrivateDevices = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [ "@system-service" "~@privileged" ];
    RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
    UMask = "0077";
  };

  # ---- build hook -------------------------------------------------------------------------
  hook = cfg.buildHook;
  hookSection = noNulls hook.settings;

  # ---- builder ----------------------------------------------------------------------------
  builder = cfg.builder;
  builderCommand =
    if builder.protocol == "ssh"
    then "${config.nix.package}/bin/nix-store --serve --write"
    else "${config.nix.package}/bin/nix-daemon --stdio";

  # ---- post-build -------------------------------------------------------------------------
  pb = cfg.postBuild;
  pbUnit = "ferry-post-build";
  keygenUnit = "ferry-post-build-keygen";
  keyName = if pb.generateKey.name != null then pb.generateKey.name else "unnamed";
  generatedKey = "/var/lib/ferry/keys/${keyName}.sec";
  generatedPub = "/var/lib/ferry/keys/${keyName}.pub";
  secretKeyFiles = pb.secretKeyFiles ++ optional pb.generateKey.enable generatedKey;
  keyCredentials = lib.imap0 (i: f: { id = "signing-key-${toString i}"; file = f; }) secretKeyFiles;
  s3Credentials =
    optional (pb.s3.accessKeyIdFile != null) { id = "s3-access-key-id"; file = pb.s3.accessKeyIdFile; }
    ++ optional (pb.s3.secretAccessKeyFile != null) { id = "s3-secret-access-key"; file = pb.s3.secretAccessKeyFile; };
  pbStateDir = if pb.settings.state-dir != null then pb.settings.state-dir else "/var/lib/ferry/post-build";
  pbNixStateDir = if pb.settings.nix-state-dir != null then pb.settings.nix-state-dir else "/nix/var/nix";
  fileTargetDirs = map (t: head (splitString "?" (removePrefix "file://" t)))
    (lib.filter (hasPrefix "file://") pb.targets);
  pbSection = noNulls pb.settings // {
    targets = pb.targets;
    secret-key-files = map (c: "${credDir pbUnit}/${c.id}") keyCredentials;
  } // optionalAttrs (pb.s3.accessKeyIdFile != null) {
    access-key-id-file = "${credDir pbUnit}/s3-access-key-id";
  } // optionalAttrs (pb.s3.secretAccessKeyFile != null) {
    secret-access-key-file = "${credDir pbUnit}/s3-secret-access-key";
  };
  inStore = f: hasPrefix "${builtins.storeDir}/" (toString f);

  # ---- substituter ------------------------------------------------------------------------
  sub = cfg.substituter;
  isV6 = hasInfix ":" sub.address;
  hostPart = a: if hasInfix ":" a then "[${a}]" else a;
  listen = "${hostPart sub.address}:${toString sub.port}";
  loopback = [ "127.0.0.1" "::1" "localhost" ];
  wildcard = [ "0.0.0.0" "::" ];
  isLoopback = lib.elem sub.address loopback || hasPrefix "127." sub.address;
  # The address this host's nix-daemon uses to reach the substituter.
  localHost =
    if lib.elem sub.address wildcard || isLoopback
    then (if isV6 then "[::1]" else "127.0.0.1")
    else hostPart sub.address;
  localUrl = "http://${localHost}:${toString sub.port}";
  # Every URL under which the substituter would be asking itself.
  selfUrls = map (h: "http://${h}:${toString sub.port}")
    ([ (hostPart sub.address) "127.0.0.1" "localhost" "[::1]" ]
      ++ optionals (lib.elem sub.address wildcard) [ "0.0.0.0" "[::]" ]);
  trimSlash = u: lib.removeSuffix "/" u;
  subUnit = "ferry-substituter";
  # The local store's signing keys reach the service as credentials (readable by it only).
  subKeyCredentials = lib.imap0 (i: f: { id = "local-signing-key-${toString i}"; file = f; })
    sub.local.secretKeyFiles;
  upstreamTable = u: noNulls (removeAttrs u [ "publicKeys" ]);
  subSection = noNulls sub.settings // {
    inherit listen;
    upstream = map upstreamTable sub.upstreams;
  } // optionalAttrs sub.cache.enable {
    cache-dir = "/var/cache/ferry-substituter";
    cache-max-size = sub.cache.maxSize;
    cache-max-age = sub.cache.maxAge;
  } // optionalAttrs sub.local.enable {
    local = {
      secret-key-files = map (c: "${credDir subUnit}/${c.id}") subKeyCredentials;
      verify-nar-hash = sub.local.verifyNarHash;
    };
  } // optionalAttrs (sub.settings.trusted-public-keys == null) {
    # What this host's Nix trusts, including the upstreams' keys added below.
    trusted-public-keys = lib.unique config.nix.settings.trusted-public-keys;
  };

  upstreamType = types.submodule {
    freeformType = tomlFormat.type;
    options = {
      url = mkOption {
        type = types.str;
        example = "http://nas.lan:5000";
        description = ''
          Upstream binary cache: `http://`, `https://`, `file:///dir`, or a bucket as Nix
          writes it, `s3://bucket?endpoint=http://garage.lan:3900&region=garage` (requests
          signed with SigV4).
        '';
      };
      priority = key types.int "Lower is asked first (as Nix's own priority). Unset: 10 × position + 10.";
      publicKeys = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "cache.lan-1:AbCd…=" ];
        description = ''
          Keys that sign this upstream's paths. Added to `nix.settings.trusted-public-keys`
          (when `addToNixSettings` is on) and so to what Ferry prefers. Not a ferry.toml key.
        '';
      };
      connect-timeout-ms = key types.ints.positive "TCP connect time-out (binary default 200).";
      read-timeout-ms = key types.ints.positive "Time-out of a small response and of each NAR read (1500).";
      rate-limit = key types.ints.unsigned "Requests per second; 0 is unlimited (200).";
      max-in-flight = key types.ints.positive "Concurrent requests (16).";
      breaker-failures = key types.ints.positive "Consecutive failures that open the circuit breaker (3).";
      breaker-cooldown-ms = key types.ints.positive "First open period of the breaker (2000).";
      access-key-id-file = key types.str ''
        `s3://` only: file with the access key id. Set with `secret-access-key-file`, or neither
        (then `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` or the shared credentials file).
        A path the service can read, e.g. under `/run/credentials/ferry-substituter.service/`
        from `systemd.services.ferry-substituter.serviceConfig.LoadCredential`.
      '';
      secret-access-key-file = key types.str "`s3://` only: file with the secret access key (see access-key-id-file).";
    };
  };

  sections =
    optionalAttrs hook.enable { build-hook = hookSection; }
    // optionalAttrs pb.enable { post-build = pbSection; }
    // optionalAttrs sub.enable { substituter = subSection; };
  configFile = tomlFormat.generate "ferry.toml" sections;
  anyConfig = hook.enable || pb.enable || sub.enable;
in
{
  options.services.ferry = {
    package = mkOption {
      type = types.package;
      default = pkgs.ferry or (pkgs.callPackage ./package.nix { });
      defaultText = lib.literalExpression "pkgs.ferry or (pkgs.callPackage ./package.nix { })";
      description = "The Ferry package (ferry-build-hook, ferry-post-build, ferry-substituter).";
    };

    buildHook = {
      enable = mkEnableOption ''
        ferry-build-hook as the nix-daemon's build hook. The machines come from
        `nix.buildMachines` and `nix.distributedBuilds` as they are; dead builders are
        remembered and builds fall back to this host'';
      settings = settingsOption "build-hook" {
        probe-timeout-ms = key (types.ints.between 1 600000) "Budget for reaching a builder (binary default 1000).";
        probe-grace-ms = key types.ints.unsigned "Extra wait for faster builders once one answered (250).";
        backoff-base-secs = key types.ints.positive "First back-off after a failure, doubled per failure (10).";
        backoff-cap-secs = key types.ints.positive "Longest back-off (600).";
        stale-after-secs = key types.ints.unsigned "Probe a builder last seen healthy longer ago (60).";
        prefer-remote = key types.bool "Offload even when a local slot is free (true).";
        stock-hook = key types.str "Command of Nix's own hook, for ssh-ng:// and other schemes.";
        probe-transport = key (types.enum [ "openssh" "russh" ]) "How probes reach a builder (openssh).";
        build-transport = key (types.enum [ "openssh" "russh" ]) "How builds reach a builder (openssh).";
        import-method = key (types.enum [ "auto" "held-locks" "restore" ]) "How outputs are imported (auto).";
      };
    };

    builder = {
      enable = mkEnableOption ''
        this host as a remote builder: a dedicated user whose SSH keys can only run
        `nix-store --serve --write` (or `nix-daemon --stdio` for ssh-ng), trusted by the
        nix-daemon, and sshd'';
      user = mkOption {
        type = types.str;
        default = "nix-builder";
        description = "The user clients log in as (the `sshUser` of their machines entry).";
      };
      authorizedKeys = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "ssh-ed25519 AAAA… root@laptop" ];
        description = "Public SSH keys of the clients' nix-daemons (root's keys on the clients).";
      };
      protocol = mkOption {
        type = types.enum [ "ssh" "ssh-ng" ];
        default = "ssh";
        description = ''
          What clients connect with. `ssh` (what ferry-build-hook speaks itself) forces
          `nix-store --serve --write`; `ssh-ng` forces `nix-daemon --stdio`.
        '';
      };
      maxSessions = mkOption {
        type = types.ints.positive;
        default = 64;
        description = ''
          sshd `MaxSessions` for the builder user: ferry-build-hook multiplexes concurrent
          builds over one connection (ControlMaster), and sshd's default of 10 would refuse
          the eleventh.
        '';
      };
    };

    postBuild = {
      enable = mkEnableOption ''
        ferry-post-build as the nix-daemon's post-build hook (it queues each build in
        milliseconds and always exits 0) and its uploader as a service that signs and
        uploads to the targets'';
      targets = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "file:///srv/nix-cache" "https://cache.lan/upload" "s3://cache?endpoint=http://nas:9000&region=us-east-1" ];
        description = "Upload targets; every built path goes to each. At least one is required.";
      };
      secretKeyFiles = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "/etc/nix/cache.sec" ];
        description = ''
          Nix signing keys (files outside the Nix store, readable by root). The uploader gets
          them through systemd's LoadCredential, never through the store.
        '';
      };
      generateKey = {
        enable = mkEnableOption ''
          generating a signing key on first start (`ferry-post-build keygen`), kept in
          /var/lib/ferry/keys/NAME.sec; the public key is in NAME.pub and in the journal of
          ferry-post-build-keygen.service'';
        name = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "cache.lan-1";
          description = "Key name, as clients will list it in trusted-public-keys.";
        };
      };
      s3 = {
        accessKeyIdFile = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "File holding the S3 access key id (outside the store; passed as a credential).";
        };
        secretAccessKeyFile = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "File holding the S3 secret access key (outside the store; passed as a credential).";
        };
      };
      settings = settingsOption "post-build" {
        state-dir = key types.str "Spool and queue (default /var/lib/ferry/post-build, the service's StateDirectory).";
        store-dir = key types.str "The Nix store directory (/nix/store).";
        nix-state-dir = key types.str "Nix's state directory, for GC roots (/nix/var/nix).";
        gc-roots = key types.bool "Protect queued paths from garbage collection until uploaded (true).";
        concurrency = key types.ints.positive "Uploads at once (4).";
        compression = key (types.enum [ "zstd" "xz" "none" ]) "Default NAR compression (zstd).";
        zstd-level = key (types.ints.between 1 19) "zstd level (3).";
        xz-level = key (types.ints.between 0 9) "xz preset (6).";
        zstd-threads = key types.ints.unsigned "zstd worker threads per NAR; 0: one per core (0).";
        retry-initial-ms = key types.ints.positive "First retry delay (1000).";
        retry-max-secs = key types.ints.positive "Longest retry delay (900).";
        poll-ms = key types.ints.positive "Spool poll interval (200).";
        connect-timeout-secs = key types.ints.positive "Connect time-out of HTTP targets (5).";
        multipart-threshold-mib = key (types.ints.between 5 5120) "NARs from this size go to s3:// targets in parts (64).";
        multipart-part-mib = key (types.ints.between 5 5120) "Size of each part (16).";
        multipart-parallel = key types.ints.positive "Parts of one NAR in flight at once (4).";
      };
    };

    substituter = {
      enable = mkEnableOption ''
        ferry-substituter, a local binary cache in front of the upstreams (time-outs, circuit
        breakers, only ever 200 or 404 to Nix), as a service; it is put first in
        `nix.settings.substituters`'';
      address = mkOption {
        type = types.str;
        default = "127.0.0.1";
        example = "0.0.0.0";
        description = ''
          Listen address. Loopback by default: the proxy serves this host. A LAN address or
          0.0.0.0 makes it a cache for the LAN (with `openFirewall`).
        '';
      };
      port = mkOption {
        type = types.port;
        default = 37515;
        description = "Listen port.";
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open `port` in the firewall (only useful with a non-loopback `address`).";
      };
      addToNixSettings = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Put the substituter first in `nix.settings.substituters` and the upstreams'
          `publicKeys` in `nix.settings.trusted-public-keys`. Off for a host that only serves
          the LAN.
        '';
      };
      replaceNixSubstituters = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Make the substituter the only entry of `nix.settings.substituters` (its upstreams
          replace the ones listed there), so Nix never waits on a cache itself. Off: it is
          put first and Nix still asks the other substituters after it.
        '';
      };
      upstreams = mkOption {
        type = types.listOf upstreamType;
        default = [{
          url = "https://cache.nixos.org";
          priority = 40;
          publicKeys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
        }];
        example = lib.literalExpression ''
          [ { url = "http://nas.lan:37515"; priority = 10; publicKeys = [ "cache.lan-1:…" ]; }
            { url = "https://cache.nixos.org"; priority = 40; } ]
        '';
        description = "The caches Ferry asks, in priority order.";
      };
      local = {
        enable = mkEnableOption ''
          serving this host's own store first (`[substituter.local]`): the desktop or NAS
          cache role of `services.nix-serve` and harmonia. Narinfos are read from Nix's
          database (read-only) and signed on the fly, NARs are streamed from the store. Set
          `address` and `openFirewall` to serve the LAN'';
        secretKeyFiles = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "/var/lib/nix-serve/cache-priv-key.pem" ];
          description = ''
            Nix signing keys (`nix-store --generate-binary-cache-key`; files outside the Nix
            store). Every narinfo served from this store gets a signature by each, as `nix
            store sign` would add it. Passed with systemd's LoadCredential: readable by the
            service only.
          '';
        };
        verifyNarHash = mkOption {
          type = types.bool;
          default = false;
          description = ''
            Check each NAR's SHA-256 against its NarHash before the last byte is sent (the
            length is always checked, so a path collected mid-stream is never served whole).
            Costs a core at about 2 GB/s; Nix checks the hash itself anyway.
          '';
        };
      };
      cache = {
        enable = mkEnableOption "a disk cache of narinfos and NARs in /var/cache/ferry-substituter";
        maxSize = mkOption {
          type = types.str;
          default = "10G";
          example = "100G";
          description = "Quota of the disk cache (K, M, G, T: powers of 1024).";
        };
        maxAge = mkOption {
          type = types.str;
          default = "30d";
          description = "Drop entries unused for this long (s, m, h, d, w).";
        };
      };
      workers = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "Serving threads (`--workers`); unset is one per core.";
      };
      settings = settingsOption "substituter" {
        store-dir = key types.str "Store directory announced and checked (/nix/store).";
        priority = key types.int "Priority announced in nix-cache-info (20).";
        narinfo-deadline-ms = key types.ints.positive "Total time for one narinfo before a 404 (2000).";
        head-start-ms = key types.ints.unsigned "Head start of each upstream over the next (250).";
        negative-ttl-secs = key types.ints.unsigned "How long a miss is remembered (60).";
        positive-ttl-secs = key types.ints.unsigned "How long a hit is remembered (3600).";
        trusted-public-keys = key (types.listOf types.str)
          "Keys whose signatures count as trusted. Unset: this host's `nix.settings.trusted-public-keys`.";
        nix-conf-dir = key types.str "Where to read nix.conf when trusted-public-keys is empty.";
        serve-untrusted = key types.bool "Serve narinfos no trusted key signs (false).";
        nar-idle-timeout-ms = key types.ints.positive "Idle time-out of one NAR read (30000).";
      };
    };
  };

  config = mkMerge [
    (mkIf anyConfig {
      environment.etc."ferry/ferry.toml".source = configFile;
      environment.systemPackages = [ cfg.package ];
    })

    (mkIf hook.enable {
      assertions = keyAssertions "services.ferry.buildHook.settings" "build-hook" "ferry-build-hook" [ ] hook.settings
        ++ [
        {
          assertion = hook.settings.probe-grace-ms == null
            || hook.settings.probe-grace-ms <= (if hook.settings.probe-timeout-ms != null then hook.settings.probe-timeout-ms else 1000);
          message = "services.ferry.buildHook.settings: probe-grace-ms must not be above probe-timeout-ms.";
        }
        {
          assertion = hook.settings.backoff-cap-secs == null
            || hook.settings.backoff-cap-secs >= (if hook.settings.backoff-base-secs != null then hook.settings.backoff-base-secs else 10);
          message = "services.ferry.buildHook.settings: backoff-cap-secs must not be below backoff-base-secs.";
        }
      ];
      warnings = optional (!config.nix.distributedBuilds || config.nix.buildMachines == [ ])
        "services.ferry.buildHook is enabled but nix.distributedBuilds is off or nix.buildMachines is empty: every build stays on this host.";
      # Nix 2.8 and 2.34 read `build-hook` from nix.conf; 2.25 to 2.33 ignore it there and
      # read it only from the daemon's environment, so it is set in both places.
      nix.settings.build-hook = bin "ferry-build-hook";
      systemd.services.nix-daemon.environment.NIX_CONFIG = "build-hook = ${bin "ferry-build-hook"}";
      # The hook's health memory, shared by every hook process (FERRY_STATE_DIR default).
      systemd.tmpfiles.rules = [ "d /nix/var/nix/ferry 0755 root root - -" ];
    })

    (mkIf builder.enable {
      assertions = [
        {
          assertion = builder.authorizedKeys != [ ];
          message = "services.ferry.builder.authorizedKeys is empty: no client could log in to build. Add the public key of each client's root (the sshKey of its machines entry).";
        }
        {
          assertion = builder.user != "root";
          message = "services.ferry.builder.user must not be root: the builder user is restricted to the Nix store protocol.";
        }
      ];
      users.users.${builder.user} = {
        isSystemUser = true;
        group = builder.user;
        description = "Nix remote builds (Ferry)";
        home = "/var/empty";
        # sshd runs the forced command through the user's shell: it must not be nologin.
        useDefaultShell = true;
        openssh.authorizedKeys.keys =
          map (k: ''restrict,command="${builderCommand}" ${k}'') builder.authorizedKeys;
      };
      users.groups.${builder.user} = { };
      # root too, in case this definition would replace NixOS's default rather than add to it.
      nix.settings.trusted-users = [ "root" builder.user ];
      services.openssh.enable = true;
      services.openssh.extraConfig = ''
        Match User ${builder.user}
          ForceCommand ${builderCommand}
          AllowAgentForwarding no
          AllowTcpForwarding no
          PermitTTY no
          PermitTunnel no
          X11Forwarding no
          MaxSessions ${toString builder.maxSessions}
        Match All
      '';
    })

    (mkIf pb.enable {
      assertions = keyAssertions "services.ferry.postBuild.settings" "post-build" "ferry-post-build"
        [ "targets" "secret-key-files" "access-key-id-file" "secret-access-key-file" ] pb.settings
        ++ [
        {
          assertion = pb.targets != [ ];
          message = "services.ferry.postBuild is enabled with no targets: set services.ferry.postBuild.targets (file://, http(s):// or s3:// caches) or disable it.";
        }
        {
          assertion = secretKeyFiles != [ ];
          message = "services.ferry.postBuild has no signing key: set secretKeyFiles or generateKey.enable. Unsigned paths are refused by clients with require-sigs (the default).";
        }
        {
          assertion = lib.all (f: !inStore f) (secretKeyFiles ++ map (c: c.file) s3Credentials);
          message = "services.ferry.postBuild: a secret key or S3 credential file is in the Nix store, which every user can read. Give a path outside the store as a string (\"/etc/nix/cache.sec\"), not a Nix path.";
        }
        {
          assertion = lib.all (f: hasPrefix "/" f) (secretKeyFiles ++ map (c: c.file) s3Credentials);
          message = "services.ferry.postBuild: secret key and S3 credential files must be absolute paths.";
        }
        {
          assertion = !pb.generateKey.enable || pb.generateKey.name != null;
          message = "services.ferry.postBuild.generateKey.enable needs generateKey.name (for example \"cache.lan-1\").";
        }
        {
          assertion = (pb.s3.accessKeyIdFile == null) == (pb.s3.secretAccessKeyFile == null);
          message = "services.ferry.postBuild.s3: set both accessKeyIdFile and secretAccessKeyFile, or neither.";
        }
        {
          assertion = lib.all (t: lib.any (s: hasPrefix s t) [ "file:///" "http://" "https://" "s3://" ]) pb.targets;
          message = "services.ferry.postBuild.targets: every target must start with file:///, http://, https:// or s3://.";
        }
      ];
      nix.settings.post-build-hook = bin "ferry-post-build";
      systemd.tmpfiles.rules = optional (pb.settings.gc-roots != false)
        "d ${pbNixStateDir}/gcroots/ferry 0755 root root - -";

      systemd.services.${keygenUnit} = mkIf pb.generateKey.enable {
        description = "Generate Ferry's binary cache signing key";
        wantedBy = [ "multi-user.target" ];
        before = [ "${pbUnit}.service" ];
        unitConfig.ConditionPathExists = "!${generatedKey}";
        serviceConfig = hardening // {
          Type = "oneshot";
          ExecStart = "${bin "ferry-post-build"} keygen ${keyName} --secret-file ${generatedKey} --public-file ${generatedPub}";
          StateDirectory = "ferry/keys";
          StateDirectoryMode = "0700";
          CapabilityBoundingSet = "";
          RestrictAddressFamilies = [ "AF_UNIX" ];
          PrivateNetwork = true;
        };
      };

      systemd.services.${pbUnit} = {
        description = "Ferry uploader: signs built paths and uploads them to binary caches";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" "nix-daemon.socket" ]
          ++ optional pb.generateKey.enable "${keygenUnit}.service";
        requires = optional pb.generateKey.enable "${keygenUnit}.service";
        path = [ config.nix.package ];
        environment = {
          FERRY_CONFIG = configPath;
          # Store queries go through the daemon: the store is read-only in this service.
          NIX_REMOTE = "daemon";
        };
        restartTriggers = [ configFile ];
        serviceConfig = hardening // {
          ExecStart = "${bin "ferry-post-build"} daemon";
          Restart = "always";
          RestartSec = 5;
          # Root, because the post-build hook (run by the nix-daemon as root) spools into the
          # state directory and makes the GC roots the uploader removes; without capabilities.
          CapabilityBoundingSet = "";
          StateDirectory = "ferry/post-build";
          StateDirectoryMode = "0700";
          ReadWritePaths = [ pbStateDir ]
            ++ optional (pb.settings.gc-roots != false) "${pbNixStateDir}/gcroots/ferry"
            # A file:// target's directory (must exist and be writable by root).
            ++ map (d: "-${d}") fileTargetDirs;
          LoadCredential = map (c: "${c.id}:${c.file}") (keyCredentials ++ s3Credentials);
        };
      };
    })

    (mkIf sub.enable {
      assertions = keyAssertions "services.ferry.substituter.settings" "substituter" "ferry-substituter"
        [ "listen" "upstream" "cache-dir" "cache-max-size" "cache-max-age" "local" ] sub.settings
        ++ lib.concatMap
        (u: [
          {
            assertion = lib.all (k: lib.elem k (keys.upstream ++ [ "publicKeys" ])) (attrNames (noNulls u));
            message = "services.ferry.substituter.upstreams (${u.url}): ferry-substituter does not accept "
              + concatStringsSep ", " (subtractLists (keys.upstream ++ [ "publicKeys" ]) (attrNames (noNulls u)))
              + " (it accepts: ${concatStringsSep ", " keys.upstream}, and the module's publicKeys).";
          }
          {
            assertion = !lib.elem (trimSlash u.url) selfUrls;
            message = "services.ferry.substituter.upstreams: ${u.url} is this substituter's own listen address (${listen}); it would ask itself.";
          }
          {
            assertion = lib.any (s: hasPrefix s u.url) [ "http://" "https://" "file:///" "s3://" ];
            message = "services.ferry.substituter.upstreams: ${u.url} must start with http://, https://, file:/// or s3://.";
          }
        ])
        sub.upstreams
        ++ [
        {
          assertion = sub.upstreams != [ ] || sub.local.enable;
          message = "services.ferry.substituter.upstreams is empty: the substituter needs at least one cache to ask (or local.enable to serve this host's store).";
        }
        {
          assertion = lib.all (f: !inStore f && hasPrefix "/" f) sub.local.secretKeyFiles;
          message = "services.ferry.substituter.local.secretKeyFiles must be absolute paths outside the Nix store (the store is world-readable).";
        }
        {
          assertion = !(sub.replaceNixSubstituters && !sub.addToNixSettings);
          message = "services.ferry.substituter.replaceNixSubstituters needs addToNixSettings: it would leave Nix with no substituter.";
        }
        {
          assertion = !(sub.openFirewall && isLoopback);
          message = "services.ferry.substituter.openFirewall is set but address is ${sub.address}, which only this host can reach; set address (for example \"0.0.0.0\") to serve the LAN.";
        }
      ];
      nix.settings = mkIf sub.addToNixSettings {
        substituters = if sub.replaceNixSubstituters then lib.mkForce [ localUrl ] else mkBefore [ localUrl ];
        trusted-public-keys = lib.concatMap (u: u.publicKeys) sub.upstreams;
      };
      networking.firewall.allowedTCPPorts = mkIf sub.openFirewall [ sub.port ];
      systemd.services.ferry-substituter = {
        description = "Ferry substituter: a local binary cache in front of upstream caches";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        environment.FERRY_CONFIG = configPath;
        restartTriggers = [ configFile ];
        serviceConfig = hardening // {
          ExecStart = "${bin "ferry-substituter"} serve"
            + optionalString (sub.workers != null) " --workers ${toString sub.workers}";
          Restart = "always";
          RestartSec = 1;
          # Serving the local store reads Nix's database: SQLite's readers of a WAL database
          # map its index (db.sqlite-shm, root's) and create it when no writer has, so the
          # service then runs as root, without capabilities; the database is opened
          # read-only (substituter/src/local.rs).
          DynamicUser = !sub.local.enable;
          ReadWritePaths = optionals sub.local.enable [ "/nix/var/nix/db" ];
          LoadCredential = map (c: "${c.id}:${c.file}") subKeyCredentials;
          CacheDirectory = "ferry-substituter";
          CacheDirectoryMode = "0700";
          CapabilityBoundingSet = if sub.port < 1024 then [ "CAP_NET_BIND_SERVICE" ] else "";
          AmbientCapabilities = optionals (sub.port < 1024) [ "CAP_NET_BIND_SERVICE" ];
        };
      };
    })
  ];
}
