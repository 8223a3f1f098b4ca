//! The push NAR checker: a sans-IO state machine that is handed a NAR in slices of any size
//! and checks the grammar of the pull parser in `parse.rs`, with the same bounds and the same
//! errors.
//!
//! Why a second implementation of the grammar: a NAR inside a protocol stream has no length in
//! front (`DumpStorePath` in the serve protocol, docs/hook-protocol.md §4), so only the grammar
//! finds its end, and the code reading that stream is async. The pull parser wants a blocking
//! `Read`, and bridging it to a tokio task took a thread and two channels per NAR. The checker
//! takes whatever bytes the caller has and says how many of them belong to the NAR; the bytes
//! after its end stay with the caller. It owns no I/O and never blocks.
//!
//! It follows `parseDump` / `parse` in `src/libutil/archive.cc`
//! (<https://github.com/NixOS/nix/blob/2.8.0/src/libutil/archive.cc>), with the bounds of
//! recent Nix (`narMaxDepth`, `narMaxName`, `narMaxTarget`, `narMaxTag`), exactly as
//! [`super::parse_from`] does, token for token: every NAR gets the same verdict, end offset and
//! error (variant, offset, NAR path, message) from both, whatever the slicing. The
//! `nar_check` fuzz target and `tests/nar.rs` hold the two to that.
//!
//! Memory is bounded whatever the input: one token of at most [`MAX_TARGET_LEN`] bytes, the
//! NAR path of the current node and the last entry name of each open directory (at most
//! [`MAX_DEPTH`] of them). File contents are counted, never kept.

use super::{
    CHUNK, MAX_DEPTH, MAX_NAME_LEN, MAX_TAG_LEN, MAX_TARGET_LEN, NAR_MAGIC, NarReadError,
    check_name, check_target, show_bytes, show_path,
};
use crate::wire::padding;
use std::io;

/// Checks one NAR pushed to it in slices: [`feed`](Self::feed) each slice as it arrives,
/// then [`finish`](Self::finish) when the input ends (or stop as soon as
/// [`is_done`](Self::is_done)).
///
/// Offsets in errors count from the first byte fed.
pub struct NarChecker {
    /// Bytes of the NAR consumed so far.
    offset: u64,
    /// The piece of the wire format being read.
    stage: Stage,
    /// What the string token being read is, in the grammar; `Size` while reading a file's
    /// contents and their padding.
    expect: Expect,
    /// Where the current string token starts (most errors name it).
    token_at: u64,
    /// Where the current stage starts (padding errors name it).
    stage_at: u64,
    /// An 8-byte word being read (a length, a file size, padding) and how much of it is in.
    word: [u8; 8],
    have: usize,
    /// The body of the current string token (at most `MAX_TARGET_LEN` bytes).
    token: Vec<u8>,
    /// NAR path of the current node.
    path: Vec<u8>,
    /// The open directories, outermost first.
    dirs: Vec<Dir>,
    state: State,
}

enum State {
    Running,
    Done,
    /// The error, returned again by every later call.
    Failed(NarReadError),
}

/// An open directory.
struct Dir {
    /// Length of its NAR path in `NarChecker::path`.
    path_len: usize,
    /// The name of its last entry (empty before the first: no entry name is empty).
    prev: Vec<u8>,
}

/// The pieces of the wire format, each read whole before it is looked at, as the pull parser's
/// `WireReader` reads them (`read_u64`, `read_bytes`, `read_padding`): so the checker never
/// rejects a token on a part of it, and fails where the pull parser fails.
#[derive(Clone, Copy)]
enum Stage {
    /// The length of a string token.
    Len,
    /// Its `len` bytes, into `token`.
    Body { len: usize },
    /// The padding after its body.
    BodyPad { len: usize },
    /// A file size.
    Size,
    /// File contents: `left` of `size` bytes still to come.
    Contents { size: u64, left: u64 },
    /// The padding after contents of `size` bytes.
    ContentsPad { size: u64 },
}

