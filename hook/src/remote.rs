//! One remote build over the serve protocol (docs/hook-protocol.md §3, §4.6), the way the stock
//! hook does it on Nix 2.8 (`src/build-remote/build-remote.cc`): copy the missing part of the
//! input closure to the builder (`QueryValidPaths`, then `AddToStoreNar` per path in
//! dependency order), build the derivation sent as a `BasicDerivation` (`BuildDerivation`; the
//! `.drv` files are never copied), then fetch the missing outputs (`QueryPathInfos`,
//! `DumpStorePath`) and import them locally.
//!
//! The protocol itself is [`ferry_nix::serve::ServeClient`]. It owns no timer, so every call
//! made here runs under a [`Limit`]: a half-open connection would otherwise block a read
//! forever (NixOS/nix#16437), and after the accept nothing else stops the hook (the daemon
//! does not apply `timeout` or `max-silent-time` to hooks, docs/hook-protocol.md §3.2).

use crate::ssh::{LogTap, ProcessGuard, Session};
use ferry_nix::derivation::{Derivation, OutputKind};
use ferry_nix::path_info::topo_sort;
pub use ferry_nix::serve::BuildOptions;
use ferry_nix::serve::{BuildStatus, PathInfo, ServeClient, ServeError};
use ferry_nix::store_path::{StoreDir, StorePath, StorePathError};
use ferry_nix::store_uri::StoreUri;
use ferry_store::{AnyImporter, ImportBatch, LocalError, LocalStore, store_dir_from_env};
use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RemoteError {
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
    pub fn exit_code(&self) -> i32 {
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
pub struct Job {
    pub drv_path: StorePath,
    /// The input closure from the daemon (`inputSrcs` plus the outputs of the input
    /// derivations, and their closures; not the `.drv`).
    pub inputs: BTreeSet<StorePath>,
    pub wanted_outputs: BTreeSet<String>,
    pub options: BuildOptions,
    /// `builders-use-substitutes`: let the builder substitute missing inputs first.
    pub use_substitutes: bool,
}

impl Job {
    /// A job from the daemon's strings (the `try` message and what follows the accept).
    pub fn new(
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

/// When a serve call is given up. `ServeClient` has no timers; these are the hook's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limit {
    /// The whole call.
    pub total: Option<Duration>,
    /// Nothing moved on the connection (either direction, or the remote log) for this long.
    pub idle: Option<Duration>,
}

/// The limits a connection applies to its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Queries (`QueryValidPaths` without substitution, `QueryPathInfos`): the remote
    /// answers from its database, in milliseconds on a live connection.
    pub query: Duration,
    /// NAR transfers: no byte moved for this long. Not a total, so a large closure over a
    /// slow link is fine as long as it moves.
    pub idle: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            query: Duration::from_secs(60),
            idle: Duration::from_secs(120),
        }
    }
}

impl Deadlines {
    /// `BuildDerivation`: the remote enforces `timeout` and `max-silent-time` itself and
    /// then answers, so the hook waits that long plus a margin. With neither set there is
    /// no bound, as with the stock hook: a build may take days, and the remote log is the
    /// only sign of life.
    pub fn build(&self, o: &BuildOptions) -> Limit {
        let plus = |secs: u64| Some(Duration::from_secs(secs) + self.query);
        Limit {
            total: (o.build_timeout > 0)
                .then(|| plus(o.build_timeout))
                .flatten(),
            idle: (o.max_silent_time > 0)
                .then(|| plus(o.max_silent_time))
                .flatten(),
        }
    }
}

