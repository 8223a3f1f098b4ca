//! The uploader's durable queue: SQLite in WAL mode with `synchronous=FULL`, so a committed
//! transaction survives a power cut (NORMAL in WAL may lose the last one; docs/upload.md §4.2).
//!
//! One row per store path to upload (`PRIMARY KEY`, so a path enqueued by many hooks is one
//! job), or per derivation whose outputs are still unknown (Nix 2.8's empty `OUT_PATHS`).
//! A job is deleted only after every target has confirmed its whole closure. A transient
//! failure reschedules it with back-off; a permanent one (see [`crate::failure`]) or a path
//! gone from the store moves it to `dead` with its error, where it stays until
//! [`Queue::requeue_dead`] (`ferry-post-build retry`) or a new build of the path puts it back:
//! nothing is ever dropped. "Running" is not stored: a job being uploaded when the uploader
//! dies is simply still queued when it restarts.
//!
//! The schema is versioned with `PRAGMA user_version` and migrated forward in one
//! transaction when a database is opened (see [`MIGRATIONS`](schema::MIGRATIONS)); a database of a newer
//! version is refused rather than misread.
//!
//! The schema and its migrations are in `schema`; what `status` reports (per-target and local
//! outcomes, retrying and dead jobs) in `status`.

use crate::failure::Side;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

mod schema;
mod status;

pub(crate) use schema::prepare_connection;
#[cfg(test)]
use schema::schema_version;
#[cfg(test)]
use status::{LastError, LocalStatus, RetryingJob};

#[derive(Debug, Error)]
pub(crate) enum QueueError {
    #[error("queue database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "queue database has schema version {found}; this ferry-post-build knows versions up to \
         {known} (was it written by a newer one?)"
    )]
    NewerSchema { found: i64, known: i64 },
    #[error("making the queue database {path} private (0600): {source}")]
    Private {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn serialize_redacted<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&ferry_nix::url::redact(url))
}

/// Creates `path` empty with mode 0600 if it is missing (an empty file is a valid, empty
/// SQLite database); an existing one loses its group and other permissions.
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let mode = f.metadata()?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(mode & !0o077))?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum JobKind {
    /// A store path (an output); its closure is uploaded.
    Out,
    /// A derivation whose outputs must be looked up first.
    Drv,
}

impl JobKind {
    fn as_str(self) -> &'static str {
        match self {
            JobKind::Out => "out",
            JobKind::Drv => "drv",
        }
    }
    fn parse(s: &str) -> JobKind {
        if s == "drv" {
            JobKind::Drv
        } else {
            JobKind::Out
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Job {
    pub(crate) path: String,
    pub(crate) kind: JobKind,
    pub(crate) enqueued_at_ms: i64,
    /// Failed attempts so far.
    pub(crate) attempts: u32,
}

/// How one attempt at a job ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Every target holds the closure.
    Uploaded,
    /// Worth trying again (network, a 5xx, the nix-daemon restarting, a full disk).
    Transient {
        error: String,
        side: Side,
        retry_after: Option<Duration>,
    },
    /// Will not work until someone acts (a target refusing the upload, a corrupt store path).
    Permanent { error: String, side: Side },
    /// The path is no longer in the store (collected after its GC root went): nothing to
    /// upload, ever.
    Gone { error: String },
}

/// Why a job is in the dead letters. Shown (and serialised) as `local`, `target`, `gone` or
/// `unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadCause {
    /// A permanent failure on this side.
    Permanent(Side),
    /// The path left the store.
    Gone,
    /// Dead-lettered by a version that did not record why.
    Unknown,
}

impl DeadCause {
    pub(crate) fn label(self) -> &'static str {
        self.as_str().unwrap_or("unknown")
    }

    fn as_str(self) -> Option<&'static str> {
        match self {
            DeadCause::Permanent(s) => Some(s.as_str()),
            DeadCause::Gone => Some("gone"),
            DeadCause::Unknown => None,
        }
    }

    fn parse(s: Option<&str>) -> DeadCause {
        match s {
            Some("gone") => DeadCause::Gone,
            Some(s) => Side::parse(s).map_or(DeadCause::Unknown, DeadCause::Permanent),
            None => DeadCause::Unknown,
        }
    }
}

impl serde::Serialize for DeadCause {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.label())
    }
}

/// What the queue does with a job after an attempt: the pure core of the state machine
/// (queued → running → deleted | rescheduled | dead; dead → queued by `retry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Transition {
    Delete,
    Reschedule {
        attempts: u32,
        next_at_ms: i64,
        error: String,
    },
    DeadLetter {
        attempts: u32,
        error: String,
        cause: DeadCause,
    },
}

