//! NAR tests: dumps compared with `nix-store --dump` of Nix 2.8.0, 2.26 and 2.34 (golden
//! files from `tests/golden/regen-nar.sh`, run by `regen-version.sh` for the newer ones), parse/restore round trips, one test per class of
//! malformed input, and the safety properties of `restore`.
#![cfg(unix)]

use ferry_nix::hash::Hash;
use ferry_nix::nar::{
    self, MAX_DEPTH, NameProblem, NarEncoder, NarReadError, NarWriteError, RestoreError,
    TargetProblem,
};
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
        assert_eq!(nar::validate(&bytes[..]).expect(case), bytes.len() as u64);
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

// ---- malformed input ----

/// Builds NARs token by token and remembers where each token starts.
#[derive(Default)]
struct Nar {
    b: Vec<u8>,
}

impl Nar {
    fn new() -> Self {
        let mut n = Nar::default();
        n.t(b"nix-archive-1");
        n
    }
    /// Appends a wire string; returns its offset.
    fn t(&mut self, s: &[u8]) -> u64 {
        let at = self.b.len() as u64;
        self.b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        self.b.extend_from_slice(s);
        while !self.b.len().is_multiple_of(8) {
            self.b.push(0);
        }
        at
    }
    fn ts(&mut self, toks: &[&[u8]]) -> u64 {
        let at = self.b.len() as u64;
        for t in toks {
            self.t(t);
        }
        at
    }
    fn file(&mut self, contents: &[u8]) {
        self.ts(&[b"(", b"type", b"regular", b"contents", contents, b")"]);
    }
    /// `entry ( name N node` ; returns the offset of the name.
    fn entry(&mut self, name: &[u8]) -> u64 {
        self.ts(&[b"entry", b"("]);
        self.t(b"name");
        let at = self.t(name);
        self.t(b"node");
        at
    }
    fn close_entry(&mut self) {
        self.t(b")");
    }
    fn open_dir(&mut self) {
        self.ts(&[b"(", b"type", b"directory"]);
    }
}

fn parse_err(bytes: &[u8]) -> NarReadError {
    nar::validate(bytes).expect_err("must be rejected")
}

