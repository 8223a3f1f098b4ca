//! What a failure after the accept says about retrying it.
//!
//! After `# accept` the daemon can no longer build the derivation elsewhere, so the hook
//! itself decides whether to try again (docs/hook-protocol.md §7.5). Some builder errors pass on
//! their own within moments — the builder's SQLite database was busy, a connection was
//! reset, sshd turned a login away at its `MaxStartups` limit — and a second attempt on the
//! same builder, or on the next one, succeeds. Others would fail again the same way (a key
//! refused, Nix missing, a disk full, the build itself failing). Retries are bounded
//! ([`RETRIES`], [`backoff`]), so a builder that keeps failing costs seconds, not minutes.
//!
//! Texts are matched as Nix and OpenSSH print them:
//! - `SQLite database '…' is busy` and `… is busy (SQLITE_PROTOCOL)`: Nix's `SQLiteBusy`,
//!   thrown where a statement is not wrapped in `retrySQLite`
//!   (<https://github.com/NixOS/nix/blob/2.8.0/src/libstore/sqlite.cc#L19-L23>,
//!   <https://github.com/NixOS/nix/blob/2.34.0/src/libstore/sqlite.cc#L49>); SQLite's own
//!   `database is locked`;
//! - `Connection reset by peer` (the network or the builder's kernel reset the connection;
//!   not `Broken pipe`, which only says that the other process is gone), and OpenSSH's `kex_exchange_identification: Connection closed by remote host` /
//!   `Connection closed by <addr> port <port>` before authentication (`MaxStartups`);
//! - `Resource temporarily unavailable` (a `fork` or socket that hit a passing limit).

use crate::remote::{RemoteError, is_local_side};
use ferry_nix::serve::ServeError;
use std::time::Duration;

/// Extra attempts after a transient failure, per hook process (so per derivation).
pub(crate) const RETRIES: u32 = 3;

/// How to handle a failure after the accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Likely to pass within moments: try again after [`backoff`], on the same builder
    /// once, then on another. Not held against the builder's health.
    Transient(Transient),
    /// The builder or the link is broken: record it down; before the build started another
    /// builder may take over.
    Builder,
    /// The build failed, or something on this host did: no retry.
    Final,
}

/// Why a failure is taken as transient (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transient {
    DatabaseBusy,
    ConnectionReset,
    LoginThrottled,
    ResourceBusy,
}

impl Transient {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Transient::DatabaseBusy => "the builder's Nix database was busy",
            Transient::ConnectionReset => "the connection was reset",
            Transient::LoginThrottled => "the builder's sshd turned the login away for now",
            Transient::ResourceBusy => "a resource on the builder was temporarily unavailable",
        }
    }
}

/// Texts that mean retrying cannot help, checked first: a transient-looking line next to
/// one of these (say, a reset after `Permission denied`) is not transient.
const PERMANENT: &[&str] = &[
    "Permission denied",
    "Host key verification failed",
    "REMOTE HOST IDENTIFICATION HAS CHANGED",
    "command not found",
    "No space left on device",
    "Could not resolve hostname",
    "lacks a signature by a trusted key",
    "not privileged",
];

/// The transient cause named in an error text (the error and the remote stderr), if any.
pub(crate) fn transient_in(text: &str) -> Option<Transient> {
    if PERMANENT.iter().any(|p| text.contains(p)) {
        return None;
    }
    if (text.contains("SQLite database") && text.contains("is busy"))
        || text.contains("database is locked")
    {
        return Some(Transient::DatabaseBusy);
    }
    if text.contains("Connection reset by peer") {
        return Some(Transient::ConnectionReset);
    }
    if text.contains("kex_exchange_identification")
        || text.contains("ssh_exchange_identification")
        || text.contains("Connection closed by remote host")
    {
        return Some(Transient::LoginThrottled);
    }
    if text.contains("Resource temporarily unavailable") {
        return Some(Transient::ResourceBusy);
    }
    None
}

/// The one classification of a failure after the accept: transient (retry), the builder's
/// (counts against its health; before the build starts another builder may take over), or
/// final. Classifies `e`, with `remote_stderr` (what the builder's side printed, often the only
/// place the cause is named: the serve protocol has no error replies outside build
/// results). Transient causes are looked for in what the builder said (its stderr, a build
/// result's message, a handshake error's captured stderr) and in the kind of a socket error,
/// never in Ferry's own wording: a write that fails with `EPIPE` only says the remote
/// process is gone, for whatever reason.
pub(crate) fn classify(e: &RemoteError, remote_stderr: &str) -> Fault {
    match e {
        // A remote build that ran and failed is the derivation's business, unless Nix on
        // the builder says it could not even record it (a busy database).
        RemoteError::BuildFailed { message, .. } => match transient_in(message) {
            Some(t) => Fault::Transient(t),
            None => Fault::Final,
        },
        // Errors about our side of the exchange: what we sent or where we wrote.
        RemoteError::Serve(s) if is_local_side(s) => Fault::Final,
        // The builder's or the link's: it did not speak the protocol, or the connection
        // broke.
        RemoteError::Serve(s) => {
            if let Some(t) = transient_in(remote_stderr) {
                return Fault::Transient(t);
            }
            let reset = matches!(s.as_ref(), ServeError::Send { source, .. }
                if source.kind() == std::io::ErrorKind::ConnectionReset);
            if reset && !PERMANENT.iter().any(|p| remote_stderr.contains(p)) {
                return Fault::Transient(Transient::ConnectionReset);
            }
            Fault::Builder
        }
        // These carry the builder's stderr in their message.
        RemoteError::Handshake { .. } | RemoteError::CommandNotFound { .. } => {
            match transient_in(&format!("{e}\n{remote_stderr}")) {
                Some(t) => Fault::Transient(t),
                None => Fault::Builder,
            }
        }
        RemoteError::Timeout { .. } => Fault::Builder,
        RemoteError::Local(_)
        | RemoteError::MissingOutput { .. }
        | RemoteError::Derivation { .. }
        | RemoteError::BadPath(_) => Fault::Final,
    }
}

