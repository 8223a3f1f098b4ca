//! The NAR parser: strict, streaming, bounded.
//!
//! Follows `parseDump` / `parse` in `src/libutil/archive.cc`, with the bounds of recent Nix
//! (`narMaxDepth`, `narMaxName`, `narMaxTarget`, `narMaxTag`). Keywords, names and targets
//! are read with a length bound; regular-file contents are handed to the visitor as a
//! reader and never buffered whole. Every error names the byte offset where the offending
//! token starts (or where input ran out) and the NAR path of the node concerned.

use super::{
    CHUNK, MAX_DEPTH, MAX_NAME_LEN, MAX_TAG_LEN, MAX_TARGET_LEN, NAR_MAGIC, NameProblem,
    TargetProblem, check_name, check_target, show_bytes, show_path,
};
use crate::wire::{WireError, WireReader};
use std::io::{self, Read};
use thiserror::Error;

/// Errors while reading a NAR.
#[derive(Debug, Error)]
pub enum NarReadError {
    #[error("not a NAR: no \"nix-archive-1\" magic at byte offset {offset}")]
    BadMagic { offset: u64 },
    #[error("NAR truncated at byte offset {offset} (in {path}): {wanted} more bytes expected")]
    Truncated {
        offset: u64,
        path: String,
        wanted: u64,
    },
    #[error("reading the NAR failed at byte offset {offset} (in {path}): {source}")]
    Io {
        offset: u64,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("bad NAR at byte offset {offset} (in {path}): expected {expected}, got {got:?}")]
    UnexpectedTag {
        offset: u64,
        path: String,
        expected: &'static str,
        got: String,
    },
    #[error(
        "bad NAR at byte offset {offset}: node {path} has unknown type {got:?} (expected \"regular\", \"directory\" or \"symlink\")"
    )]
    UnknownType {
        offset: u64,
        path: String,
        got: String,
    },
    #[error(
        "bad NAR at byte offset {offset} (in {path}): {what} is {len} bytes long, the limit is {limit}"
    )]
    TooLong {
        offset: u64,
        path: String,
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("bad NAR at byte offset {offset} (in {path}): non-zero padding byte")]
    BadPadding { offset: u64, path: String },
    #[error(
        "bad NAR at byte offset {offset}: invalid entry name {name:?} in directory {dir}: {problem}"
    )]
    InvalidName {
        offset: u64,
        dir: String,
        name: String,
        problem: NameProblem,
    },
    #[error("bad NAR at byte offset {offset}: entry {path} appears twice in its directory")]
    DuplicateName { offset: u64, path: String },
    #[error(
        "bad NAR at byte offset {offset}: entry {path} is not sorted, it follows {prev:?} (names must increase byte-wise)"
    )]
    Unsorted {
        offset: u64,
        path: String,
        prev: String,
    },
    #[error(
        "bad NAR at byte offset {offset}: entry {path} is nested deeper than {MAX_DEPTH} levels (narMaxDepth)"
    )]
    TooDeep { offset: u64, path: String },
    #[error("bad NAR at byte offset {offset}: invalid symlink target for {path}: {problem}")]
    BadTarget {
        offset: u64,
        path: String,
        problem: TargetProblem,
    },
    #[error(
        "bad NAR at byte offset {offset}: the executable marker of {path} has a non-empty value"
    )]
    NonEmptyExecutable { offset: u64, path: String },
    #[error("bad NAR: trailing data at byte offset {offset}, after the end of the root node")]
    TrailingData { offset: u64 },
    #[error("at byte offset {offset} of the NAR, handling entry {path} failed: {source}")]
    Visitor {
        offset: u64,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl NarReadError {
    /// The byte offset the error refers to.
    pub fn offset(&self) -> u64 {
        match self {
            NarReadError::BadMagic { offset }
            | NarReadError::Truncated { offset, .. }
            | NarReadError::Io { offset, .. }
            | NarReadError::UnexpectedTag { offset, .. }
            | NarReadError::UnknownType { offset, .. }
            | NarReadError::TooLong { offset, .. }
            | NarReadError::BadPadding { offset, .. }
            | NarReadError::InvalidName { offset, .. }
            | NarReadError::DuplicateName { offset, .. }
            | NarReadError::Unsorted { offset, .. }
            | NarReadError::TooDeep { offset, .. }
            | NarReadError::BadTarget { offset, .. }
            | NarReadError::NonEmptyExecutable { offset, .. }
            | NarReadError::TrailingData { offset }
            | NarReadError::Visitor { offset, .. } => *offset,
        }
    }
}

/// Receives the nodes of a NAR in order, depth first, entries of a directory in NAR order.
///
/// `path` is the NAR path of the node: empty for the root, `/a/b` below it. Every name in
/// it has passed [`super::check_name`], and every directory on it was announced by
/// [`directory`](Self::directory) before. An error returned here stops the parse and comes
/// back as [`NarReadError::Visitor`].
pub trait NarVisitor {
    /// A directory starts; its entries follow, then [`end_directory`](Self::end_directory).
    fn directory(&mut self, path: &[u8]) -> io::Result<()>;

    /// The directory `path` had all its entries.
    fn end_directory(&mut self, _path: &[u8]) -> io::Result<()> {
        Ok(())
    }

    /// A regular file. `contents` yields exactly [`NarContents::size`] bytes; whatever the
    /// visitor leaves unread is skipped.
    fn regular(
        &mut self,
        path: &[u8],
        executable: bool,
        contents: &mut NarContents<'_>,
    ) -> io::Result<()>;

    /// A symlink with its raw target (checked by [`super::check_target`]).
    fn symlink(&mut self, path: &[u8], target: &[u8]) -> io::Result<()>;
}

/// A visitor that does nothing: parsing with it validates a NAR (what [`validate`] does;
/// with [`parse_from`], a NAR inside a longer stream).
pub struct Null;

impl NarVisitor for Null {
    fn directory(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn regular(&mut self, _: &[u8], _: bool, _: &mut NarContents<'_>) -> io::Result<()> {
        Ok(())
    }
    fn symlink(&mut self, _: &[u8], _: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

/// Object-safe view of the wire reader, so [`NarContents`] needs no type parameter.
trait Source {
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), WireError>;
}

impl<R: Read> Source for WireReader<R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), WireError> {
        WireReader::read_exact(self, buf)
    }
}

/// The contents of a regular file, read straight from the NAR stream.
pub struct NarContents<'a> {
    src: &'a mut dyn Source,
    size: u64,
    remaining: u64,
    /// A failure of the underlying stream; it takes precedence over whatever error the
    /// visitor turns it into, so the caller sees the offset.
    failed: Option<WireError>,
}