pub(crate) fn transition(
    job: &Job,
    outcome: &Outcome,
    now_ms: i64,
    policy: &crate::retry::RetryPolicy,
    unit: f64,
) -> Transition {
    let attempts = job.attempts.saturating_add(1);
    match outcome {
        Outcome::Uploaded => Transition::Delete,
        Outcome::Permanent { error, side } => Transition::DeadLetter {
            attempts,
            error: error.clone(),
            cause: DeadCause::Permanent(*side),
        },
        Outcome::Gone { error } => Transition::DeadLetter {
            attempts,
            error: error.clone(),
            cause: DeadCause::Gone,
        },
        Outcome::Transient {
            error, retry_after, ..
        } => {
            let delay = policy.delay(attempts, unit, *retry_after);
            Transition::Reschedule {
                attempts,
                next_at_ms: now_ms.saturating_add(delay.as_millis().min(i64::MAX as u128) as i64),
                error: error.clone(),
            }
        }
    }
}

pub(crate) struct Queue {
    conn: Connection,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn clamp_u32(v: i64) -> u32 {
    v.clamp(0, u32::MAX as i64) as u32
}

impl Queue {
    /// A transaction that takes the write lock at once. A deferred one that reads first
    /// and writes later fails with SQLITE_BUSY (no waiting) when another process, the
    /// uploader or `retry`, committed in between; an immediate one waits its turn under the
    /// busy time-out.
    fn write_tx(&mut self) -> Result<Transaction<'_>, QueueError> {
        Ok(self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?)
    }

