//! Why the hook gives up on a `try` or on a build, and what it tells the daemon then: the
//! one place where an error becomes a log line, a reply and an exit status.

use super::Logger;
use crate::delegate::DelegateError;
use crate::protocol::{ProtocolError, Reply, Verbosity};
use crate::remote::RemoteError;
use crate::slots::SlotError;
use ferry_nix::machines::MachinesError;
use ferry_store::LocalError;
use thiserror::Error;

/// An error that ends the handling of one `try` (before a reply) or of the hook process.
#[derive(Debug, Error)]
pub(crate) enum HookError {
    /// The command line, the settings stream, a request or what follows the accept.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The `builders` setting or the machines file.
    #[error(transparent)]
    Machines(#[from] MachinesError),
    /// The slot locks under `current-load`.
    #[error(transparent)]
    Slots(#[from] SlotError),
    /// Only non-`ssh://` builders fit, and the stock hook could not be started for them.
    #[error("cannot build '{drv}' on {machines}: {source}")]
    Delegate {
        drv: String,
        /// The builders' store URIs, comma-separated.
        machines: String,
        #[source]
        source: DelegateError,
    },
    /// Reading the derivation after the accept.
    #[error(transparent)]
    Local(#[from] LocalError),
    /// The build after the accept: copying, building, fetching or importing (what is left
    /// after retries and failover).
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

impl HookError {
    /// Whether the hook keeps answering after this error. Before the accept a failure
    /// declines the derivation (`None`): the daemon can still build it elsewhere. A broken
    /// stream, or any failure after the accept, ends the process with the status the daemon
    /// maps to the build's result (docs/hook-protocol.md §1.8).
    pub(crate) fn exit_status(&self) -> Option<i32> {
        match self {
            HookError::Machines(_) | HookError::Slots(_) | HookError::Delegate { .. } => None,
            HookError::Protocol(_) | HookError::Local(_) => Some(1),
            HookError::Remote(e) => Some(e.exit_code()),
        }
    }

    /// Says what went wrong (one `@nix` error message, shown to the client), replies
    /// `# decline` if the hook keeps answering, and returns [`exit_status`](Self::exit_status).
    pub(crate) fn report(&self, logger: &Logger) -> Option<i32> {
        logger.log(Verbosity::ERROR, format!("ferry-build-hook: {self}"));
        let status = self.exit_status();
        if status.is_none() {
            logger.reply(&Reply::Decline);
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_nix::serve::BuildStatus;

    #[test]
    fn failures_before_the_accept_decline_and_after_it_exit() {
        let slots = HookError::Slots(SlotError::Lock {
            path: "/x/main-lock".into(),
            source: std::io::Error::other("no"),
        });
        assert_eq!(slots.exit_status(), None);
        let timed_out = HookError::Remote(RemoteError::BuildFailed {
            drv: "d".into(),
            machine: "m".into(),
            status: BuildStatus::TimedOut,
            message: "x".into(),
        });
        assert_eq!(timed_out.exit_status(), Some(101));
        let args = HookError::Protocol(ProtocolError::BadVerbosity { arg: "x".into() });
        assert_eq!(args.exit_status(), Some(1));
    }
}
