//! NAR (Nix ARchive): the serialisation of a file tree that store objects are hashed and
//! shipped as.
//!
//! Follows `src/libutil/archive.cc` (`dumpPath`, `parseDump`, `restorePath`) and the
//! grammar in the Nix manual (`protocols/nix-archive`); see also `docs/upload.md` §3.1:
//!
//! ```text
//! nar    = str("nix-archive-1") node
//! node   = str("(") str("type") body str(")")
//! body   = str("regular") [str("executable") str("")] str("contents") str(bytes)
//!        | str("symlink") str("target") str(target)
//!        | str("directory") { str("entry") str("(") str("name") str(name) str("node") node str(")") }
//! ```
//!
//! Pieces:
//! - [`NarEncoder`]: an event-based writer (directory / entry / file / symlink) that refuses
//!   to emit anything Nix would refuse to parse;
//! - [`dump_path`]: a file tree on disk to a NAR, byte-identical to `nix-store --dump`;
//! - [`parse`] / [`parse_from`] with a [`NarVisitor`]: a strict streaming parser that pulls
//!   its input from a `Read`;
//! - [`NarChecker`]: the same grammar, bounds and errors as a sans-IO state machine that is
//!   pushed slices of any size and says where the NAR ends (for NARs inside async protocol
//!   streams, such as the serve protocol's `DumpStorePath`);
//! - [`restore`]: a NAR to a new directory, all-or-nothing.
//!
//! Paths inside a NAR ("NAR paths") are byte strings: the empty string for the root node and
//! `/name/name…` for the nodes below it, as in the error messages (`/bin/sh`).

mod check;
mod encode;
mod parse;

#[cfg(unix)]
mod dump;
#[cfg(unix)]
mod restore;

pub use check::NarChecker;
pub use encode::{NarEncoder, NarWriteError, TeeWriter};
pub use parse::{NarContents, NarReadError, NarVisitor, Null, parse, parse_from, validate};

#[cfg(unix)]
pub use dump::{dump_path, dump_path_hashed};
#[cfg(unix)]
pub use restore::{RestoreError, restore};

use std::fmt;

/// The version magic every NAR starts with (`narVersionMagic1`).
pub const NAR_MAGIC: &str = "nix-archive-1";

/// Longest entry name, in bytes (`narMaxName`). It is the `NAME_MAX` of every file system
/// Nix runs on, so a longer name could not be restored anyway; Nix fixes it in the format
/// rather than asking the host.
pub const MAX_NAME_LEN: usize = 255;

/// Longest symlink target, in bytes (`narMaxTarget` in recent Nix). Linux refuses a target
/// of `PATH_MAX` (4096) bytes or more, since `PATH_MAX` counts the terminating NUL, so 4095
/// is the longest target that can be restored; the bound also caps what the parser buffers.
pub const MAX_TARGET_LEN: usize = 4095;

/// Deepest node: the root is at depth 0 and a node at depth `MAX_DEPTH` is refused, so a
/// path inside a NAR has at most 63 names (`narMaxDepth`, recent Nix). Dumping and parsing
/// recurse once per level, and the bound keeps a hostile NAR from exhausting the stack;
/// 64 levels is far beyond any real store object.
pub const MAX_DEPTH: usize = 64;

/// Longest keyword token the parser reads (`narMaxTag`): keywords are at most 10 bytes, the
/// slack keeps error messages useful for short garbage without large allocations.
const MAX_TAG_LEN: u64 = 32;

/// Size of the buffer regular-file contents are streamed through.
const CHUNK: usize = 64 * 1024;

/// Why an entry name is not allowed in a NAR (`parse` in `archive.cc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameProblem {
    Empty,
    Dot,
    DotDot,
    Slash,
    Nul,
    TooLong(usize),
}

impl fmt::Display for NameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameProblem::Empty => f.write_str("the name is empty"),
            NameProblem::Dot => f.write_str("the name is '.'"),
            NameProblem::DotDot => f.write_str("the name is '..'"),
            NameProblem::Slash => f.write_str("the name contains '/'"),
            NameProblem::Nul => f.write_str("the name contains a NUL byte"),
            NameProblem::TooLong(n) => {
                write!(f, "the name is {n} bytes long, the limit is {MAX_NAME_LEN}")
            }
        }
    }
}

