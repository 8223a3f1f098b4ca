//! One remote build over the serve protocol (docs/hook-protocol.md §3, §4.6), the way the stock
//! hook does it on Nix 2.8 (`src/build-remote/build-remote.cc`): copy the missing part of the
//! input closure to the builder (`QueryValidPaths`, then `AddToStoreNar` per path in
//! dependency order), build the derivation sent as a `BasicDerivation` (`BuildDerivation`; the
//! `.drv` files are never copied), then fetch the missing outputs (`QueryPathInfos`,
//! `DumpStorePath`) and import them locally.
//!
//! The protocol itself is [`ferry_nix::serve::ServeClient`]. It owns no timer, so every call
//! made here runs under a [`Limit`](limit::Limit): a half-open connection would otherwise block a read
//! forever (NixOS/nix#16437), and after the accept nothing else stops the hook (the daemon
//! does not apply `timeout` or `max-silent-time` to hooks, docs/hook-protocol.md §3.2).
//!
//! This module holds the job, its errors and the two steps ([`upload`], [`build_and_fetch`]);
//! `connection` the serve session and its operations, `limit` the timers they run under.

use ferry_nix::derivation::{Derivation, OutputKind};
use ferry_nix::path_info::topo_sort;
pub(crate) use ferry_nix::serve::BuildOptions;
use ferry_nix::serve::{BuildStatus, PathInfo, ServeError};
use ferry_nix::store_path::{StoreDir, StorePath, StorePathError};
use ferry_store::{AnyImporter, LocalError, LocalStore};
use std::collections::BTreeSet;
use std::time::Duration;
use thiserror::Error;

mod connection;
mod limit;

pub(crate) use connection::{Connection, is_local_side, open};

#[derive(Debug, Error)]
#[non_exhaustive]
pub(crate) enum RemoteError {
    /// The remote shell could not run the serve command: Nix is missing there, or not on
    /// the PATH of a non-interactive login, or `remote-program` is wrong.
    #[error(
        "the remote command {program} was not found on '{machine}' (is Nix installed there and \
         on the PATH of non-interactive ssh logins, or is remote-program wrong?); remote \
         stderr: {stderr}"
    )]
    CommandNotFound {
        machine: String,
        program: String,
        stderr: String,
    },
    #[error("{source}{}", stderr_suffix(.stderr))]
    Handshake {
        machine: String,
        #[source]
        source: Box<ServeError>,
        stderr: String,
    },
    #[error(transparent)]
    Serve(Box<ServeError>),
    #[error("{op} on '{machine}': {what} {after:?}; the connection is given up")]
    Timeout {
        machine: String,
        op: &'static str,
        what: &'static str,
        after: Duration,
    },
    #[error("local store: {0}")]
    Local(#[from] LocalError),
    #[error("build of '{drv}' on '{machine}' failed: {message}")]
    BuildFailed {
        drv: String,
        machine: String,
        status: BuildStatus,
        message: String,
    },
    #[error("'{machine}' did not produce output {path} of '{drv}'")]
    MissingOutput {
        machine: String,
        drv: String,
        path: String,
    },
    #[error("the derivation '{drv}': {problem}")]
    Derivation { drv: String, problem: String },
    #[error("a path from the daemon: {0}")]
    BadPath(#[from] StorePathError),
}

impl From<ServeError> for RemoteError {
    fn from(e: ServeError) -> Self {
        RemoteError::Serve(Box::new(e))
    }
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!("; remote stderr: {stderr}")
    }
}

// Whether to retry a `RemoteError`, and whose fault it is: `crate::fault::classify`.
impl RemoteError {
    /// The hook's exit status for this failure (docs/hook-protocol.md §1.8): 101 → `TimedOut`,
    /// 100 → permanent failure on Nix ≤ 2.28; any other non-zero is `MiscFailure`.
    pub(crate) fn exit_code(&self) -> i32 {
        match self {
            RemoteError::BuildFailed { status, .. } => match status {
                BuildStatus::TimedOut => 101,
                BuildStatus::PermanentFailure | BuildStatus::OutputRejected => 100,
                _ => 1,
            },
            _ => 1,
        }
    }
}

/// Everything one remote build needs.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) drv_path: StorePath,
    /// The input closure from the daemon (`inputSrcs` plus the outputs of the input
    /// derivations, and their closures; not the `.drv`).
    pub(crate) inputs: BTreeSet<StorePath>,
    pub(crate) wanted_outputs: BTreeSet<String>,
    pub(crate) options: BuildOptions,
    /// `builders-use-substitutes`: let the builder substitute missing inputs first.
    pub(crate) use_substitutes: bool,
}

impl Job {
    /// A job from the daemon's strings (the `try` message and what follows the accept).
    pub(crate) fn new(
        store_dir: &StoreDir,
        drv_path: &str,
        inputs: &BTreeSet<String>,
        wanted_outputs: BTreeSet<String>,
        options: BuildOptions,
        use_substitutes: bool,
    ) -> Result<Job, RemoteError> {
        Ok(Job {
            drv_path: store_dir.parse(drv_path)?,
            inputs: inputs
                .iter()
                .map(|p| store_dir.parse(p))
                .collect::<Result<_, _>>()?,
            wanted_outputs,
            options,
            use_substitutes,
        })
    }
}