    /// Opens (or creates) the queue at `path`, mode 0600: it names every path built here and
    /// every target (docs/threat-model.md). SQLite gives its `-wal` and `-shm` files the
    /// database file's mode (`findCreateFileMode` in
    /// <https://sqlite.org/src/file?name=src/os_unix.c>), so creating the database file 0600
    /// first is enough (the test checks the `-wal`); one an earlier version made 0644 is
    /// closed.
    pub(crate) fn open(path: &Path) -> Result<Queue, QueueError> {
        private_file(path).map_err(|e| QueueError::Private {
            path: path.to_owned(),
            source: e,
        })?;
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    #[cfg(test)]
    pub(crate) fn open_in_memory() -> Result<Queue, QueueError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Queue, QueueError> {
        Ok(Queue {
            conn: prepare_connection(conn)?,
        })
    }

    /// Adds jobs in one transaction; paths already queued stay as they are (dedup). A path
    /// in the dead letters comes back as a new job (it was built again).
    pub(crate) fn enqueue(
        &mut self,
        jobs: &[(String, JobKind)],
        now: i64,
    ) -> Result<usize, QueueError> {
        let tx = self.write_tx()?;
        let mut added = 0;
        {
            let mut ins = tx.prepare_cached(
                "INSERT OR IGNORE INTO jobs(path, kind, enqueued_at, next_at) VALUES (?1, ?2, ?3, ?3)",
            )?;
            let mut undead = tx.prepare_cached("DELETE FROM dead WHERE path = ?1")?;
            for (p, k) in jobs {
                added += ins.execute(params![p, k.as_str(), now])?;
                undead.execute(params![p])?;
            }
        }
        tx.commit()?;
        Ok(added)
    }

    /// Replaces a derivation job by jobs for its outputs, atomically.
    pub(crate) fn resolve_drv(
        &mut self,
        drv: &str,
        outputs: &[String],
        now: i64,
    ) -> Result<(), QueueError> {
        let tx = self.write_tx()?;
        {
            let enq: Option<i64> = tx
                .query_row(
                    "SELECT enqueued_at FROM jobs WHERE path = ?1",
                    params![drv],
                    |r| r.get(0),
                )
                .optional()?;
            let at = enq.unwrap_or(now);
            let mut ins = tx.prepare_cached(
                "INSERT OR IGNORE INTO jobs(path, kind, enqueued_at, next_at) VALUES (?1, 'out', ?2, ?3)",
            )?;
            for o in outputs {
                ins.execute(params![o, at, now])?;
            }
            tx.execute("DELETE FROM jobs WHERE path = ?1", params![drv])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Jobs due at `now`, oldest first, skipping `exclude` (those running).
    pub(crate) fn due(
        &self,
        now: i64,
        limit: usize,
        exclude: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<Job>, QueueError> {
        let mut st = self.conn.prepare_cached(
            "SELECT path, kind, enqueued_at, attempts FROM jobs WHERE next_at <= ?1 ORDER BY next_at, enqueued_at, path",
        )?;
        let rows = st.query_map(params![now], |r| {
            Ok(Job {
                path: r.get(0)?,
                kind: JobKind::parse(&r.get::<_, String>(1)?),
                enqueued_at_ms: r.get(2)?,
                attempts: clamp_u32(r.get(3)?),
            })
        })?;
        let mut out = Vec::new();
        for j in rows {
            let j = j?;
            if !exclude(&j.path) {
                out.push(j);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// When the next job becomes due, if any.
    #[cfg(test)]
    fn next_due_ms(&self) -> Result<Option<i64>, QueueError> {
        Ok(self
            .conn
            .query_row("SELECT MIN(next_at) FROM jobs", [], |r| r.get(0))?)
    }

    /// Records `t` for `job`. `side` is where the attempt failed, if it did.
    pub(crate) fn apply(
        &mut self,
        job: &Job,
        t: &Transition,
        side: Option<Side>,
        now: i64,
    ) -> Result<(), QueueError> {
        match t {
            Transition::Delete => {
                self.conn
                    .execute("DELETE FROM jobs WHERE path = ?1", params![job.path])?;
            }
            Transition::Reschedule {
                attempts,
                next_at_ms,
                error,
            } => {
                self.conn.execute(
                    "UPDATE jobs SET attempts = ?2, next_at = ?3, last_error = ?4, last_error_at = ?5,
                     last_error_side = ?6 WHERE path = ?1",
                    params![
                        job.path,
                        attempts,
                        next_at_ms,
                        error,
                        now,
                        side.map(Side::as_str)
                    ],
                )?;
            }
            Transition::DeadLetter {
                attempts,
                error,
                cause,
            } => {
                let tx = self.write_tx()?;
                tx.execute(
                    "INSERT OR REPLACE INTO dead(path, kind, reason, at, attempts, enqueued_at, cause)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        job.path,
                        job.kind.as_str(),
                        error,
                        now,
                        attempts,
                        job.enqueued_at_ms,
                        cause.as_str()
                    ],
                )?;
                tx.execute("DELETE FROM jobs WHERE path = ?1", params![job.path])?;
                tx.commit()?;
            }
        }
        Ok(())
    }

    /// Is `path` queued (waiting or rescheduled)?
    pub(crate) fn contains(&self, path: &str) -> Result<bool, QueueError> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM jobs WHERE path = ?1", params![path], |_| {
                Ok(())
            })
            .optional()?
            .is_some())
    }

    /// Is `path` queued or dead-lettered? Both keep their GC root: a dead letter is
    /// uploaded once someone runs `retry`, so its path must still be there then.
    pub(crate) fn holds(&self, path: &str) -> Result<bool, QueueError> {
        Ok(self.contains(path)?
            || self
                .conn
                .query_row(
                    "SELECT 1 FROM dead WHERE path = ?1 AND cause IS NOT 'gone'",
                    params![path],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
    }

    /// Moves dead letters back into the queue, due at once with a fresh attempt count: all
    /// of them (`paths` = `None`) or those named. Returns the paths requeued and, separately,
    /// the named paths that were not dead-lettered. One transaction.
    pub(crate) fn requeue_dead(
        &mut self,
        paths: Option<&[String]>,
        now: i64,
    ) -> Result<(Vec<String>, Vec<String>), QueueError> {
        let tx = self.write_tx()?;
        let dead: Vec<(String, String, Option<i64>)> = {
            let mut st = tx.prepare("SELECT path, kind, enqueued_at FROM dead ORDER BY path")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?
        };
        let (chosen, missing): (Vec<_>, Vec<String>) = match paths {
            None => (dead, Vec::new()),
            Some(ps) => {
                let missing = ps
                    .iter()
                    .filter(|p| !dead.iter().any(|(d, _, _)| d == *p))
                    .cloned()
                    .collect();
                (
                    dead.into_iter()
                        .filter(|(d, _, _)| ps.contains(d))
                        .collect(),
                    missing,
                )
            }
        };
        let mut requeued = Vec::new();
        {
            // A path queued meanwhile (built again) keeps its job; the dead letter goes.
            let mut ins = tx.prepare_cached(
                "INSERT OR IGNORE INTO jobs(path, kind, enqueued_at, next_at) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut del = tx.prepare_cached("DELETE FROM dead WHERE path = ?1")?;
            for (p, kind, enq) in chosen {
                ins.execute(params![p, kind, enq.unwrap_or(now), now])?;
                del.execute(params![p])?;
                requeued.push(p);
            }
        }
        tx.commit()?;
        Ok((requeued, missing))
    }
}

#[cfg(test)]
mod tests;
