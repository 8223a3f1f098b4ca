//! Machines-file parsing. Nix 2.8 has no printer for parsed machines, so these tests use
//! realistic lines from user configurations and a committed ed25519 host key fixture
//! (`tests/golden/nixconf/machines-fixture/`, made with `ssh-keygen -t ed25519` and
//! `base64 -w0` of the `.pub` line).

use ferry_nix::machines::{
    BUILDERS_SETTING_SOURCE, Machine, MachinesError, parse_builders_setting, parse_machines,
    slot_lock_name,
};
use std::collections::BTreeSet;
use std::io;
use std::path::Path;

const FIXTURE_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/nixconf/machines-fixture"
);

fn no_files(_: &Path) -> io::Result<Option<String>> {
    Ok(None)
}

fn parse(text: &str) -> Result<Vec<Machine>, MachinesError> {
    parse_machines(text, "/etc/nix/machines", "x86_64-linux", &no_files)
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(Path::new(FIXTURE_DIR).join(name)).expect("fixture")
}

#[test]
fn all_eight_fields_with_a_real_host_key() {
    let pubkey = fixture("host_ed25519.pub");
    let b64 = fixture("host_ed25519.pub.b64");
    let b64 = b64.trim();
    let line = format!(
        "ssh://nix-builder@ser5.internal x86_64-linux,i686-linux /home/ndufour/.ssh/id_nix_builder \
         12 4 nixos-test,benchmark,big-parallel,kvm benchmark {b64}"
    );
    let v = parse(&line).expect("parse");
    let [m] = v.as_slice() else {
        panic!("one machine expected, got {v:?}")
    };
    assert_eq!(m.store_uri, "ssh://nix-builder@ser5.internal");
    assert_eq!(m.systems, ["x86_64-linux", "i686-linux"]);
    assert_eq!(
        m.ssh_key.as_deref(),
        Some("/home/ndufour/.ssh/id_nix_builder")
    );
    assert_eq!(m.max_jobs, 12);
    assert_eq!(m.speed_factor, 4.0);
    assert_eq!(
        m.supported_features,
        set(&["benchmark", "big-parallel", "kvm", "nixos-test"])
    );
    assert_eq!(m.mandatory_features, set(&["benchmark"]));
    let key = m.public_host_key.as_ref().expect("host key");
    assert_eq!(key.base64, b64);
    assert_eq!(key.decoded, pubkey);
    assert!(key.decoded.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"));
    assert_eq!(
        key.known_hosts_line(m.host().expect("ssh host")),
        format!("ser5.internal {}\n", pubkey.trim_end())
    );
    assert_eq!(m.host(), Some("nix-builder@ser5.internal"));
    assert_eq!(m.scheme(), Some("ssh"));

    // Eligibility (docs/hook-protocol.md §2.1): benchmark is mandatory.
    assert!(m.accepts("x86_64-linux", &set(&["benchmark", "kvm"])));
    assert!(!m.accepts("x86_64-linux", &set(&["kvm"])));
    assert!(!m.accepts("aarch64-linux", &set(&["benchmark"])));
    assert!(m.accepts("builtin", &set(&["benchmark"])));
}

#[test]
fn seed_command_line_builders() {
    // From a user's troubleshooting guide: `--builders "ssh://nix-builder@192.168.15.6 x86_64-linux /etc/nix/builder_key 2 1"`.
    let v = parse_builders_setting(
        "ssh://nix-builder@192.168.15.6 x86_64-linux /etc/nix/builder_key 2 1",
        "x86_64-linux",
    )
    .expect("parse");
    let [m] = v.as_slice() else { panic!("{v:?}") };
    assert_eq!(m.store_uri, "ssh://nix-builder@192.168.15.6");
    assert_eq!((m.max_jobs, m.speed_factor), (2, 1.0));
    assert_eq!(m.ssh_key.as_deref(), Some("/etc/nix/builder_key"));
    assert_eq!(m.slot_lock_name(0), "ssh:__nix-builder@192.168.15.6-0");
    assert_eq!(m.slot_lock_name(1), "ssh:__nix-builder@192.168.15.6-1");
}

#[test]
fn nixos_generated_machines_file() {
    // What NixOS writes for a `nix.buildMachines` list like the seeds' (one machine per line,
    // `-` for unset fields, bare host names without a scheme).
    let text = "\
nix-builder@ser5.internal x86_64-linux /home/ndufour/.ssh/id_nix_builder 12 4 nixos-test,benchmark,big-parallel,kvm - -
nix-builder@opi01.internal aarch64-linux /home/ndufour/.ssh/id_nix_builder 6 2 big-parallel - -
nix-builder@opi02.internal aarch64-linux /home/ndufour/.ssh/id_nix_builder 6 2 big-parallel - -
ssh-ng://nix-builder@nas-01 x86_64-linux,aarch64-linux - 4 1 nixos-test,benchmark,big-parallel,kvm - -
";
    let v = parse(text).expect("parse");
    assert_eq!(v.len(), 4);
    let uris: Vec<&str> = v.iter().map(|m| m.store_uri.as_str()).collect();
    assert_eq!(
        uris,
        [
            "ssh://nix-builder@ser5.internal",
            "ssh://nix-builder@opi01.internal",
            "ssh://nix-builder@opi02.internal",
            "ssh-ng://nix-builder@nas-01"
        ]
    );
    let arm: Vec<&str> = v
        .iter()
        .filter(|m| m.accepts("aarch64-linux", &set(&["big-parallel"])))
        .filter_map(Machine::host)
        .collect();
    assert_eq!(
        arm,
        [
            "nix-builder@opi01.internal",
            "nix-builder@opi02.internal",
            "nix-builder@nas-01"
        ]
    );
    assert!(
        v.iter()
            .all(|m| m.public_host_key.is_none() && m.mandatory_features.is_empty())
    );
}

#[test]
fn nix_test_suite_fake_ssh_line() {
    // Nix's tests/build-remote.sh: fake ssh through `localhost` with a remote store.
    let v = parse("ssh://localhost?remote-store=/tmp/t/machine1?system-features=foo - - 1 1 foo; ssh://localhost?remote-store=/tmp/t/machine2 - - 1 1 bar")
        .expect("parse");
    assert_eq!(v.len(), 2);
    let m = v.first().expect("first");
    assert_eq!(m.host(), Some("localhost"));
    assert_eq!(m.systems, ["x86_64-linux"]);
    assert_eq!(m.supported_features, set(&["foo"]));
    assert_eq!(
        slot_lock_name(&m.store_uri, 0),
        "ssh:__localhost?remote-store=_tmp_t_machine1?system-features=foo-0"
    );
}

#[test]
fn builders_setting_with_real_machines_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let machines = dir.path().join("machines");
    let more = dir.path().join("more");
    std::fs::write(
        &machines,
        format!(
            "# builders\nbuilder1 x86_64-linux - 2\n@{}\n@{}/absent\n",
            more.display(),
            dir.path().display()
        ),
    )
    .expect("write");
    std::fs::write(&more, "builder2 aarch64-linux - 1 2.5 ; builder3\n").expect("write");
    let v =
        parse_builders_setting(&format!("@{}", machines.display()), "x86_64-linux").expect("parse");
    let got: Vec<(&str, u64, f64)> = v
        .iter()
        .map(|m| (m.store_uri.as_str(), m.max_jobs, m.speed_factor))
        .collect();
    assert_eq!(
        got,
        [
            ("ssh://builder1", 2, 1.0),
            ("ssh://builder2", 1, 2.5),
            ("ssh://builder3", 1, 1.0)
        ]
    );
}

