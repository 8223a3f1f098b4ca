//! NAR tests: dumps compared with `nix-store --dump` of Nix 2.8.0, 2.26 and 2.34 (golden
//! files from `tests/golden/regen-nar.sh`, run by `regen-version.sh` for the newer ones), parse/restore round trips, one test per class of
//! malformed input, and the safety properties of `restore`. Every NAR validated here is also
//! checked by the push checker in several slicings, which must agree with the pull parser
//! (`nar/push.rs`).
#![cfg(unix)]

#[path = "nar/malformed.rs"]
mod malformed;
#[path = "nar/push.rs"]
mod push;

use malformed::{Nar, parse_err, symlink_nar, two_entries};

use ferry_nix::hash::Hash;
use ferry_nix::nar::{
    self, MAX_DEPTH, NameProblem, NarChecker, NarEncoder, NarReadError, NarWriteError,
    RestoreError, TargetProblem,
};
use push::{SLICINGS, validate_both};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const CASES: [&str; 6] = [
    "tree",
    "file",
    "exec-file",
    "symlink",
    "empty-dir",
    "empty-file",
];

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/nar")
}

/// The golden directories of each Nix version in integration/nix-versions: 2.8 at the top
/// (regen-nar.sh on this machine), the others in nix-LABEL/ (regen-version.sh LABEL).
const VERSIONS: [&str; 3] = ["", "nix-2.26", "nix-2.34"];

fn golden(case: &str) -> Vec<u8> {
    golden_of("", case)
}

fn golden_of(ver: &str, case: &str) -> Vec<u8> {
    fs::read(golden_dir().join(ver).join(format!("{case}.nar"))).expect("golden NAR")
}

/// `(size, hex, nix32)` from hashes.txt.
fn golden_hashes(case: &str) -> (u64, String, String) {
    golden_hashes_of("", case)
}

fn golden_hashes_of(ver: &str, case: &str) -> (u64, String, String) {
    let text = fs::read_to_string(golden_dir().join(ver).join("hashes.txt")).expect("hashes.txt");
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.first() == Some(&case) {
            return (
                f[1].parse().expect("size"),
                f[2].to_owned(),
                f[3].to_owned(),
            );
        }
    }
    panic!("no hashes for {case}");
}

