//! nix.conf parsing checked against the real Nix 2.8.0: `tests/golden/regen-nixconf.sh` ran
//! `NIX_CONF_DIR=<dir> nix show-config` on the committed dirs under
//! `tests/golden/nixconf/dirs/`; here Ferry parses the same dirs and every setting it reads
//! (or that a test file sets) must have the value Nix printed.

use ferry_nix::nixconf::{
    NIX_CONFIG_SOURCE, NixConf, NixConfError, Provenance, RealFs, canonical_name,
};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/nixconf");

/// Settings Ferry's hook reads, always compared.
const READ_BY_FERRY: &[&str] = &[
    "builders",
    "max-jobs",
    "substituters",
    "trusted-public-keys",
    "extra-platforms",
    "system-features",
    "builders-use-substitutes",
    "experimental-features",
];

/// `Setting<StringSet>` and the experimental-feature set: Nix prints them sorted.
const SET_TYPED: &[&str] = &[
    "extra-platforms",
    "system-features",
    "experimental-features",
    "trusted-substituters",
    "sandbox-paths",
    "ignored-acls",
    "allowed-impure-host-deps",
];

/// Names Nix treats as unknown settings (warns, ignores, never prints).
const IGNORED_BY_NIX: &[&str] = &["extra-builders", "extra-max-jobs"];

fn dir(name: &str) -> PathBuf {
    Path::new(GOLDEN).join("dirs").join(name)
}

fn show_config(name: &str, conf_dir: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(
        Path::new(GOLDEN)
            .join("out")
            .join(format!("{name}.show-config")),
    )
    .expect("golden output");
    let conf_dir = conf_dir.display().to_string();
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(" = ").expect("'name = value' line");
            (k.to_owned(), v.replace("@CONFDIR@", &conf_dir))
        })
        .collect()
}

fn apply_env_and_cli(conf: &mut NixConf, conf_dir: &Path) {
    if let Ok(text) = std::fs::read_to_string(conf_dir.join("NIX_CONFIG")) {
        conf.apply_text(&text, Path::new(NIX_CONFIG_SOURCE), &RealFs)
            .expect("NIX_CONFIG");
    }
    conf.apply_overrides(&[("extra-experimental-features", "nix-command")]);
}

/// Parses a golden dir the way Nix did for the recording: defaults (recorded from `empty`),
/// then `<dir>/nix.conf`, then `NIX_CONFIG`, then the `--extra-experimental-features
/// nix-command` flag.
fn ferry_parse(name: &str) -> NixConf {
    let conf_dir = dir(name);
    let mut conf = NixConf::new();
    for (k, v) in &show_config("empty", &conf_dir) {
        conf.set_default(k, v);
    }
    conf.apply_file(&conf_dir.join("nix.conf"), &RealFs)
        .expect("parse");
    apply_env_and_cli(&mut conf, &conf_dir);
    conf
}

#[test]
fn load_system_agrees_with_seeded_defaults() {
    for name in ["empty", "main", "extras", "override"] {
        let conf_dir = dir(name);
        let mut plain = NixConf::load_system(&conf_dir, &RealFs).expect("parse");
        apply_env_and_cli(&mut plain, &conf_dir);
        let seeded = ferry_parse(name);
        for (n, s) in plain.iter() {
            // Values that did not append to a default are the same with or without defaults.
            if s.set_at != Provenance::Default && s.value == seeded.get(n).unwrap_or_default() {
                continue;
            }
            if s.set_at == Provenance::Default
                || !s.appended_at.is_empty()
                || n == "experimental-features"
            {
                continue;
            }
            panic!(
                "{name}: '{n}' is '{}' without defaults, '{:?}' with",
                s.value,
                seeded.get(n)
            );
        }
        // The seeded `builders` default is Nix's.
        if plain.provenance("builders") == Some(&Provenance::Default) {
            assert_eq!(plain.get("builders"), seeded.get("builders"), "{name}");
        }
    }
}

fn compare(name: &str) {
    let conf_dir = dir(name);
    let nix = show_config(name, &conf_dir);
    let ferry = ferry_parse(name);
    let cores: u64 = nix
        .get("cores")
        .and_then(|c| c.parse().ok())
        .expect("cores");

    let mut names: BTreeSet<String> = READ_BY_FERRY.iter().map(|s| (*s).to_owned()).collect();
    for (n, s) in ferry.iter() {
        if s.set_at != Provenance::Default || !s.appended_at.is_empty() {
            names.insert(n.to_owned());
        }
    }
    let mut checked = 0;
    for n in &names {
        let Some(want) = nix.get(n) else {
            assert!(
                IGNORED_BY_NIX.contains(&n.as_str()),
                "{name}: Nix printed no '{n}'"
            );
            continue;
        };
        let got = ferry
            .get(n)
            .unwrap_or_else(|| panic!("{name}: Ferry has no '{n}'"));
        if SET_TYPED.contains(&n.as_str()) {
            let want: BTreeSet<&str> = want.split(' ').filter(|s| !s.is_empty()).collect();
            assert_eq!(ferry.get_set(n), Some(want), "{name}: {n}");
        } else if n == "max-jobs" {
            assert_eq!(
                ferry
                    .get_max_jobs(cores)
                    .expect("max-jobs")
                    .map(|v| v.to_string())
                    .as_deref(),
                Some(want.as_str()),
                "{name}: {n}"
            );
        } else if want == "true" || want == "false" {
            assert_eq!(
                ferry.get_bool(n).expect("bool"),
                Some(want == "true"),
                "{name}: {n} = {got}"
            );
        } else {
            assert_eq!(got, want, "{name}: {n}");
        }
        checked += 1;
    }
    assert!(
        checked >= READ_BY_FERRY.len(),
        "{name}: compared only {checked}"
    );
}