/// Progress callbacks, so the caller can report through `@nix` messages.
pub(crate) trait Progress {
    fn message(&self, text: &str);
}

/// What a copy moved, for the builder's measured transfer rate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Transfer {
    pub(crate) bytes: u64,
    pub(crate) secs: f64,
}

/// Step one of a remote build (docs/hook-protocol.md §4.6): copy the input closure to the
/// builder, as far as it lacks it. Failures here happen before the build starts, so the
/// caller may retry on another builder.
pub(crate) async fn upload(
    conn: &mut Connection,
    job: &Job,
    local: &LocalStore,
    progress: &dyn Progress,
    upload_lock: Option<crate::slots::HeldLock>,
) -> Result<Transfer, RemoteError> {
    let start = std::time::Instant::now();
    // The daemon's set is already closed under references; asking for the closure costs
    // nothing extra (one `nix path-info` either way) and guards against a partial set.
    let closure = local.closure_infos(&job.inputs).await?;
    let all: BTreeSet<StorePath> = closure.iter().map(|i| i.path.clone()).collect();
    let valid = conn
        .query_valid_paths(&all, true, job.use_substitutes)
        .await?;
    let missing: Vec<PathInfo> = closure
        .into_iter()
        .filter(|i| !valid.contains(&i.path))
        .collect();
    let missing = topo_sort(missing).map_err(LocalError::from)?;
    if !missing.is_empty() {
        progress.message(&format!(
            "copying {} paths to '{}'",
            missing.len(),
            conn.machine()
        ));
    }
    let mut bytes = 0;
    for info in &missing {
        conn.add_to_store_nar(info, local).await?;
        bytes += info.nar_size;
    }
    // Uploads are serialised per builder; the build itself is not.
    drop(upload_lock);
    Ok(Transfer {
        bytes,
        secs: start.elapsed().as_secs_f64(),
    })
}

/// The store paths of the wanted outputs. Outputs whose path is not known before the
/// build (floating content-addressed, impure) are not supported.
pub(crate) fn wanted_output_paths(
    job: &Job,
    drv: &Derivation,
) -> Result<BTreeSet<StorePath>, RemoteError> {
    let mut wanted = BTreeSet::new();
    for name in &job.wanted_outputs {
        let problem = |p: String| RemoteError::Derivation {
            drv: job.drv_path.to_string(),
            problem: p,
        };
        let out = drv
            .outputs
            .get(name)
            .ok_or_else(|| problem(format!("it has no output '{name}'")))?;
        match (&out.path, out.kind()) {
            (Some(p), OutputKind::InputAddressed | OutputKind::FixedCa) => {
                wanted.insert(p.clone());
            }
            (_, kind) => {
                return Err(problem(format!(
                    "output '{name}' is {kind:?}: only outputs with known paths can be built remotely by Ferry"
                )));
            }
        }
    }
    Ok(wanted)
}

/// Step two: build, fetch the missing outputs and import them. Returns the build time and
/// what was fetched. Each NAR streams from the builder into the importer: the fetch time
/// includes the local import.
pub(crate) async fn build_and_fetch(
    conn: &mut Connection,
    job: &Job,
    drv: &Derivation,
    importer: &AnyImporter,
) -> Result<(f64, Transfer), RemoteError> {
    let wanted = wanted_output_paths(job, drv)?;
    let start = std::time::Instant::now();
    conn.build_derivation(job, drv).await?;
    let build_secs = start.elapsed().as_secs_f64();

    let fetch_start = std::time::Instant::now();
    let infos = conn.query_path_infos(&wanted).await?;
    for p in &wanted {
        if !infos.iter().any(|i| &i.path == p) {
            return Err(RemoteError::MissingOutput {
                machine: conn.machine().to_owned(),
                drv: job.drv_path.to_string(),
                path: conn.store_dir().display(p),
            });
        }
    }
    let infos = topo_sort(infos).map_err(LocalError::from)?;
    let mut batch = importer.begin(&infos).await?;
    let mut bytes = 0;
    for info in &infos {
        if !batch.needs(&info.path) {
            continue;
        }
        if let Err(e) = conn.dump_store_path(info, &mut batch).await {
            // A write into the local tool failed: the tool says why (a full disk, …).
            let local_side = matches!(&e, RemoteError::Local(_))
                || matches!(&e, RemoteError::Serve(s) if matches!(**s, ServeError::Sink { .. }));
            let tool = batch.abort().await;
            return Err(match tool {
                Some(t) if local_side => t.into(),
                _ => e,
            });
        }
        bytes += info.nar_size;
    }
    batch.commit().await?;
    Ok((
        build_secs,
        Transfer {
            bytes,
            secs: fetch_start.elapsed().as_secs_f64(),
        },
    ))
}

#[cfg(test)]
mod tests;