fn put(path: &Path, mode: u32, content: &[u8]) {
    fs::write(path, content).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn mkdir(path: &Path) {
    fs::create_dir_all(path).expect("mkdir");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Builds test case `case` at `at`. THE RECIPE: the same as in `tests/golden/regen-nar.sh`
/// (see the table there); keep both identical.
fn build_case(case: &str, at: &Path) {
    use std::os::unix::fs::symlink;
    match case {
        "tree" => {
            mkdir(at);
            for d in ["nested", "nested/deeper", "nested/empty-dir", "emptydir"] {
                mkdir(&at.join(d));
            }
            put(&at.join("empty"), 0o644, b"");
            put(&at.join("exec.sh"), 0o755, b"#!/bin/sh\necho hello\n");
            put(&at.join("owner-x"), 0o744, b"owner may execute\n");
            put(
                &at.join("group-x"),
                0o655,
                b"group and others may execute\n",
            );
            put(&at.join("odd.txt"), 0o644, b"hello, nar\n");
            put(&at.join("eight.bin"), 0o644, b"12345678");
            for n in ["B", "a", "_", ".hidden", "é"] {
                put(&at.join(n), 0o644, format!("{n}\n").as_bytes());
            }
            put(&at.join("nested/deeper/leaf.txt"), 0o644, b"leaf\n");
            symlink("nested/deeper/leaf.txt", at.join("link-rel")).expect("link");
            symlink("/nonexistent/absolute/target", at.join("link-abs")).expect("link");
            symlink("../..", at.join("link-up")).expect("link");
        }
        "file" => put(at, 0o644, b"top-level file\n"),
        "exec-file" => put(at, 0o755, b"#!/bin/sh\nexit 0\n"),
        "symlink" => symlink("some/relative/target", at).expect("link"),
        "empty-dir" => mkdir(at),
        "empty-file" => put(at, 0o644, b""),
        _ => panic!("unknown case {case}"),
    }
}

#[test]
fn dump_matches_nix_store_dump() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for case in CASES {
        let at = tmp.path().join(case);
        build_case(case, &at);
        let mut out = Vec::new();
        let size = nar::dump_path(&at, &mut out).expect("dump");
        assert_eq!(size, out.len() as u64, "{case}");
        let (hash, size2) = nar::dump_path_hashed(&at, std::io::sink()).expect("dump hashed");
        for ver in VERSIONS {
            assert_eq!(out, golden_of(ver, case), "{ver} {case}");
            let (want_size, hex, nix32) = golden_hashes_of(ver, case);
            assert_eq!(size2, want_size, "{ver} {case}");
            assert_eq!(hash.to_base16(), hex, "{ver} {case}");
            assert_eq!(hash.to_nix32(), nix32, "{ver} {case}");
        }
    }
}

#[test]
fn golden_parses_restores_and_dumps_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for case in CASES {
        let bytes = golden(case);
        assert_eq!(validate_both(&bytes).expect(case), bytes.len() as u64);
        let target = tmp.path().join(format!("restored-{case}"));
        let size = nar::restore(&bytes[..], &target).expect(case);
        assert_eq!(size, bytes.len() as u64);
        let mut again = Vec::new();
        nar::dump_path(&target, &mut again).expect("dump");
        assert_eq!(again, bytes, "{case}");
    }
    // Only the restored targets are left: no staging directories.
    let mut names: Vec<String> = fs::read_dir(tmp.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .collect();
    names.sort();
    let mut want: Vec<String> = CASES.iter().map(|c| format!("restored-{c}")).collect();
    want.sort();
    assert_eq!(names, want);

    let t = tmp.path().join("restored-tree");
    let mode = |p: &str| fs::metadata(t.join(p)).expect(p).permissions().mode();
    assert_ne!(mode("exec.sh") & 0o111, 0);
    assert_eq!(
        mode("exec.sh") & 0o111,
        0o111,
        "x for all, as RestoreSink does"
    );
    assert_eq!(mode("group-x") & 0o111, 0);
    assert_eq!(
        fs::read_link(t.join("link-up")).expect("link"),
        Path::new("../..")
    );
    assert!(
        fs::symlink_metadata(t.join("nested/empty-dir"))
            .expect("dir")
            .is_dir()
    );
}

#[test]
fn encoder_reproduces_golden_without_a_disk_tree() {
    let mut e = NarEncoder::new(Vec::new()).expect("new");
    e.regular_bytes(true, b"#!/bin/sh\nexit 0\n").expect("file");
    assert_eq!(e.finish().expect("finish").0, golden("exec-file"));

    let mut e = NarEncoder::new(Vec::new()).expect("new");
    e.symlink(b"some/relative/target").expect("link");
    assert_eq!(e.finish().expect("finish").0, golden("symlink"));

    let mut e = NarEncoder::new(Vec::new()).expect("new");
    e.begin_directory().expect("dir");
    e.end_directory().expect("end");
    assert_eq!(e.finish().expect("finish").0, golden("empty-dir"));
}

#[test]
fn large_file_streams_through() {
    // Three and a bit 64 KiB chunks, with a length that is not a multiple of 8.
    let data: Vec<u8> = (0..(3 * 65536 + 12345u32))
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    let tmp = tempfile::tempdir().expect("tempdir");
    let f = tmp.path().join("big");
    put(&f, 0o755, &data);
    let mut dumped = Vec::new();
    nar::dump_path(&f, &mut dumped).expect("dump");

    let mut e = NarEncoder::new(Vec::new()).expect("new");
    e.regular(true, data.len() as u64, &data[..])
        .expect("regular");
    assert_eq!(dumped, e.finish().expect("finish").0);

    let back = tmp.path().join("back");
    nar::restore(&dumped[..], &back).expect("restore");
    assert_eq!(fs::read(&back).expect("read"), data);

    // The push checker agrees, whole and cut anywhere in the contents, across the pull
    // parser's 64 KiB reads.
    assert_eq!(validate_both(&dumped).expect("valid"), dumped.len() as u64);
    let start = dumped.len() - data.len().next_multiple_of(8) - 8;
    for cut in [
        0,
        1,
        65535,
        65536,
        65537,
        3 * 65536,
        data.len() - 1,
        data.len(),
    ] {
        parse_err(&dumped[..start + cut]);
    }
}

/// The golden NARs of every Nix version, fed to the push checker in every slicing with more
/// bytes after them: it takes exactly the NAR and leaves the rest.
#[test]
fn push_checker_finds_the_end_of_every_golden_nar() {
    for ver in VERSIONS {
        for case in CASES {
            let nar = golden_of(ver, case);
            let mut stream = nar.clone();
            stream.extend_from_slice(b"next reply, not NAR");
            for slicing in SLICINGS {
                let e = push::validate_pushed(&stream, slicing).expect_err("trailing");
                assert!(
                    matches!(e, NarReadError::TrailingData { offset } if offset == nar.len() as u64),
                    "{ver} {case} {slicing:?}: {e}"
                );
            }
            // Fed all at once, it says how much of the input was the NAR, and then takes no more.
            let mut c = NarChecker::new();
            assert_eq!(c.feed(&stream).expect(case), nar.len());
            assert!(c.is_done());
            assert_eq!(c.feed(b"more").expect(case), 0);
            assert_eq!(c.finish().expect(case), nar.len() as u64);
        }
    }
}

#[test]
fn push_checker_keeps_failing_after_an_error() {
    let mut nar = golden("file");
    nar[30] = b'X';
    let mut c = NarChecker::new();
    let first = c.feed(&nar).expect_err("bad");
    let again = c.feed(b"").expect_err("still bad");
    assert_eq!(first.to_string(), again.to_string());
    assert_eq!(
        c.finish().expect_err("still bad").to_string(),
        first.to_string()
    );
}

/// A file that claims an enormous size is counted, never buffered.
#[test]
fn push_checker_memory_does_not_follow_claimed_sizes() {
    let mut n = Nar::new();
    n.ts(&[b"(", b"type", b"regular", b"contents"]);
    n.b.extend_from_slice(&u64::MAX.to_le_bytes());
    let mut c = NarChecker::new();
    c.feed(&n.b).expect("header");
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        assert_eq!(c.feed(&zeros).expect("contents"), zeros.len());
    }
    assert!(!c.is_done());
    let e = c.finish().expect_err("truncated");
    assert!(matches!(e, NarReadError::Truncated { .. }), "{e}");
}