/// The pause before retry number `n` (1-based): 250 ms, doubled each time, at most 2 s.
/// Long enough for a busy database's writer to finish or sshd to accept again, short
/// against a build.
pub(crate) fn backoff(n: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << n.saturating_sub(1).min(3)))
        .min(Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_nix::serve::BuildStatus;

    fn closed(op: &'static str) -> RemoteError {
        RemoteError::Serve(Box::new(ServeError::Closed {
            op,
            remote: "ssh://b".into(),
            offset: 8,
        }))
    }

    fn build_failed(status: BuildStatus, message: &str) -> RemoteError {
        RemoteError::BuildFailed {
            drv: "/nix/store/x.drv".into(),
            machine: "ssh://b".into(),
            status,
            message: message.into(),
        }
    }

    #[test]
    fn real_nix_and_openssh_texts() {
        for (text, want) in [
            // Nix 2.8 and 2.34 `SQLiteBusy`, as `nix-store --serve` prints it before exiting.
            (
                "error: SQLite database '/nix/var/nix/db/db.sqlite' is busy",
                Some(Transient::DatabaseBusy),
            ),
            (
                "error: SQLite database '/nix/var/nix/db/db.sqlite' is busy (SQLITE_PROTOCOL)",
                Some(Transient::DatabaseBusy),
            ),
            (
                "error: executing SQLite statement 'insert into ValidPaths …': database is locked",
                Some(Transient::DatabaseBusy),
            ),
            // The remote process is gone: that says nothing about why.
            ("error: writing to file: Broken pipe", None),
            (
                "client_loop: send disconnect: Connection reset by peer",
                Some(Transient::ConnectionReset),
            ),
            (
                "kex_exchange_identification: read: Connection reset by peer",
                Some(Transient::ConnectionReset),
            ),
            (
                "kex_exchange_identification: Connection closed by remote host\r\nConnection closed by 10.64.1.11 port 22",
                Some(Transient::LoginThrottled),
            ),
            (
                "error: cannot fork: Resource temporarily unavailable",
                Some(Transient::ResourceBusy),
            ),
            // Permanent, even next to a reset.
            ("root@10.64.1.11: Permission denied (publickey).", None),
            ("Host key verification failed.", None),
            ("bash: line 1: nix-store: command not found", None),
            ("error: writing to file: No space left on device", None),
            (
                "error: cannot add path '/nix/store/abc-x' because it lacks a signature by a trusted key",
                None,
            ),
            (
                "ssh: connect to host 10.64.1.11 port 22: Connection refused",
                None,
            ),
            (
                "ssh: Could not resolve hostname builder: Name or service not known",
                None,
            ),
            (
                "Permission denied (publickey).\r\nConnection reset by peer",
                None,
            ),
            ("error: unexpected end-of-file", None),
        ] {
            assert_eq!(transient_in(text), want, "{text}");
        }
    }

    #[test]
    fn errors_with_their_remote_stderr() {
        let busy = "error: SQLite database '/nix/var/nix/db/db.sqlite' is busy";
        // The builder's serve process exited mid-upload because its database was busy.
        assert_eq!(
            classify(&closed("add_to_store_nar"), busy),
            Fault::Transient(Transient::DatabaseBusy)
        );
        // Closed with no reason given: the builder is broken (record it, fail over).
        assert_eq!(classify(&closed("add_to_store_nar"), ""), Fault::Builder);
        assert_eq!(
            classify(
                &closed("query_valid_paths"),
                "bash: nix-store: command not found"
            ),
            Fault::Builder
        );
        // A reset while sending.
        let reset = RemoteError::Serve(Box::new(ServeError::Send {
            op: "add_to_store_nar",
            remote: "ssh://b".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        }));
        assert_eq!(
            classify(&reset, ""),
            Fault::Transient(Transient::ConnectionReset)
        );
        // Build results: a failing build is final; a busy database while registering is not.
        assert_eq!(
            classify(
                &build_failed(
                    BuildStatus::PermanentFailure,
                    "builder for 'x' failed with exit code 1"
                ),
                ""
            ),
            Fault::Final
        );
        assert_eq!(
            classify(&build_failed(BuildStatus::MiscFailure, busy), ""),
            Fault::Transient(Transient::DatabaseBusy)
        );
        // A time-out is the builder's, and not retried on it.
        let timeout = RemoteError::Timeout {
            machine: "ssh://b".into(),
            op: "build_derivation",
            what: "no output",
            after: Duration::from_secs(5),
        };
        assert_eq!(classify(&timeout, busy), Fault::Builder);
    }

    #[test]
    fn backoff_is_short_and_bounded() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(1));
        assert_eq!(backoff(9), Duration::from_secs(2));
    }
}
