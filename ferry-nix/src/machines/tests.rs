use super::*;
use crate::test_fs::fs;
use std::io;

fn no_files(_: &Path) -> io::Result<Option<String>> {
    Ok(None)
}

fn one(line: &str) -> Machine {
    let mut v = parse_machines(line, "test", "x86_64-linux", &no_files).expect("parse");
    assert_eq!(v.len(), 1, "{line}");
    v.remove(0)
}

fn err(line: &str) -> MachinesError {
    parse_machines(line, "/etc/nix/machines", "x86_64-linux", &no_files).expect_err(line)
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn machine_lines_round_trip() {
    for line in [
        "ssh://root@a x86_64-linux,aarch64-linux /root/.ssh/id 4 2.5 kvm,big-parallel big-parallel c3NoLWVkMjU1MTkgQUFBQQ==",
        "ssh://b",
        "ssh://c - - 0 0 - benchmark",
        // Found by fuzzing: a systems field with no system rendered as `-` (this system).
        "ssh://d , - 1 1",
        "ssh://e ,- - 1 1 -, ,-",
    ] {
        let m = one(line);
        assert_eq!(one(&m.to_line()), m, "{line} -> {}", m.to_line());
    }
}

#[test]
fn seed_line() {
    let m = one("ssh://nix-builder@192.168.15.6 x86_64-linux /etc/nix/builder_key 2 1");
    assert_eq!(m.store_uri, "ssh://nix-builder@192.168.15.6");
    assert_eq!(m.systems, vec!["x86_64-linux"]);
    assert_eq!(m.ssh_key.as_deref(), Some("/etc/nix/builder_key"));
    assert_eq!(m.max_jobs, 2);
    assert_eq!(m.speed_factor, 1.0);
    assert!(m.supported_features.is_empty() && m.mandatory_features.is_empty());
    assert_eq!(m.public_host_key, None);
    assert_eq!(m.host(), Some("nix-builder@192.168.15.6"));
    assert_eq!(m.scheme(), Some("ssh"));
}

#[test]
fn defaults_and_placeholders() {
    let m = one("builder");
    assert_eq!(m.store_uri, "ssh://builder");
    assert_eq!(m.systems, vec!["x86_64-linux"]);
    assert_eq!((m.max_jobs, m.speed_factor, m.ssh_key), (1, 1.0, None));
    let m = one("ssh-ng://b - - - 0 - - -");
    assert_eq!(m.systems, vec!["x86_64-linux"]);
    assert_eq!((m.max_jobs, m.speed_factor), (1, 1.0));
    assert_eq!(m.host(), Some("b"));
}

#[test]
fn store_uri_prefix_rule() {
    for (given, want) in [
        ("host", "ssh://host"),
        ("user@host", "ssh://user@host"),
        ("ssh-ng://host", "ssh-ng://host"),
        ("auto", "auto"),
        ("daemon", "daemon"),
        ("local", "local"),
        ("local?root=/tmp/x", "local?root=/tmp/x"),
        ("auto?x=1", "auto?x=1"),
        ("?root=x", "?root=x"),
        ("/some/path", "/some/path"),
        ("relative/path", "relative/path"),
        ("localhost?remote-store=x", "ssh://localhost?remote-store=x"),
        ("autox", "ssh://autox"),
    ] {
        assert_eq!(normalize_store_uri(given), want, "{given}");
    }
    let m = one("auto");
    assert_eq!((m.scheme(), m.host()), (None, None));
    let m = one("ssh://localhost?remote-store=/tmp/m1?system-features=foo - - 1 1 foo");
    assert_eq!(m.host(), Some("localhost"));
    assert_eq!(m.supported_features, set(&["foo"]));
    let m = one("ssh://u@[::1]:2222/ x86_64-linux");
    assert_eq!(m.host(), Some("u@[::1]:2222"));
}

#[test]
fn host_key_without_padding_is_accepted() {
    // Nix's base64Decode stops at '=' and does not require padding.
    let m = one("h - - - - - - c3NoLWVkMjU1MTkgQUFBQQ");
    assert_eq!(
        m.public_host_key.map(|k| k.decoded),
        Some("ssh-ed25519 AAAA".into())
    );
}

#[test]
fn eligibility() {
    let m = one("h x86_64-linux,aarch64-linux - 2 1 big-parallel,kvm benchmark");
    assert!(m.system_supported("aarch64-linux"));
    assert!(m.system_supported("builtin"));
    assert!(!m.system_supported("i686-linux"));
    let req = set(&["benchmark", "kvm"]);
    assert!(m.all_supported(&req) && m.mandatory_met(&req) && m.accepts("x86_64-linux", &req));
    // The mandatory feature must be required.
    assert!(!m.mandatory_met(["kvm"]));
    assert!(!m.accepts("x86_64-linux", &set(&["kvm"])));
    // Unknown feature.
    assert!(!m.all_supported(["benchmark", "cuda"]));
    assert!(m.all_supported(Vec::<String>::new()));
}

#[test]
fn separators_and_comments_follow_head() {
    let text = "# fleet\na x86_64-linux ; b aarch64-linux\n\n  c # comment; d\n;;\n";
    let v = parse_machines(text, "t", "x86_64-linux", &no_files).expect("parse");
    let uris: Vec<&str> = v.iter().map(|m| m.store_uri.as_str()).collect();
    // 2.8 would also yield `ssh://d` (it splits on ';' before stripping comments).
    assert_eq!(uris, ["ssh://a", "ssh://b", "ssh://c"]);
    assert_eq!(
        v.get(1).map(|m| m.systems.clone()),
        Some(vec!["aarch64-linux".to_owned()])
    );
}

#[test]
fn speed_factors() {
    assert_eq!(one("h - - - 2.5").speed_factor, 2.5);
    assert_eq!(one("h - - - 0").speed_factor, 1.0);
    assert_eq!(one("h - - - 0.0").speed_factor, 1.0);
    assert_eq!(one("h - - - 3").speed_factor, 3.0);
    assert!(matches!(
        err("h - - - nan"),
        MachinesError::BadField { field: 5, .. }
    ));
    assert!(matches!(
        err("h - - - inf"),
        MachinesError::BadField { field: 5, .. }
    ));
}

#[test]
fn bad_max_jobs() {
    let e = err("a\nb\nh x86_64-linux - x 1");
    assert_eq!(
        e.to_string(),
        "/etc/nix/machines line 3, field 4 (maxJobs): 'x' is not a number (an unsigned integer)"
    );
    assert!(matches!(
        err("h - - -1"),
        MachinesError::BadField { field: 4, .. }
    ));
    assert!(matches!(
        err("h - - 4294967296"),
        MachinesError::BadField { field: 4, .. }
    ));
    assert_eq!(one("h - - 4294967295").max_jobs, u64::from(u32::MAX));
}

#[test]
fn negative_speed_factor() {
    let e = err("h - - 1 -1.5");
    assert_eq!(
        e,
        MachinesError::NegativeSpeedFactor {
            src: "/etc/nix/machines".into(),
            line: 1,
            value: "-1.5".into()
        }
    );
    assert!(e.to_string().contains("field 5 (speedFactor)"));
}

#[test]
fn bad_base64_host_key() {
    let e = err("h - - - - - - not*base64");
    assert!(
        matches!(e, MachinesError::BadHostKey { line: 1, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("field 8 (publicHostKey)"), "{e}");
    let e = err("h - - - - - - //79");
    assert!(e.to_string().contains("not text"), "{e}");
}

#[test]
fn too_many_fields() {
    let e = err("h x86_64-linux - 1 1 kvm, big-parallel - -");
    assert_eq!(
        e,
        MachinesError::TooManyFields {
            src: "/etc/nix/machines".into(),
            line: 1,
            count: 9
        }
    );
}

#[test]
fn missing_store_uri() {
    assert!(matches!(
        err("- x86_64-linux"),
        MachinesError::MissingStoreUri { line: 1, .. }
    ));
}

#[test]
fn includes_recursive_and_missing_ignored() {
    let loader = fs(&[
        (
            "/etc/nix/machines",
            "a\n@/etc/nix/more # more machines\n@/etc/nix/absent\n",
        ),
        ("/etc/nix/more", "b aarch64-linux\n"),
    ]);
    let v = parse_machines(
        "@/etc/nix/machines; c",
        BUILDERS_SETTING_SOURCE,
        "x86_64-linux",
        &loader,
    )
    .expect("parse");
    let uris: Vec<&str> = v.iter().map(|m| m.store_uri.as_str()).collect();
    assert_eq!(uris, ["ssh://a", "ssh://b", "ssh://c"]);
}

#[test]
fn errors_in_included_files_name_the_file() {
    let loader = fs(&[("/etc/nix/machines", "ok\n\nh - - x\n")]);
    let e = parse_machines(
        "@/etc/nix/machines",
        BUILDERS_SETTING_SOURCE,
        "x86_64-linux",
        &loader,
    )
    .expect_err("bad");
    assert!(
        e.to_string()
            .starts_with("/etc/nix/machines line 3, field 4 (maxJobs)"),
        "{e}"
    );
    let e =
        parse_machines("a\nh - - 1 -2", BUILDERS_SETTING_SOURCE, "x", &no_files).expect_err("bad");
    assert!(
        e.to_string().starts_with("the 'builders' setting line 2"),
        "{e}"
    );
}

#[test]
fn include_cycle() {
    let loader = fs(&[("/m/a", "x\n@/m/b\n"), ("/m/b", "@/m/./a\n")]);
    let e = parse_machines("@/m/a", "t", "x86_64-linux", &loader).expect_err("cycle");
    assert_eq!(
        e,
        MachinesError::IncludeCycle {
            src: "/m/b".into(),
            line: 1,
            path: "/m/./a".into()
        }
    );
}

#[test]
fn read_error_is_reported() {
    let loader = |_: &Path| -> io::Result<Option<String>> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    };
    let e = parse_machines("@/etc/nix/machines", "t", "x", &loader).expect_err("read");
    assert!(matches!(e, MachinesError::Read { .. }));
}

#[test]
fn lock_names() {
    assert_eq!(
        slot_lock_name("ssh://nix-builder@192.168.15.6", 0),
        "ssh:__nix-builder@192.168.15.6-0"
    );
    assert_eq!(upload_lock_name("ssh-ng://b/x"), "ssh-ng:__b_x.upload-lock");
    assert_eq!(
        current_load_dir(Path::new("/nix/var/nix")).join(MAIN_LOCK),
        PathBuf::from("/nix/var/nix/current-load/main-lock")
    );
}

#[test]
fn real_files_through_builders_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("machines");
    std::fs::write(&p, "ssh://x aarch64-linux - 3\n").expect("write");
    let v = parse_builders_setting(&format!("@{}", p.display()), "x86_64-linux").expect("parse");
    assert_eq!(v.len(), 1);
    assert_eq!(v.first().map(|m| m.max_jobs), Some(3));
    let v =
        parse_builders_setting(&format!("@{}/absent", dir.path().display()), "x").expect("parse");
    assert!(v.is_empty());
    assert!(parse_builders_setting("", "x").expect("empty").is_empty());
}