#[test]
fn dump_refuses_unsupported_file_types() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path().join("d");
    mkdir(&d);
    let sock = d.join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("socket");
    let err = nar::dump_path(&d, std::io::sink()).expect_err("must fail");
    match &err {
        NarWriteError::UnsupportedType { path, kind } => {
            assert_eq!(path, &sock);
            assert_eq!(*kind, "socket");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string().contains(&sock.display().to_string()),
        "{err}"
    );

    let err = nar::dump_path(&tmp.path().join("missing"), std::io::sink()).expect_err("must fail");
    assert!(matches!(err, NarWriteError::Read { .. }), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn dump_refuses_trees_deeper_than_the_limit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut p = tmp.path().join("root");
    mkdir(&p);
    for _ in 0..MAX_DEPTH {
        p.push("d");
        mkdir(&p);
    }
    let err = nar::dump_path(&tmp.path().join("root"), std::io::sink()).expect_err("must fail");
    assert!(matches!(err, NarWriteError::TooDeep { .. }), "{err}");
    assert!(err.to_string().contains(&"/d".repeat(MAX_DEPTH)), "{err}");
}

// ---- restore ----

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn restore_refuses_an_existing_target() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("dir");
    mkdir(&dir);
    put(&dir.join("keep"), 0o644, b"keep");
    let file = tmp.path().join("file");
    put(&file, 0o644, b"keep");
    let link = tmp.path().join("dangling");
    std::os::unix::fs::symlink("nowhere", &link).expect("link");

    for target in [&dir, &file, &link] {
        let err = nar::restore(&golden("tree")[..], target).expect_err("must fail");
        assert!(matches!(err, RestoreError::TargetExists { .. }), "{err}");
        assert!(
            err.to_string().contains(&target.display().to_string()),
            "{err}"
        );
    }
    assert_eq!(listing(tmp.path()), ["dangling", "dir", "file"]);
    assert_eq!(listing(&dir), ["keep"]);
    assert_eq!(fs::read(&file).expect("file"), b"keep");
}

