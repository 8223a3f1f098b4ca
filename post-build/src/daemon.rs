//! The uploader daemon: spool → queue → workers.
//!
//! Each round it moves spool records into the queue in one transaction and deletes each
//! spool file only after that commit; resolves derivation-only jobs (Nix 2.8) into output
//! jobs; and starts due jobs on up to `concurrency` workers. A job leaves the queue only when
//! every target has confirmed its closure; then its GC root goes. Killing the daemon at any
//! point loses nothing: uncommitted spool files are read again, unfinished jobs are still
//! queued, and files on targets are either complete or absent (see `target`).

use crate::config::Settings;
use crate::failure::{Classify, Side};
use crate::queue::{Job, JobKind, Outcome, Queue, Transition, now_ms, transition};
use crate::spool::{Spool, SpoolRecord};
use crate::target::Target;
use crate::upload::{Shared, TargetResults, upload_closure};
use anyhow::{Context, Result, bail};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

pub(crate) struct Options {
    /// Exit once the spool and the queue are empty (for `push --wait` and tests).
    pub(crate) drain: bool,
}

/// Due jobs whose closures are fetched together before they run.
const PREFETCH_AHEAD: usize = 64;

/// Moves spool records into the queue. Returns how many records were ingested.
pub(crate) fn ingest(spool: &Spool, queue: &mut Queue, settings: &Settings) -> Result<usize> {
    let names = spool.pending()?;
    if names.is_empty() {
        return Ok(0);
    }
    let mut jobs = Vec::new();
    let mut done = Vec::new();
    for name in names {
        let text = match spool.read(&name) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(%name, error = %e, "unreadable spool record");
                continue;
            }
        };
        match SpoolRecord::decode(&text) {
            Ok(rec) => {
                if rec.outs.is_empty() {
                    if let Some(d) = rec.drv {
                        jobs.push((d, JobKind::Drv));
                    }
                } else {
                    jobs.extend(rec.outs.into_iter().map(|o| (o, JobKind::Out)));
                }
                done.push(name);
            }
            Err(e) => {
                tracing::error!(%name, error = %e, "bad spool record moved to spool/bad");
                let _ = spool.quarantine(&name);
            }
        }
    }
    // Paths outside this store would fail forever; they are dropped here with a log line.
    jobs.retain(|(p, _)| {
        let ok = settings.store_dir.parse(p).is_ok();
        if !ok {
            tracing::error!(path = %p, store = %settings.store_dir, "not a store path; ignored");
        }
        ok
    });
    let added = queue.enqueue(&jobs, now_ms())?;
    // Only now, with the transaction committed, may the spool files go.
    for name in &done {
        spool.remove(name)?;
    }
    tracing::debug!(records = done.len(), added, "ingested spool");
    Ok(done.len())
}