/// Where the grammar is: what the next string token must be (or, for `Size`, the file size
/// and contents that follow "contents").
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Magic,
    /// `(` opening a node.
    Open,
    /// `type`.
    Type,
    /// `regular`, `symlink` or `directory`.
    TypeName,
    /// `executable` or `contents`.
    RegularTag,
    /// The empty value after `executable`.
    ExecMarker,
    /// `contents` after the executable marker.
    Contents,
    /// The file size and contents (not a string token).
    Size,
    /// `target`.
    TargetTag,
    /// The symlink target.
    Target,
    /// `)` closing a regular file or symlink node.
    Close,
    /// `entry` or the `)` closing a directory node.
    DirTag,
    /// `(` opening an entry.
    EntryOpen,
    /// `name`.
    NameTag,
    /// The entry name.
    Name,
    /// `node`.
    NodeTag,
    /// `)` closing an entry.
    EntryClose,
}

impl Expect {
    /// For a token that can only be one keyword: the keyword, how errors show it, and what
    /// follows it.
    fn fixed(self) -> Option<(&'static str, &'static str, Expect)> {
        Some(match self {
            Expect::Open => ("(", "\"(\"", Expect::Type),
            Expect::Type => ("type", "\"type\"", Expect::TypeName),
            Expect::TargetTag => ("target", "\"target\"", Expect::Target),
            Expect::EntryOpen => ("(", "\"(\"", Expect::NameTag),
            Expect::NameTag => ("name", "\"name\"", Expect::Name),
            Expect::NodeTag => ("node", "\"node\"", Expect::Open),
            Expect::EntryClose => (")", "\")\"", Expect::DirTag),
            _ => return None,
        })
    }

    /// The length bound of the token and what it is called in `TooLong` errors.
    fn limit(self) -> (usize, &'static str) {
        match self {
            Expect::Magic => (NAR_MAGIC.len(), "magic"),
            Expect::Target => (MAX_TARGET_LEN, "symlink target"),
            Expect::Name => (MAX_NAME_LEN, "entry name"),
            _ => (MAX_TAG_LEN as usize, "keyword"),
        }
    }
}

impl Default for NarChecker {
    fn default() -> Self {
        Self::new()
    }
}

impl NarChecker {
    pub fn new() -> Self {
        NarChecker {
            offset: 0,
            stage: Stage::Len,
            expect: Expect::Magic,
            token_at: 0,
            stage_at: 0,
            word: [0; 8],
            have: 0,
            token: Vec::new(),
            path: Vec::new(),
            dirs: Vec::new(),
            state: State::Running,
        }
    }