// One test per class of malformed input.

#[test]
fn malformed_bad_max_jobs() {
    let e = parse("good\n# comment\nbad x86_64-linux - x").expect_err("bad maxJobs");
    assert_eq!(
        e.to_string(),
        "/etc/nix/machines line 3, field 4 (maxJobs): 'x' is not a number (an unsigned integer)"
    );
}

#[test]
fn malformed_negative_speed_factor() {
    let e = parse("h x86_64-linux - 1 -2").expect_err("negative");
    assert!(matches!(
        e,
        MachinesError::NegativeSpeedFactor { line: 1, .. }
    ));
    assert_eq!(
        e.to_string(),
        "/etc/nix/machines line 1, field 5 (speedFactor): speed factor must be >= 0, got '-2'"
    );
}

#[test]
fn malformed_bad_base64_host_key() {
    let e = parse("h x86_64-linux - 1 1 - - c3NoLWVkMjU1MTkg!!!").expect_err("base64");
    let msg = e.to_string();
    assert!(msg.starts_with("/etc/nix/machines line 1, field 8 (publicHostKey): 'c3NoLWVkMjU1MTkg!!!' is not valid base64"), "{msg}");
}

#[test]
fn malformed_too_many_fields() {
    let e = parse("h x86_64-linux - 1 1 kvm,big-parallel - - extra").expect_err("9 fields");
    assert_eq!(
        e.to_string(),
        "/etc/nix/machines line 1: 9 fields, a machine has at most 8 (is there a space inside a comma-separated list?)"
    );
}

#[test]
fn malformed_include_cycle() {
    let loader = |p: &Path| -> io::Result<Option<String>> {
        Ok(match p.to_str() {
            Some("/etc/nix/machines") => Some("a\n@/etc/nix/machines.d/more\n".to_owned()),
            Some("/etc/nix/machines.d/more") => Some("b\n\n@/etc/nix/machines\n".to_owned()),
            _ => None,
        })
    };
    let e = parse_machines(
        "@/etc/nix/machines",
        BUILDERS_SETTING_SOURCE,
        "x86_64-linux",
        &loader,
    )
    .expect_err("cycle");
    assert_eq!(
        e.to_string(),
        "/etc/nix/machines.d/more line 3: machines file '/etc/nix/machines' includes itself (include cycle)"
    );
    // A file including itself directly.
    let loader = |p: &Path| -> io::Result<Option<String>> {
        Ok((p == Path::new("/m")).then(|| "@/m".to_owned()))
    };
    assert!(matches!(
        parse_machines("@/m", "t", "x", &loader),
        Err(MachinesError::IncludeCycle { .. })
    ));
}
