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
//! find its end is to parse it. We reuse [`crate::nar::parse_from`] (the strict, bounded NAR
//! grammar) instead of writing a second, asynchronous one: the parser runs on a short-lived
//! thread and pulls its input through a channel from this task, which reads from the remote
//! exactly the bytes the parser asked for (the parser only ever asks for bytes it needs), so
//! nothing after the NAR is consumed, and copies them to the sink. The sink therefore receives
//! exactly the NAR bytes, validated; if the NAR is bad the error comes from the NAR parser,
//! with the offset inside the NAR. Dropping the future closes the channel, which stops the
//! thread.

use crate::derivation::BasicDerivation;
use crate::hash::{Hash, HashAlgo, HashError, HashSink, Sha256Sink};
use crate::nar::{self, NarContents, NarReadError, NarVisitor};
use crate::store_path::{StoreDir, StorePath, StorePathError};
use crate::wire::{AsyncWireReader, AsyncWireWriter, WireError, WireReader};
use std::collections::BTreeSet;
use std::io;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

/// First word of the handshake, client to server.
pub const SERVE_MAGIC_1: u64 = 0x390c_9deb;
/// First word of the handshake, server to client.
pub const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// The version we offer: 2.7.
pub const PROTOCOL_VERSION: u64 = 0x207;
/// The oldest server version we talk to: 2.5, the first with `AddToStoreNar`.
pub const MIN_PROTOCOL_VERSION: u64 = 0x205;

const CMD_QUERY_VALID_PATHS: u64 = 1;
const CMD_QUERY_PATH_INFOS: u64 = 2;
const CMD_DUMP_STORE_PATH: u64 = 3;
const CMD_QUERY_CLOSURE: u64 = 7;
const CMD_BUILD_DERIVATION: u64 = 8;
const CMD_ADD_TO_STORE_NAR: u64 = 9;