    /// Bytes of the NAR consumed so far; once [`is_done`](Self::is_done), the NAR's size.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether the root node is complete: the NAR ended at [`offset`](Self::offset).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Checks the next bytes of the NAR and returns how many of them belong to it: all of
    /// `input`, or fewer when the NAR ends inside it (then [`is_done`](Self::is_done), and the
    /// rest of `input` is whatever follows the NAR). Once done, it takes no more bytes.
    /// After an error, every call returns that error again.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, NarReadError> {
        match &self.state {
            State::Running => {}
            State::Done => return Ok(0),
            State::Failed(e) => return Err(again(e)),
        }
        match self.run(input) {
            Ok(used) => Ok(used),
            Err(e) => {
                let out = again(&e);
                self.state = State::Failed(e);
                Err(out)
            }
        }
    }

    /// The input ended: the NAR's size if it is complete, otherwise the error the pull parser
    /// reports at the same end of input ([`NarReadError::Truncated`] where it ran out).
    pub fn finish(&self) -> Result<u64, NarReadError> {
        match &self.state {
            State::Done => Ok(self.offset),
            State::Failed(e) => Err(again(e)),
            State::Running => Err(NarReadError::Truncated {
                offset: self.offset,
                path: show_path(&self.path),
                wanted: self.wanted(),
            }),
        }
    }

    fn run(&mut self, input: &[u8]) -> Result<usize, NarReadError> {
        let mut used = 0;
        while matches!(self.state, State::Running) {
            let need = self.need();
            if need > 0 {
                let rest = input.get(used..).unwrap_or(&[]);
                if rest.is_empty() {
                    break;
                }
                let n = rest.len().min(usize::try_from(need).unwrap_or(usize::MAX));
                self.absorb(rest.get(..n).unwrap_or(&[]));
                used += n;
                self.offset += n as u64;
                if (n as u64) < need {
                    break;
                }
            }
            self.stage_complete()?;
        }
        Ok(used)
    }

    /// Bytes the current stage still needs; 0 when it is complete.
    fn need(&self) -> u64 {
        match self.stage {
            Stage::Len | Stage::Size => (8 - self.have) as u64,
            Stage::Body { len } => (len - self.token.len()) as u64,
            Stage::BodyPad { len } => (padding(len as u64) - self.have) as u64,
            Stage::Contents { left, .. } => left,
            Stage::ContentsPad { size } => (padding(size) - self.have) as u64,
        }
    }

    /// What the pull parser's `Truncated` error would say it wanted when the input ends now:
    /// the rest of the read in progress. It reads file contents in `CHUNK`-sized reads from
    /// their start, so there that is the rest of the current chunk.
    fn wanted(&self) -> u64 {
        match self.stage {
            Stage::Contents { size, left } => {
                let chunk = CHUNK as u64;
                let done = size - left;
                let start = done - done % chunk;
                (size - start).min(chunk) - (done - start)
            }
            _ => self.need(),
        }
    }

    fn absorb(&mut self, bytes: &[u8]) {
        match &mut self.stage {
            Stage::Body { .. } => self.token.extend_from_slice(bytes),
            Stage::Contents { left, .. } => *left -= bytes.len() as u64,
            Stage::Len | Stage::Size | Stage::BodyPad { .. } | Stage::ContentsPad { .. } => {
                if let Some(dst) = self.word.get_mut(self.have..self.have + bytes.len()) {
                    dst.copy_from_slice(bytes);
                }
                self.have += bytes.len();
            }
        }
    }

    /// Enters `stage`, which starts at the current offset.
    fn enter(&mut self, stage: Stage) {
        self.stage = stage;
        self.stage_at = self.offset;
        self.have = 0;
    }

    /// Starts reading the next string token, which is `expect`.
    fn next_token(&mut self, expect: Expect) {
        self.expect = expect;
        self.token_at = self.offset;
        self.token.clear();
        self.enter(Stage::Len);
    }

    /// The current stage has all its bytes: check them and move on.
    fn stage_complete(&mut self) -> Result<(), NarReadError> {
        match self.stage {
            Stage::Len => {
                let len = u64::from_le_bytes(self.word);
                let (limit, what) = self.expect.limit();
                if len > limit as u64 {
                    return Err(self.too_long(what, len, limit));
                }
                // `len <= limit`, a `usize`.
                let len = len as usize;
                self.token.reserve_exact(len);
                self.enter(Stage::Body { len });
            }
            Stage::Body { len } => self.enter(Stage::BodyPad { len }),
            Stage::BodyPad { .. } => {
                self.check_padding()?;
                self.token_complete()?;
            }
            Stage::Size => {
                let size = u64::from_le_bytes(self.word);
                self.enter(Stage::Contents { size, left: size });
            }
            Stage::Contents { size, .. } => self.enter(Stage::ContentsPad { size }),
            Stage::ContentsPad { .. } => {
                self.check_padding()?;
                self.next_token(Expect::Close);
            }
        }
        Ok(())
    }

    fn check_padding(&self) -> Result<(), NarReadError> {
        if self
            .word
            .get(..self.have)
            .unwrap_or(&[])
            .iter()
            .any(|&b| b != 0)
        {
            return Err(if self.expect == Expect::Magic {
                NarReadError::BadMagic {
                    offset: self.token_at,
                }
            } else {
                NarReadError::BadPadding {
                    offset: self.stage_at,
                    path: show_path(&self.path),
                }
            });
        }
        Ok(())
    }

    fn too_long(&self, what: &'static str, len: u64, limit: usize) -> NarReadError {
        if self.expect == Expect::Magic {
            return NarReadError::BadMagic {
                offset: self.token_at,
            };
        }
        NarReadError::TooLong {
            offset: self.token_at,
            path: show_path(&self.path),
            what,
            len,
            limit: limit as u64,
        }
    }

    /// The token must be `want`; `shown` is how errors name it.
    fn keyword(&self, want: &str, shown: &'static str) -> Result<(), NarReadError> {
        if self.token != want.as_bytes() {
            return Err(self.unexpected(shown));
        }
        Ok(())
    }

    fn unexpected(&self, expected: &'static str) -> NarReadError {
        NarReadError::UnexpectedTag {
            offset: self.token_at,
            path: show_path(&self.path),
            expected,
            got: show_bytes(&self.token),
        }
    }

    /// A whole string token is in `token`: the grammar step for it.
    fn token_complete(&mut self) -> Result<(), NarReadError> {
        if let Some((want, shown, next)) = self.expect.fixed() {
            self.keyword(want, shown)?;
            self.next_token(next);
            return Ok(());
        }
        let next = match self.expect {
            Expect::Magic => {
                if self.token != NAR_MAGIC.as_bytes() {
                    return Err(NarReadError::BadMagic {
                        offset: self.token_at,
                    });
                }
                Expect::Open
            }
            Expect::TypeName => match self.token.as_slice() {
                b"regular" => Expect::RegularTag,
                b"symlink" => Expect::TargetTag,
                b"directory" => {
                    self.dirs.push(Dir {
                        path_len: self.path.len(),
                        prev: Vec::new(),
                    });
                    Expect::DirTag
                }
                _ => {
                    return Err(NarReadError::UnknownType {
                        offset: self.token_at,
                        path: show_path(&self.path),
                        got: show_bytes(&self.token),
                    });
                }
            },
            Expect::RegularTag => match self.token.as_slice() {
                b"executable" => Expect::ExecMarker,
                b"contents" => return self.file_size(),
                _ => return Err(self.unexpected("\"executable\" or \"contents\"")),
            },
            Expect::ExecMarker => {
                if !self.token.is_empty() {
                    return Err(NarReadError::NonEmptyExecutable {
                        offset: self.token_at,
                        path: show_path(&self.path),
                    });
                }
                Expect::Contents
            }
            Expect::Contents => {
                self.keyword("contents", "\"contents\"")?;
                return self.file_size();
            }
            Expect::Target => {
                check_target(&self.token).map_err(|problem| NarReadError::BadTarget {
                    offset: self.token_at,
                    path: show_path(&self.path),
                    problem,
                })?;
                Expect::Close
            }
            Expect::Close => {
                self.keyword(")", "\")\"")?;
                self.end_node();
                return Ok(());
            }
            Expect::DirTag => match self.token.as_slice() {
                b")" => {
                    self.dirs.pop();
                    self.end_node();
                    return Ok(());
                }
                b"entry" => Expect::EntryOpen,
                _ => return Err(self.unexpected("\"entry\" or \")\"")),
            },
            Expect::Name => {
                self.entry_name()?;
                Expect::NodeTag
            }
            // Never here: the keywords went through `fixed` above, and `stage_complete` reads
            // the size and contents itself. Failing keeps a slip from looping forever.
            Expect::Open
            | Expect::Type
            | Expect::TargetTag
            | Expect::EntryOpen
            | Expect::NameTag
            | Expect::NodeTag
            | Expect::EntryClose
            | Expect::Size => return Err(self.unexpected("a known token")),
        };
        self.next_token(next);
        Ok(())
    }

    fn file_size(&mut self) -> Result<(), NarReadError> {
        self.expect = Expect::Size;
        self.enter(Stage::Size);
        Ok(())
    }

    /// The entry name is in `token`: the checks of the pull parser's `directory`, in its order.
    fn entry_name(&mut self) -> Result<(), NarReadError> {
        check_name(&self.token).map_err(|problem| NarReadError::InvalidName {
            offset: self.token_at,
            dir: show_path(&self.path),
            name: show_bytes(&self.token),
            problem,
        })?;
        self.path.push(b'/');
        self.path.extend_from_slice(&self.token);
        let depth = self.dirs.len();
        let Some(dir) = self.dirs.last_mut() else {
            // Names are only read inside a directory.
            return Err(self.unexpected("a node"));
        };
        // Nix requires `name > prevName` (`parse` in archive.cc), which rejects duplicates and
        // unsorted entries alike; `prev` is empty before the first entry, below any name.
        if !dir.prev.is_empty() {
            if self.token == dir.prev {
                return Err(NarReadError::DuplicateName {
                    offset: self.token_at,
                    path: show_path(&self.path),
                });
            }
            if self.token < dir.prev {
                return Err(NarReadError::Unsorted {
                    offset: self.token_at,
                    path: show_path(&self.path),
                    prev: show_bytes(&dir.prev),
                });
            }
        }
        // The directory is at depth `depth - 1`, its entry at `depth`.
        if depth >= MAX_DEPTH {
            return Err(NarReadError::TooDeep {
                offset: self.token_at,
                path: show_path(&self.path),
            });
        }
        dir.prev.clear();
        dir.prev.extend_from_slice(&self.token);
        Ok(())
    }

    /// A node ended: the NAR is complete at the root, otherwise its entry must close.
    fn end_node(&mut self) {
        match self.dirs.last() {
            None => self.state = State::Done,
            Some(dir) => {
                self.path.truncate(dir.path_len);
                self.next_token(Expect::EntryClose);
            }
        }
    }
}

