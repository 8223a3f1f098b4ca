use super::*;

fn no_nix_conf(_: &std::path::Path) -> Result<NixTrust, SettingsError> {
    Ok(NixTrust::default())
}

#[test]
fn zero_config_proxies_cache_nixos_org_on_loopback() {
    let s = SubstituterConfig::default()
        .resolve(&Overrides::default(), no_nix_conf)
        .expect("defaults resolve");
    assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(s.upstreams.len(), 1);
    assert_eq!(
        s.upstreams[0].location,
        UpstreamLocation::http("https://cache.nixos.org")
    );
    // No nix.conf: Nix's built-in key, never "trust everything".
    assert_eq!(s.trusted_keys.len(), 1);
    assert!(s.trusted_keys.get("cache.nixos.org-1").is_some());
    assert!(s.require_sigs);
}

#[test]
fn file_section_with_upstreams_sorts_by_priority() {
    let text = r#"
[substituter]
listen = "127.0.0.1:9000"
priority = 15
[[substituter.upstream]]
url = "http://10.0.0.2:5000/"
priority = 50
connect-timeout-ms = 100
[[substituter.upstream]]
url = "file:///srv/cache"
priority = 5
"#;
    let c: SubstituterConfig = ferry_nix::config::parse_section(
        text,
        std::path::Path::new("/etc/ferry/ferry.toml"),
        "substituter",
    )
    .expect("parses");
    let s = c
        .resolve(&Overrides::default(), no_nix_conf)
        .expect("resolves");
    assert_eq!(s.priority, 15);
    assert_eq!(
        s.upstreams[0].location,
        UpstreamLocation::File("/srv/cache".into())
    );
    assert_eq!(
        s.upstreams[1].location,
        UpstreamLocation::http("http://10.0.0.2:5000")
    );
    assert_eq!(s.upstreams[1].connect_timeout, Duration::from_millis(100));
}

#[test]
fn typo_names_the_line() {
    let text = "[substituter]\nlisten = \"127.0.0.1:1\"\n[[substituter.upstream]]\nurl = \"http://a\"\nconect-timeout-ms = 3\n";
    let e = ferry_nix::config::parse_section::<SubstituterConfig>(
        text,
        std::path::Path::new("f.toml"),
        "substituter",
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("f.toml line 5:"), "{e}");
}

#[test]
fn flags_replace_file_upstreams_and_keys_come_from_nix_conf() {
    let mut c = SubstituterConfig::default();
    c.upstream.push(UpstreamConfig::new("http://from-file"));
    let o = Overrides {
        listen: Some("127.0.0.1:1234".into()),
        upstreams: vec!["http://a:1".into(), "file:///b".into()],
    };
    let key = ferry_nix::signing::SecretKey::from_seed("test-1", [1; 32])
        .expect("key")
        .to_public()
        .to_string();
    let s = c
        .resolve(&o, |_| {
            Ok(NixTrust {
                trusted_public_keys: key,
                require_sigs: true,
            })
        })
        .expect("resolves");
    assert_eq!(s.upstreams.len(), 2);
    assert_eq!(s.upstreams[0].priority, 10);
    assert_eq!(s.upstreams[1].priority, 20);
    assert_eq!(s.trusted_keys.len(), 1);
}

