use super::*;
use crate::test_fs::fs;

fn parse(text: &str) -> Result<NixConf, NixConfError> {
    NixConf::parse(text, Path::new("/etc/nix/nix.conf"), &fs(&[]))
}

#[test]
fn basic_lines_comments_whitespace() {
    let c = parse(
        "# comment\n\
             \tbuilders   =  ssh://a  x86_64-linux ; ssh://b   # trailing\n\
             max-jobs = 4\r\n\
             empty =\n\
             \n   \n",
    )
    .expect("parse");
    assert_eq!(c.get("builders"), Some("ssh://a x86_64-linux ; ssh://b"));
    assert_eq!(c.get_u64("max-jobs"), Ok(Some(4)));
    assert_eq!(c.get("empty"), Some(""));
    assert_eq!(
        c.provenance("max-jobs"),
        Some(&Provenance::Line {
            source: "/etc/nix/nix.conf".into(),
            line: 3
        })
    );
}

#[test]
fn hash_in_value_is_a_comment() {
    let c = parse("substituters = http://x/#frag y\n").expect("parse");
    assert_eq!(c.get("substituters"), Some("http://x/"));
}

#[test]
fn later_assignment_wins_and_aliases_resolve() {
    let c = parse("build-max-jobs = 2\nmax-jobs = 3\nbinary-caches = a\n").expect("parse");
    assert_eq!(c.get("max-jobs"), Some("3"));
    assert_eq!(c.get("build-max-jobs"), Some("3"));
    assert_eq!(c.get("substituters"), Some("a"));
}

#[test]
fn extra_appends_and_plain_assignment_resets() {
    let c = parse(
        "substituters = a\nextra-substituters = b c\n\
             extra-system-features = kvm\nsystem-features = big\nextra-system-features = x\n\
             extra-binary-caches = d\n",
    )
    .expect("parse");
    assert_eq!(c.get("substituters"), Some("a b c d"));
    assert_eq!(c.get("system-features"), Some("big x"));
    assert_eq!(
        c.setting("system-features").map(|s| s.appended_at.len()),
        Some(1)
    );
}

#[test]
fn extra_on_unset_uses_default_when_seeded() {
    let mut c = NixConf::new();
    c.set_default("substituters", "https://cache.nixos.org/");
    c.apply_text(
        "extra-substituters = http://x\nextra-trusted-public-keys = k:1\n",
        Path::new("/etc/nix/nix.conf"),
        &fs(&[]),
    )
    .expect("parse");
    assert_eq!(
        c.get("substituters"),
        Some("https://cache.nixos.org/ http://x")
    );
    assert_eq!(c.get("trusted-public-keys"), Some("k:1"));
}

#[test]
fn extra_of_scalar_is_kept_apart() {
    let c =
        parse("builders = a\nextra-builders = b\nextra-platforms = i686-linux\n").expect("parse");
    assert_eq!(c.get("builders"), Some("a"));
    assert_eq!(c.get("extra-builders"), Some("b"));
    assert_eq!(c.get("extra-platforms"), Some("i686-linux"));
    assert_eq!(c.warnings().len(), 1);
    assert!(c.warnings()[0].contains("extra-builders"));
}

#[test]
fn extra_extra_platforms_appends() {
    let c = parse("extra-platforms = a\nextra-extra-platforms = b\n").expect("parse");
    assert_eq!(c.get_set("extra-platforms"), Some(["a", "b"].into()));
}

#[test]
fn include_relative_and_optional() {
    let loader = fs(&[
        ("/etc/nix/sub/a.conf", "include ../b.conf\nmax-jobs = 5\n"),
        ("/etc/nix/b.conf", "cores = 3\n"),
    ]);
    let c = NixConf::parse(
        "include sub/a.conf\n!include nothere.conf\nkeep-failed = yes\n",
        Path::new("/etc/nix/nix.conf"),
        &loader,
    )
    .expect("parse");
    assert_eq!(c.get_u64("max-jobs"), Ok(Some(5)));
    assert_eq!(c.get_u64("cores"), Ok(Some(3)));
    assert_eq!(c.get_bool("keep-failed"), Ok(Some(true)));
    assert_eq!(
        c.provenance("cores"),
        Some(&Provenance::Line {
            source: "/etc/nix/b.conf".into(),
            line: 1
        })
    );
}

#[test]
fn missing_include_names_file() {
    let e = parse("\ninclude other.conf\n").expect_err("missing");
    assert_eq!(
        e,
        NixConfError::IncludeMissing {
            path: "/etc/nix/other.conf".into(),
            file: "/etc/nix/nix.conf".into(),
            line: 2
        }
    );
    assert!(e.to_string().contains("'/etc/nix/other.conf'"));
}

#[test]
fn include_cycle_is_reported() {
    let loader = fs(&[
        ("/etc/nix/a.conf", "include b.conf\n"),
        ("/etc/nix/b.conf", "include ./a.conf\n"),
    ]);
    let e = NixConf::parse("include a.conf", Path::new("/etc/nix/nix.conf"), &loader)
        .expect_err("cycle");
    assert!(matches!(e, NixConfError::IncludeCycle { ref path, .. } if path == "/etc/nix/a.conf"));
}