/// Checks an entry name: not empty, not `.` or `..`, no `/`, no NUL, at most
/// [`MAX_NAME_LEN`] bytes. Such a name is always a single path component, which is what
/// keeps [`restore`] inside its target directory.
pub fn check_name(name: &[u8]) -> Result<(), NameProblem> {
    if name.is_empty() {
        Err(NameProblem::Empty)
    } else if name == b"." {
        Err(NameProblem::Dot)
    } else if name == b".." {
        Err(NameProblem::DotDot)
    } else if name.len() > MAX_NAME_LEN {
        Err(NameProblem::TooLong(name.len()))
    } else if name.contains(&b'/') {
        Err(NameProblem::Slash)
    } else if name.contains(&0) {
        Err(NameProblem::Nul)
    } else {
        Ok(())
    }
}

/// Why a symlink target is not allowed in a NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetProblem {
    /// `symlink("")` fails with `ENOENT` on Linux, so such a NAR could not be restored.
    Empty,
    /// A C string cannot carry it.
    Nul,
    TooLong(usize),
}

impl fmt::Display for TargetProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetProblem::Empty => f.write_str("the target is empty"),
            TargetProblem::Nul => f.write_str("the target contains a NUL byte"),
            TargetProblem::TooLong(n) => {
                write!(
                    f,
                    "the target is {n} bytes long, the limit is {MAX_TARGET_LEN}"
                )
            }
        }
    }
}

/// Checks a symlink target: not empty, no NUL, at most [`MAX_TARGET_LEN`] bytes (as recent
/// Nix does in `parse`; the target itself is otherwise arbitrary, `../..` and `/tmp` included,
/// because [`restore`] never follows symlinks it created).
pub fn check_target(target: &[u8]) -> Result<(), TargetProblem> {
    if target.is_empty() {
        Err(TargetProblem::Empty)
    } else if target.len() > MAX_TARGET_LEN {
        Err(TargetProblem::TooLong(target.len()))
    } else if target.contains(&0) {
        Err(TargetProblem::Nul)
    } else {
        Ok(())
    }
}

/// Renders a NAR path or name for messages: `/` for the root, UTF-8 as is (control
/// characters escaped), other bytes as `\xNN`.
pub fn show_path(path: &[u8]) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    show_bytes(path)
}

fn show_bytes(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.chars().flat_map(|c| c.escape_debug()).collect::<String>(),
        Err(_) => b.escape_ascii().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(check_name(b"a"), Ok(()));
        assert_eq!(check_name(b"...").map_err(|e| e.to_string()), Ok(()));
        assert_eq!(check_name(b"\xff\xfe"), Ok(()));
        assert_eq!(check_name(b""), Err(NameProblem::Empty));
        assert_eq!(check_name(b"."), Err(NameProblem::Dot));
        assert_eq!(check_name(b".."), Err(NameProblem::DotDot));
        assert_eq!(check_name(b"a/b"), Err(NameProblem::Slash));
        assert_eq!(check_name(b"a\0b"), Err(NameProblem::Nul));
        assert_eq!(check_name(&[b'x'; 255]), Ok(()));
        assert_eq!(check_name(&[b'x'; 256]), Err(NameProblem::TooLong(256)));
    }

    #[test]
    fn targets() {
        assert_eq!(check_target(b"../.."), Ok(()));
        assert_eq!(check_target(b""), Err(TargetProblem::Empty));
        assert_eq!(check_target(b"a\0"), Err(TargetProblem::Nul));
        assert_eq!(check_target(&[b'x'; 4095]), Ok(()));
        assert_eq!(
            check_target(&[b'x'; 4096]),
            Err(TargetProblem::TooLong(4096))
        );
    }

    #[test]
    fn showing_paths() {
        assert_eq!(show_path(b""), "/");
        assert_eq!(show_path(b"/bin/sh"), "/bin/sh");
        assert_eq!(show_path("/é".as_bytes()), "/é");
        assert_eq!(show_path(b"/a\nb"), "/a\\nb");
        assert_eq!(show_path(b"/\xff"), "/\\xff");
    }
}
