//! The NAR writer: an event-based encoder that cannot produce a NAR Nix would refuse.
//!
//! Follows the serialisation half of `src/libutil/archive.cc` (`dumpPath` / `NarWriter`):
//! each node is `( type … )`, a directory entry is `entry ( name N node … )`.

use super::{
    CHUNK, MAX_DEPTH, NAR_MAGIC, NameProblem, TargetProblem, check_name, check_target, show_path,
};
use crate::wire::padding;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use thiserror::Error;

/// Errors while writing a NAR, from [`NarEncoder`] or [`super::dump_path`].
#[derive(Debug, Error)]
pub enum NarWriteError {
    #[error("writing the NAR failed at byte offset {offset}: {source}")]
    Write {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("invalid name {name:?} for an entry of NAR directory {dir}: {problem}")]
    InvalidName {
        dir: String,
        name: String,
        problem: NameProblem,
    },
    #[error(
        "NAR entry {path} is not after the previous entry {prev:?} (entries must be unique and sorted byte-wise)"
    )]
    Unsorted { path: String, prev: String },
    #[error("NAR entry {path} is nested too deep: at most {MAX_DEPTH} levels (narMaxDepth)")]
    TooDeep { path: String },
    #[error("invalid symlink target for NAR entry {path}: {problem}")]
    BadTarget {
        path: String,
        problem: TargetProblem,
    },
    #[error("contents of NAR entry {path}: {expected} bytes announced, {got} given")]
    SizeMismatch {
        path: String,
        expected: u64,
        got: u64,
    },
    #[error("reading the contents of NAR entry {path} failed: {source}")]
    ContentsRead {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("NAR encoder used out of order at {path}: {call} called while {state}")]
    Misuse {
        path: String,
        call: &'static str,
        state: &'static str,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "file {path} has an unsupported type ({kind}); a NAR holds only regular files, directories and symlinks"
    )]
    UnsupportedType { path: PathBuf, kind: &'static str },
    #[error("file {path} changed while it was dumped: {expected} bytes announced, {got} read")]
    FileChanged {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The next call must start a node: the root, or the node of the entry just opened.
    ExpectNode,
    /// Inside the innermost open directory, between entries.
    InDirectory,
    /// Inside a regular file's contents, with this many bytes still to come.
    Contents { remaining: u64 },
    /// The root node is complete.
    Done,
}

impl State {
    fn describe(self) -> &'static str {
        match self {
            State::ExpectNode => "a node was expected",
            State::InDirectory => "between directory entries",
            State::Contents { .. } => "file contents were being written",
            State::Done => "the NAR was already complete",
        }
    }
}

struct DirFrame {
    /// Length of `NarEncoder::path` for this directory itself.
    path_len: usize,
    /// The previous entry's name, to enforce strictly increasing names.
    prev: Option<Vec<u8>>,
}

/// Writes a NAR one event at a time, without a tree on disk.
///
/// ```text
/// let mut e = NarEncoder::new(out)?;
/// e.begin_directory()?;
/// e.entry(b"bin")?; e.begin_directory()?;
///   e.entry(b"sh")?; e.regular_bytes(true, b"#!…")?;
/// e.end_directory()?;
/// e.end_directory()?;
/// let (out, nar_size) = e.finish()?;
/// ```
///
/// Calls out of order (a second root, an entry outside a directory, unsorted or invalid
/// names, too deep a tree, a file shorter than announced) are errors, never bad output;
/// after an error the output is incomplete and must be discarded.
pub struct NarEncoder<W: Write> {
    w: W,
    written: u64,
    state: State,
    dirs: Vec<DirFrame>,
    /// NAR path of the current node (empty for the root).
    path: Vec<u8>,
    /// Announced size of the current regular file.
    current_size: u64,
}