/// The same error again, for a checker that is fed after it failed. The checker only makes
/// the variants without an `io::Error`; the others keep their message.
fn again(e: &NarReadError) -> NarReadError {
    use NarReadError as E;
    match e {
        E::BadMagic { offset } => E::BadMagic { offset: *offset },
        E::Truncated {
            offset,
            path,
            wanted,
        } => E::Truncated {
            offset: *offset,
            path: path.clone(),
            wanted: *wanted,
        },
        E::UnexpectedTag {
            offset,
            path,
            expected,
            got,
        } => E::UnexpectedTag {
            offset: *offset,
            path: path.clone(),
            expected,
            got: got.clone(),
        },
        E::UnknownType { offset, path, got } => E::UnknownType {
            offset: *offset,
            path: path.clone(),
            got: got.clone(),
        },
        E::TooLong {
            offset,
            path,
            what,
            len,
            limit,
        } => E::TooLong {
            offset: *offset,
            path: path.clone(),
            what,
            len: *len,
            limit: *limit,
        },
        E::BadPadding { offset, path } => E::BadPadding {
            offset: *offset,
            path: path.clone(),
        },
        E::InvalidName {
            offset,
            dir,
            name,
            problem,
        } => E::InvalidName {
            offset: *offset,
            dir: dir.clone(),
            name: name.clone(),
            problem: *problem,
        },
        E::DuplicateName { offset, path } => E::DuplicateName {
            offset: *offset,
            path: path.clone(),
        },
        E::Unsorted { offset, path, prev } => E::Unsorted {
            offset: *offset,
            path: path.clone(),
            prev: prev.clone(),
        },
        E::TooDeep { offset, path } => E::TooDeep {
            offset: *offset,
            path: path.clone(),
        },
        E::BadTarget {
            offset,
            path,
            problem,
        } => E::BadTarget {
            offset: *offset,
            path: path.clone(),
            problem: *problem,
        },
        E::NonEmptyExecutable { offset, path } => E::NonEmptyExecutable {
            offset: *offset,
            path: path.clone(),
        },
        E::TrailingData { offset } => E::TrailingData { offset: *offset },
        E::Io { offset, path, .. } | E::Visitor { offset, path, .. } => E::Io {
            offset: *offset,
            path: path.clone(),
            source: io::Error::other(e.to_string()),
        },
    }
}