#[test]
fn restore_leaves_nothing_after_an_error_mid_stream() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = tmp.path().join("out");
    let full = golden("tree");

    // Truncated after several entries were written to disk.
    let cut = full.windows(5).position(|w| w == b"leaf\n").expect("leaf");
    let err = nar::restore(&full[..cut], &target).expect_err("must fail");
    assert!(
        matches!(
            err,
            RestoreError::Nar {
                source: NarReadError::Truncated { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("/nested/deeper/leaf.txt"), "{err}");
    assert!(listing(tmp.path()).is_empty(), "{:?}", listing(tmp.path()));

    // A bad name after a valid entry.
    let (b, _) = two_entries(b"ok", b"..");
    let err = nar::restore(&b[..], &target).expect_err("must fail");
    assert!(
        matches!(
            err,
            RestoreError::Nar {
                source: NarReadError::InvalidName { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(listing(tmp.path()).is_empty());

    // Trailing garbage: the whole tree was written, and still nothing is left.
    let mut b = full.clone();
    b.extend_from_slice(b"garbage!");
    let err = nar::restore(&b[..], &target).expect_err("must fail");
    assert!(
        matches!(
            err,
            RestoreError::Nar {
                source: NarReadError::TrailingData { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(listing(tmp.path()).is_empty());
}

#[test]
fn restore_never_writes_through_symlinks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let outside = tmp.path().join("outside");
    mkdir(&outside);
    let work = tmp.path().join("work");
    mkdir(&work);
    let outside_abs = outside.to_str().expect("utf8 tempdir").as_bytes().to_vec();

    // Symlinks pointing up and out are restored as symlinks, never followed.
    let mut e = NarEncoder::new(Vec::new()).expect("new");
    e.begin_directory().expect("dir");
    e.entry(b"abs").expect("abs");
    e.symlink(&outside_abs).expect("abs link");
    e.entry(b"up").expect("up");
    e.symlink(b"../..").expect("up link");
    e.end_directory().expect("end");
    let b = e.finish().expect("finish").0;
    let t = work.join("links");
    nar::restore(&b[..], &t).expect("restore");
    assert_eq!(fs::read_link(t.join("abs")).expect("abs"), outside);
    assert_eq!(fs::read_link(t.join("up")).expect("up"), Path::new("../.."));

    // A later entry cannot reuse the symlink's name to put a file "under" it: names are
    // unique per directory, so the parser refuses before anything is written there.
    for (link, target) in [(&b"abs"[..], &outside_abs[..]), (b"up", b"../..")] {
        let mut n = Nar::new();
        n.open_dir();
        n.entry(link);
        n.ts(&[b"(", b"type", b"symlink", b"target", target, b")"]);
        n.close_entry();
        n.entry(link);
        n.open_dir();
        n.entry(b"pwned");
        n.file(b"gotcha");
        n.close_entry();
        n.t(b")");
        n.close_entry();
        n.t(b")");
        let err = nar::restore(&n.b[..], &work.join("evil")).expect_err("must fail");
        assert!(
            matches!(
                err,
                RestoreError::Nar {
                    source: NarReadError::DuplicateName { .. },
                    ..
                }
            ),
            "{err}"
        );
    }
    // A top-level symlink to the outside is just a symlink.
    let (b, _) = symlink_nar(&outside_abs);
    nar::restore(&b[..], &work.join("toplink")).expect("restore");
    assert_eq!(fs::read_link(work.join("toplink")).expect("link"), outside);

    assert!(listing(&outside).is_empty(), "{:?}", listing(&outside));
    assert_eq!(listing(tmp.path()), ["outside", "work"]);
    assert_eq!(listing(&work), ["links", "toplink"]);
}

#[test]
fn restore_needs_a_target_name() {
    let err = nar::restore(&golden("file")[..], Path::new("/")).expect_err("must fail");
    assert!(matches!(err, RestoreError::BadTarget { .. }), "{err}");
}

#[test]
fn hash_of_golden_matches_nix_hash() {
    for case in CASES {
        let (_, hex, nix32) = golden_hashes(case);
        let h = Hash::sha256_of(&golden(case));
        assert_eq!(h.to_base16(), hex);
        assert_eq!(h.to_nix32(), nix32);
    }
}
