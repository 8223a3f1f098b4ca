//! An asynchronous client for the serve protocol, `nix-store --serve --write`.
//!
//! Follows Nix 2.8 `src/libstore/serve-protocol.hh`, the client `src/libstore/legacy-ssh-store.cc`
//! and the server `opServe` in `src/nix-store/nix-store.cc`, checked against HEAD
//! (`serve-protocol-connection.cc`); the facts are in docs/hook-protocol.md §4.
//!
//! The transport stays outside: [`ServeClient`] takes the two halves of any byte stream
//! (for the build hook, ssh's stdout and stdin) and owns no process, socket or timer.
//! Deadlines are the caller's job, and they are needed: a half-open connection blocks a read
//! forever (NixOS/nix#16437), the bad-magic drain included. Wrap each call in a timeout.
//!
//! Every read is bounded by [`ServeLimits`]; every error names the operation and the remote.
//! Byte offsets in errors about replies count the server's output from just after its
//! 8-byte greeting magic (the version word is at offset 0).
//! The protocol has no framing to resynchronise on, so after any error (or a cancelled call)
//! the client refuses further operations with [`ServeError::Broken`]; open a new connection.
//!
//! ## Versions
//!
//! We offer 2.7 (`0x207`) and use `min(remote, 2.7)`, like the HEAD client; we need at least
//! 2.5 (`AddToStoreNar`). Nix 2.8–2.34 servers answer 2.7, Nix 2.35+ 2.8 (which it lowers to
//! our 2.7 for everything it sends). The 2.8–2.11 server tests `GET_PROTOCOL_MINOR(clientVersion
//! >= 6)`, which is always true, so it sends `builtOutputs` even to clients that offered less
//! than 2.6; since we offer 2.7, the negotiated minor is ≥ 6 whenever the server is one of
//! those, and the rule "read `builtOutputs` iff minor ≥ 6" is right for all of them.
//!
//! ## DumpStorePath
//!
//! The server answers `DumpStorePath` with a bare NAR: no length, no trailer. The only way to
//! find its end is to parse it. The push NAR checker ([`crate::nar::NarChecker`], the same
//! strict, bounded grammar and errors as [`crate::nar::parse_from`], without I/O) does that in
//! this task: each read buffer is offered to it, it takes the bytes up to the NAR's end, and
//! only those are consumed from the stream and copied to the sink, so the next reply stays
//! unread. The sink therefore receives exactly the NAR bytes, validated; if the NAR is bad the
//! error comes from the checker, with the offset inside the NAR. No thread or channel is
//! involved, so dropping the future leaves nothing running.

use crate::hash::{Hash, HashError};
use crate::nar::NarReadError;
#[cfg(feature = "tokio")]
use crate::store_path::StoreDir;
use crate::store_path::{StorePath, StorePathError};
use crate::wire::WireError;
#[cfg(feature = "tokio")]
use crate::wire::{AsyncWireReader, AsyncWireWriter};
use std::collections::BTreeSet;
use std::io;
use thiserror::Error;
#[cfg(feature = "tokio")]
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

// The client needs tokio; the types above it (`PathInfo`, `BuildOptions`, …) do not.
#[cfg(feature = "tokio")]
mod codec;
#[cfg(feature = "tokio")]
mod handshake;
#[cfg(feature = "tokio")]
mod nar;
#[cfg(feature = "tokio")]
mod ops;
#[cfg(all(test, feature = "tokio"))]
mod tests;

/// First word of the handshake, client to server.
pub const SERVE_MAGIC_1: u64 = 0x390c_9deb;
/// First word of the handshake, server to client.
pub const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// The version we offer: 2.7.
pub const PROTOCOL_VERSION: u64 = 0x207;
/// The oldest server version we talk to: 2.5, the first with `AddToStoreNar`.
pub const MIN_PROTOCOL_VERSION: u64 = 0x205;

#[cfg(feature = "tokio")]
const CMD_QUERY_VALID_PATHS: u64 = 1;
#[cfg(feature = "tokio")]
const CMD_QUERY_PATH_INFOS: u64 = 2;
#[cfg(feature = "tokio")]
const CMD_DUMP_STORE_PATH: u64 = 3;
#[cfg(feature = "tokio")]
const CMD_QUERY_CLOSURE: u64 = 7;
#[cfg(feature = "tokio")]
const CMD_BUILD_DERIVATION: u64 = 8;
#[cfg(feature = "tokio")]
const CMD_ADD_TO_STORE_NAR: u64 = 9;

/// How much of a bad greeting is kept for the error message.
#[cfg(feature = "tokio")]
const MAX_BANNER: usize = 4096;
/// Capacity of the read buffer. `DumpStorePath` copies NARs through it, one buffer at a time,
/// so it is the size of each write to the sink; 64 KiB matches a pipe's default capacity.
#[cfg(feature = "tokio")]
const READ_BUFFER: usize = 64 * 1024;
/// Chunk size for NARs sent with `AddToStoreNar`: a quarter of the reads and writes (and
/// task wake-ups) of 64 KiB pieces for the same bytes.
#[cfg(feature = "tokio")]
const UPLOAD_CHUNK: usize = 256 * 1024;