impl<W: Write> NarEncoder<W> {
    /// Starts a NAR on `w` by writing the magic.
    pub fn new(w: W) -> Result<Self, NarWriteError> {
        let mut e = NarEncoder {
            w,
            written: 0,
            state: State::ExpectNode,
            dirs: Vec::new(),
            path: Vec::new(),
            current_size: 0,
        };
        e.str(NAR_MAGIC.as_bytes())?;
        Ok(e)
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Whether the root node is complete.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn raw(&mut self, b: &[u8]) -> Result<(), NarWriteError> {
        self.w.write_all(b).map_err(|source| NarWriteError::Write {
            offset: self.written,
            source,
        })?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn u64(&mut self, v: u64) -> Result<(), NarWriteError> {
        self.raw(&v.to_le_bytes())
    }

    fn pad(&mut self, len: u64) -> Result<(), NarWriteError> {
        self.raw(&[0u8; 8][..padding(len)])
    }

    /// A wire string (`writeString` in `serialise.cc`).
    fn str(&mut self, s: &[u8]) -> Result<(), NarWriteError> {
        self.u64(s.len() as u64)?;
        self.raw(s)?;
        self.pad(s.len() as u64)
    }

    fn misuse(&self, call: &'static str) -> NarWriteError {
        NarWriteError::Misuse {
            path: show_path(&self.path),
            call,
            state: self.state.describe(),
        }
    }

    fn start_node(&mut self, call: &'static str, kind: &str) -> Result<(), NarWriteError> {
        if self.state != State::ExpectNode {
            return Err(self.misuse(call));
        }
        self.str(b"(")?;
        self.str(b"type")?;
        self.str(kind.as_bytes())
    }

    /// Closes the current node, and the entry around it if it is not the root.
    fn end_node(&mut self) -> Result<(), NarWriteError> {
        self.str(b")")?;
        match self.dirs.last() {
            Some(frame) => {
                let len = frame.path_len;
                self.str(b")")?;
                self.path.truncate(len);
                self.state = State::InDirectory;
            }
            None => self.state = State::Done,
        }
        Ok(())
    }

    /// Starts a regular file of exactly `size` bytes; send them with
    /// [`write_contents`](Self::write_contents), then call [`end_regular`](Self::end_regular).
    pub fn begin_regular(&mut self, executable: bool, size: u64) -> Result<(), NarWriteError> {
        self.start_node("begin_regular", "regular")?;
        if executable {
            self.str(b"executable")?;
            self.str(b"")?;
        }
        self.str(b"contents")?;
        self.u64(size)?;
        self.state = State::Contents { remaining: size };
        self.current_size = size;
        Ok(())
    }

    /// Writes the next piece of the current regular file.
    pub fn write_contents(&mut self, data: &[u8]) -> Result<(), NarWriteError> {
        let State::Contents { remaining } = self.state else {
            return Err(self.misuse("write_contents"));
        };
        let n = data.len() as u64;
        if n > remaining {
            return Err(self.size_mismatch(remaining, n));
        }
        self.raw(data)?;
        self.state = State::Contents {
            remaining: remaining - n,
        };
        Ok(())
    }

    fn size_mismatch(&self, remaining: u64, more: u64) -> NarWriteError {
        // Only called in the Contents state, where `current_size` is meaningful.
        let expected = self.current_size;
        NarWriteError::SizeMismatch {
            path: show_path(&self.path),
            expected,
            got: expected.saturating_sub(remaining).saturating_add(more),
        }
    }

    /// Ends the current regular file: all announced bytes must have been written.
    pub fn end_regular(&mut self) -> Result<(), NarWriteError> {
        let State::Contents { remaining } = self.state else {
            return Err(self.misuse("end_regular"));
        };
        if remaining != 0 {
            return Err(self.size_mismatch(remaining, 0));
        }
        self.pad(self.current_size)?;
        self.end_node()
    }

    /// A whole regular file read from `contents`, which must yield at least `size` bytes
    /// (only `size` are read). Streams through a fixed buffer.
    pub fn regular(
        &mut self,
        executable: bool,
        size: u64,
        mut contents: impl Read,
    ) -> Result<(), NarWriteError> {
        self.begin_regular(executable, size)?;
        let mut buf = vec![0u8; CHUNK];
        let mut left = size;
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
            let n = match contents.read(&mut buf[..want]) {
                Ok(0) => return Err(self.size_mismatch(left, 0)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(NarWriteError::ContentsRead {
                        path: show_path(&self.path),
                        source,
                    });
                }
            };
            self.write_contents(&buf[..n])?;
            left -= n as u64;
        }
        self.end_regular()
    }

    /// A whole regular file from memory (`dumpString` for the root).
    pub fn regular_bytes(&mut self, executable: bool, data: &[u8]) -> Result<(), NarWriteError> {
        self.begin_regular(executable, data.len() as u64)?;
        self.write_contents(data)?;
        self.end_regular()
    }

    /// A symlink with its raw target (never resolved).
    pub fn symlink(&mut self, target: &[u8]) -> Result<(), NarWriteError> {
        if self.state == State::ExpectNode {
            check_target(target).map_err(|problem| NarWriteError::BadTarget {
                path: show_path(&self.path),
                problem,
            })?;
        }
        self.start_node("symlink", "symlink")?;
        self.str(b"target")?;
        self.str(target)?;
        self.end_node()
    }

    /// Starts a directory; add entries with [`entry`](Self::entry) and close it with
    /// [`end_directory`](Self::end_directory).
    pub fn begin_directory(&mut self) -> Result<(), NarWriteError> {
        self.start_node("begin_directory", "directory")?;
        self.dirs.push(DirFrame {
            path_len: self.path.len(),
            prev: None,
        });
        self.state = State::InDirectory;
        Ok(())
    }

    /// Opens an entry of the current directory; the next call writes its node. Names must
    /// be valid ([`super::check_name`]) and strictly increasing byte-wise, as Nix sorts them
    /// (`std::map<std::string, …>`) and its parser requires.
    pub fn entry(&mut self, name: &[u8]) -> Result<(), NarWriteError> {
        if self.state != State::InDirectory {
            return Err(self.misuse("entry"));
        }
        let depth = self.dirs.len();
        let Some(frame) = self.dirs.last_mut() else {
            return Err(self.misuse("entry"));
        };
        if let Err(problem) = check_name(name) {
            return Err(NarWriteError::InvalidName {
                dir: show_path(&self.path),
                name: super::show_bytes(name),
                problem,
            });
        }
        let mut child = self.path.clone();
        child.push(b'/');
        child.extend_from_slice(name);
        if let Some(prev) = &frame.prev
            && name <= prev.as_slice()
        {
            return Err(NarWriteError::Unsorted {
                path: show_path(&child),
                prev: super::show_bytes(prev),
            });
        }
        // The child node is at depth `depth` (the root is at 0).
        if depth >= MAX_DEPTH {
            return Err(NarWriteError::TooDeep {
                path: show_path(&child),
            });
        }
        frame.prev = Some(name.to_vec());
        self.path = child;
        self.str(b"entry")?;
        self.str(b"(")?;
        self.str(b"name")?;
        self.str(name)?;
        self.str(b"node")?;
        self.state = State::ExpectNode;
        Ok(())
    }

    /// Closes the current directory.
    pub fn end_directory(&mut self) -> Result<(), NarWriteError> {
        if self.state != State::InDirectory {
            return Err(self.misuse("end_directory"));
        }
        self.dirs.pop();
        self.end_node()
    }

    /// Flushes and returns the writer and the NAR size; the root node must be complete.
    pub fn finish(mut self) -> Result<(W, u64), NarWriteError> {
        if self.state != State::Done {
            return Err(self.misuse("finish"));
        }
        self.w.flush().map_err(|source| NarWriteError::Write {
            offset: self.written,
            source,
        })?;
        Ok((self.w, self.written))
    }
}

/// A writer that copies everything to two writers, e.g. a file and a
/// [`crate::hash::Sha256Sink`] to hash a NAR while it streams.
pub struct TeeWriter<A, B> {
    pub a: A,
    pub b: B,
}

impl<A: Write, B: Write> TeeWriter<A, B> {
    pub fn new(a: A, b: B) -> Self {
        TeeWriter { a, b }
    }
    pub fn into_inner(self) -> (A, B) {
        (self.a, self.b)
    }
}

impl<A: Write, B: Write> Write for TeeWriter<A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Write the whole buffer to both, so they never disagree on what was written.
        self.a.write_all(buf)?;
        self.b.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.a.flush()?;
        self.b.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: &[u8]) -> Vec<u8> {
        let mut v = (b.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(b);
        v.resize(v.len() + padding(b.len() as u64), 0);
        v
    }

    fn toks(t: &[&[u8]]) -> Vec<u8> {
        t.iter().flat_map(|x| s(x)).collect()
    }

    #[test]
    fn single_file_matches_dump_string() {
        let mut e = NarEncoder::new(Vec::new()).expect("new");
        e.regular_bytes(false, b"hello").expect("file");
        let (out, n) = e.finish().expect("finish");
        let want = toks(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"hello",
            b")",
        ]);
        assert_eq!(out, want);
        assert_eq!(n, want.len() as u64);
    }

    #[test]
    fn directory_with_entries() {
        let mut e = NarEncoder::new(Vec::new()).expect("new");
        e.begin_directory().expect("dir");
        e.entry(b"a").expect("a");
        e.symlink(b"../..").expect("link");
        e.entry(b"b").expect("b");
        e.regular_bytes(true, b"").expect("file");
        e.end_directory().expect("end");
        let (out, _) = e.finish().expect("finish");
        let want = toks(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"a",
            b"node",
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"../..",
            b")",
            b")",
            b"entry",
            b"(",
            b"name",
            b"b",
            b"node",
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"contents",
            b"",
            b")",
            b")",
            b")",
        ]);
        assert_eq!(out, want);
    }

    #[test]
    fn refuses_bad_sequences() {
        let mut e = NarEncoder::new(Vec::new()).expect("new");
        assert!(matches!(e.entry(b"x"), Err(NarWriteError::Misuse { .. })));
        assert!(matches!(
            e.end_directory(),
            Err(NarWriteError::Misuse { .. })
        ));
        e.begin_directory().expect("dir");
        assert!(matches!(
            e.regular_bytes(false, b""),
            Err(NarWriteError::Misuse { .. })
        ));
        let err = e.entry(b"..").expect_err("must fail");
        assert!(err.to_string().contains("'..'"), "{err}");
        e.entry(b"b").expect("b");
        e.regular_bytes(false, b"").expect("b node");
        let err = e.entry(b"a").expect_err("must fail");
        assert!(
            matches!(err, NarWriteError::Unsorted { ref path, .. } if path == "/a"),
            "{err}"
        );
        let err = e.entry(b"b").expect_err("must fail");
        assert!(matches!(err, NarWriteError::Unsorted { .. }), "{err}");
        e.entry(b"c").expect("c");
        e.begin_regular(false, 3).expect("c node");
        let err = e.write_contents(b"abcd").expect_err("must fail");
        assert!(
            matches!(err, NarWriteError::SizeMismatch { expected: 3, got: 4, ref path } if path == "/c"),
            "{err}"
        );
        e.write_contents(b"ab").expect("ab");
        let err = e.end_regular().expect_err("must fail");
        assert!(
            matches!(
                err,
                NarWriteError::SizeMismatch {
                    expected: 3,
                    got: 2,
                    ..
                }
            ),
            "{err}"
        );
        e.write_contents(b"c").expect("c");
        e.end_regular().expect("end c");
        e.end_directory().expect("end");
        assert!(matches!(e.symlink(b"x"), Err(NarWriteError::Misuse { .. })));
        e.finish().expect("finish");
    }

    #[test]
    fn refuses_too_deep_and_bad_targets() {
        let mut e = NarEncoder::new(Vec::new()).expect("new");
        e.begin_directory().expect("root");
        for _ in 0..MAX_DEPTH - 1 {
            e.entry(b"d").expect("entry");
            e.begin_directory().expect("dir");
        }
        let err = e.entry(b"d").expect_err("must fail");
        assert!(matches!(err, NarWriteError::TooDeep { .. }), "{err}");
        assert!(err.to_string().contains(&"/d".repeat(MAX_DEPTH)), "{err}");

        let mut e = NarEncoder::new(Vec::new()).expect("new");
        let err = e.symlink(b"").expect_err("must fail");
        assert!(matches!(err, NarWriteError::BadTarget { .. }), "{err}");
        let err = e.symlink(&[b'x'; 4096]).expect_err("must fail");
        assert!(err.to_string().contains("4096"), "{err}");
    }

    #[test]
    fn unfinished_is_an_error() {
        let mut e = NarEncoder::new(Vec::new()).expect("new");
        e.begin_directory().expect("dir");
        assert!(matches!(e.finish(), Err(NarWriteError::Misuse { .. })));
    }

    #[test]
    fn short_reader_is_an_error() {
        let mut e = NarEncoder::new(Vec::new()).expect("new");
        let err = e.regular(false, 10, &b"abc"[..]).expect_err("must fail");
        assert!(
            matches!(
                err,
                NarWriteError::SizeMismatch {
                    expected: 10,
                    got: 3,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn tee_hashes() {
        let mut e = NarEncoder::new(TeeWriter::new(Vec::new(), crate::hash::Sha256Sink::new()))
            .expect("new");
        e.regular_bytes(false, b"x").expect("file");
        let (tee, n) = e.finish().expect("finish");
        let (bytes, sink) = tee.into_inner();
        assert_eq!(sink.len(), n);
        assert_eq!(sink.finish(), crate::hash::Hash::sha256_of(&bytes));
    }
}
