//! Which failures are worth retrying.
//!
//! A job that failed for a *transient* reason (a network error, a 5xx, a busy or restarting
//! nix-daemon, a full disk) is retried with back-off: the world changes on its own and the
//! job goes through. A *permanent* failure needs someone to act first (credentials the
//! target refuses, a target that does not accept uploads, a store path whose contents no
//! longer match its recorded hash): retrying it every few minutes only fills the logs, so the
//! job moves to the dead letters, where `status` shows it and `retry` puts it back once the
//! cause is fixed. A store path that is no longer in the store is a case of its own
//! ([`crate::queue::Outcome::Gone`]): there is nothing left to upload.
//!
//! Classification is by error variant, status code and `io::ErrorKind`, never by message
//! text: messages change between Nix and server versions, variants do not.

use crate::target::TargetError;
use crate::upload::PrepareError;
use ferry_nix::nar::NarWriteError;
use ferry_store::LocalError;
use std::io::ErrorKind;

/// Where a failure happened: the job's status and `status` report the two apart, because
/// the fix is on a different machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Side {
    /// Reading path infos or NARs from the local store, or the uploader's own work files.
    Local,
    /// Talking to an upload target.
    Target,
}

impl Side {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Side::Local => "local",
            Side::Target => "target",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Side> {
        match s {
            "local" => Some(Side::Local),
            "target" => Some(Side::Target),
            _ => None,
        }
    }
}

/// Permanent or transient, decided by the error's type.
pub(crate) trait Classify {
    /// Retrying without someone changing something first cannot succeed.
    fn is_permanent(&self) -> bool;

    #[cfg(test)]
    fn is_transient(&self) -> bool {
        !self.is_permanent()
    }
}

/// Local and `file://` I/O: only errors that say "this process may not do that here" are
/// permanent (as root, permissions rarely stop anything, but a read-only file system or a
/// cache directory that is a file does). A full disk is transient: space gets freed.
impl Classify for std::io::Error {
    fn is_permanent(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::PermissionDenied
                | ErrorKind::ReadOnlyFilesystem
                | ErrorKind::NotADirectory
                | ErrorKind::IsADirectory
                | ErrorKind::InvalidFilename
        )
    }
}

/// HTTP status codes that a retry cannot change: the request itself is refused (auth,
/// method, size, a bucket that does not exist). 408, 425 and 429 say "later", 409 is S3's
/// `OperationAborted` on a concurrent change, and every 5xx is the server's own trouble.
pub(crate) fn status_is_permanent(status: u16, s3_code: Option<&str>) -> bool {
    // A clock out of step is fixed by NTP, not by a person; expired temporary credentials
    // are renewed by whatever issued them.
    if matches!(
        s3_code,
        Some("RequestTimeTooSkewed" | "ExpiredToken" | "SlowDown" | "InternalError")
    ) {
        return false;
    }
    match status {
        408 | 409 | 425 | 429 => false,
        400..=499 => true,
        // 501: the server does not implement PUT at all; 505: not our HTTP version.
        501 | 505 => true,
        _ => false,
    }
}

impl Classify for TargetError {
    fn is_permanent(&self) -> bool {
        match self {
            TargetError::BadUrl(_)
            | TargetError::BadParam { .. }
            | TargetError::S3Url { .. }
            | TargetError::Credentials { .. }
            | TargetError::StoreDirMismatch { .. } => true,
            TargetError::Io { source, .. } => source.is_permanent(),
            TargetError::Status { status, code, .. } => {
                status_is_permanent(*status, code.as_deref())
            }
            // Refused, reset, timed out, DNS: the network comes back.
            TargetError::Network { .. } => false,
        }
    }
}

/// NAR serialisation from the store's files: contents Nix could never have stored (a name or
/// symlink target a NAR cannot hold, a fifo) stay that way; read errors and a file changing
/// under the dump do not.
impl Classify for NarWriteError {
    fn is_permanent(&self) -> bool {
        match self {
            NarWriteError::InvalidName { .. }
            | NarWriteError::Unsorted { .. }
            | NarWriteError::TooDeep { .. }
            | NarWriteError::BadTarget { .. }
            | NarWriteError::UnsupportedType { .. } => true,
            NarWriteError::Read { source, .. } | NarWriteError::ContentsRead { source, .. } => {
                source.is_permanent()
            }
            _ => false,
        }
    }
}

impl Classify for PrepareError {
    fn is_permanent(&self) -> bool {
        match self {
            // The store holds something else than it recorded: `nix-store --verify
            // --check-contents --repair` or a rebuild must come first.
            PrepareError::Mismatch { .. } => true,
            PrepareError::Info { .. } => true,
            PrepareError::Dump { source, .. } => source.is_permanent(),
            // The uploader's own work directory (full disk, …): transient.
            PrepareError::WorkFile { .. } | PrepareError::Compress { .. } => false,
        }
    }
}

