//! One test per class of malformed NAR: each is refused with an error that names the offset
//! and the path inside the NAR, by the pull parser and (through `check`) the push checker.

use super::*;

/// Builds NARs token by token and remembers where each token starts.
#[derive(Default)]
pub(crate) struct Nar {
    pub(crate) b: Vec<u8>,
}

impl Nar {
    pub(crate) fn new() -> Self {
        let mut n = Nar::default();
        n.t(b"nix-archive-1");
        n
    }
    /// Appends a wire string; returns its offset.
    pub(crate) fn t(&mut self, s: &[u8]) -> u64 {
        let at = self.b.len() as u64;
        self.b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        self.b.extend_from_slice(s);
        while !self.b.len().is_multiple_of(8) {
            self.b.push(0);
        }
        at
    }
    pub(crate) fn ts(&mut self, toks: &[&[u8]]) -> u64 {
        let at = self.b.len() as u64;
        for t in toks {
            self.t(t);
        }
        at
    }
    pub(crate) fn file(&mut self, contents: &[u8]) {
        self.ts(&[b"(", b"type", b"regular", b"contents", contents, b")"]);
    }
    /// `entry ( name N node` ; returns the offset of the name.
    pub(crate) fn entry(&mut self, name: &[u8]) -> u64 {
        self.ts(&[b"entry", b"("]);
        self.t(b"name");
        let at = self.t(name);
        self.t(b"node");
        at
    }
    pub(crate) fn close_entry(&mut self) {
        self.t(b")");
    }
    pub(crate) fn open_dir(&mut self) {
        self.ts(&[b"(", b"type", b"directory"]);
    }
}

pub(crate) fn parse_err(bytes: &[u8]) -> NarReadError {
    validate_both(bytes).expect_err("must be rejected")
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
    validate_both(&ok).expect("255 bytes are allowed");
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

pub(crate) fn two_entries(a: &[u8], b: &[u8]) -> (Vec<u8>, u64) {
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
    validate_both(&two_entries(b"B", b"a").0).expect("sorted");
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
    validate_both(&nested(MAX_DEPTH - 1).0).expect("at the limit");
    let (b, at) = nested(MAX_DEPTH);
    let err = parse_err(&b);
    assert!(matches!(err, NarReadError::TooDeep { .. }), "{err}");
    assert_names(&err, at, &"/d".repeat(MAX_DEPTH));
}

pub(crate) fn symlink_nar(target: &[u8]) -> (Vec<u8>, u64) {
    let mut n = Nar::new();
    n.ts(&[b"(", b"type", b"symlink", b"target"]);
    let at = n.t(target);
    n.t(b")");
    (n.b, at)
}

#[test]
fn over_long_symlink_target() {
    validate_both(&symlink_nar(&[b'x'; 4095]).0).expect("4095 bytes are allowed");
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