#[test]
fn deep_includes_are_bounded() {
    // Distinct names, so only the depth limit stops it.
    let loader = |p: &Path| -> io::Result<Option<String>> {
        let n: usize = p
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok(Some(format!("include {}.conf\n", n + 1)))
    };
    let e = NixConf::parse("include 0.conf", Path::new("/x/nix.conf"), &loader).expect_err("deep");
    assert!(matches!(e, NixConfError::IncludeTooDeep { .. }));
}

#[test]
fn syntax_errors_name_file_and_line() {
    for text in ["a\nsubstituters=x\n", "a\nfoo bar\n", "a\nfoo =bar\n"] {
        let text = text.replacen('a', "# ok", 1);
        let e = parse(&text).expect_err(&text);
        assert!(
            matches!(e, NixConfError::Syntax { line: 2, ref file, .. } if file == "/etc/nix/nix.conf"),
            "{e}"
        );
        assert!(e.to_string().starts_with("/etc/nix/nix.conf:2:"), "{e}");
    }
    let e = parse("include a b\n").expect_err("include");
    assert!(matches!(e, NixConfError::BadInclude { line: 1, .. }));
}

#[test]
fn bad_bool_and_int_name_setting_and_place() {
    let c = parse("keep-failed = maybe\nmax-jobs = x\nbuilders-use-substitutes = 0\ncores = -1\n")
        .expect("parse");
    let e = c.get_bool("keep-failed").expect_err("bool");
    let msg = e.to_string();
    assert!(
        msg.contains("'keep-failed'") && msg.contains("/etc/nix/nix.conf:1"),
        "{msg}"
    );
    assert_eq!(c.get_bool("builders-use-substitutes"), Ok(Some(false)));
    let e = c.get_max_jobs(8).expect_err("int");
    let msg = e.to_string();
    assert!(
        msg.contains("'max-jobs'") && msg.contains("/etc/nix/nix.conf:2"),
        "{msg}"
    );
    let e = c.get_u64("cores").expect_err("negative");
    assert!(e.to_string().contains("/etc/nix/nix.conf:4"));
    assert_eq!(c.get_u64("nonexistent"), Ok(None));
}

#[test]
fn max_jobs_auto() {
    let c = parse("max-jobs = auto\n").expect("parse");
    assert_eq!(c.get_max_jobs(6), Ok(Some(6)));
    assert_eq!(c.get_max_jobs(0), Ok(Some(1)));
}

#[test]
fn overrides_and_nix_config_layer_on_top() {
    let loader = fs(&[(
        "/etc/nix/nix.conf",
        "builders = @/etc/nix/machines\nmax-jobs = 2\n",
    )]);
    let mut c = NixConf::load_system(Path::new("/etc/nix"), &loader).expect("load");
    c.apply_text(
        "max-jobs = 3\nextra-substituters = http://c\n",
        Path::new(NIX_CONFIG_SOURCE),
        &loader,
    )
    .expect("env");
    assert_eq!(c.get("max-jobs"), Some("3"));
    c.apply_overrides(&[("builders", ""), ("max-jobs", "0")]);
    assert_eq!(c.get("builders"), Some(""));
    assert_eq!(c.get_u64("max-jobs"), Ok(Some(0)));
    assert_eq!(
        c.provenance("builders"),
        Some(&Provenance::Override {
            source: HOOK_STREAM_SOURCE.into()
        })
    );
    assert_eq!(
        c.provenance("substituters").map(ToString::to_string),
        Some("NIX_CONFIG:2".into())
    );
}

#[test]
fn load_system_seeds_builders_default() {
    let c = NixConf::load_system(Path::new("/etc/nix/"), &fs(&[])).expect("load");
    assert_eq!(c.get("builders"), Some("@/etc/nix/machines"));
    assert_eq!(c.provenance("builders"), Some(&Provenance::Default));
}

#[test]
fn unreadable_include_is_skipped_with_warning() {
    let loader = |p: &Path| -> io::Result<Option<String>> {
        if p.ends_with("secret.conf") {
            Err(io::Error::from(io::ErrorKind::PermissionDenied))
        } else {
            Ok(None)
        }
    };
    let c = NixConf::parse(
        "include secret.conf\nmax-jobs = 1\n",
        Path::new("/e/nix.conf"),
        &loader,
    )
    .expect("parse");
    assert_eq!(c.get("max-jobs"), Some("1"));
    assert_eq!(c.warnings().len(), 1);
}

#[test]
fn normalize() {
    assert_eq!(
        normalize_path(Path::new("/a/./b/../c//d")),
        PathBuf::from("/a/c/d")
    );
    assert_eq!(normalize_path(Path::new("/../a")), PathBuf::from("/a"));
    assert_eq!(
        normalize_path(Path::new("a/../../b")),
        PathBuf::from("../b")
    );
}

#[test]
fn u64_rules() {
    assert_eq!(parse_u64("+7"), Some(7));
    assert_eq!(parse_u64("18446744073709551615"), Some(u64::MAX));
    for bad in ["", "+", "-1", "1.0", " 1", "0x10", "18446744073709551616"] {
        assert_eq!(parse_u64(bad), None, "{bad}");
    }
}