fn assert_names(err: &NarReadError, offset: u64, path: &str) {
    assert_eq!(err.offset(), offset, "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("byte offset {offset}")), "{msg}");
    assert!(msg.contains(path), "message lacks {path}: {msg}");
}

/// A root directory with one entry named `name` holding an empty file.
fn dir_with_name(name: &[u8]) -> (Vec<u8>, u64) {
    let mut n = Nar::new();
    n.open_dir();
    let at = n.entry(name);
    n.file(b"");
    n.close_entry();
    n.t(b")");
    (n.b, at)
}

#[test]
fn bad_magic() {
    let mut n = Nar::default();
    n.t(b"nix-archive-2");
    n.file(b"x");
    let err = parse_err(&n.b);
    assert!(matches!(err, NarReadError::BadMagic { offset: 0 }), "{err}");
    assert!(err.to_string().contains("nix-archive-1"), "{err}");
    // A huge length where the magic should be is refused without allocating.
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(&[0; 16]);
    assert!(matches!(
        parse_err(&b),
        NarReadError::BadMagic { offset: 0 }
    ));
}

#[test]
fn truncated() {
    let full = golden("tree");
    // Every cut point, so each token and contents boundary is covered.
    for cut in 0..full.len() {
        let err = parse_err(&full[..cut]);
        match &err {
            NarReadError::Truncated { offset, .. } => assert_eq!(*offset, cut as u64, "{err}"),
            other => panic!("cut {cut}: {other}"),
        }
    }
    // Cut inside the contents of /nested/deeper/leaf.txt: the message names the entry.
    let at = full.windows(5).position(|w| w == b"leaf\n").expect("leaf");
    let err = parse_err(&full[..at + 2]);
    assert_names(&err, at as u64 + 2, "/nested/deeper/leaf.txt");
}

#[test]
fn unknown_node_type() {
    let mut n = Nar::new();
    n.open_dir();
    n.entry(b"p");
    n.ts(&[b"(", b"type"]);
    let at = n.t(b"fifo");
    n.t(b")");
    n.close_entry();
    n.t(b")");
    let err = parse_err(&n.b);
    assert!(
        matches!(err, NarReadError::UnknownType { ref got, .. } if got == "fifo"),
        "{err}"
    );
    assert_names(&err, at, "/p");
}

fn invalid_name(name: &[u8], problem: NameProblem) {
    let (b, at) = dir_with_name(name);
    let err = parse_err(&b);
    assert!(
        matches!(err, NarReadError::InvalidName { problem: p, ref dir, .. } if p == problem && dir == "/"),
        "{err}"
    );
    assert_names(&err, at, &problem.to_string());
}

#[test]
fn dotdot_name() {
    invalid_name(b"..", NameProblem::DotDot);
}

#[test]
fn dot_name() {
    invalid_name(b".", NameProblem::Dot);
}

#[test]
fn slash_in_name() {
    invalid_name(b"etc/passwd", NameProblem::Slash);
    invalid_name(b"/", NameProblem::Slash);
}

#[test]
fn nul_in_name() {
    invalid_name(b"a\0b", NameProblem::Nul);
}

#[test]
fn empty_name() {
    invalid_name(b"", NameProblem::Empty);
}

#[test]
fn name_longer_than_255_bytes() {
    let (ok, _) = dir_with_name(&[b'n'; 255]);
    nar::validate(&ok[..]).expect("255 bytes are allowed");
    let (b, at) = dir_with_name(&[b'n'; 256]);
    let err = parse_err(&b);
    assert!(
        matches!(
            err,
            NarReadError::TooLong {
                what: "entry name",
                len: 256,
                limit: 255,
                ..
            }
        ),
        "{err}"
    );
    assert_names(&err, at, "entry name");
}

fn two_entries(a: &[u8], b: &[u8]) -> (Vec<u8>, u64) {
    let mut n = Nar::new();
    n.open_dir();
    n.entry(a);
    n.file(b"1");
    n.close_entry();
    let at = n.entry(b);
    n.file(b"2");
    n.close_entry();
    n.t(b")");
    (n.b, at)
}

#[test]
fn duplicate_names() {
    let (b, at) = two_entries(b"same", b"same");
    let err = parse_err(&b);
    assert!(matches!(err, NarReadError::DuplicateName { .. }), "{err}");
    assert_names(&err, at, "/same");
}

#[test]
fn unsorted_names() {
    // Byte-wise 'B' (0x42) < 'a' (0x61), whatever the locale says.
    nar::validate(&two_entries(b"B", b"a").0[..]).expect("sorted");
    let (b, at) = two_entries(b"a", b"B");
    let err = parse_err(&b);
    assert!(
        matches!(err, NarReadError::Unsorted { ref prev, .. } if prev == "a"),
        "{err}"
    );
    assert_names(&err, at, "/B");
}

fn nested(levels: usize) -> (Vec<u8>, u64) {
    let mut n = Nar::new();
    let mut last = 0;
    n.open_dir();
    for _ in 0..levels {
        last = n.entry(b"d");
        n.open_dir();
    }
    n.t(b")");
    for _ in 0..levels {
        n.close_entry();
        n.t(b")");
    }
    (n.b, last)
}

#[test]
fn depth_over_limit() {
    // The root is at depth 0: 63 levels below it are allowed, 64 are not.
    nar::validate(&nested(MAX_DEPTH - 1).0[..]).expect("at the limit");
    let (b, at) = nested(MAX_DEPTH);
    let err = parse_err(&b);
    assert!(matches!(err, NarReadError::TooDeep { .. }), "{err}");
    assert_names(&err, at, &"/d".repeat(MAX_DEPTH));
}

fn symlink_nar(target: &[u8]) -> (Vec<u8>, u64) {
    let mut n = Nar::new();
    n.ts(&[b"(", b"type", b"symlink", b"target"]);
    let at = n.t(target);
    n.t(b")");
    (n.b, at)
}

#[test]
fn over_long_symlink_target() {
    nar::validate(&symlink_nar(&[b'x'; 4095]).0[..]).expect("4095 bytes are allowed");
    let (b, at) = symlink_nar(&[b'x'; 4096]);
    let err = parse_err(&b);
    assert!(
        matches!(
            err,
            NarReadError::TooLong {
                what: "symlink target",
                len: 4096,
                ..
            }
        ),
        "{err}"
    );
    assert_names(&err, at, "symlink target");

    let (b, at) = symlink_nar(b"");
    let err = parse_err(&b);
    assert!(
        matches!(
            err,
            NarReadError::BadTarget {
                problem: TargetProblem::Empty,
                ..
            }
        ),
        "{err}"
    );
    assert_names(&err, at, "target is empty");
}

#[test]
fn trailing_garbage_after_the_root_node() {
    let mut b = golden("file");
    let len = b.len() as u64;
    b.push(0);
    let err = parse_err(&b);
    assert!(matches!(err, NarReadError::TrailingData { .. }), "{err}");
    assert_names(&err, len, "trailing");
}

#[test]
fn non_zero_padding() {
    let mut n = Nar::new();
    n.ts(&[b"(", b"type", b"regular", b"contents"]);
    let at = n.t(b"abc");
    n.t(b")");
    // The padding of "abc" starts after its 8-byte length and 3 bytes.
    let pad = at as usize + 8 + 3;
    n.b[pad + 2] = 1;
    let err = parse_err(&n.b);
    assert!(matches!(err, NarReadError::BadPadding { .. }), "{err}");
    assert_names(&err, pad as u64, "padding");
}

#[test]
fn unexpected_tokens() {
    // A non-empty executable marker.
    let mut n = Nar::new();
    n.ts(&[b"(", b"type", b"regular", b"executable"]);
    let at = n.t(b"yes");
    n.ts(&[b"contents", b"", b")"]);
    let err = parse_err(&n.b);
    assert!(
        matches!(err, NarReadError::NonEmptyExecutable { .. }),
        "{err}"
    );
    assert_names(&err, at, "executable");

    // Something else where an entry or ')' belongs.
    let mut n = Nar::new();
    n.open_dir();
    let at = n.t(b"entri");
    let err = parse_err(&n.b);
    assert!(
        matches!(err, NarReadError::UnexpectedTag { ref got, .. } if got == "entri"),
        "{err}"
    );
    assert_names(&err, at, "\"entry\" or \")\"");

    // An over-long keyword is refused without reading it.
    let mut n = Nar::new();
    let at = n.t(&[b'('; 33]);
    let err = parse_err(&n.b);
    assert!(
        matches!(
            err,
            NarReadError::TooLong {
                what: "keyword",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.offset(), at);
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