/// When bytes last moved on a connection: shared by the stream wrappers, the log forwarder
/// and the watchdog of [`within`].
#[derive(Debug, Clone)]
pub struct Activity {
    base: Instant,
    /// Milliseconds after `base`.
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    pub fn new() -> Self {
        Activity {
            base: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    pub fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

/// A stream half that records activity whenever bytes move.
pub struct Tracked<T> {
    inner: T,
    activity: Activity,
}

impl<T> Tracked<T> {
    pub fn new(inner: T, activity: Activity) -> Self {
        Tracked { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Runs one serve call under `limit`. Giving up drops the call's future mid-message, which
/// leaves the client refusing further calls ([`ServeError::Broken`]): the connection is done.
pub async fn within<T>(
    activity: &Activity,
    machine: &str,
    op: &'static str,
    limit: Limit,
    call: impl Future<Output = Result<T, ServeError>>,
) -> Result<T, RemoteError> {
    let timeout = |what, after| RemoteError::Timeout {
        machine: machine.to_owned(),
        op,
        what,
        after,
    };
    let started = Instant::now();
    let total_deadline = limit.total.map(|d| started + d);
    tokio::pin!(call);
    // The start of the call counts as activity: the idle clock starts now.
    activity.touch();
    loop {
        let idle_deadline = limit.idle.map(|d| activity.last() + d);
        let next = match (total_deadline, idle_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(next) = next else {
            return Ok(call.await?);
        };
        tokio::select! {
            r = &mut call => return Ok(r?),
            () = tokio::time::sleep_until(next) => {
                let now = Instant::now();
                if let (Some(t), Some(d)) = (total_deadline, limit.total)
                    && now >= t
                {
                    return Err(timeout("no answer within", d));
                }
                if let (Some(d), Some(_)) = (limit.idle, idle_deadline)
                    && now >= activity.last() + d
                {
                    return Err(timeout("nothing moved on the connection for", d));
                }
            }
        }
    }
}

type Reader = Tracked<Box<dyn AsyncRead + Send + Unpin>>;
type Writer = Tracked<Box<dyn AsyncWrite + Send + Unpin>>;

/// A connected builder: the serve client, the remote log and the transport process.
pub struct Connection {
    machine: String,
    client: ServeClient<Reader, Writer>,
    log: LogTap,
    guard: ProcessGuard,
    activity: Activity,
    pub deadlines: Deadlines,
}

/// The program a store URI runs on the builder (`remote-program`, default `nix-store`).
fn remote_program(uri: &str) -> String {
    StoreUri::parse(uri)
        .param_set("remote-program")
        .unwrap_or("nix-store")
        .to_owned()
}

/// Errors of a serve call that are about our side of it (what we asked or sent).
pub(crate) fn is_local_side(e: &ServeError) -> bool {
    matches!(
        e,
        ServeError::BadRequest { .. }
            | ServeError::NarSource { .. }
            | ServeError::NarHashMismatch { .. }
            | ServeError::Sink { .. }
    )
}

/// What a shell prints when it cannot run a command: bash `command not found` /
/// `No such file or directory`, dash `not found`.
fn looks_like_missing_command(stderr: &str) -> bool {
    stderr.contains("not found") || stderr.contains("No such file or directory")
}

/// Runs the serve handshake over a fresh session, in the local store directory
/// (`$NIX_STORE_DIR`, else `/nix/store`; Nix requires the builder's to be the same). No
/// timer here: callers bound it (the probe budget). On failure the remote stderr (ssh's and
/// the remote shell's messages, e.g. `nix-store: command not found`) is part of the error.
pub async fn open(machine: &str, session: Session) -> Result<Connection, RemoteError> {
    open_in(machine, session, store_dir_from_env()).await
}

pub async fn open_in(
    machine: &str,
    session: Session,
    store_dir: StoreDir,
) -> Result<Connection, RemoteError> {
    let (writer, reader, mut log, guard) = session.into_parts();
    let activity = Activity::new();
    let handshake = ServeClient::handshake(
        Tracked::new(reader, activity.clone()),
        Tracked::new(writer, activity.clone()),
        store_dir,
        machine,
    )
    .await;
    match handshake {
        Ok(client) => Ok(Connection {
            machine: machine.to_owned(),
            client,
            log,
            guard,
            activity,
            deadlines: Deadlines::default(),
        }),
        Err(source) => {
            // The remote side has exited or is about to: its stderr ends soon.
            let stderr = log.collect(Duration::from_secs(2)).await;
            drop(guard);
            let startup = matches!(
                source,
                ServeError::NoGreeting { .. }
                    | ServeError::BadMagic { .. }
                    | ServeError::Send { .. }
                    | ServeError::Closed { .. }
            );
            if startup && looks_like_missing_command(&stderr) {
                return Err(RemoteError::CommandNotFound {
                    machine: machine.to_owned(),
                    program: remote_program(machine),
                    stderr,
                });
            }
            Err(RemoteError::Handshake {
                machine: machine.to_owned(),
                source: Box::new(source),
                stderr,
            })
        }
    }
}

impl Connection {
    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// The negotiated serve protocol version.
    pub fn version(&self) -> u64 {
        self.client.version()
    }

    pub fn store_dir(&self) -> &StoreDir {
        self.client.store_dir()
    }

    /// `QueryValidPaths` (op 1). `lock` adds temp roots on the builder so the paths are
    /// not collected before the build (Hydra does; the stock hook does not).
    pub async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        lock: bool,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, RemoteError> {
        // Substituting downloads on the builder, silently: no bound then.
        let limit = if substitute {
            Limit::default()
        } else {
            Limit {
                total: Some(self.deadlines.query),
                idle: None,
            }
        };
        let call = self.client.query_valid_paths(lock, substitute, paths);
        within(
            &self.activity,
            &self.machine,
            "query_valid_paths",
            limit,
            call,
        )
        .await
    }

    /// `QueryPathInfos` (op 2) for paths valid on the builder.
    pub async fn query_path_infos(
        &mut self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<PathInfo>, RemoteError> {
        let limit = Limit {
            total: Some(self.deadlines.query),
            idle: None,
        };
        let call = self.client.query_path_infos(paths);
        within(
            &self.activity,
            &self.machine,
            "query_path_infos",
            limit,
            call,
        )
        .await
    }

    /// `AddToStoreNar` (op 9): uploads one path, its NAR streamed from the local store
    /// ([`LocalStore::nar`]).
    ///
    /// The NAR is not hashed on the way out: that pass over the data would be the
    /// sender's largest cost, and the builder hashes it anyway and ends the connection on
    /// a mismatch. Only when the call fails after the whole NAR went out is the local NAR
    /// hashed, so that a local store whose files no longer match their recorded hash is
    /// reported as such ([`ServeError::NarHashMismatch`], not the builder's fault) rather
    /// than as a broken connection.
    pub async fn add_to_store_nar(
        &mut self,
        info: &PathInfo,
        local: &LocalStore,
    ) -> Result<(), RemoteError> {
        let mut nar = local.nar(&info.path)?;
        let limit = Limit {
            total: None,
            idle: Some(self.deadlines.idle),
        };
        let call = self.client.add_to_store_nar_unhashed(info, &mut nar);
        let r = within(
            &self.activity,
            &self.machine,
            "add_to_store_nar",
            limit,
            call,
        )
        .await;
        let sent_all = nar.bytes_read() >= info.nar_size;
        nar.finish().await;
        match r {
            Err(RemoteError::Serve(e)) if sent_all && !is_local_side(&e) => {
                if let Ok(got) = local.nar_hash(&info.path).await
                    && got != info.nar_hash
                {
                    return Err(ServeError::NarHashMismatch {
                        remote: self.machine.clone(),
                        path: local.display(&info.path),
                        expected: info.nar_hash.to_nix32_prefixed(),
                        got: got.to_nix32_prefixed(),
                    }
                    .into());
                }
                Err(RemoteError::Serve(e))
            }
            r => r,
        }
    }

    /// `BuildDerivation` (op 8). A failed build is [`RemoteError::BuildFailed`].
    pub async fn build_derivation(
        &mut self,
        job: &Job,
        drv: &Derivation,
    ) -> Result<(), RemoteError> {
        // 2.8 `build-remote.cc`: with input derivations, the builder gets the whole input
        // closure as `inputSrcs` (it has no `.drv` to find the input derivations' outputs).
        let basic = if drv.input_drvs.is_empty() {
            drv.to_basic()
        } else {
            drv.to_basic_with_inputs(job.inputs.clone())
        };
        let limit = self.deadlines.build(&job.options);
        let call = self
            .client
            .build_derivation(&job.drv_path, &basic, &job.options);
        let result = within(
            &self.activity,
            &self.machine,
            "build_derivation",
            limit,
            call,
        )
        .await?;
        if result.status.is_success() {
            return Ok(());
        }
        Err(RemoteError::BuildFailed {
            drv: self.store_dir().display(&job.drv_path),
            machine: self.machine.clone(),
            status: result.status,
            message: result.plain_error_msg(),
        })
    }

    /// `DumpStorePath` (op 3): the NAR of `info.path` streamed into `batch`, checked against
    /// the size and hash `info` declares on the way ([`ServeClient::dump_store_path_checked`]);
    /// the object is completed in `batch` only when it passed.
    pub async fn dump_store_path(
        &mut self,
        info: &PathInfo,
        batch: &mut ImportBatch,
    ) -> Result<(), RemoteError> {
        let limit = Limit {
            total: None,
            idle: Some(self.deadlines.idle),
        };
        let sink = batch.open(info).await?;
        let call = self.client.dump_store_path_checked(info, sink);
        let sha256 = within(
            &self.activity,
            &self.machine,
            "dump_store_path",
            limit,
            call,
        )
        .await?;
        batch.close(info, sha256).await?;
        Ok(())
    }

    /// Ends the session: closes the builder's stdin and waits for the transport.
    pub async fn close(self) -> LogTap {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.close()).await;
        self.guard.finish().await;
        self.log
    }

    /// Takes the remote log tap out, leaving an empty one.
    pub fn take_log(&mut self) -> LogTap {
        std::mem::replace(&mut self.log, LogTap::spawn(tokio::io::empty()))
    }

    /// Forwards the remote log (the serve process's stderr) to `log_path` (fd 4) as it
    /// arrives; log output counts as activity, so a build that logs is alive. The last
    /// [`LOG_TAIL`] bytes are also kept in the returned tail: after a failure they often
    /// name its cause (the serve protocol reports errors only in build results).
    pub fn forward_log(
        &mut self,
        log_path: PathBuf,
    ) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<u8>>>) {
        let mut tap = self.take_log();
        let activity = self.activity.clone();
        let tail = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&tail);
        let remember = move |chunk: &[u8]| {
            if let Ok(mut t) = keep.lock() {
                t.extend_from_slice(chunk);
                let extra = t.len().saturating_sub(LOG_TAIL);
                t.drain(..extra);
            }
        };
        let task = tokio::spawn(async move {
            let Ok(file) = std::fs::OpenOptions::new().write(true).open(&log_path) else {
                while let Some(chunk) = tap.next().await {
                    activity.touch();
                    remember(&chunk);
                }
                return;
            };
            let mut file = tokio::fs::File::from_std(file);
            while let Some(chunk) = tap.next().await {
                use tokio::io::AsyncWriteExt;
                activity.touch();
                remember(&chunk);
                if file.write_all(&chunk).await.is_err() {
                    break;
                }
                let _ = file.flush().await;
            }
        });
        (task, tail)
    }
}

/// How much of the end of a remote log [`Connection::forward_log`] keeps.
pub const LOG_TAIL: usize = 4096;

/// Progress callbacks, so the caller can report through `@nix` messages.
pub trait Progress {
    fn message(&self, text: &str);
}

/// What a copy moved, for the builder's measured transfer rate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Transfer {
    pub bytes: u64,
    pub secs: f64,
}

/// Step one of a remote build (docs/hook-protocol.md §4.6): copy the input closure to the
/// builder, as far as it lacks it. Failures here happen before the build starts, so the
/// caller may retry on another builder.
pub async fn upload(
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
pub fn wanted_output_paths(
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
pub async fn build_and_fetch(
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
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_remote_status() {
        let f = |status| RemoteError::BuildFailed {
            drv: "d".into(),
            machine: "m".into(),
            status,
            message: "x".into(),
        };
        assert_eq!(f(BuildStatus::TimedOut).exit_code(), 101);
        assert_eq!(f(BuildStatus::PermanentFailure).exit_code(), 100);
        assert_eq!(f(BuildStatus::OutputRejected).exit_code(), 100);
        assert_eq!(f(BuildStatus::MiscFailure).exit_code(), 1);
        assert_eq!(f(BuildStatus::Unknown(77)).exit_code(), 1);
        assert_eq!(
            crate::fault::classify(&f(BuildStatus::MiscFailure), ""),
            crate::fault::Fault::Final
        );
    }

    #[test]
    fn build_limits_follow_the_remote_settings() {
        let d = Deadlines::default();
        assert_eq!(d.build(&BuildOptions::default()), Limit::default());
        let l = d.build(&BuildOptions {
            build_timeout: 10,
            max_silent_time: 5,
            ..BuildOptions::default()
        });
        assert_eq!(l.total, Some(Duration::from_secs(10) + d.query));
        assert_eq!(l.idle, Some(Duration::from_secs(5) + d.query));
    }

    #[test]
    fn missing_commands_are_recognised() {
        assert!(looks_like_missing_command(
            "bash: line 1: /nonexistent/nix-store: No such file or directory"
        ));
        assert!(looks_like_missing_command("sh: 1: nix-store: not found"));
        assert!(!looks_like_missing_command(
            "Permission denied (publickey)."
        ));
        assert_eq!(
            remote_program("ssh://h?remote-program=/opt/nix-store&x=1"),
            "/opt/nix-store"
        );
        assert_eq!(remote_program("ssh://h"), "nix-store");
    }

    /// A call that never answers is given up at the idle limit, while one whose peer keeps
    /// the connection busy is not; a total limit ends even a busy call.
    #[tokio::test(start_paused = true)]
    async fn limits_give_up_on_silence() {
        let activity = Activity::new();
        let never = std::future::pending::<Result<(), ServeError>>();
        let idle = Limit {
            total: None,
            idle: Some(Duration::from_secs(5)),
        };
        let t = Instant::now();
        let e = within(&activity, "m", "Op", idle, never)
            .await
            .expect_err("silent call");
        assert!(e.to_string().contains("nothing moved"), "{e}");
        assert_eq!(crate::fault::classify(&e, ""), crate::fault::Fault::Builder);
        assert_eq!(t.elapsed(), Duration::from_secs(5));

        // Busy for 12 s (activity every second), then done: the idle limit never fires.
        let a2 = activity.clone();
        let busy = async move {
            for _ in 0..12 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                a2.touch();
            }
            Ok::<_, ServeError>(7)
        };
        let v = within(&activity, "m", "Op", idle, busy)
            .await
            .expect("busy call");
        assert_eq!(v, 7);

        let a3 = activity.clone();
        let endless = async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                a3.touch();
            }
            #[allow(unreachable_code)]
            Ok::<(), ServeError>(())
        };
        let total = Limit {
            total: Some(Duration::from_secs(3)),
            idle: Some(Duration::from_secs(5)),
        };
        let e = within(&activity, "m", "Op", total, endless)
            .await
            .expect_err("over total");
        assert!(e.to_string().contains("no answer within 3s"), "{e}");
    }
}