/// Bounds on what the remote may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Paths in one reply (valid paths, references, closures, path infos).
    pub max_paths: usize,
    /// Length of a store path string.
    pub max_path_len: u64,
    /// Length of other short strings: signatures, content addresses, realisation JSON.
    pub max_string: u64,
    /// Signatures per path.
    pub max_sigs: usize,
    /// Length of a build error message (it carries the tail of the build log).
    pub max_error_msg: u64,
    /// Entries in a build result's `builtOutputs`.
    pub max_built_outputs: usize,
    /// Size of a NAR received by [`ServeClient::dump_store_path`]. NARs are streamed, never
    /// held in memory, so this bounds disk use rather than memory.
    pub max_nar_size: u64,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_paths: 1 << 20,
            max_path_len: 4096,
            max_string: 64 * 1024,
            max_sigs: 1024,
            max_error_msg: 4 * 1024 * 1024,
            max_built_outputs: 1024,
            max_nar_size: u64::MAX,
        }
    }
}

/// Errors of the serve client. `op` is the operation (`handshake`, `query_valid_paths`, …),
/// `remote` the name the caller gave the connection.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error(
        "'nix-store --serve' protocol mismatch from '{remote}': got {got:?} instead of the serve magic (a shell banner, or nix-store missing on the remote?)"
    )]
    BadMagic { remote: String, got: String },
    #[error(
        "'nix-store --serve' on '{remote}' closed the connection before the handshake (is nix-store installed there? its stderr says more)"
    )]
    NoGreeting { remote: String },
    #[error(
        "'nix-store --serve' on '{remote}' speaks protocol version {version:#x}; Ferry needs major version 2 and minor 5 or later"
    )]
    UnsupportedVersion { remote: String, version: u64 },
    #[error(
        "{op} on '{remote}': the remote closed the connection at byte offset {offset} of its output (its stderr says why)"
    )]
    Closed {
        op: &'static str,
        remote: String,
        offset: u64,
    },
    #[error("{op} on '{remote}': bad reply: {source}")]
    Wire {
        op: &'static str,
        remote: String,
        #[source]
        source: WireError,
    },
    #[error("{op} on '{remote}': sending the request failed: {source}")]
    Send {
        op: &'static str,
        remote: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} on '{remote}': bad reply at byte offset {offset}: {detail}")]
    BadReply {
        op: &'static str,
        remote: String,
        offset: u64,
        detail: String,
    },
    #[error(
        "{op} on '{remote}': invalid store path in the reply at byte offset {offset}: {source}"
    )]
    BadPath {
        op: &'static str,
        remote: String,
        offset: u64,
        #[source]
        source: Box<StorePathError>,
    },
    #[error(
        "{op} on '{remote}': invalid NAR hash {got:?} in the reply at byte offset {offset}: {source}"
    )]
    BadHash {
        op: &'static str,
        remote: String,
        offset: u64,
        got: String,
        #[source]
        source: Box<HashError>,
    },
    #[error("{op} of {path} on '{remote}': {detail}")]
    BadRequest {
        op: &'static str,
        remote: String,
        path: String,
        detail: String,
    },
    #[error(
        "add_to_store_nar of {path} to '{remote}': reading the local NAR failed after {done} of {size} bytes: {source}"
    )]
    NarSource {
        remote: String,
        path: String,
        done: u64,
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "add_to_store_nar of {path} to '{remote}': the NAR sent hashes to {got}, not to the stated {expected}; the remote rejects it"
    )]
    NarHashMismatch {
        remote: String,
        path: String,
        expected: String,
        got: String,
    },
    #[error("dump_store_path of {path} from '{remote}': {source}")]
    Nar {
        remote: String,
        path: String,
        #[source]
        source: Box<NarReadError>,
    },
    #[error(
        "dump_store_path of {path} from '{remote}': the NAR exceeds the limit of {limit} bytes"
    )]
    NarTooLarge {
        remote: String,
        path: String,
        limit: u64,
    },
    #[error(
        "dump_store_path of {path} from '{remote}': writing the NAR to its destination failed: {source}"
    )]
    Sink {
        remote: String,
        path: String,
        #[source]
        source: io::Error,
    },
    /// The NAR is not the one the remote described in `QueryPathInfos`: longer or shorter
    /// than its `narSize`, or with another hash than its `narHash`.
    #[error("dump_store_path of {path} from '{remote}': {detail}")]
    NarNotAsDeclared {
        remote: String,
        path: String,
        detail: String,
    },
    #[error(
        "{op} on '{remote}': the connection is unusable after an earlier error or cancelled operation"
    )]
    Broken { op: &'static str, remote: String },
}

/// A valid store path as `QueryPathInfos` describes it (`ValidPathInfo`), and what
/// [`ServeClient::add_to_store_nar`] sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub deriver: Option<StorePath>,
    pub references: BTreeSet<StorePath>,
    pub nar_size: u64,
    /// SHA-256 of the NAR.
    pub nar_hash: Hash,
    /// The content address (`text:sha256:…`, `fixed:r:sha256:…`), as Nix renders it.
    pub ca: Option<String>,
    pub sigs: BTreeSet<String>,
}

