//! Targets for the NAR reader and restorer (`ferry_nix::nar`).

use std::io;
use std::path::Path;

/// Re-encodes what it is shown, so a parsed NAR can be compared with its bytes.
struct Reencode {
    enc: Option<ferry_nix::nar::NarEncoder<Vec<u8>>>,
}

impl Reencode {
    fn new() -> Reencode {
        Reencode {
            enc: Some(ferry_nix::nar::NarEncoder::new(Vec::new()).expect("encoder")),
        }
    }
    fn enc(&mut self, path: &[u8]) -> io::Result<&mut ferry_nix::nar::NarEncoder<Vec<u8>>> {
        let enc = self.enc.as_mut().expect("encoder");
        if !path.is_empty() {
            let name = path.rsplit(|b| *b == b'/').next().unwrap_or(path);
            enc.entry(name).map_err(io::Error::other)?;
        }
        Ok(enc)
    }
}

impl ferry_nix::nar::NarVisitor for Reencode {
    fn directory(&mut self, path: &[u8]) -> io::Result<()> {
        self.enc(path)?.begin_directory().map_err(io::Error::other)
    }
    fn end_directory(&mut self, _: &[u8]) -> io::Result<()> {
        self.enc(b"")?.end_directory().map_err(io::Error::other)
    }
    fn regular(
        &mut self,
        path: &[u8],
        executable: bool,
        contents: &mut ferry_nix::nar::NarContents<'_>,
    ) -> io::Result<()> {
        let mut data = Vec::new();
        io::Read::read_to_end(contents, &mut data)?;
        self.enc(path)?
            .regular_bytes(executable, &data)
            .map_err(io::Error::other)
    }
    fn symlink(&mut self, path: &[u8], target: &[u8]) -> io::Result<()> {
        self.enc(path)?.symlink(target).map_err(io::Error::other)
    }
}

/// NAR parsing (`ferry_nix::nar::parse`, `validate`): an accepted NAR re-encodes to its bytes.
pub fn nar_parse(data: &[u8]) -> bool {
    let valid = ferry_nix::nar::validate(data);
    let mut v = Reencode::new();
    let parsed = ferry_nix::nar::parse(data, &mut v);
    match (parsed, valid) {
        (Ok(n), Ok(m)) => {
            assert_eq!(n, m);
            assert_eq!(n, data.len() as u64, "exactly one NAR, no trailing bytes");
            let (bytes, size) = v.enc.take().expect("encoder").finish().expect("finish");
            assert_eq!(size, n);
            assert!(bytes == data, "a parsed NAR re-encodes to the same bytes");
            true
        }
        (Err(_), Err(_)) => false,
        (p, v) => panic!("parse and validate disagree: {p:?} vs {v:?}"),
    }
}

/// Feeds `data` to the push checker in pieces of the sizes `sizes` gives: the NAR's size
/// once it ends (what follows is not taken), or the error.
fn push_check(
    data: &[u8],
    mut sizes: impl FnMut() -> usize,
) -> Result<u64, ferry_nix::nar::NarReadError> {
    let mut checker = ferry_nix::nar::NarChecker::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (piece, after) = rest.split_at(sizes().clamp(1, rest.len()));
        let used = checker.feed(piece)?;
        assert!(used <= piece.len());
        if checker.is_done() {
            assert_eq!(
                checker.feed(after).expect("done"),
                0,
                "takes nothing after the end"
            );
            break;
        }
        assert_eq!(used, piece.len(), "takes every byte before the end");
        rest = after;
    }
    checker.finish()
}

/// The push NAR checker (`ferry_nix::nar::NarChecker`) against the pull parser
/// (`nar::parse_from`), which it must mirror: whole, byte by byte and in pseudo-random
/// pieces, the same verdict, the same end (bytes after the NAR are left alone) and the same
/// error, message and offset included.
pub fn nar_check(data: &[u8]) -> bool {
    let mut r = ferry_nix::wire::WireReader::new(data);
    let pulled = ferry_nix::nar::parse_from(&mut r, &mut ferry_nix::nar::Null);
    // Piece sizes from 1 to 64, from a seed the input picks.
    let mut state = data.iter().fold(0x9e37_79b9_7f4a_7c15u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) | 1;
    let random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        1 + (state % 64) as usize
    };
    let pushed = [
        push_check(data, || usize::MAX),
        push_check(data, || 1),
        push_check(data, random),
    ];
    for p in &pushed {
        match (&pulled, p) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "the same end"),
            (Err(a), Err(b)) => {
                assert_eq!(a.offset(), b.offset(), "{a} / {b}");
                assert_eq!(a.to_string(), b.to_string());
            }
            (a, b) => panic!("pull parser and push checker disagree: {a:?} vs {b:?}"),
        }
    }
    pulled.is_ok()
}

struct RestoreDir {
    _dir: tempfile::TempDir,
    base: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// NAR restore (`ferry_nix::nar::restore`) into a temporary directory: nothing is written
/// outside the target (a sibling canary directory, which symlinks in the NAR may name, stays
/// as it was), nothing is left beside it, a failed restore leaves no target, and a restored
/// tree dumps back to the NAR's bytes.
pub fn nar_restore(data: &[u8]) -> bool {
    thread_local! {
        static DIR: RestoreDir = {
            let dir = tempfile::tempdir().expect("tempdir");
            let base = dir.path().join("b");
            let outside = dir.path().join("outside");
            std::fs::create_dir(&base).expect("mkdir");
            std::fs::create_dir(&outside).expect("mkdir");
            std::fs::write(outside.join("canary"), b"canary").expect("canary");
            // So a NAR symlink `../outside` from the target's parent's level points somewhere.
            std::os::unix::fs::symlink(&outside, base.join("outside")).expect("symlink");
            RestoreDir { _dir: dir, base, outside }
        };
    }
    DIR.with(|d| {
        let target = d.base.join("out");
        let result = ferry_nix::nar::restore(data, &target);
        assert_eq!(listing(&d.outside), ["canary"], "wrote outside the target");
        assert_eq!(
            std::fs::read(d.outside.join("canary")).expect("canary"),
            b"canary"
        );
        match result {
            Ok(n) => {
                assert_eq!(n, data.len() as u64);
                assert_eq!(
                    listing(&d.base),
                    ["out", "outside"],
                    "left something beside"
                );
                let mut dumped = Vec::new();
                ferry_nix::nar::dump_path(&target, &mut dumped).expect("dump");
                assert!(
                    dumped == data,
                    "a restored tree dumps to the NAR it came from"
                );
                let md = std::fs::symlink_metadata(&target).expect("target");
                if md.is_dir() {
                    make_writable(&target);
                    std::fs::remove_dir_all(&target).expect("clean");
                } else {
                    std::fs::remove_file(&target).expect("clean");
                }
                true
            }
            Err(_) => {
                assert_eq!(listing(&d.base), ["outside"], "a failed restore left files");
                false
            }
        }
    })
}

/// Restored directories may be read-only; `remove_dir_all` needs to write them.
fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(md) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !md.is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            make_writable(&e.path());
        }
    }
}