#[test]
fn disk_cache_sizes_and_ages() {
    assert_eq!(parse_size("100G"), Ok(100 << 30));
    assert_eq!(parse_size("100GiB"), Ok(100 << 30));
    assert_eq!(parse_size("512m"), Ok(512 << 20));
    assert_eq!(parse_size("4096"), Ok(4096));
    for bad in ["", "G", "10X", "-1", "99999999999T"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
    assert_eq!(parse_age("30d"), Ok(Duration::from_secs(30 * 86_400)));
    assert_eq!(parse_age("90m"), Ok(Duration::from_secs(5400)));
    assert_eq!(parse_age("3600"), Ok(Duration::from_secs(3600)));
    assert!(parse_age("1y").is_err());

    let text = "[substituter]\ncache-dir = \"/var/cache/ferry\"\ncache-max-size = \"100G\"\ncache-max-age = \"30d\"\n";
    let c: SubstituterConfig =
        ferry_nix::config::parse_section(text, std::path::Path::new("f.toml"), "substituter")
            .expect("parses");
    let s = c
        .resolve(&Overrides::default(), no_nix_conf)
        .expect("resolves");
    assert_eq!(
        s.disk,
        Some(DiskSettings {
            dir: "/var/cache/ferry".into(),
            max_bytes: 100 << 30,
            max_age: Duration::from_secs(30 * 86_400),
        })
    );
    let text = "[substituter]\ncache-max-size = 1000\ncache-max-age = 60\n";
    let c: SubstituterConfig =
        ferry_nix::config::parse_section(text, std::path::Path::new("f.toml"), "substituter")
            .expect("numbers parse");
    assert_eq!(c.cache_max_size, ByteSize(1000));
    assert_eq!(
        c.resolve(&Overrides::default(), no_nix_conf)
            .expect("ok")
            .disk,
        None,
        "no cache-dir, no disk cache"
    );
    let e = ferry_nix::config::parse_section::<SubstituterConfig>(
        "[substituter]\ncache-max-size = \"lots\"\n",
        std::path::Path::new("f.toml"),
        "substituter",
    )
    .unwrap_err();
    assert!(e.to_string().contains("invalid size"), "{e}");
}

/// Issue 12 item 3: Ferry trusted one key where Nix trusts two with only
/// `extra-trusted-public-keys`, and everything with no `trusted-public-keys` line.
#[test]
fn trusted_keys_are_computed_as_nix_computes_them() {
    let k = |seed| {
        ferry_nix::signing::SecretKey::from_seed("test-1", [seed; 32])
            .expect("key")
            .to_public()
            .to_string()
    };
    let dir = tempfile::tempdir().expect("tmp");
    let trust = |conf: &str| {
        std::fs::write(dir.path().join("nix.conf"), conf).expect("nix.conf");
        nix_conf_trust(dir.path()).expect("trust")
    };
    assert_eq!(trust(""), NixTrust::default());
    let t = trust(&format!("extra-trusted-public-keys = {}\n", k(1)));
    assert_eq!(
        t.trusted_public_keys,
        format!("{NIX_DEFAULT_TRUSTED_PUBLIC_KEYS} {}", k(1))
    );
    let t = trust(&format!(
        "trusted-public-keys = {}\nrequire-sigs = false\n",
        k(1)
    ));
    assert_eq!(t.trusted_public_keys, k(1));
    assert!(!t.require_sigs);
    let t = trust(&format!(
        "trusted-public-keys = {}\nextra-trusted-public-keys = {}\n",
        k(1),
        k(2)
    ));
    assert_eq!(t.trusted_public_keys, format!("{} {}", k(1), k(2)));
    // An explicitly empty list trusts no key at all (only content-addressed paths).
    assert_eq!(trust("trusted-public-keys =\n").trusted_public_keys, "");
    std::fs::remove_file(dir.path().join("nix.conf")).expect("rm");
    assert_eq!(
        nix_conf_trust(dir.path()).expect("no file"),
        NixTrust::default()
    );
}

#[test]
fn credentials_come_out_of_urls_and_from_netrc() {
    let dir = tempfile::tempdir().expect("tmp");
    let netrc = dir.path().join("netrc");
    std::fs::write(&netrc, "machine b.lan login bob password hunter2\n").expect("netrc");
    let mut c = SubstituterConfig {
        netrc_file: Some(netrc),
        ..SubstituterConfig::default()
    };
    c.upstream = vec![
        UpstreamConfig::new("http://alice:s3cret@a.lan:5000/c"),
        UpstreamConfig::new("http://b.lan:5000"),
    ];
    let s = c.resolve(&Overrides::default(), no_nix_conf).expect("ok");
    let a = &s.upstreams[0];
    assert_eq!(a.url, "http://a.lan:5000/c");
    assert_eq!(a.display, "http://***@a.lan:5000/c");
    let basic = |u: &UpstreamSettings| match &u.location {
        UpstreamLocation::Http { base, credentials } => (base.clone(), credentials.clone()),
        other => panic!("not http: {other:?}"),
    };
    let (base, ca) = basic(a);
    assert_eq!(base, "http://a.lan:5000/c");
    let ca = ca.expect("from the URL");
    assert_eq!(
        (ca.user.as_str(), ca.password.as_str()),
        ("alice", "s3cret")
    );
    let cb = basic(&s.upstreams[1]).1.expect("from netrc");
    assert_eq!(cb.password, "hunter2");
    assert!(!format!("{s:?}").contains("s3cret"), "Debug leaks");
    assert!(!format!("{s:?}").contains("hunter2"), "Debug leaks");
}

#[test]
fn bad_upstreams_are_rejected() {
    let no_s3 = |_: &crate::s3::S3Location| -> Result<_, crate::s3::S3ConfigError> {
        unreachable!("not an s3:// URL")
    };
    for u in ["ftp://x", "file://relative", "http://", "http://a/?x=1"] {
        assert!(parse_location(u, no_s3).is_err(), "{u}");
    }
}

fn s3_config(upstream: &str) -> Result<Settings, String> {
    let text = format!("[substituter]\n[[substituter.upstream]]\n{upstream}");
    let c: SubstituterConfig =
        ferry_nix::config::parse_section(&text, std::path::Path::new("f.toml"), "substituter")
            .map_err(|e| e.to_string())?;
    let env = |k: &str| match k {
        "AWS_ACCESS_KEY_ID" => Some("GKenv".to_owned()),
        "AWS_SECRET_ACCESS_KEY" => Some("env-secret".to_owned()),
        _ => None,
    };
    c.resolve_with_env(&Overrides::default(), no_nix_conf, &env)
        .map_err(|e| e.to_string())
}

#[test]
fn s3_upstreams_carry_their_location_and_credentials() {
    let dir = tempfile::tempdir().expect("tmp");
    let id = dir.path().join("id");
    let secret = dir.path().join("secret");
    std::fs::write(&id, "GKfile\n").expect("id");
    std::fs::write(&secret, "file-secret\n").expect("secret");
    let url = "s3://nix-cache?endpoint=http://10.0.0.5:3900&region=garage";
    let s = s3_config(&format!(
        "url = \"{url}\"\naccess-key-id-file = \"{}\"\nsecret-access-key-file = \"{}\"\n",
        id.display(),
        secret.display()
    ))
    .expect("files");
    let u = &s.upstreams[0];
    assert_eq!(u.display, url);
    let UpstreamLocation::S3 {
        location,
        credentials,
    } = &u.location
    else {
        panic!("not s3: {:?}", u.location)
    };
    assert_eq!(
        (
            location.bucket.as_str(),
            location.base.as_str(),
            location.region.as_str()
        ),
        ("nix-cache", "http://10.0.0.5:3900", "garage")
    );
    assert_eq!(credentials.access_key_id, "GKfile");
    let dbg = format!("{s:?}");
    assert!(
        dbg.contains("GKfile") && !dbg.contains("file-secret"),
        "{dbg}"
    );
    // Neither file: the environment, as Nix (aws-sdk-cpp's default chain).
    let s = s3_config(&format!("url = \"{url}\"\n")).expect("env");
    assert!(
        matches!(&s.upstreams[0].location, UpstreamLocation::S3 { credentials, .. } if credentials.access_key_id == "GKenv")
    );
}

#[test]
fn bad_s3_upstreams_name_the_upstream_and_the_field() {
    let url = "s3://nix-cache?endpoint=http://h:3900";
    for (upstream, want) in [
            (
                format!("url = \"{url}\"\naccess-key-id-file = \"/x/id\"\n"),
                format!("upstream '{url}': access-key-id-file is set but secret-access-key-file is not"),
            ),
            (
                format!("url = \"{url}\"\nsecret-access-key-file = \"/x/s\"\n"),
                format!("upstream '{url}': secret-access-key-file is set but access-key-id-file is not"),
            ),
            (
                format!(
                    "url = \"{url}\"\naccess-key-id-file = \"/nonexistent/id\"\nsecret-access-key-file = \"/nonexistent/s\"\n"
                ),
                format!("upstream '{url}': reading /nonexistent/id"),
            ),
            (
                "url = \"s3://nix-cache?endpiont=http://h\"\n".to_owned(),
                "upstream 's3://nix-cache?endpiont=http://h': unknown parameter \"endpiont\"".to_owned(),
            ),
            (
                "url = \"http://h:5000\"\naccess-key-id-file = \"/x/id\"\nsecret-access-key-file = \"/x/s\"\n".to_owned(),
                "upstream 'http://h:5000': access-key-id-file and secret-access-key-file are only for s3:// upstreams".to_owned(),
            ),
            (
                "url = \"s3://nix-cache\"\naccess-key-file = \"/x\"\n".to_owned(),
                "unknown field `access-key-file`".to_owned(),
            ),
        ] {
            let e = s3_config(&upstream).expect_err(&upstream);
            assert!(e.contains(&want), "{upstream}: {e}");
        }
}