/// The local store, through Nix's tools (`ferry_store`).
impl Classify for LocalError {
    fn is_permanent(&self) -> bool {
        match self {
            // A store path or derivation that does not parse, or a reference cycle, is the
            // same on every attempt.
            LocalError::BadPath(_) | LocalError::Cycle { .. } => true,
            LocalError::Derivation { source, .. } => match source.as_ref() {
                ferry_nix::derivation::DerivationError::Io { source, .. } => source.is_permanent(),
                _ => true,
            },
            LocalError::RegisteredHashMismatch { .. } => true,
            // Callers check this first and treat the job as gone from the store; anywhere
            // else an invalid path stays invalid.
            LocalError::NotValid { .. } => true,
            // `nix` could not be started, exited non-zero (daemon down or restarting, database
            // busy), or printed path info this version of Ferry cannot read. The last is fixed
            // by upgrading Ferry or Nix, and both restart the uploader, which then finds the
            // job still queued: no one has to remember to run `retry`.
            LocalError::Spawn { .. }
            | LocalError::Failed { .. }
            | LocalError::BadInfo { .. }
            | LocalError::BadJson(_)
            | LocalError::BadOutput { .. }
            | LocalError::NarRead { .. } => false,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn status(status: u16, code: Option<&str>) -> TargetError {
        TargetError::Status {
            target: "http://c".into(),
            method: "PUT",
            key: "x.narinfo".into(),
            status,
            code: code.map(str::to_owned),
            retry_after: None,
        }
    }

    #[test]
    fn http_status_codes() {
        for s in [400, 401, 403, 404, 405, 411, 413, 501] {
            assert!(status(s, None).is_permanent(), "{s}");
        }
        for s in [408, 409, 425, 429, 500, 502, 503, 504, 507] {
            assert!(status(s, None).is_transient(), "{s}");
        }
        assert!(status(403, Some("SignatureDoesNotMatch")).is_permanent());
        assert!(status(403, Some("AccessDenied")).is_permanent());
        assert!(status(404, Some("NoSuchBucket")).is_permanent());
        assert!(status(403, Some("RequestTimeTooSkewed")).is_transient());
        assert!(status(400, Some("ExpiredToken")).is_transient());
        assert!(status(503, Some("SlowDown")).is_transient());
    }

    #[test]
    fn target_errors() {
        let io_err = |kind| TargetError::Io {
            target: "file:///c".into(),
            path: "/c/x".into(),
            source: io::Error::from(kind),
        };
        assert!(io_err(ErrorKind::PermissionDenied).is_permanent());
        assert!(io_err(ErrorKind::ReadOnlyFilesystem).is_permanent());
        assert!(io_err(ErrorKind::NotADirectory).is_permanent());
        assert!(io_err(ErrorKind::StorageFull).is_transient());
        assert!(io_err(ErrorKind::QuotaExceeded).is_transient());
        assert!(io_err(ErrorKind::Interrupted).is_transient());
        let net = TargetError::Network {
            target: "http://c".into(),
            method: "PUT",
            key: "k".into(),
            message: "connection refused".into(),
        };
        assert!(net.is_transient());
        let mismatch = TargetError::StoreDirMismatch {
            target: "file:///c".into(),
            found: "/other".into(),
            want: "/nix/store".into(),
        };
        assert!(mismatch.is_permanent());
    }

    #[test]
    fn local_errors() {
        let failed = LocalError::Failed {
            command: "nix path-info --json -r".into(),
            status: "exit status: 1".into(),
            stderr: "error: cannot connect to socket".into(),
        };
        assert!(failed.is_transient());
        assert!(LocalError::BadJson("an entry without \"path\"".into()).is_transient());
        let lines = LocalError::BadOutput {
            command: "nix-store -q --hash".into(),
            problem: "printed 1 lines for 2 paths".into(),
        };
        assert!(lines.is_transient());
        let spawn = LocalError::Spawn {
            program: "nix".into(),
            source: io::Error::from(ErrorKind::NotFound),
        };
        assert!(spawn.is_transient());
        assert!(
            LocalError::Cycle {
                paths: vec!["a".into()]
            }
            .is_permanent()
        );
        let bad_drv = LocalError::Derivation {
            path: "/nix/store/x.drv".into(),
            source: Box::new(ferry_nix::derivation::DerivationError::NotUtf8 { offset: 3 }),
        };
        assert!(bad_drv.is_permanent());
        let unreadable_drv = LocalError::Derivation {
            path: "/nix/store/x.drv".into(),
            source: Box::new(ferry_nix::derivation::DerivationError::Io {
                offset: 0,
                source: io::Error::from(ErrorKind::Interrupted),
            }),
        };
        assert!(unreadable_drv.is_transient());
    }

    #[test]
    fn prepare_errors() {
        let mismatch = PrepareError::Mismatch {
            path: "/nix/store/x".into(),
            got: "sha256:a".into(),
            got_size: 1,
            want: "sha256:b".into(),
            want_size: 1,
        };
        assert!(mismatch.is_permanent());
        let full = PrepareError::WorkFile {
            path: "/var/lib/ferry/work/x.nar".into(),
            source: io::Error::from(ErrorKind::StorageFull),
        };
        assert!(full.is_transient());
        let fifo = PrepareError::Dump {
            path: "/nix/store/x".into(),
            source: NarWriteError::UnsupportedType {
                path: "/nix/store/x/p".into(),
                kind: "fifo",
            },
        };
        assert!(fifo.is_permanent());
        let changed = PrepareError::Dump {
            path: "/nix/store/x".into(),
            source: NarWriteError::Read {
                path: "/nix/store/x".into(),
                source: io::Error::from(ErrorKind::Interrupted),
            },
        };
        assert!(changed.is_transient());
    }
}