impl NarContents<'_> {
    /// Size of the file.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }
}

impl Read for NarContents<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = &self.failed {
            return Err(io::Error::other(format!(
                "the NAR stream failed earlier: {e}"
            )));
        }
        let n = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let Some(dst) = buf.get_mut(..n) else {
            return Ok(0);
        };
        match self.src.read_exact(dst) {
            Ok(()) => {
                self.remaining -= n as u64;
                Ok(n)
            }
            Err(e) => {
                let kind = match e {
                    WireError::Eof { .. } => io::ErrorKind::UnexpectedEof,
                    _ => io::ErrorKind::Other,
                };
                let err = io::Error::new(kind, e.to_string());
                self.failed = Some(e);
                Err(err)
            }
        }
    }
}

struct Parser<'a, R, V> {
    r: &'a mut WireReader<R>,
    v: &'a mut V,
    /// NAR path of the current node.
    path: Vec<u8>,
}

impl<R: Read, V: NarVisitor> Parser<'_, R, V> {
    fn wire(&self, e: WireError, what: &'static str) -> NarReadError {
        let path = show_path(&self.path);
        match e {
            WireError::Eof { offset, wanted } => NarReadError::Truncated {
                offset,
                path,
                wanted,
            },
            WireError::Io { offset, source } => NarReadError::Io {
                offset,
                path,
                source,
            },
            WireError::TooLong { offset, len, limit } => NarReadError::TooLong {
                offset,
                path,
                what,
                len,
                limit,
            },
            WireError::BadPadding { offset } => NarReadError::BadPadding { offset, path },
            // The calls below never produce the other variants; keep their message anyway.
            other => NarReadError::Io {
                offset: self.r.offset(),
                path,
                source: io::Error::other(other.to_string()),
            },
        }
    }

    /// A length-bounded string.
    fn token(&mut self, limit: usize, what: &'static str) -> Result<Vec<u8>, NarReadError> {
        self.r
            .read_bytes(limit as u64)
            .map_err(|e| self.wire(e, what))
    }

    fn tag(&mut self) -> Result<Vec<u8>, NarReadError> {
        self.token(MAX_TAG_LEN as usize, "keyword")
    }

    fn expect(&mut self, want: &'static str, shown: &'static str) -> Result<(), NarReadError> {
        let at = self.r.offset();
        let got = self.tag()?;
        if got != want.as_bytes() {
            return Err(NarReadError::UnexpectedTag {
                offset: at,
                path: show_path(&self.path),
                expected: shown,
                got: show_bytes(&got),
            });
        }
        Ok(())
    }

    fn visitor(&self, at: u64, source: io::Error) -> NarReadError {
        NarReadError::Visitor {
            offset: at,
            path: show_path(&self.path),
            source,
        }
    }

    fn magic(&mut self) -> Result<(), NarReadError> {
        let at = self.r.offset();
        match self.r.read_bytes(NAR_MAGIC.len() as u64) {
            Ok(m) if m == NAR_MAGIC.as_bytes() => Ok(()),
            Ok(_) | Err(WireError::TooLong { .. }) | Err(WireError::BadPadding { .. }) => {
                Err(NarReadError::BadMagic { offset: at })
            }
            Err(e) => Err(self.wire(e, "magic")),
        }
    }

    /// One node at `depth` (the root is at 0; callers keep `depth < MAX_DEPTH`).
    fn node(&mut self, depth: usize) -> Result<(), NarReadError> {
        self.expect("(", "\"(\"")?;
        self.expect("type", "\"type\"")?;
        let at = self.r.offset();
        let ty = self.tag()?;
        match ty.as_slice() {
            b"regular" => self.regular()?,
            b"symlink" => self.symlink()?,
            b"directory" => return self.directory(at, depth),
            _ => {
                return Err(NarReadError::UnknownType {
                    offset: at,
                    path: show_path(&self.path),
                    got: show_bytes(&ty),
                });
            }
        }
        self.expect(")", "\")\"")
    }

    fn regular(&mut self) -> Result<(), NarReadError> {
        let mut at = self.r.offset();
        let mut tag = self.tag()?;
        let mut executable = false;
        if tag == b"executable" {
            let marker = self.r.offset();
            if !self.tag()?.is_empty() {
                return Err(NarReadError::NonEmptyExecutable {
                    offset: marker,
                    path: show_path(&self.path),
                });
            }
            executable = true;
            at = self.r.offset();
            tag = self.tag()?;
        }
        if tag != b"contents" {
            return Err(NarReadError::UnexpectedTag {
                offset: at,
                path: show_path(&self.path),
                expected: if executable {
                    "\"contents\""
                } else {
                    "\"executable\" or \"contents\""
                },
                got: show_bytes(&tag),
            });
        }
        let size = self.r.read_u64().map_err(|e| self.wire(e, "file size"))?;
        let start = self.r.offset();
        let mut contents = NarContents {
            src: &mut *self.r,
            size,
            remaining: size,
            failed: None,
        };
        let result = self.v.regular(&self.path, executable, &mut contents);
        let failed = contents.failed.take();
        let remaining = contents.remaining;
        if let Some(e) = failed {
            return Err(self.wire(e, "file contents"));
        }
        if let Err(e) = result {
            return Err(self.visitor(start, e));
        }
        self.skip(remaining)?;
        self.r
            .read_padding(size)
            .map_err(|e| self.wire(e, "file contents"))
    }

    /// Skips contents the visitor did not read.
    fn skip(&mut self, mut left: u64) -> Result<(), NarReadError> {
        let mut buf = vec![0u8; CHUNK.min(usize::try_from(left).unwrap_or(CHUNK))];
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(CHUNK).min(buf.len());
            let Some(dst) = buf.get_mut(..n) else { break };
            self.r
                .read_exact(dst)
                .map_err(|e| self.wire(e, "file contents"))?;
            left -= n as u64;
        }
        Ok(())
    }

    fn symlink(&mut self) -> Result<(), NarReadError> {
        self.expect("target", "\"target\"")?;
        let at = self.r.offset();
        let target = self.token(MAX_TARGET_LEN, "symlink target")?;
        check_target(&target).map_err(|problem| NarReadError::BadTarget {
            offset: at,
            path: show_path(&self.path),
            problem,
        })?;
        self.v
            .symlink(&self.path, &target)
            .map_err(|e| self.visitor(at, e))
    }

    fn directory(&mut self, at: u64, depth: usize) -> Result<(), NarReadError> {
        self.v
            .directory(&self.path)
            .map_err(|e| self.visitor(at, e))?;
        let dir_len = self.path.len();
        let mut prev: Option<Vec<u8>> = None;
        loop {
            let at = self.r.offset();
            let tag = self.tag()?;
            if tag == b")" {
                break;
            }
            if tag != b"entry" {
                return Err(NarReadError::UnexpectedTag {
                    offset: at,
                    path: show_path(&self.path),
                    expected: "\"entry\" or \")\"",
                    got: show_bytes(&tag),
                });
            }
            self.expect("(", "\"(\"")?;
            self.expect("name", "\"name\"")?;
            let at = self.r.offset();
            let name = self.token(MAX_NAME_LEN, "entry name")?;
            check_name(&name).map_err(|problem| NarReadError::InvalidName {
                offset: at,
                dir: show_path(&self.path),
                name: show_bytes(&name),
                problem,
            })?;
            self.path.push(b'/');
            self.path.extend_from_slice(&name);
            // Nix requires `name > prevName` (`parse` in archive.cc): this rejects both
            // duplicates and unsorted entries, and is what makes every name unique in its
            // directory.
            if let Some(p) = &prev {
                if name == *p {
                    return Err(NarReadError::DuplicateName {
                        offset: at,
                        path: show_path(&self.path),
                    });
                }
                if name < *p {
                    return Err(NarReadError::Unsorted {
                        offset: at,
                        path: show_path(&self.path),
                        prev: show_bytes(p),
                    });
                }
            }
            if depth + 1 >= MAX_DEPTH {
                return Err(NarReadError::TooDeep {
                    offset: at,
                    path: show_path(&self.path),
                });
            }
            self.expect("node", "\"node\"")?;
            self.node(depth + 1)?;
            self.path.truncate(dir_len);
            self.expect(")", "\")\"")?;
            prev = Some(name);
        }
        let at = self.r.offset();
        self.v
            .end_directory(&self.path)
            .map_err(|e| self.visitor(at, e))
    }
}