/// Why the outputs of a derivation job could not be found.
#[derive(Debug, thiserror::Error)]
enum DrvError {
    #[error("{0}")]
    Path(#[from] ferry_nix::store_path::StorePathError),
    #[error("{0}")]
    Local(#[from] ferry_store::LocalError),
}

/// Output paths of a derivation: read from the `.drv` itself, or asked of Nix.
async fn drv_outputs(sh: &Shared, drv: &str) -> Result<Vec<String>, DrvError> {
    if let Ok(text) = tokio::fs::read(drv).await
        && let Ok(o) = crate::drv::outputs(&text, &sh.store_dir)
    {
        return Ok(o.into_iter().map(|(_, p)| p).collect());
    }
    // Not readable here (another store root): ask the local store for the file.
    let drv = sh.store_dir.parse(drv)?;
    let d = sh.store.read_derivation(&drv)?;
    Ok(d.outputs
        .values()
        .filter_map(|o| o.path.as_ref().map(|p| sh.store_dir.display(p)))
        .collect())
}

fn drv_failure(sh: &Shared, drv: &str, e: DrvError) -> Outcome {
    let error = format!("outputs of {drv}: {e}");
    if let Ok(p) = sh.store_dir.parse(drv)
        && crate::upload::gone_from_store(sh, &p)
    {
        return Outcome::Gone { error };
    }
    let permanent = match &e {
        DrvError::Path(_) => true,
        DrvError::Local(l) => l.is_permanent(),
    };
    if permanent {
        Outcome::Permanent {
            error,
            side: Side::Local,
        }
    } else {
        Outcome::Transient {
            error,
            side: Side::Local,
            retry_after: None,
        }
    }
}

pub(crate) struct Daemon {
    settings: Settings,
    spool: Spool,
    queue: Queue,
    shared: Arc<Shared>,
    _lock: std::fs::File,
}

/// The start-up line: targets without their credentials (issue 12 item 7).
fn log_started(targets: &[String], concurrency: usize) {
    let shown: Vec<String> = targets.iter().map(|t| ferry_nix::url::redact(t)).collect();
    tracing::info!(targets = ?shown, concurrency, "uploader started");
}

fn lock_state(settings: &Settings) -> Result<std::fs::File> {
    let dir = &settings.config.state_dir;
    // 0700: the queue and spool inside name what is built here (docs/threat-model.md).
    crate::spool::private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("uploader.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!(
                "another uploader holds {}; only one may run per state directory",
                path.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

pub(crate) fn load_keys(settings: &Settings) -> Result<Vec<ferry_nix::signing::SecretKey>> {
    settings
        .config
        .secret_key_files
        .iter()
        .map(|p| ferry_nix::signing::SecretKey::from_file(p).map_err(anyhow::Error::from))
        .collect()
}

pub(crate) fn make_targets(settings: &Settings) -> Result<Vec<Arc<Target>>> {
    let opts = settings.target_options();
    settings
        .config
        .targets
        .iter()
        .map(|u| {
            Target::new(u, &opts)
                .map(Arc::new)
                .map_err(anyhow::Error::from)
        })
        .collect()
}

impl Daemon {
    pub(crate) fn new(settings: Settings) -> Result<Daemon> {
        let lock = lock_state(&settings)?;
        if settings.config.targets.is_empty() {
            bail!("no targets configured in [post-build] targets");
        }
        let keys = load_keys(&settings)?;
        if keys.is_empty() {
            tracing::warn!(
                "no secret-key-files: narinfos will carry only the signatures already in the store"
            );
        }
        let targets = make_targets(&settings)?;
        for t in &settings.config.targets {
            crate::target::clean_file_target(t);
        }
        let spool = Spool::new(settings.spool_dir());
        spool.ensure_dirs()?;
        spool.clean_tmp();
        let work_dir = settings.work_dir();
        let _ = std::fs::remove_dir_all(&work_dir);
        std::fs::create_dir_all(&work_dir)?;
        let db = settings.queue_db();
        let queue = Queue::open(&db).with_context(|| format!("opening {}", db.display()))?;
        let shared = Arc::new(Shared {
            store_dir: settings.store_dir.clone(),
            store: ferry_store::LocalStore::default(),
            targets,
            keys,
            levels: settings.levels(),
            work_dir,
            present: Default::default(),
            initialised: Default::default(),
            busy: Default::default(),
            infos: Default::default(),
            uploads: crate::multipart::UploadLog::open(&db)
                .with_context(|| format!("opening {}", db.display()))?,
            multipart: settings.multipart(),
            compressing: tokio::sync::Semaphore::new(settings.compress_slots()),
        });
        Ok(Daemon {
            settings,
            spool,
            queue,
            shared,
            _lock: lock,
        })
    }

    fn remove_root(&self, path: &str) {
        if self.settings.config.gc_roots
            && let Err(e) = crate::gcroot::remove(&self.settings.gc_roots_dir(), path)
        {
            tracing::warn!(%path, error = %e, "removing GC root");
        }
    }

    fn sweep_roots(&self) {
        let stale = crate::gcroot::stale(
            &self.settings.gc_roots_dir(),
            Duration::from_secs(600),
            &|p| self.queue.holds(p).unwrap_or(true),
        );
        for r in stale {
            tracing::info!(root = %r.display(), "removing a GC root left by an interrupted run");
            let _ = std::fs::remove_file(r);
        }
    }

    fn finish(&mut self, job: &Job, outcome: Outcome, results: TargetResults) -> Result<()> {
        let now = now_ms();
        for (t, r) in &results {
            let url = &self.shared.targets[*t].url;
            self.queue
                .record_target(url, r.as_ref().map(|n| *n).map_err(String::as_str), now)?;
        }
        // The local store worked for this job unless the job failed on the local side; a
        // path gone from the store says nothing either way.
        let side = match &outcome {
            Outcome::Transient { side, .. } | Outcome::Permanent { side, .. } => Some(*side),
            Outcome::Uploaded | Outcome::Gone { .. } => None,
        };
        match (&outcome, side) {
            (
                Outcome::Transient { error, .. } | Outcome::Permanent { error, .. },
                Some(Side::Local),
            ) => self.queue.record_local(Err(error), now)?,
            (Outcome::Gone { .. }, _) => {}
            _ => self.queue.record_local(Ok(()), now)?,
        }
        let t = transition(
            job,
            &outcome,
            now,
            &self.settings.retry_policy(),
            crate::retry::random_unit(),
        );
        let attempts = job.attempts.saturating_add(1);
        match (&outcome, &t) {
            (Outcome::Uploaded, _) => tracing::info!(path = %job.path, "job done"),
            (Outcome::Transient { error, side, .. }, Transition::Reschedule { next_at_ms, .. }) => {
                tracing::warn!(path = %job.path, attempts, side = side.as_str(), %error,
                    retry_in_ms = next_at_ms.saturating_sub(now), "job failed; will retry")
            }
            (Outcome::Permanent { error, side }, _) => {
                tracing::error!(path = %job.path, attempts, side = side.as_str(), %error,
                    "job failed permanently: dead-lettered until `ferry-post-build retry`")
            }
            (Outcome::Gone { error }, _) => {
                tracing::error!(path = %job.path, %error, "path left the store before it was uploaded; dead-lettered")
            }
            _ => {}
        }
        // The root goes before the job: killed in between, the job is still queued and its
        // next attempt finds the narinfos in place (see `upload_closure`); the other order
        // would leak the root. A dead letter keeps its root: `retry` must find the path.
        if matches!(outcome, Outcome::Uploaded | Outcome::Gone { .. }) {
            self.remove_root(&job.path);
        }
        self.queue.apply(job, &t, side, now)?;
        Ok(())
    }

    pub(crate) async fn run(mut self, opts: Options) -> Result<()> {
        let concurrency = self.settings.config.concurrency;
        let poll = Duration::from_millis(self.settings.config.poll_ms.max(10));
        let mut running: HashSet<String> = HashSet::new();
        let mut prefetched: HashSet<String> = HashSet::new();
        let mut tasks: JoinSet<(Job, Outcome, TargetResults)> = JoinSet::new();
        let mut swept = false;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        log_started(&self.settings.config.targets, concurrency);
        loop {
            let ingested = ingest(&self.spool, &mut self.queue, &self.settings)?;
            if !swept {
                self.sweep_roots();
                let queue = &self.queue;
                crate::multipart::sweep(&self.shared.targets, &self.shared.uploads, &|p| {
                    queue.holds(p).unwrap_or(true)
                })
                .await;
                swept = true;
            }
            // Derivation-only jobs become output jobs first.
            let now = now_ms();
            let due = self.queue.due(now, usize::MAX, &|p| running.contains(p))?;
            for job in due.iter().filter(|j| j.kind == JobKind::Drv) {
                match drv_outputs(&self.shared, &job.path).await {
                    Ok(outs) => {
                        for o in &outs {
                            if self.settings.config.gc_roots && std::path::Path::new(o).exists() {
                                let _ = crate::gcroot::add(&self.settings.gc_roots_dir(), o);
                            }
                        }
                        self.queue.resolve_drv(&job.path, &outs, now)?;
                    }
                    Err(e) => {
                        self.finish(job, drv_failure(&self.shared, &job.path, e), Vec::new())?
                    }
                }
            }
            let free = concurrency.saturating_sub(running.len());
            if free > 0 {
                // Jobs about to run and the next PREFETCH_AHEAD: their closures in one call.
                let ahead = self.queue.due(now_ms(), free + PREFETCH_AHEAD, &|p| {
                    running.contains(p) || p.ends_with(".drv")
                })?;
                // Each root is asked about once: a batch with an invalid path fails as a whole,
                // and its jobs then ask for their own closures.
                let roots: Vec<String> = ahead
                    .iter()
                    .filter(|j| !prefetched.contains(&j.path))
                    .map(|j| j.path.clone())
                    .collect();
                // A call costs the same for 3 roots as for 64 (most of it is starting `nix`):
                // ask when a job about to run is missing or half the window is, not each time
                // the window moves by the few jobs that finished (that was one call per
                // loop, and it made small-path uploads CPU-bound on `nix path-info`).
                let head_missing = ahead
                    .iter()
                    .take(free)
                    .any(|j| !prefetched.contains(&j.path));
                if roots.len() > 1 && (head_missing || roots.len() >= PREFETCH_AHEAD / 2) {
                    if prefetched.len() > 100_000 {
                        prefetched.clear();
                    }
                    prefetched.extend(roots.iter().cloned());
                    crate::upload::prefetch_infos(&self.shared, &roots).await;
                }
                for job in ahead.into_iter().take(free) {
                    if job.kind == JobKind::Drv {
                        continue;
                    }
                    running.insert(job.path.clone());
                    let sh = Arc::clone(&self.shared);
                    tasks.spawn(async move {
                        let (o, r) = upload_closure(&sh, &job.path).await;
                        (job, o, r)
                    });
                }
            }
            if opts.drain && tasks.is_empty() && ingested == 0 && self.queue.status()?.depth == 0 {
                tracing::info!("queue drained");
                return Ok(());
            }
            tokio::select! {
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    match done {
                        Ok((job, outcome, results)) => {
                            running.remove(&job.path);
                            self.finish(&job, outcome, results)?;
                        }
                        Err(e) => bail!("an upload worker panicked: {e}"),
                    }
                }
                _ = tokio::time::sleep(poll) => {}
                _ = term.recv() => {
                    tracing::info!("SIGTERM: stopping; unfinished jobs stay queued");
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Everything a `fmt` subscriber writes, kept for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut v) = self.0.lock() {
                v.extend_from_slice(b);
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Issue 12 item 7: the uploader's start-up line listed `targets=[…]` as configured,
    /// `user:password@` included.
    #[test]
    fn the_start_up_line_shows_no_credentials() {
        let out = Captured::default();
        let w = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .finish();
        let targets = vec![
            "https://uploader:hunter2@cache.example/upload?compression=zstd".to_owned(),
            "file:///var/cache/nix".to_owned(),
        ];
        tracing::subscriber::with_default(subscriber, || log_started(&targets, 4));
        let text = String::from_utf8(out.0.lock().expect("log").clone()).expect("utf-8");
        assert!(text.contains("uploader started"), "{text}");
        assert!(
            !text.contains("hunter2") && !text.contains("uploader:"),
            "{text}"
        );
        assert!(
            text.contains("https://***@cache.example/upload?compression=zstd"),
            "{text}"
        );
        assert!(text.contains("file:///var/cache/nix"), "{text}");
    }
}