/// Build settings sent with `BuildDerivation` (`putBuildSettings`, docs/hook-protocol.md §4.4).
/// `nrRepeats` and `enforceDeterminism` are always sent as 0: HEAD servers refuse anything
/// else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// `max-silent-time` in seconds, 0 for none.
    pub max_silent_time: u64,
    /// `timeout` in seconds, 0 for none.
    pub build_timeout: u64,
    /// `max-log-size` in bytes, 0 for none (sent from 2.2).
    pub max_log_size: u64,
    /// `keep-failed` (sent from 2.7).
    pub keep_failed: bool,
}

/// `BuildResult::Status` (`src/libstore/build-result.hh`); codes are stable across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStatus {
    Built,
    Substituted,
    AlreadyValid,
    PermanentFailure,
    InputRejected,
    OutputRejected,
    TransientFailure,
    CachedFailure,
    TimedOut,
    MiscFailure,
    DependencyFailed,
    LogLimitExceeded,
    NotDeterministic,
    ResolvesToAlreadyValid,
    NoSubstituters,
    /// A code this version does not know.
    Unknown(u64),
}

const STATUSES: [BuildStatus; 15] = [
    BuildStatus::Built,
    BuildStatus::Substituted,
    BuildStatus::AlreadyValid,
    BuildStatus::PermanentFailure,
    BuildStatus::InputRejected,
    BuildStatus::OutputRejected,
    BuildStatus::TransientFailure,
    BuildStatus::CachedFailure,
    BuildStatus::TimedOut,
    BuildStatus::MiscFailure,
    BuildStatus::DependencyFailed,
    BuildStatus::LogLimitExceeded,
    BuildStatus::NotDeterministic,
    BuildStatus::ResolvesToAlreadyValid,
    BuildStatus::NoSubstituters,
];

impl BuildStatus {
    pub fn from_code(code: u64) -> Self {
        usize::try_from(code)
            .ok()
            .and_then(|i| STATUSES.get(i).copied())
            .unwrap_or(BuildStatus::Unknown(code))
    }

    pub fn code(self) -> u64 {
        match self {
            BuildStatus::Unknown(c) => c,
            known => STATUSES.iter().position(|s| *s == known).unwrap_or(0) as u64,
        }
    }

    /// `BuildResult::success()`: Built, Substituted, AlreadyValid or ResolvesToAlreadyValid.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }
}

/// One entry of `builtOutputs` as protocol 2.6/2.7 sends it: the `DrvOutput` id
/// (`sha256:<hex>!<output>`) and the `Realisation` as JSON text (`id`, `outPath` as a base
/// name, `signatures`, `dependentRealisations`), both kept as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltOutput {
    pub id: String,
    pub realisation_json: String,
}

impl BuiltOutput {
    /// The output name after the `!` of the id.
    pub fn output_name(&self) -> Option<&str> {
        self.id.rsplit_once('!').map(|(_, name)| name)
    }
}

/// The reply to `BuildDerivation` (docs/hook-protocol.md §4.5). Fields a version does not send
/// keep their defaults (0, false, empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    pub status: BuildStatus,
    pub error_msg: String,
    /// From 2.3.
    pub times_built: u64,
    /// From 2.3.
    pub is_non_deterministic: bool,
    /// Seconds since the epoch, from 2.3.
    pub start_time: u64,
    /// Seconds since the epoch, from 2.3.
    pub stop_time: u64,
    /// From 2.6.
    pub built_outputs: Vec<BuiltOutput>,
}

impl BuildResult {
    /// `error_msg` without the terminal colour codes (ANSI CSI sequences such as `ESC[35;1m`)
    /// that Nix puts around paths in its messages.
    pub fn plain_error_msg(&self) -> String {
        strip_ansi(&self.error_msg)
    }
}

/// Removes ANSI CSI sequences: `ESC [`, parameter and intermediate bytes, one final byte.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A connection to `nix-store --serve --write` after the handshake.
#[cfg(feature = "tokio")]
pub struct ServeClient<R, W> {
    r: AsyncWireReader<BufReader<R>>,
    w: AsyncWireWriter<BufWriter<W>>,
    store_dir: StoreDir,
    remote: String,
    remote_version: u64,
    version: u64,
    limits: ServeLimits,
    broken: bool,
}

#[cfg(feature = "tokio")]
impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> ServeClient<R, W> {
    /// The version the server announced.
    pub fn remote_version(&self) -> u64 {
        self.remote_version
    }

    /// The version in use: `min(remote, 2.7)`.
    pub fn version(&self) -> u64 {
        self.version
    }

    fn minor(&self) -> u64 {
        self.version & 0xff
    }

    pub fn remote(&self) -> &str {
        &self.remote
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// Whether an earlier error left the connection unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Flushes, shuts down and drops both halves; the server exits at end of input.
    /// (Dropping the client without this also closes the pipe, minus the flush.)
    pub async fn close(mut self) -> io::Result<()> {
        self.w.flush().await?;
        self.w.get_mut().shutdown().await
    }
}