/// Reads one NAR from a wire stream and leaves the reader just after it, for NARs embedded
/// in a protocol stream. Offsets in errors count from the start of `r`. Returns the NAR size.
pub fn parse_from<R: Read, V: NarVisitor>(
    r: &mut WireReader<R>,
    visitor: &mut V,
) -> Result<u64, NarReadError> {
    let start = r.offset();
    let mut p = Parser {
        r,
        v: visitor,
        path: Vec::new(),
    };
    p.magic()?;
    p.node(0)?;
    Ok(p.r.offset() - start)
}

/// Parses `reader`, which must hold exactly one NAR (trailing bytes are an error), feeding
/// `visitor`. Returns the NAR size.
pub fn parse<R: Read, V: NarVisitor>(reader: R, visitor: &mut V) -> Result<u64, NarReadError> {
    let mut r = WireReader::new(reader);
    let size = parse_from(&mut r, visitor)?;
    let mut b = [0u8; 1];
    loop {
        match r.get_mut().read(&mut b) {
            Ok(0) => return Ok(size),
            Ok(_) => return Err(NarReadError::TrailingData { offset: r.offset() }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(NarReadError::Io {
                    offset: r.offset(),
                    path: "/".to_owned(),
                    source,
                });
            }
        }
    }
}

/// Checks that `reader` holds exactly one valid NAR; returns its size.
pub fn validate<R: Read>(reader: R) -> Result<u64, NarReadError> {
    parse(reader, &mut Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nar::NarEncoder;

    #[derive(Default)]
    struct Log(Vec<String>);

    impl NarVisitor for Log {
        fn directory(&mut self, path: &[u8]) -> io::Result<()> {
            self.0.push(format!("dir {}", show_path(path)));
            Ok(())
        }
        fn end_directory(&mut self, path: &[u8]) -> io::Result<()> {
            self.0.push(format!("end {}", show_path(path)));
            Ok(())
        }
        fn regular(
            &mut self,
            path: &[u8],
            executable: bool,
            contents: &mut NarContents<'_>,
        ) -> io::Result<()> {
            // Read only part of it: the parser must skip the rest.
            let mut first = [0u8; 2];
            let n = contents.read(&mut first)?;
            self.0.push(format!(
                "file {} x={executable} size={} starts={:?}",
                show_path(path),
                contents.size(),
                String::from_utf8_lossy(&first[..n])
            ));
            Ok(())
        }
        fn symlink(&mut self, path: &[u8], target: &[u8]) -> io::Result<()> {
            self.0.push(format!(
                "link {} -> {}",
                show_path(path),
                show_bytes(target)
            ));
            Ok(())
        }
    }

    fn sample() -> Vec<u8> {
        let mut e = NarEncoder::new(Vec::new()).expect("new");
        e.begin_directory().expect("root");
        e.entry(b"bin").expect("bin");
        e.begin_directory().expect("bin dir");
        e.entry(b"sh").expect("sh");
        e.regular_bytes(true, b"#!/bin/sh\n").expect("sh file");
        e.end_directory().expect("end bin");
        e.entry(b"lib").expect("lib");
        e.symlink(b"../..").expect("link");
        e.end_directory().expect("end root");
        e.finish().expect("finish").0
    }

    #[test]
    fn visits_in_order() {
        let nar = sample();
        let mut log = Log::default();
        let n = parse(&nar[..], &mut log).expect("parse");
        assert_eq!(n, nar.len() as u64);
        assert_eq!(
            log.0,
            [
                "dir /",
                "dir /bin",
                "file /bin/sh x=true size=10 starts=\"#!\"",
                "end /bin",
                "link /lib -> ../..",
                "end /",
            ]
        );
    }

    #[test]
    fn embedded_nar_leaves_the_rest() {
        let mut bytes = sample();
        let len = bytes.len() as u64;
        bytes.extend_from_slice(b"NEXT");
        let mut r = WireReader::new(&bytes[..]);
        assert_eq!(parse_from(&mut r, &mut Null).expect("parse"), len);
        assert_eq!(r.offset(), len);
        let mut rest = [0u8; 4];
        r.read_exact(&mut rest).expect("rest");
        assert_eq!(&rest, b"NEXT");
        let e = validate(&bytes[..]).expect_err("must fail");
        assert!(
            matches!(e, NarReadError::TrailingData { offset } if offset == len),
            "{e}"
        );
    }

    #[test]
    fn visitor_error_names_entry_and_offset() {
        struct Fail;
        impl NarVisitor for Fail {
            fn directory(&mut self, _: &[u8]) -> io::Result<()> {
                Ok(())
            }
            fn regular(&mut self, _: &[u8], _: bool, _: &mut NarContents<'_>) -> io::Result<()> {
                Err(io::Error::other("disk full"))
            }
            fn symlink(&mut self, _: &[u8], _: &[u8]) -> io::Result<()> {
                Ok(())
            }
        }
        let e = parse(&sample()[..], &mut Fail).expect_err("must fail");
        let msg = e.to_string();
        assert!(matches!(e, NarReadError::Visitor { .. }), "{msg}");
        assert!(
            msg.contains("/bin/sh") && msg.contains("disk full") && msg.contains("offset"),
            "{msg}"
        );
    }

    #[test]
    fn truncated_contents_report_the_stream_error() {
        let nar = sample();
        // Cut inside "#!/bin/sh\n".
        let cut = nar.windows(4).position(|w| w == b"#!/b").expect("contents") + 4;
        let mut log = Log::default();
        let e = parse(&nar[..cut + 2], &mut log).expect_err("must fail");
        assert!(
            matches!(e, NarReadError::Truncated { ref path, .. } if path == "/bin/sh"),
            "{e}"
        );
    }
}
