//! `ferry-post-build` logging to journald: the hook's and the uploader's records, read back
//! from a socket that speaks journald's native protocol. Needs root (dev/setup).

use ferry_integration::ferry_bin;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One journal entry in journald's native protocol: `NAME=value\n`, or `NAME\n` + u64-LE
/// length + value + `\n` for values that may hold newlines (systemd's JOURNAL_NATIVE_PROTOCOL).
type Entry = Vec<(String, String)>;

fn parse_journal_entry(mut b: &[u8]) -> Entry {
    let mut fields = Vec::new();
    while let Some(nl) = b.iter().position(|&c| c == b'\n') {
        let line = &b[..nl];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            fields.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            b = &b[nl + 1..];
        } else {
            let rest = &b[nl + 1..];
            assert!(rest.len() >= 8, "truncated length field in {b:?}");
            let len = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")) as usize;
            assert!(
                rest.len() > 8 + len && rest[8 + len] == b'\n',
                "bad length-encoded field"
            );
            fields.push((
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(&rest[8..8 + len]).into_owned(),
            ));
            b = &rest[8 + len + 1..];
        }
    }
    assert!(b.is_empty(), "trailing bytes {b:?}");
    fields
}

fn field<'a>(e: &'a Entry, name: &str) -> Option<&'a str> {
    e.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn has_message(msgs: &[Entry], text: &str) -> bool {
    msgs.iter()
        .any(|e| field(e, "MESSAGE").is_some_and(|m| m.contains(text)))
}

/// Runs `ferry-post-build ARGS` in a private mount namespace whose
/// `/run/systemd/journal/socket` is `sock` (a datagram socket this test listens on), the
/// way journald's socket looks to a service, and returns the datagrams it sent.
fn run_with_fake_journald(
    args: &[&str],
    env: &[(&str, String)],
    stderr: Stdio,
) -> (std::process::Output, Vec<Entry>) {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().expect("dir");
    let sock_path = dir.path().join("journal.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let script = "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && \
                  touch /run/systemd/journal/socket && mount --bind \"$0\" /run/systemd/journal/socket && exec \"$@\"";
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(&sock_path)
        .arg(ferry_bin("ferry-post-build"))
        .args(args)
        .env_remove("JOURNAL_STREAM")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .output()
        .expect("unshare");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = sock.recv(&mut buf) {
        // tracing-journald probes the socket with an empty datagram.
        if n > 0 {
            got.push(parse_journal_entry(&buf[..n]));
        }
    }
    (out, got)
}

/// With journald there, the hook logs what it queued (and its problems, which also still go
/// to stderr for Nix to show) as native journal entries with `FERRY_*` fields; the uploader
/// logs to journald when asked (`--log journald`) or when its stderr is the journal
/// (`JOURNAL_STREAM`), and to stderr otherwise.
#[test]
fn hook_and_uploader_log_to_journald() {
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("state");
    let conf = dir.path().join("ferry.toml");
    std::fs::write(
        &conf,
        format!(
            "[post-build]\ntargets = [\"file://{}\"]\nstate-dir = \"{}\"\ngc-roots = false\n",
            dir.path().join("cache").display(),
            state.display()
        ),
    )
    .expect("config");
    let out_path = "/nix/store/7hmcr4m0qxnr5yb9mr37k2bw4ylp7wjc-ferry-journal-test";
    let env = vec![
        ("FERRY_CONFIG", conf.display().to_string()),
        ("OUT_PATHS", out_path.to_owned()),
    ];
    let (out, msgs) = run_with_fake_journald(&[], &env, Stdio::piped());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "the hook wrote to stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let queued = msgs
        .iter()
        .find(|e| field(e, "MESSAGE") == Some("queued for upload"))
        .unwrap_or_else(|| panic!("no 'queued' entry in {msgs:?}"));
    assert_eq!(
        field(queued, "SYSLOG_IDENTIFIER"),
        Some("ferry-post-build"),
        "{queued:?}"
    );
    assert_eq!(field(queued, "FERRY_OUTS"), Some(out_path), "{queued:?}");
    assert_eq!(field(queued, "PRIORITY"), Some("5"), "{queued:?}");
    assert!(
        field(queued, "FERRY_SPOOL").is_some_and(|s| !s.is_empty()),
        "{queued:?}"
    );

    // A problem: on stderr for Nix, and in the journal as a warning.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "[post-build]\nstate-dir = \"{}\"\ngc-roots = false\n",
            conf.display()
        ),
    )
    .expect("w");
    let env = vec![
        ("FERRY_CONFIG", bad.display().to_string()),
        ("OUT_PATHS", out_path.to_owned()),
    ];
    let (out, msgs) = run_with_fake_journald(&[], &env, Stdio::piped());
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOT queued"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        msgs.iter().any(|e| field(e, "PRIORITY") == Some("4")
            && field(e, "FERRY_PROBLEM").is_some_and(|p| p.contains("NOT queued"))),
        "no warning entry in {msgs:?}"
    );

    // The uploader: --log journald puts its log there and not on stderr.
    let env = vec![("FERRY_CONFIG", conf.display().to_string())];
    let (out, msgs) = run_with_fake_journald(
        &["--log", "journald", "daemon", "--drain"],
        &env,
        Stdio::piped(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        has_message(&msgs, "uploader started") && has_message(&msgs, "queue drained"),
        "{msgs:?}"
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("uploader started"));

    // Auto: journald when JOURNAL_STREAM names our stderr (as under systemd)…
    use std::os::unix::fs::MetadataExt as _;
    let f = std::fs::File::create(dir.path().join("stderr.log")).expect("log");
    let m = f.metadata().expect("meta");
    let env = vec![
        ("FERRY_CONFIG", conf.display().to_string()),
        ("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino())),
    ];
    let (out, msgs) = run_with_fake_journald(&["daemon", "--drain"], &env, Stdio::from(f));
    assert!(out.status.success());
    assert!(
        has_message(&msgs, "uploader started"),
        "auto did not pick journald: {msgs:?}"
    );
    // …stderr when stderr is something else (a child of a service, a terminal, a test).
    let env = vec![
        ("FERRY_CONFIG", conf.display().to_string()),
        ("JOURNAL_STREAM", "1:2".to_owned()),
    ];
    let (out, msgs) = run_with_fake_journald(&["daemon", "--drain"], &env, Stdio::piped());
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("uploader started"));
    assert!(msgs.is_empty(), "{msgs:?}");
}