/// How much of a bad greeting is kept for the error message.
const MAX_BANNER: usize = 4096;
/// Chunk size for copying NARs.
const CHUNK: usize = 64 * 1024;
/// Chunk size for NARs sent with `AddToStoreNar`: a quarter of the reads and writes (and
/// task wake-ups) of 64 KiB pieces for the same bytes.
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
    #[error("dump_store_path of {path} from '{remote}': {detail}")]
    NarCheck {
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

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> ServeClient<R, W> {
    /// Performs the handshake with default limits. `store_dir` is the store directory of the
    /// remote (Nix requires it to equal the local one); `remote` names the connection in errors.
    pub async fn handshake(
        reader: R,
        writer: W,
        store_dir: StoreDir,
        remote: impl Into<String>,
    ) -> Result<Self, ServeError> {
        Self::handshake_with_limits(reader, writer, store_dir, remote, ServeLimits::default()).await
    }

    /// Performs the handshake (docs/hook-protocol.md §4.1): sends `SERVE_MAGIC_1` and 2.7, expects
    /// `SERVE_MAGIC_2` and a version with major 2 and minor ≥ 5.
    ///
    /// If the first 8 bytes are not the magic, this closes the writer (so a remote waiting for
    /// input exits, as `LegacySSHStore::openConnection` does), reads what else the remote
    /// prints until end of input (at most 4 KiB) and returns [`ServeError::BadMagic`] with it as
    /// text: usually a shell banner or `nix-store: command not found`.
    pub async fn handshake_with_limits(
        reader: R,
        writer: W,
        store_dir: StoreDir,
        remote: impl Into<String>,
        limits: ServeLimits,
    ) -> Result<Self, ServeError> {
        let remote = remote.into();
        let mut r = BufReader::new(reader);
        let mut w = AsyncWireWriter::new(BufWriter::new(writer));
        // A failed write usually means the remote is gone; what it printed explains why,
        // so read that before reporting the write error.
        let sent = async {
            w.write_u64(SERVE_MAGIC_1).await?;
            w.write_u64(PROTOCOL_VERSION).await?;
            w.flush().await
        }
        .await;

        let mut greeting = Vec::with_capacity(8);
        read_up_to(&mut r, &mut greeting, 8).await;
        if greeting.len() == 8 && greeting == SERVE_MAGIC_2.to_le_bytes() {
            if let Err(source) = sent {
                return Err(ServeError::Send {
                    op: "handshake",
                    remote,
                    source,
                });
            }
        } else {
            if greeting.is_empty() {
                return Err(match sent {
                    Err(source) => ServeError::Send {
                        op: "handshake",
                        remote,
                        source,
                    },
                    Ok(()) => ServeError::NoGreeting { remote },
                });
            }
            // Dropping the writer closes it (a `shutdown` alone does not close a pipe).
            let _ = w.get_mut().shutdown().await;
            drop(w);
            read_up_to(&mut r, &mut greeting, MAX_BANNER).await;
            return Err(ServeError::BadMagic {
                remote,
                got: banner_text(&greeting),
            });
        }

        let mut rr = AsyncWireReader::new(r);
        let remote_version = match rr.read_u64().await {
            Ok(v) => v,
            Err(WireError::Eof { .. }) => {
                return Err(ServeError::Closed {
                    op: "handshake",
                    remote,
                    offset: rr.offset(),
                });
            }
            Err(source) => {
                return Err(ServeError::Wire {
                    op: "handshake",
                    remote,
                    source,
                });
            }
        };
        // Major 2 exactly (Nix masks with 0xff00 only; higher bits are never set by any Nix).
        if remote_version >> 8 != 2 || remote_version < MIN_PROTOCOL_VERSION {
            return Err(ServeError::UnsupportedVersion {
                remote,
                version: remote_version,
            });
        }
        Ok(ServeClient {
            r: rr,
            w,
            store_dir,
            remote,
            remote_version,
            version: remote_version.min(PROTOCOL_VERSION),
            limits,
            broken: false,
        })
    }

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

    /// `QueryValidPaths` (op 1): which of `paths` are valid on the remote. `lock` makes the
    /// remote hold temporary GC roots for them for the life of the connection; `substitute`
    /// lets it substitute missing ones first.
    pub async fn query_valid_paths(
        &mut self,
        lock: bool,
        substitute: bool,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, ServeError> {
        const OP: &str = "query_valid_paths";
        self.begin(OP)?;
        self.send_u64(OP, CMD_QUERY_VALID_PATHS).await?;
        self.send_u64(OP, u64::from(lock)).await?;
        self.send_u64(OP, u64::from(substitute)).await?;
        self.send_paths(OP, paths).await?;
        self.flush(OP).await?;
        let valid = self.recv_path_set(OP).await?;
        if let Some(extra) = valid.difference(paths).next() {
            return Err(self.bad_reply(
                OP,
                format!(
                    "the remote calls {} valid, which was not asked about",
                    self.store_dir.display(extra)
                ),
            ));
        }
        self.broken = false;
        Ok(valid)
    }

    /// `QueryPathInfos` (op 2): information about those of `paths` that are valid on the
    /// remote, in the remote's order (sorted). Invalid paths are left out.
    pub async fn query_path_infos(
        &mut self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<PathInfo>, ServeError> {
        const OP: &str = "query_path_infos";
        self.begin(OP)?;
        self.send_u64(OP, CMD_QUERY_PATH_INFOS).await?;
        self.send_paths(OP, paths).await?;
        self.flush(OP).await?;
        let mut infos = Vec::new();
        loop {
            let at = self.r.offset();
            let s = self.recv_string(OP, self.limits.max_path_len).await?;
            if s.is_empty() {
                break;
            }
            let path = self.parse_path(OP, at, &s)?;
            if !paths.contains(&path) || infos.len() >= paths.len() {
                return Err(self.bad_reply(
                    OP,
                    format!("information about {s}, which was not asked about"),
                ));
            }
            let at = self.r.offset();
            let deriver = self.recv_string(OP, self.limits.max_path_len).await?;
            let deriver = if deriver.is_empty() {
                None
            } else {
                Some(self.parse_path(OP, at, &deriver)?)
            };
            let references = self.recv_path_set(OP).await?;
            let _download_size = self.recv_u64(OP).await?;
            let nar_size = self.recv_u64(OP).await?;
            // Present from 2.4; we require 2.5.
            let at = self.r.offset();
            let hash = self.recv_string(OP, self.limits.max_string).await?;
            let nar_hash =
                Hash::parse_any_prefixed(&hash).map_err(|source| ServeError::BadHash {
                    op: OP,
                    remote: self.remote.clone(),
                    offset: at,
                    got: hash.clone(),
                    source: Box::new(source),
                })?;
            let ca = self.recv_string(OP, self.limits.max_string).await?;
            let sigs = self
                .r
                .read_strings(self.limits.max_sigs, self.limits.max_string)
                .await
                .map_err(|e| self.wire_err(OP, e))?;
            infos.push(PathInfo {
                path,
                deriver,
                references,
                nar_size,
                nar_hash,
                ca: (!ca.is_empty()).then_some(ca),
                sigs: sigs.into_iter().collect(),
            });
        }
        self.broken = false;
        Ok(infos)
    }

    /// `QueryClosure` (op 7): the closure of `paths` on the remote, with the outputs of
    /// derivations in it if `include_outputs`.
    pub async fn query_closure(
        &mut self,
        include_outputs: bool,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, ServeError> {
        const OP: &str = "query_closure";
        self.begin(OP)?;
        self.send_u64(OP, CMD_QUERY_CLOSURE).await?;
        self.send_u64(OP, u64::from(include_outputs)).await?;
        self.send_paths(OP, paths).await?;
        self.flush(OP).await?;
        let closure = self.recv_path_set(OP).await?;
        self.broken = false;
        Ok(closure)
    }

    /// `AddToStoreNar` (op 9): adds `info.path` to the remote store from the NAR that
    /// `nar` yields. Exactly `info.nar_size` bytes are read from `nar` and streamed to the
    /// remote (never buffered whole) while they are hashed; the hash goes out as base-16
    /// without prefix (`narHash.to_string(Base16, false)`), with registration time 0 (the
    /// remote uses "now") and `ultimate` false. The remote must trust us (`NoCheckSigs`).
    ///
    /// The remote checks size and hash itself and fails the connection on a mismatch; we
    /// check too, so the error says what went wrong instead of "connection closed".
    pub async fn add_to_store_nar<N: AsyncRead + Unpin>(
        &mut self,
        info: &PathInfo,
        nar: N,
    ) -> Result<(), ServeError> {
        self.add_nar(info, nar, true).await
    }

    /// [`add_to_store_nar`](Self::add_to_store_nar) without hashing the NAR on this side.
    /// Hashing is a full extra pass over the data (on a copy that saturates the CPU, the
    /// sender's largest cost after the transport); the remote hashes it anyway (Nix 2.8
    /// `LocalStore::addToStore`: "hash mismatch importing path") and then ends the
    /// connection, so the call fails either way. A caller that wants to tell a bad local
    /// NAR from a broken connection checks its NAR after a failure.
    pub async fn add_to_store_nar_unhashed<N: AsyncRead + Unpin>(
        &mut self,
        info: &PathInfo,
        nar: N,
    ) -> Result<(), ServeError> {
        self.add_nar(info, nar, false).await
    }

    async fn add_nar<N: AsyncRead + Unpin>(
        &mut self,
        info: &PathInfo,
        mut nar: N,
        hash: bool,
    ) -> Result<(), ServeError> {
        const OP: &str = "add_to_store_nar";
        let path = self.store_dir.display(&info.path);
        if info.nar_size == 0 {
            return Err(self.bad_request(OP, &path, "the NAR size is 0 (the remote refuses it)"));
        }
        if info.nar_hash.algo() != HashAlgo::Sha256 {
            return Err(self.bad_request(OP, &path, "the NAR hash must be SHA-256"));
        }
        self.begin(OP)?;
        self.send_u64(OP, CMD_ADD_TO_STORE_NAR).await?;
        self.send_str(OP, &path).await?;
        let deriver = info.deriver.as_ref().map(|d| self.store_dir.display(d));
        self.send_str(OP, deriver.as_deref().unwrap_or("")).await?;
        self.send_str(OP, &info.nar_hash.to_base16()).await?;
        self.send_paths(OP, &info.references).await?;
        self.send_u64(OP, 0).await?; // registrationTime
        self.send_u64(OP, info.nar_size).await?;
        self.send_u64(OP, 0).await?; // ultimate
        let sigs: Vec<&str> = info.sigs.iter().map(String::as_str).collect();
        self.w
            .write_strings(sigs)
            .await
            .map_err(|e| self.send_err(OP, e))?;
        self.send_str(OP, info.ca.as_deref().unwrap_or("")).await?;

        let mut hasher = hash.then(Sha256Sink::new);
        let mut buf = vec![0u8; UPLOAD_CHUNK];
        let mut done = 0u64;
        while done < info.nar_size {
            let want = usize::try_from(info.nar_size - done)
                .unwrap_or(UPLOAD_CHUNK)
                .min(UPLOAD_CHUNK);
            let Some(chunk) = buf.get_mut(..want) else {
                break;
            };
            let n = match nar.read(chunk).await {
                Ok(0) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the NAR source ended early",
                )),
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            }
            .map_err(|source| ServeError::NarSource {
                remote: self.remote.clone(),
                path: path.clone(),
                done,
                size: info.nar_size,
                source,
            })?;
            let data = chunk.get(..n).unwrap_or(&[]);
            if let Some(h) = hasher.as_mut() {
                h.update(data);
            }
            self.w
                .get_mut()
                .write_all(data)
                .await
                .map_err(|e| self.send_err(OP, e))?;
            done += n as u64;
        }
        self.flush(OP).await?;
        if let Some(got) = hasher.map(Sha256Sink::finish)
            && got != info.nar_hash
        {
            return Err(ServeError::NarHashMismatch {
                remote: self.remote.clone(),
                path,
                expected: info.nar_hash.to_nix32_prefixed(),
                got: got.to_nix32_prefixed(),
            });
        }
        let at = self.r.offset();
        let reply = self.recv_u64(OP).await?;
        if reply != 1 {
            return Err(ServeError::BadReply {
                op: OP,
                remote: self.remote.clone(),
                offset: at,
                detail: format!("the remote answered {reply} instead of 1 for {path}"),
            });
        }
        self.broken = false;
        Ok(())
    }

    /// `BuildDerivation` (op 8): builds `drv` (its `.drv` path is `drv_path`, from which the
    /// remote takes the name) on the remote. A failed build is a [`BuildResult`] with a
    /// failure status, not an error; errors are protocol or connection failures. The build
    /// log is not in the protocol: the remote writes it to its stderr.
    pub async fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        options: &BuildOptions,
    ) -> Result<BuildResult, ServeError> {
        const OP: &str = "build_derivation";
        self.begin(OP)?;
        self.send_u64(OP, CMD_BUILD_DERIVATION).await?;
        let p = self.store_dir.display(drv_path);
        self.send_str(OP, &p).await?;
        let body = drv.to_wire(&self.store_dir);
        self.w
            .get_mut()
            .write_all(&body)
            .await
            .map_err(|e| self.send_err(OP, e))?;
        // `putBuildSettings`, by the version in use.
        self.send_u64(OP, options.max_silent_time).await?;
        self.send_u64(OP, options.build_timeout).await?;
        if self.minor() >= 2 {
            self.send_u64(OP, options.max_log_size).await?;
        }
        if self.minor() >= 3 {
            self.send_u64(OP, 0).await?; // nrRepeats
            self.send_u64(OP, 0).await?; // enforceDeterminism
        }
        if self.minor() >= 7 {
            self.send_u64(OP, u64::from(options.keep_failed)).await?;
        }
        self.flush(OP).await?;

        let status = BuildStatus::from_code(self.recv_u64(OP).await?);
        let error_msg = self.recv_string(OP, self.limits.max_error_msg).await?;
        let mut result = BuildResult {
            status,
            error_msg,
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            built_outputs: Vec::new(),
        };
        if self.minor() >= 3 {
            result.times_built = self.recv_u64(OP).await?;
            result.is_non_deterministic =
                self.r.read_bool().await.map_err(|e| self.wire_err(OP, e))?;
            result.start_time = self.recv_u64(OP).await?;
            result.stop_time = self.recv_u64(OP).await?;
        }
        if self.minor() >= 6 {
            // `std::map<DrvOutput, Realisation>`: a count, then id and JSON per entry.
            let at = self.r.offset();
            let n = self.recv_u64(OP).await?;
            if n > self.limits.max_built_outputs as u64 {
                return Err(ServeError::Wire {
                    op: OP,
                    remote: self.remote.clone(),
                    source: WireError::TooManyItems {
                        offset: at,
                        len: n,
                        limit: self.limits.max_built_outputs as u64,
                    },
                });
            }
            for _ in 0..n {
                let id = self.recv_string(OP, self.limits.max_string).await?;
                let realisation_json = self.recv_string(OP, self.limits.max_string).await?;
                result.built_outputs.push(BuiltOutput {
                    id,
                    realisation_json,
                });
            }
        }
        self.broken = false;
        Ok(result)
    }

    /// `DumpStorePath` (op 3): the NAR of `path`, copied to `sink` exactly and validated on
    /// the way (see the module documentation). Returns the NAR size. On error the sink may
    /// hold a prefix of the NAR, which the caller must discard.
    pub async fn dump_store_path<S: AsyncWrite + Unpin>(
        &mut self,
        path: &StorePath,
        sink: S,
    ) -> Result<u64, ServeError> {
        let limit = self.limits.max_nar_size;
        self.dump(path, sink, limit, None).await
    }

    /// `DumpStorePath` of `info.path`, checked against what `info` (from `QueryPathInfos`)
    /// declares while it streams: reading stops as soon as the NAR needs more than
    /// `info.nar_size` bytes ([`ServeError::NarTooLarge`]), and a NAR that ends short of it
    /// or hashes to anything but `info.nar_hash` (SHA-256 or SHA-512) fails with
    /// [`ServeError::NarNotAsDeclared`]. The sink has then received bytes that must not be
    /// used: the caller commits what the sink wrote only after `Ok`. Memory stays at one
    /// chunk whatever the size. Returns the NAR's SHA-256 (what a local store records).
    ///
    /// Why: the remote is not trusted. Nix's own client passes the remote's `narSize` and
    /// `narHash` to `addToStore`, which checks both
    /// (<https://github.com/NixOS/nix/blob/2.8.0/src/libstore/local-store.cc#L1163-L1171>).
    pub async fn dump_store_path_checked<S: AsyncWrite + Unpin>(
        &mut self,
        info: &PathInfo,
        sink: S,
    ) -> Result<Hash, ServeError> {
        let limit = self.limits.max_nar_size.min(info.nar_size);
        let declared = info.nar_hash.algo();
        let mut hashes = (
            HashSink::new(HashAlgo::Sha256),
            (declared != HashAlgo::Sha256).then(|| HashSink::new(declared)),
        );
        let shown = self.store_dir.display(&info.path);
        let remote = self.remote.clone();
        let not_as_declared = |detail: String| ServeError::NarNotAsDeclared {
            remote: remote.clone(),
            path: shown.clone(),
            detail,
        };
        let size = match self.dump(&info.path, sink, limit, Some(&mut hashes)).await {
            Err(ServeError::NarTooLarge { limit, .. }) if limit == info.nar_size => {
                return Err(not_as_declared(format!(
                    "the remote declared a NAR of {limit} bytes and sent more"
                )));
            }
            r => r?,
        };
        if size != info.nar_size {
            return Err(not_as_declared(format!(
                "the remote declared a NAR of {} bytes and sent one of {size}",
                info.nar_size
            )));
        }
        let (sha256, other) = hashes;
        let sha256 = sha256.finish();
        let got = match other {
            Some(h) => h.finish(),
            None => sha256.clone(),
        };
        if got != info.nar_hash {
            return Err(not_as_declared(format!(
                "the NAR hashes to {}, the remote declared {}",
                got.to_nix32_prefixed(),
                info.nar_hash.to_nix32_prefixed()
            )));
        }
        Ok(sha256)
    }

    /// The body of both dumps: at most `limit` bytes, fed to `hashes` as they go.
    async fn dump<S: AsyncWrite + Unpin>(
        &mut self,
        path: &StorePath,
        mut sink: S,
        limit: u64,
        mut hashes: Option<&mut (HashSink, Option<HashSink>)>,
    ) -> Result<u64, ServeError> {
        const OP: &str = "dump_store_path";
        self.begin(OP)?;
        let shown = self.store_dir.display(path);
        self.send_u64(OP, CMD_DUMP_STORE_PATH).await?;
        self.send_str(OP, &shown).await?;
        self.flush(OP).await?;

        let (req_tx, mut req_rx) = tokio::sync::mpsc::channel::<FromParser>(1);
        let (resp_tx, resp_rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(1);
        let bridge = Bridge {
            req: req_tx,
            resp: resp_rx,
            buf: Vec::new(),
            pos: 0,
        };
        let spawned = std::thread::Builder::new()
            .name("ferry-nar-check".into())
            .spawn(move || {
                let mut r = WireReader::new(bridge);
                let result = nar::parse_from(&mut r, &mut Discard);
                let _ = r.get_mut().req.blocking_send(FromParser::Done(result));
            });
        if let Err(e) = spawned {
            return Err(ServeError::NarCheck {
                remote: self.remote.clone(),
                path: shown,
                detail: format!("cannot start the NAR checking thread: {e}"),
            });
        }

        let mut total = 0u64;
        loop {
            match req_rx.recv().await {
                Some(FromParser::Need(n)) => {
                    if total.saturating_add(n as u64) > limit {
                        // Reading exactly what the parser asks never goes past the NAR, so
                        // a NAR that needs more than the limit is over it.
                        return Err(ServeError::NarTooLarge {
                            remote: self.remote.clone(),
                            path: shown,
                            limit,
                        });
                    }
                    let mut chunk = vec![0u8; n];
                    if let Err(e) = self.r.read_exact(&mut chunk).await {
                        let _ = resp_tx.try_send(Err(io::Error::other(e.to_string())));
                        return Err(self.wire_err(OP, e));
                    }
                    total += n as u64;
                    if let Some((a, b)) = hashes.as_deref_mut() {
                        a.update(&chunk);
                        if let Some(b) = b {
                            b.update(&chunk);
                        }
                    }
                    if let Err(source) = sink.write_all(&chunk).await {
                        return Err(ServeError::Sink {
                            remote: self.remote.clone(),
                            path: shown,
                            source,
                        });
                    }
                    // The parser waits for exactly one answer per request, so the slot is free.
                    if resp_tx.try_send(Ok(chunk)).is_err() {
                        return Err(ServeError::NarCheck {
                            remote: self.remote.clone(),
                            path: shown,
                            detail: "the NAR checking thread stopped".into(),
                        });
                    }
                }
                Some(FromParser::Done(Ok(size))) => {
                    if size != total {
                        return Err(ServeError::NarCheck {
                            remote: self.remote.clone(),
                            path: shown,
                            detail: format!("parsed {size} NAR bytes but read {total}"),
                        });
                    }
                    sink.flush().await.map_err(|source| ServeError::Sink {
                        remote: self.remote.clone(),
                        path: shown.clone(),
                        source,
                    })?;
                    self.broken = false;
                    return Ok(size);
                }
                Some(FromParser::Done(Err(source))) => {
                    return Err(ServeError::Nar {
                        remote: self.remote.clone(),
                        path: shown,
                        source: Box::new(source),
                    });
                }
                None => {
                    return Err(ServeError::NarCheck {
                        remote: self.remote.clone(),
                        path: shown,
                        detail: "the NAR checking thread stopped without a result".into(),
                    });
                }
            }
        }
    }

    // --- helpers: each names the operation in its errors ---

    fn begin(&mut self, op: &'static str) -> Result<(), ServeError> {
        if self.broken {
            return Err(ServeError::Broken {
                op,
                remote: self.remote.clone(),
            });
        }
        // Cleared by the operation when it completes; an error or a cancelled future
        // leaves the stream mid-message.
        self.broken = true;
        Ok(())
    }

    fn wire_err(&self, op: &'static str, e: WireError) -> ServeError {
        match e {
            WireError::Eof { offset, .. } => ServeError::Closed {
                op,
                remote: self.remote.clone(),
                offset,
            },
            source => ServeError::Wire {
                op,
                remote: self.remote.clone(),
                source,
            },
        }
    }

    fn send_err(&self, op: &'static str, source: io::Error) -> ServeError {
        ServeError::Send {
            op,
            remote: self.remote.clone(),
            source,
        }
    }

    fn bad_reply(&self, op: &'static str, detail: String) -> ServeError {
        ServeError::BadReply {
            op,
            remote: self.remote.clone(),
            offset: self.r.offset(),
            detail,
        }
    }

    fn bad_request(&self, op: &'static str, path: &str, detail: &str) -> ServeError {
        ServeError::BadRequest {
            op,
            remote: self.remote.clone(),
            path: path.to_owned(),
            detail: detail.to_owned(),
        }
    }

    fn parse_path(&self, op: &'static str, at: u64, s: &str) -> Result<StorePath, ServeError> {
        self.store_dir
            .parse(s)
            .map_err(|source| ServeError::BadPath {
                op,
                remote: self.remote.clone(),
                offset: at,
                source: Box::new(source),
            })
    }

    async fn send_u64(&mut self, op: &'static str, v: u64) -> Result<(), ServeError> {
        self.w.write_u64(v).await.map_err(|e| self.send_err(op, e))
    }

    async fn send_str(&mut self, op: &'static str, s: &str) -> Result<(), ServeError> {
        self.w.write_str(s).await.map_err(|e| self.send_err(op, e))
    }

    async fn send_paths(
        &mut self,
        op: &'static str,
        paths: &BTreeSet<StorePath>,
    ) -> Result<(), ServeError> {
        let shown: Vec<String> = paths.iter().map(|p| self.store_dir.display(p)).collect();
        self.w
            .write_strings(&shown)
            .await
            .map_err(|e| self.send_err(op, e))
    }

    async fn flush(&mut self, op: &'static str) -> Result<(), ServeError> {
        self.w.flush().await.map_err(|e| self.send_err(op, e))
    }

    async fn recv_u64(&mut self, op: &'static str) -> Result<u64, ServeError> {
        self.r.read_u64().await.map_err(|e| self.wire_err(op, e))
    }

    async fn recv_string(&mut self, op: &'static str, limit: u64) -> Result<String, ServeError> {
        self.r
            .read_string(limit)
            .await
            .map_err(|e| self.wire_err(op, e))
    }

    /// A `StorePathSet`: a count (at most `max_paths`), then absolute store paths.
    async fn recv_path_set(&mut self, op: &'static str) -> Result<BTreeSet<StorePath>, ServeError> {
        let at = self.r.offset();
        let n = self.recv_u64(op).await?;
        if n > self.limits.max_paths as u64 {
            return Err(self.wire_err(
                op,
                WireError::TooManyItems {
                    offset: at,
                    len: n,
                    limit: self.limits.max_paths as u64,
                },
            ));
        }
        let mut set = BTreeSet::new();
        for _ in 0..n {
            let at = self.r.offset();
            let s = self.recv_string(op, self.limits.max_path_len).await?;
            set.insert(self.parse_path(op, at, &s)?);
        }
        Ok(set)
    }
}

/// Reads into `buf` until it holds `limit` bytes or the stream ends or fails (the greeting:
/// whatever arrived is what the error shows).
async fn read_up_to<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, limit: usize) {
    let mut chunk = [0u8; 512];
    while buf.len() < limit {
        let want = (limit - buf.len()).min(chunk.len());
        let Some(dst) = chunk.get_mut(..want) else {
            return;
        };
        match r.read(dst).await {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(dst.get(..n).unwrap_or(&[])),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// What a bad greeting said, as text: the leading UTF-8 text up to the first byte that is
/// neither printable nor a line break or tab (a remote that echoes its input, like `cat`,
/// sends our binary handshake back after its banner), trailing whitespace trimmed.
fn banner_text(bytes: &[u8]) -> String {
    let valid = match std::str::from_utf8(bytes) {
        Ok(s) => s,
        // `valid_up_to` is a char boundary, so the slice is valid UTF-8.
        Err(e) => std::str::from_utf8(bytes.get(..e.valid_up_to()).unwrap_or(&[])).unwrap_or(""),
    };
    let end = valid
        .char_indices()
        .find(|(_, c)| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        .map_or(valid.len(), |(i, _)| i);
    let text = valid.get(..end).unwrap_or("").trim_end();
    if text.is_empty() {
        format!("{} bytes that are not text", bytes.len())
    } else if end < bytes.len() {
        format!(
            "{text}\n(then {} bytes that are not text)",
            bytes.len() - end
        )
    } else {
        text.to_owned()
    }
}

/// Messages from the NAR checking thread.
enum FromParser {
    /// The parser needs exactly this many more bytes for its current read.
    Need(usize),
    /// The parser finished: the NAR size, or why the NAR is bad.
    Done(Result<u64, NarReadError>),
}

/// The checking thread's `Read`: each read asks this task for bytes and waits for them.
struct Bridge {
    req: tokio::sync::mpsc::Sender<FromParser>,
    resp: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl io::Read for Bridge {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.buf.len() {
            // `WireReader::read_exact` asks for what it still needs, never more, so a request
            // for `out.len()` bytes (capped) never reads past the NAR.
            let want = out.len().min(CHUNK);
            let gone = || io::Error::other("the dump was cancelled");
            self.req
                .blocking_send(FromParser::Need(want))
                .map_err(|_| gone())?;
            self.buf = self.resp.recv().map_err(|_| gone())??;
            self.pos = 0;
        }
        let avail = self.buf.get(self.pos..).unwrap_or(&[]);
        let n = avail.len().min(out.len());
        if let (Some(dst), Some(src)) = (out.get_mut(..n), avail.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.pos += n;
        Ok(n)
    }
}

/// A visitor that accepts everything: the parser's own checks are the validation.
struct Discard;

impl NarVisitor for Discard {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes() {
        for (i, s) in STATUSES.iter().enumerate() {
            assert_eq!(BuildStatus::from_code(i as u64), *s);
            assert_eq!(s.code(), i as u64);
        }
        assert_eq!(BuildStatus::from_code(8), BuildStatus::TimedOut);
        assert_eq!(BuildStatus::from_code(99), BuildStatus::Unknown(99));
        assert_eq!(BuildStatus::Unknown(99).code(), 99);
        assert!(BuildStatus::Built.is_success());
        assert!(BuildStatus::ResolvesToAlreadyValid.is_success());
        assert!(!BuildStatus::PermanentFailure.is_success());
    }

    #[test]
    fn banners() {
        assert_eq!(banner_text(b"Welcome!\n"), "Welcome!");
        let mut echoed = b"motd\n".to_vec();
        echoed.extend_from_slice(&SERVE_MAGIC_1.to_le_bytes());
        assert_eq!(
            banner_text(&echoed),
            "motd\n(then 8 bytes that are not text)"
        );
        assert_eq!(banner_text(&[0xff, 0, 1]), "3 bytes that are not text");
        assert_eq!(banner_text("naïve\tok".as_bytes()), "naïve\tok");
    }

    #[test]
    fn ansi_is_stripped() {
        let r = BuildResult {
            status: BuildStatus::PermanentFailure,
            error_msg: "\u{1b}[0mbuilder for '\u{1b}[35;1m/s/x.drv\u{1b}[0m' failed".into(),
            times_built: 1,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            built_outputs: Vec::new(),
        };
        assert_eq!(r.plain_error_msg(), "builder for '/s/x.drv' failed");
    }

    // Malformed replies, from a scripted peer: one test per class of bad input.

    use crate::wire::WireWriter;
    use tokio::io::{DuplexStream, duplex};

    const P1: &str = "/s/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-one";
    const P2: &str = "/s/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-two";

    fn sd() -> StoreDir {
        StoreDir::new("/s").expect("store dir")
    }

    fn sp(p: &str) -> StorePath {
        sd().parse(p).expect("path")
    }

    /// The server's greeting followed by `body`.
    fn reply(version: u64, body: impl FnOnce(&mut WireWriter<Vec<u8>>)) -> Vec<u8> {
        let mut w = WireWriter::new(Vec::new());
        w.write_u64(SERVE_MAGIC_2).expect("write");
        w.write_u64(version).expect("write");
        body(&mut w);
        w.into_inner()
    }

    /// A client whose peer sends `bytes` and then end of input. The second value keeps the
    /// peer's reading end alive so the client's writes succeed.
    async fn scripted(
        bytes: Vec<u8>,
        limits: ServeLimits,
    ) -> (
        Result<ServeClient<DuplexStream, DuplexStream>, ServeError>,
        DuplexStream,
    ) {
        let (client_r, mut server_w) = duplex(bytes.len() + 64);
        let (client_w, server_r) = duplex(1 << 20);
        server_w.write_all(&bytes).await.expect("script");
        drop(server_w);
        let c =
            ServeClient::handshake_with_limits(client_r, client_w, sd(), "scripted", limits).await;
        (c, server_r)
    }

    fn one(p: &str) -> BTreeSet<StorePath> {
        BTreeSet::from([sp(p)])
    }

    #[tokio::test]
    async fn unsupported_versions() {
        for v in [0x104, 0x204, 0x307, 0x1_0207] {
            let (c, _peer) = scripted(reply(v, |_| {}), ServeLimits::default()).await;
            let e = c.err().expect("refused");
            assert!(
                matches!(e, ServeError::UnsupportedVersion { version, .. } if version == v),
                "{e}"
            );
        }
        // A newer 2.x server is fine, and we keep speaking 2.7.
        let (c, _peer) = scripted(reply(0x208, |_| {}), ServeLimits::default()).await;
        assert_eq!(c.expect("2.8 server").version(), 0x207);
    }

    #[tokio::test]
    async fn truncated_reply_names_the_offset() {
        let bytes = reply(0x207, |w| {
            w.write_u64(1).expect("count");
            w.write_u64(P1.len() as u64).expect("len");
        });
        let (c, _peer) = scripted(bytes, ServeLimits::default()).await;
        let mut c = c.expect("handshake");
        let e = c
            .query_valid_paths(false, false, &one(P1))
            .await
            .expect_err("truncated");
        // The version word is at offset 0, the count at 8, the string length at 16, and the
        // string body would start at 24.
        assert!(matches!(e, ServeError::Closed { offset: 24, .. }), "{e}");
        assert!(
            e.to_string().contains("query_valid_paths on 'scripted'"),
            "{e}"
        );
        // Nothing more is attempted on a broken connection.
        let e = c
            .query_valid_paths(false, false, &one(P1))
            .await
            .expect_err("broken");
        assert!(matches!(e, ServeError::Broken { .. }), "{e}");
    }

    #[tokio::test]
    async fn too_many_paths() {
        let bytes = reply(0x207, |w| w.write_u64(11).expect("count"));
        let limits = ServeLimits {
            max_paths: 10,
            ..ServeLimits::default()
        };
        let (c, _peer) = scripted(bytes, limits).await;
        let e = c
            .expect("handshake")
            .query_closure(false, &one(P1))
            .await
            .expect_err("too many");
        assert!(
            matches!(
                e,
                ServeError::Wire {
                    source: WireError::TooManyItems {
                        offset: 8,
                        len: 11,
                        limit: 10
                    },
                    ..
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn bad_store_path_in_reply() {
        let bytes = reply(0x207, |w| w.write_strings(["/elsewhere/x"]).expect("paths"));
        let (c, _peer) = scripted(bytes, ServeLimits::default()).await;
        let e = c
            .expect("handshake")
            .query_valid_paths(true, false, &one(P1))
            .await
            .expect_err("bad path");
        assert!(matches!(e, ServeError::BadPath { offset: 16, .. }), "{e}");
    }

    #[tokio::test]
    async fn unasked_path_in_reply() {
        let bytes = reply(0x207, |w| w.write_strings([P2]).expect("paths"));
        let (c, _peer) = scripted(bytes, ServeLimits::default()).await;
        let e = c
            .expect("handshake")
            .query_valid_paths(true, false, &one(P1))
            .await
            .expect_err("unasked");
        assert!(matches!(e, ServeError::BadReply { .. }), "{e}");
        assert!(e.to_string().contains("-two"), "{e}");
    }

    fn path_info_reply(hash: &str) -> Vec<u8> {
        reply(0x207, |w| {
            w.write_str(P1).expect("path");
            w.write_str("").expect("deriver");
            w.write_strings([P2]).expect("refs");
            w.write_u64(120).expect("download size");
            w.write_u64(120).expect("nar size");
            w.write_str(hash).expect("hash");
            w.write_str("").expect("ca");
            w.write_strings(["cache.example-1:c2ln"]).expect("sigs");
            w.write_str("").expect("end");
        })
    }

    #[tokio::test]
    async fn path_infos_decode_and_bad_hash() {
        let h = Hash::sha256_of(b"x");
        let (c, _peer) = scripted(
            path_info_reply(&h.to_nix32_prefixed()),
            ServeLimits::default(),
        )
        .await;
        let infos = c
            .expect("handshake")
            .query_path_infos(&one(P1))
            .await
            .expect("infos");
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].nar_hash, h);
        assert_eq!(infos[0].references, one(P2));
        assert_eq!(infos[0].sigs.len(), 1);

        let (c, _peer) = scripted(path_info_reply("sha256:nothex"), ServeLimits::default()).await;
        let e = c
            .expect("handshake")
            .query_path_infos(&one(P1))
            .await
            .expect_err("bad hash");
        assert!(matches!(e, ServeError::BadHash { .. }), "{e}");
        assert!(e.to_string().contains("sha256:nothex"), "{e}");
    }

    fn build_reply(n_outputs: u64) -> Vec<u8> {
        reply(0x207, |w| {
            w.write_u64(3).expect("status");
            w.write_str("it broke").expect("msg");
            for v in [1, 0, 10, 11] {
                w.write_u64(v).expect("times");
            }
            w.write_u64(n_outputs).expect("count");
        })
    }

    #[tokio::test]
    async fn build_result_and_bounded_built_outputs() {
        let drv = crate::derivation::BasicDerivation::default();
        let opts = BuildOptions::default();
        let (c, _peer) = scripted(build_reply(0), ServeLimits::default()).await;
        let r = c
            .expect("handshake")
            .build_derivation(&sp(P1), &drv, &opts)
            .await
            .expect("result");
        assert_eq!(r.status, BuildStatus::PermanentFailure);
        assert_eq!(
            (
                r.error_msg.as_str(),
                r.times_built,
                r.start_time,
                r.stop_time
            ),
            ("it broke", 1, 10, 11)
        );

        let limits = ServeLimits {
            max_built_outputs: 4,
            ..ServeLimits::default()
        };
        let (c, _peer) = scripted(build_reply(5), limits).await;
        let e = c
            .expect("handshake")
            .build_derivation(&sp(P1), &drv, &opts)
            .await
            .expect_err("too many");
        assert!(
            matches!(
                e,
                ServeError::Wire {
                    source: WireError::TooManyItems { len: 5, .. },
                    ..
                }
            ),
            "{e}"
        );
    }

    fn small_nar() -> Vec<u8> {
        let mut e = crate::nar::NarEncoder::new(Vec::new()).expect("nar");
        e.regular_bytes(false, b"contents").expect("file");
        e.finish().expect("finish").0
    }

    #[tokio::test]
    async fn dump_copies_exactly_the_nar() {
        let nar = small_nar();
        let mut bytes = reply(0x207, |_| {});
        bytes.extend_from_slice(&nar);
        // Whatever follows the NAR must stay unread for the next reply.
        bytes.extend_from_slice(&7u64.to_le_bytes());
        let (c, _peer) = scripted(bytes, ServeLimits::default()).await;
        let mut c = c.expect("handshake");
        let mut sink = Vec::new();
        let n = c.dump_store_path(&sp(P1), &mut sink).await.expect("dump");
        assert_eq!(sink, nar);
        assert_eq!(n, nar.len() as u64);
        assert_eq!(c.recv_u64("test").await.expect("next word"), 7);
    }

    #[tokio::test]
    async fn dump_rejects_a_bad_nar() {
        let mut nar = small_nar();
        // Corrupt the "type" keyword of the root node (magic 24 bytes, "(" 16 bytes).
        let at = 24 + 16 + 8;
        nar[at..at + 4].copy_from_slice(b"typo");
        let mut bytes = reply(0x207, |_| {});
        bytes.extend_from_slice(&nar);
        let (c, _peer) = scripted(bytes, ServeLimits::default()).await;
        let e = c
            .expect("handshake")
            .dump_store_path(&sp(P1), &mut Vec::new())
            .await
            .expect_err("bad NAR");
        assert!(
            matches!(&e, ServeError::Nar { source, .. } if source.offset() == 40),
            "{e}"
        );
        assert!(e.to_string().contains("dump_store_path of /s/"), "{e}");
    }

    #[tokio::test]
    async fn dump_of_a_truncated_nar() {
        let nar = small_nar();
        let mut bytes = reply(0x207, |_| {});
        bytes.extend_from_slice(&nar[..nar.len() - 16]);
        let (c, _peer) = scripted(bytes, ServeLimits::default()).await;
        let e = c
            .expect("handshake")
            .dump_store_path(&sp(P1), &mut Vec::new())
            .await
            .expect_err("truncated");
        assert!(matches!(e, ServeError::Closed { .. }), "{e}");
    }

    #[tokio::test]
    async fn dump_over_the_size_limit() {
        let nar = small_nar();
        let mut bytes = reply(0x207, |_| {});
        bytes.extend_from_slice(&nar);
        let limits = ServeLimits {
            max_nar_size: nar.len() as u64 - 1,
            ..ServeLimits::default()
        };
        let (c, _peer) = scripted(bytes, limits).await;
        let e = c
            .expect("handshake")
            .dump_store_path(&sp(P1), &mut Vec::new())
            .await
            .expect_err("too big");
        assert!(matches!(e, ServeError::NarTooLarge { .. }), "{e}");
    }

    fn info_of(size: u64, hash: Hash) -> PathInfo {
        PathInfo {
            path: sp(P1),
            deriver: None,
            references: BTreeSet::new(),
            nar_size: size,
            nar_hash: hash,
            ca: None,
            sigs: BTreeSet::new(),
        }
    }

    /// A NAR of one regular file of `len` zero bytes, as a NAR writer would produce it.
    fn zero_file_nar(len: usize) -> Vec<u8> {
        let mut e = crate::nar::NarEncoder::new(Vec::new()).expect("nar");
        e.regular_bytes(false, &vec![0u8; len]).expect("file");
        e.finish().expect("finish").0
    }

    async fn checked(
        bytes_after_greeting: &[u8],
        info: &PathInfo,
    ) -> (Result<Hash, ServeError>, Vec<u8>) {
        let mut bytes = reply(0x207, |_| {});
        bytes.extend_from_slice(bytes_after_greeting);
        let (c, _peer) = scripted(bytes, ServeLimits::default()).await;
        let mut sink = Vec::new();
        let r = c
            .expect("handshake")
            .dump_store_path_checked(info, &mut sink)
            .await;
        (r, sink)
    }

    /// Issue 12 item 5: the declared `narSize` bounds what is read (a builder that declared
    /// 4096 bytes and sent a 1 MiB NAR is stopped at 4096), a short NAR and a wrong hash
    /// fail, and a SHA-512 `narHash` is checked like a SHA-256 one (issue 12 item 10).
    #[tokio::test]
    async fn checked_dump_holds_the_remote_to_its_declaration() {
        let nar = small_nar();
        let n = nar.len() as u64;
        for algo in [HashAlgo::Sha256, HashAlgo::Sha512] {
            let (r, sink) = checked(&nar, &info_of(n, Hash::of(algo, &nar))).await;
            assert_eq!(r.expect("as declared"), Hash::sha256_of(&nar), "{algo:?}");
            assert_eq!(sink, nar);

            let wrong = Hash::of(algo, b"other bytes");
            let (r, _) = checked(&nar, &info_of(n, wrong)).await;
            let e = r.expect_err("wrong hash");
            assert!(
                matches!(e, ServeError::NarNotAsDeclared { .. }),
                "{algo:?}: {e}"
            );
            assert!(e.to_string().contains(algo.name()), "{e}");
        }

        let big = zero_file_nar(1 << 20);
        let (r, sink) = checked(&big, &info_of(4096, Hash::sha256_of(&big))).await;
        let e = r.expect_err("over the declared size");
        assert!(
            matches!(&e, ServeError::NarNotAsDeclared { detail, .. } if detail.contains("declared a NAR of 4096 bytes and sent more")),
            "{e}"
        );
        assert!(
            sink.len() <= 4096,
            "read {} bytes past the declaration",
            sink.len()
        );

        let (r, _) = checked(&nar, &info_of(n + 8, Hash::sha256_of(&nar))).await;
        let e = r.expect_err("short");
        assert!(e.to_string().contains(&format!("sent one of {n}")), "{e}");
    }

    #[test]
    fn built_output_name() {
        let b = BuiltOutput {
            id: "sha256:abcd!out".into(),
            realisation_json: "{}".into(),
        };
        assert_eq!(b.output_name(), Some("out"));
    }
}