#[test]
fn golden_empty_dir_is_all_defaults() {
    compare("empty");
}

#[test]
fn golden_main_with_includes_comments_aliases_extras() {
    compare("main");
    let c = ferry_parse("main");
    // Spot checks of the rules that made those values.
    assert_eq!(c.get_u64("max-jobs"), Ok(Some(4)));
    assert_eq!(canonical_name("build-max-silent-time"), "max-silent-time");
    assert_eq!(
        c.provenance("max-jobs").map(ToString::to_string),
        Some(format!(
            "{}:1",
            dir("main").join("conf.d/nested.conf").display()
        ))
    );
    assert_eq!(
        c.get_list("substituters"),
        Some(vec![
            "http://192.168.15.6:5000",
            "https://cache.nixos.org/",
            "http://nix-cache"
        ])
    );
}

#[test]
fn golden_extras_append_to_defaults() {
    compare("extras");
    let c = ferry_parse("extras");
    assert_eq!(c.get("extra-builders"), Some("ssh://ignored"));
    assert_eq!(c.warnings().len(), 2, "{:?}", c.warnings());
}

#[test]
fn golden_nix_config_overrides_the_file() {
    compare("override");
}

#[test]
fn hook_stream_overrides_layer_on_top() {
    let mut c = ferry_parse("main");
    c.apply_overrides(&[
        ("builders", ""),
        ("max-jobs", "0"),
        ("builders-use-substitutes", "false"),
    ]);
    assert_eq!(c.get("builders"), Some(""));
    assert_eq!(c.get_u64("max-jobs"), Ok(Some(0)));
    assert_eq!(c.get_bool("builders-use-substitutes"), Ok(Some(false)));
}

// One test per class of malformed input.

fn loader(
    files: &'static [(&'static str, &'static str)],
) -> impl Fn(&Path) -> io::Result<Option<String>> {
    move |p: &Path| {
        Ok(files
            .iter()
            .find(|(name, _)| Path::new(name) == p)
            .map(|(_, t)| (*t).to_owned()))
    }
}

#[test]
fn malformed_missing_equals_names_file_and_line() {
    let files: &'static [(&str, &str)] = &[("/etc/nix/extra.conf", "# fine\n\nmax-jobs 4\n")];
    let e = NixConf::parse(
        "include extra.conf\n",
        Path::new("/etc/nix/nix.conf"),
        &loader(files),
    )
    .expect_err("missing =");
    assert_eq!(
        e,
        NixConfError::Syntax {
            file: "/etc/nix/extra.conf".into(),
            line: 3,
            text: "max-jobs 4".into()
        }
    );
    assert!(
        e.to_string()
            .starts_with("/etc/nix/extra.conf:3: illegal configuration line 'max-jobs 4'")
    );
    // `name=value` is one word: also an error, as in Nix.
    let e =
        NixConf::parse("max-jobs=4", Path::new("/etc/nix/nix.conf"), &loader(&[])).expect_err("x");
    assert!(matches!(e, NixConfError::Syntax { line: 1, .. }));
}

#[test]
fn malformed_missing_include_names_it() {
    let e = NixConf::parse(
        "max-jobs = 1\ninclude conf.d/../gone.conf\n",
        Path::new("/etc/nix/nix.conf"),
        &loader(&[]),
    )
    .expect_err("missing include");
    assert_eq!(
        e.to_string(),
        "file '/etc/nix/gone.conf' included from /etc/nix/nix.conf:2 not found"
    );
}

#[test]
fn malformed_include_cycle() {
    let files: &'static [(&str, &str)] = &[
        ("/etc/nix/nix.conf", "include a.conf\n"),
        ("/etc/nix/a.conf", "max-jobs = 1\n!include nix.conf\n"),
    ];
    let e = NixConf::load_system(Path::new("/etc/nix"), &loader(files)).expect_err("cycle");
    assert_eq!(
        e.to_string(),
        "include cycle: '/etc/nix/nix.conf' included from /etc/nix/a.conf:2 is already being read"
    );
}

#[test]
fn malformed_bad_bool_and_int_name_setting_and_place() {
    let files: &'static [(&str, &str)] = &[
        ("/etc/nix/nix.conf", "max-jobs = 2\ninclude site.conf\n"),
        (
            "/etc/nix/site.conf",
            "\nbuilders-use-substitutes = maybe\nmax-jobs = lots\n",
        ),
    ];
    let c = NixConf::load_system(Path::new("/etc/nix"), &loader(files)).expect("parse");
    assert_eq!(
        c.get_bool("builders-use-substitutes")
            .expect_err("bool")
            .to_string(),
        "Boolean setting 'builders-use-substitutes' has invalid value 'maybe' (set at /etc/nix/site.conf:2); expected true, false, yes, no, 1 or 0"
    );
    assert_eq!(
        c.get_u64("max-jobs").expect_err("int").to_string(),
        "setting 'max-jobs' has invalid value 'lots' (set at /etc/nix/site.conf:3); expected an unsigned integer"
    );
    let mut c = c;
    c.apply_overrides(&[("connect-timeout", "-5")]);
    assert_eq!(
        c.get_u64("connect-timeout").expect_err("neg").to_string(),
        "setting 'connect-timeout' has invalid value '-5' (set at the build hook's settings stream); expected an unsigned integer"
    );
}
