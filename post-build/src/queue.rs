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
//! transaction when a database is opened (see [`MIGRATIONS`]); a database of a newer
//! version is refused rather than misread.

use crate::failure::Side;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum QueueError {
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
pub enum JobKind {
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
pub struct Job {
    pub path: String,
    pub kind: JobKind,
    pub enqueued_at_ms: i64,
    /// Failed attempts so far.
    pub attempts: u32,
}

/// How one attempt at a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
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
pub enum DeadCause {
    /// A permanent failure on this side.
    Permanent(Side),
    /// The path left the store.
    Gone,
    /// Dead-lettered by a version that did not record why.
    Unknown,
}

impl DeadCause {
    pub fn label(self) -> &'static str {
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
pub enum Transition {
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

pub fn transition(
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

/// Schema steps; step `i` takes a database from version `i` to `i + 1`. Version 0 is both
/// a new file and the schema of the first release (which set no `user_version`), so step 0
/// uses `IF NOT EXISTS` and leaves an existing first-release database as it is.
/// Columns are only ever added (with defaults), never renamed or dropped: an older uploader
/// still reads and writes a migrated database correctly.
pub const MIGRATIONS: &[&str] = &[
    // 0 → 1: the first release's schema.
    "CREATE TABLE IF NOT EXISTS jobs (
        path TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        enqueued_at INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at INTEGER NOT NULL,
        last_error TEXT
    );
    CREATE INDEX IF NOT EXISTS jobs_next ON jobs(next_at);
    CREATE TABLE IF NOT EXISTS dead (
        path TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS targets (
        url TEXT PRIMARY KEY,
        last_ok INTEGER,
        last_err_at INTEGER,
        last_err TEXT,
        uploaded INTEGER NOT NULL DEFAULT 0
    );",
    // 1 → 2: when a job last failed and on which side; how a dead letter got there (so
    // `retry` can restore it); the local store's own last success and error.
    "ALTER TABLE jobs ADD COLUMN last_error_at INTEGER;
    ALTER TABLE jobs ADD COLUMN last_error_side TEXT;
    ALTER TABLE dead ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE dead ADD COLUMN enqueued_at INTEGER;
    ALTER TABLE dead ADD COLUMN cause TEXT;
    CREATE TABLE local_store (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        last_ok INTEGER,
        last_err_at INTEGER,
        last_err TEXT,
        errors INTEGER NOT NULL DEFAULT 0
    );",
];

pub fn schema_version() -> i64 {
    MIGRATIONS.len() as i64
}

pub struct Queue {
    conn: Connection,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetStatus {
    /// As configured (the key of the `targets` table); serialised without credentials.
    #[serde(serialize_with = "serialize_redacted")]
    pub url: String,
    pub last_ok_ms: Option<i64>,
    pub last_error_ms: Option<i64>,
    pub last_error: Option<String>,
    pub paths_uploaded: i64,
}

/// The local store as the uploader sees it: when reading path infos and NARs last worked,
/// and the last error doing so.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LocalStatus {
    pub last_ok_ms: Option<i64>,
    pub last_error_ms: Option<i64>,
    pub last_error: Option<String>,
    /// Failed attempts on the local side since the queue was created.
    pub errors: i64,
}

/// A queued job that has failed at least once.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RetryingJob {
    pub path: String,
    pub kind: JobKind,
    pub enqueued_ms: i64,
    pub attempts: u32,
    pub next_attempt_ms: i64,
    pub last_error: Option<String>,
    pub last_error_ms: Option<i64>,
    /// `None` for errors recorded by a version that did not say.
    pub last_error_side: Option<Side>,
}

/// A dead-lettered job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadJob {
    pub path: String,
    pub kind: JobKind,
    pub error: String,
    pub dead_since_ms: i64,
    pub attempts: u32,
    pub cause: DeadCause,
    pub enqueued_ms: Option<i64>,
}

/// The most recent error anywhere (local store or a target).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LastError {
    pub at_ms: i64,
    pub error: String,
    /// `local` or the target's URL.
    pub source: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueStatus {
    pub depth: i64,
    pub oldest_enqueued_ms: Option<i64>,
    pub dead: i64,
    pub retrying: i64,
    /// When the earliest rescheduled job is due again.
    pub next_retry_ms: Option<i64>,
    pub last_error: Option<LastError>,
    pub local: LocalStatus,
    pub targets: Vec<TargetStatus>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn clamp_u32(v: i64) -> u32 {
    v.clamp(0, u32::MAX as i64) as u32
}

/// Brings the schema to [`schema_version`], each step and the version bump in one
/// transaction: a crash mid-migration leaves the old version, and a second process opening
/// the database at the same time waits (`BEGIN IMMEDIATE`, busy time-out) and then finds
/// the work done.
fn migrate(conn: &mut Connection) -> Result<(), QueueError> {
    let known = schema_version();
    // Up to date (the usual case): no write lock, so `status` never waits on the uploader.
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current == known {
        return Ok(());
    }
    let tx = Transaction::new(conn, rusqlite::TransactionBehavior::Immediate)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > known {
        return Err(QueueError::NewerSchema { found, known });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        tx.execute_batch(step)?;
        // PRAGMA takes no parameters; the value is our own integer.
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
    }
    tx.commit()?;
    Ok(())
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
    pub fn open(path: &Path) -> Result<Queue, QueueError> {
        private_file(path).map_err(|e| QueueError::Private {
            path: path.to_owned(),
            source: e,
        })?;
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Queue, QueueError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Queue, QueueError> {
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut conn)?;
        Ok(Queue { conn })
    }

    /// Adds jobs in one transaction; paths already queued stay as they are (dedup). A path
    /// in the dead letters comes back as a new job (it was built again).
    pub fn enqueue(&mut self, jobs: &[(String, JobKind)], now: i64) -> Result<usize, QueueError> {
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
    pub fn resolve_drv(
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
    pub fn due(
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
    pub fn next_due_ms(&self) -> Result<Option<i64>, QueueError> {
        Ok(self
            .conn
            .query_row("SELECT MIN(next_at) FROM jobs", [], |r| r.get(0))?)
    }

    /// Records `t` for `job`. `side` is where the attempt failed, if it did.
    pub fn apply(
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
    pub fn contains(&self, path: &str) -> Result<bool, QueueError> {
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
    pub fn holds(&self, path: &str) -> Result<bool, QueueError> {
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

    pub fn record_target(
        &self,
        url: &str,
        ok: Result<u64, &str>,
        now: i64,
    ) -> Result<(), QueueError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO targets(url) VALUES (?1)",
            params![url],
        )?;
        match ok {
            Ok(n) => self.conn.execute(
                "UPDATE targets SET last_ok = ?2, uploaded = uploaded + ?3 WHERE url = ?1",
                params![url, now, n as i64],
            )?,
            Err(e) => self.conn.execute(
                "UPDATE targets SET last_err_at = ?2, last_err = ?3 WHERE url = ?1",
                params![url, now, e],
            )?,
        };
        Ok(())
    }

    /// Records whether reading the local store worked for one job.
    pub fn record_local(&self, ok: Result<(), &str>, now: i64) -> Result<(), QueueError> {
        self.conn
            .execute("INSERT OR IGNORE INTO local_store(id) VALUES (1)", [])?;
        match ok {
            Ok(()) => self.conn.execute(
                "UPDATE local_store SET last_ok = ?1 WHERE id = 1",
                params![now],
            )?,
            Err(e) => self.conn.execute(
                "UPDATE local_store SET last_err_at = ?1, last_err = ?2, errors = errors + 1 WHERE id = 1",
                params![now, e],
            )?,
        };
        Ok(())
    }

    pub fn status(&self) -> Result<QueueStatus, QueueError> {
        let (depth, oldest, retrying, next_retry): (i64, Option<i64>, i64, Option<i64>) =
            self.conn.query_row(
                "SELECT COUNT(*), MIN(enqueued_at), COALESCE(SUM(attempts > 0), 0),
                 MIN(CASE WHEN attempts > 0 THEN next_at END) FROM jobs",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )?;
        let dead: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM dead", [], |r| r.get(0))?;
        let local = self
            .conn
            .query_row(
                "SELECT last_ok, last_err_at, last_err, errors FROM local_store WHERE id = 1",
                [],
                |r| {
                    Ok(LocalStatus {
                        last_ok_ms: r.get(0)?,
                        last_error_ms: r.get(1)?,
                        last_error: r.get(2)?,
                        errors: r.get(3)?,
                    })
                },
            )
            .optional()?
            .unwrap_or_default();
        let mut st = self.conn.prepare(
            "SELECT url, last_ok, last_err_at, last_err, uploaded FROM targets ORDER BY url",
        )?;
        let targets = st
            .query_map([], |r| {
                Ok(TargetStatus {
                    url: r.get(0)?,
                    last_ok_ms: r.get(1)?,
                    last_error_ms: r.get(2)?,
                    last_error: r.get(3)?,
                    paths_uploaded: r.get(4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut last_error: Option<LastError> = None;
        let mut consider = |at: Option<i64>, error: Option<&String>, source: &str| {
            if let (Some(at), Some(error)) = (at, error)
                && last_error.as_ref().is_none_or(|l| at > l.at_ms)
            {
                last_error = Some(LastError {
                    at_ms: at,
                    error: error.clone(),
                    source: source.to_owned(),
                });
            }
        };
        consider(local.last_error_ms, local.last_error.as_ref(), "local");
        for t in &targets {
            consider(
                t.last_error_ms,
                t.last_error.as_ref(),
                &ferry_nix::url::redact(&t.url),
            );
        }
        Ok(QueueStatus {
            depth,
            oldest_enqueued_ms: oldest,
            dead,
            retrying,
            next_retry_ms: next_retry,
            last_error,
            local,
            targets,
        })
    }

    /// Queued jobs that have failed at least once, those due first; at most `limit`.
    pub fn retrying(&self, limit: usize) -> Result<Vec<RetryingJob>, QueueError> {
        let mut st = self.conn.prepare(
            "SELECT path, kind, enqueued_at, attempts, next_at, last_error, last_error_at, last_error_side
             FROM jobs WHERE attempts > 0 ORDER BY next_at, path LIMIT ?1",
        )?;
        let rows = st.query_map(params![limit.min(i64::MAX as usize) as i64], |r| {
            Ok(RetryingJob {
                path: r.get(0)?,
                kind: JobKind::parse(&r.get::<_, String>(1)?),
                enqueued_ms: r.get(2)?,
                attempts: clamp_u32(r.get(3)?),
                next_attempt_ms: r.get(4)?,
                last_error: r.get(5)?,
                last_error_ms: r.get(6)?,
                last_error_side: r
                    .get::<_, Option<String>>(7)?
                    .as_deref()
                    .and_then(Side::parse),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Dead-lettered jobs, by path.
    pub fn dead(&self) -> Result<Vec<DeadJob>, QueueError> {
        let mut st = self.conn.prepare(
            "SELECT path, kind, reason, at, attempts, cause, enqueued_at FROM dead ORDER BY path",
        )?;
        let rows = st.query_map([], |r| {
            Ok(DeadJob {
                path: r.get(0)?,
                kind: JobKind::parse(&r.get::<_, String>(1)?),
                error: r.get(2)?,
                dead_since_ms: r.get(3)?,
                attempts: clamp_u32(r.get(4)?),
                cause: DeadCause::parse(r.get::<_, Option<String>>(5)?.as_deref()),
                enqueued_ms: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Moves dead letters back into the queue, due at once with a fresh attempt count: all
    /// of them (`paths` = `None`) or those named. Returns the paths requeued and, separately,
    /// the named paths that were not dead-lettered. One transaction.
    pub fn requeue_dead(
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
mod tests {
    use super::*;
    use crate::retry::RetryPolicy;

    const P: RetryPolicy = RetryPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };

    fn job(path: &str, attempts: u32) -> Job {
        Job {
            path: path.into(),
            kind: JobKind::Out,
            enqueued_at_ms: 0,
            attempts,
        }
    }

    fn transient(error: &str, side: Side) -> Outcome {
        Outcome::Transient {
            error: error.into(),
            side,
            retry_after: None,
        }
    }

    #[test]
    fn transitions() {
        assert_eq!(
            transition(&job("/s/a", 0), &Outcome::Uploaded, 5, &P, 0.5),
            Transition::Delete
        );
        let t = transition(
            &job("/s/a", 2),
            &transient("503", Side::Target),
            1000,
            &P,
            1.0,
        );
        assert_eq!(
            t,
            Transition::Reschedule {
                attempts: 3,
                next_at_ms: 1000 + 4000,
                error: "503".into()
            }
        );
        let t = transition(
            &job("/s/a", 0),
            &Outcome::Permanent {
                error: "HTTP 403".into(),
                side: Side::Target,
            },
            1,
            &P,
            0.0,
        );
        assert_eq!(
            t,
            Transition::DeadLetter {
                attempts: 1,
                error: "HTTP 403".into(),
                cause: DeadCause::Permanent(Side::Target),
            }
        );
        let t = transition(
            &job("/s/a", 4),
            &Outcome::Gone {
                error: "gone".into(),
            },
            1,
            &P,
            0.0,
        );
        assert_eq!(
            t,
            Transition::DeadLetter {
                attempts: 5,
                error: "gone".into(),
                cause: DeadCause::Gone,
            }
        );
    }

    #[test]
    fn dedup_reschedule_dead_and_resolve() {
        let mut q = Queue::open_in_memory().expect("open");
        let jobs = vec![
            ("/s/a".to_owned(), JobKind::Out),
            ("/s/a".to_owned(), JobKind::Out),
        ];
        assert_eq!(q.enqueue(&jobs, 10).expect("enqueue"), 1);
        assert_eq!(q.enqueue(&jobs, 11).expect("enqueue"), 0);
        q.enqueue(&[("/s/x.drv".to_owned(), JobKind::Drv)], 12)
            .expect("drv");
        let due = q.due(20, 10, &|_| false).expect("due");
        assert_eq!(due.len(), 2);
        assert_eq!(due[0].path, "/s/a");
        assert_eq!(q.due(20, 10, &|p| p == "/s/a").expect("due").len(), 1);

        let failed = transient("daemon down", Side::Local);
        let t = transition(&due[0], &failed, 20, &P, 1.0);
        q.apply(&due[0], &t, Some(Side::Local), 20).expect("apply");
        let due2 = q.due(20, 10, &|_| false).expect("due");
        assert_eq!(due2.len(), 1, "a rescheduled job is not due yet");
        assert_eq!(q.next_due_ms().expect("next"), Some(12));
        let later = q.due(1020, 10, &|_| false).expect("due");
        assert!(later.iter().any(|j| j.path == "/s/a" && j.attempts == 1));
        assert_eq!(
            q.retrying(10).expect("retrying"),
            vec![RetryingJob {
                path: "/s/a".into(),
                kind: JobKind::Out,
                enqueued_ms: 10,
                attempts: 1,
                next_attempt_ms: 1020,
                last_error: Some("daemon down".into()),
                last_error_ms: Some(20),
                last_error_side: Some(Side::Local),
            }]
        );

        q.resolve_drv("/s/x.drv", &["/s/x".into(), "/s/a".into()], 30)
            .expect("resolve");
        assert!(!q.contains("/s/x.drv").expect("c"));
        assert!(q.contains("/s/x").expect("c"));

        let st = q.status().expect("status");
        assert_eq!(st.depth, 2);
        assert_eq!(st.retrying, 1);
        assert_eq!(st.next_retry_ms, Some(1020));
        assert_eq!(st.oldest_enqueued_ms, Some(10));

        let x = Job {
            path: "/s/x".into(),
            kind: JobKind::Out,
            enqueued_at_ms: 12,
            attempts: 0,
        };
        q.apply(
            &x,
            &Transition::DeadLetter {
                attempts: 1,
                error: "gone".into(),
                cause: DeadCause::Gone,
            },
            None,
            40,
        )
        .expect("dead");
        q.apply(&due[0], &Transition::Delete, None, 40)
            .expect("delete");
        let st = q.status().expect("status");
        assert_eq!((st.depth, st.dead, st.retrying), (0, 1, 0));
        assert_eq!(st.next_retry_ms, None);
        let dead = q.dead().expect("dead");
        assert_eq!(
            (dead[0].path.as_str(), dead[0].error.as_str(), dead[0].cause),
            ("/s/x", "gone", DeadCause::Gone)
        );
        // A path gone from the store needs no GC root.
        assert!(!q.holds("/s/x").expect("holds"));
        // Enqueued again (rebuilt): it leaves the dead letters.
        q.enqueue(&[("/s/x".to_owned(), JobKind::Out)], 50)
            .expect("again");
        assert_eq!(q.status().expect("status").dead, 0);
    }

    /// queued → dead (permanent) → queued again by `retry`, with a fresh attempt count and
    /// its original enqueue time; nothing is lost on the way, and unknown paths are named.
    #[test]
    fn dead_letters_and_retry() {
        let mut q = Queue::open_in_memory().expect("open");
        for (i, p) in ["/s/a", "/s/b", "/s/c"].iter().enumerate() {
            q.enqueue(&[((*p).to_owned(), JobKind::Out)], 100 + i as i64)
                .expect("enqueue");
        }
        for j in q.due(200, 10, &|_| false).expect("due") {
            let t = transition(
                &j,
                &Outcome::Permanent {
                    error: format!("{}: HTTP 403", j.path),
                    side: Side::Target,
                },
                300,
                &P,
                0.5,
            );
            q.apply(&j, &t, Some(Side::Target), 300).expect("apply");
        }
        let st = q.status().expect("status");
        assert_eq!((st.depth, st.dead), (0, 3));
        assert!(
            q.holds("/s/b").expect("holds"),
            "a dead letter keeps its root"
        );
        assert!(!q.contains("/s/b").expect("contains"));
        let dead = q.dead().expect("dead");
        assert_eq!(dead.len(), 3);
        assert_eq!(dead[1].cause, DeadCause::Permanent(Side::Target));
        assert_eq!(dead[1].attempts, 1);
        assert_eq!(dead[1].enqueued_ms, Some(101));
        assert_eq!(dead[1].dead_since_ms, 300);
        assert_eq!(dead[1].error, "/s/b: HTTP 403");
        // The daemon never picks up a dead letter.
        assert!(q.due(i64::MAX, 10, &|_| false).expect("due").is_empty());

        let (requeued, missing) = q
            .requeue_dead(Some(&["/s/b".into(), "/s/nope".into()]), 400)
            .expect("retry b");
        assert_eq!(requeued, vec!["/s/b".to_owned()]);
        assert_eq!(missing, vec!["/s/nope".to_owned()]);
        let due = q.due(400, 10, &|_| false).expect("due");
        assert_eq!(
            due,
            vec![Job {
                path: "/s/b".into(),
                kind: JobKind::Out,
                enqueued_at_ms: 101,
                attempts: 0,
            }]
        );
        let (requeued, missing) = q.requeue_dead(None, 500).expect("retry all");
        assert_eq!(requeued, vec!["/s/a".to_owned(), "/s/c".to_owned()]);
        assert!(missing.is_empty());
        let st = q.status().expect("status");
        assert_eq!((st.depth, st.dead), (3, 0));
        assert_eq!(q.requeue_dead(None, 600).expect("none").0.len(), 0);
    }

    #[test]
    fn target_and_local_status() {
        let q = Queue::open_in_memory().expect("open");
        assert_eq!(q.status().expect("status").last_error, None);
        q.record_target("file:///c", Ok(3), 5).expect("ok");
        q.record_target("file:///c", Err("disk full"), 6)
            .expect("err");
        q.record_target("file:///c", Ok(2), 7).expect("ok");
        let st = q.status().expect("status");
        let t = &st.targets[0];
        assert_eq!(t.paths_uploaded, 5);
        assert_eq!(t.last_ok_ms, Some(7));
        assert_eq!(t.last_error.as_deref(), Some("disk full"));
        assert_eq!(
            st.last_error,
            Some(LastError {
                at_ms: 6,
                error: "disk full".into(),
                source: "file:///c".into()
            })
        );
        // Local-side errors count too, and the newest error wins.
        q.record_local(Ok(()), 8).expect("ok");
        q.record_local(Err("cannot connect to the daemon"), 9)
            .expect("err");
        q.record_local(Err("cannot connect to the daemon"), 10)
            .expect("err");
        let st = q.status().expect("status");
        assert_eq!(
            st.local,
            LocalStatus {
                last_ok_ms: Some(8),
                last_error_ms: Some(10),
                last_error: Some("cannot connect to the daemon".into()),
                errors: 2,
            }
        );
        assert_eq!(
            st.last_error.map(|l| (l.at_ms, l.source)),
            Some((10, "local".to_owned()))
        );
    }

    #[test]
    fn survives_reopen() {
        let d = tempfile::tempdir().expect("dir");
        let db = d.path().join("q.sqlite");
        {
            let mut q = Queue::open(&db).expect("open");
            q.enqueue(&[("/s/a".to_owned(), JobKind::Out)], 1)
                .expect("enqueue");
        }
        let q = Queue::open(&db).expect("reopen");
        assert!(q.contains("/s/a").expect("contains"));
    }

    /// Issue 12 item 10: the queue database and its WAL are 0600 (they were 0644), also
    /// when an earlier version created the database world-readable.
    #[test]
    fn queue_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tmp");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        let db = d.path().join("queue.sqlite");
        let mut q = Queue::open(&db).expect("open");
        q.enqueue(&[("/s/a".to_owned(), JobKind::Out)], 1)
            .expect("enqueue");
        assert_eq!(mode(&db), 0o600);
        assert_eq!(mode(&d.path().join("queue.sqlite-wal")), 0o600);
        drop(q);
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let q = Queue::open(&db).expect("reopen");
        assert_eq!(mode(&db), 0o600);
        assert!(q.contains("/s/a").expect("kept"));
    }

    /// The first release's schema, verbatim, as its `Queue::init` created it (no
    /// `user_version`).
    const FIRST_RELEASE_SCHEMA: &str = "
        CREATE TABLE IF NOT EXISTS jobs (
            path TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            enqueued_at INTEGER NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at INTEGER NOT NULL,
            last_error TEXT
        );
        CREATE INDEX IF NOT EXISTS jobs_next ON jobs(next_at);
        CREATE TABLE IF NOT EXISTS dead (
            path TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            reason TEXT NOT NULL,
            at INTEGER NOT NULL
        );
        CREATE TABLE IF NOT EXISTS targets (
            url TEXT PRIMARY KEY,
            last_ok INTEGER,
            last_err_at INTEGER,
            last_err TEXT,
            uploaded INTEGER NOT NULL DEFAULT 0
        );";

    /// A queue written by the first release opens, keeps its jobs, dead letters and target
    /// history, gains the new columns, and works as a new one; the migrated file still
    /// takes the first release's own statements (a downgrade keeps working).
    #[test]
    fn migrates_a_first_release_database() {
        let d = tempfile::tempdir().expect("dir");
        let db = d.path().join("queue.sqlite");
        {
            let c = Connection::open(&db).expect("old");
            c.pragma_update(None, "journal_mode", "WAL").expect("wal");
            c.execute_batch(FIRST_RELEASE_SCHEMA).expect("old schema");
            c.execute_batch(
                "INSERT INTO jobs(path, kind, enqueued_at, attempts, next_at, last_error)
                   VALUES ('/s/a', 'out', 10, 3, 5000, 'HTTP 503'), ('/s/d.drv', 'drv', 11, 0, 11, NULL);
                 INSERT INTO dead(path, kind, reason, at) VALUES ('/s/old', 'out', 'no longer in the store', 20);
                 INSERT INTO targets(url, last_ok, uploaded) VALUES ('file:///c', 30, 7);",
            )
            .expect("old rows");
            let v: i64 = c
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .expect("version");
            assert_eq!(v, 0);
        }
        let mut q = Queue::open(&db).expect("migrate");
        let v: i64 = q
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(v, schema_version());
        let st = q.status().expect("status");
        assert_eq!((st.depth, st.retrying, st.dead), (2, 1, 1));
        assert_eq!(st.targets[0].paths_uploaded, 7);
        assert_eq!(st.local, LocalStatus::default());
        let r = q.retrying(10).expect("retrying");
        assert_eq!(r[0].attempts, 3);
        assert_eq!(r[0].last_error.as_deref(), Some("HTTP 503"));
        assert_eq!((r[0].last_error_ms, r[0].last_error_side), (None, None));
        let dead = q.dead().expect("dead");
        assert_eq!(
            (dead[0].cause, dead[0].attempts, dead[0].enqueued_ms),
            (DeadCause::Unknown, 0, None)
        );
        // An old dead letter goes back like a new one (enqueued now: its time was not kept).
        let (requeued, _) = q.requeue_dead(None, 40).expect("retry");
        assert_eq!(requeued, vec!["/s/old".to_owned()]);
        assert!(
            q.due(40, 10, &|_| false)
                .expect("due")
                .iter()
                .any(|j| j.path == "/s/old" && j.enqueued_at_ms == 40)
        );
        q.record_local(Err("x"), 50).expect("local");
        drop(q);
        // Opening again is a no-op.
        let q = Queue::open(&db).expect("reopen");
        assert_eq!(q.status().expect("status").local.errors, 1);
        drop(q);
        // The first release's statements still work on the migrated file.
        let c = Connection::open(&db).expect("old again");
        c.execute_batch(FIRST_RELEASE_SCHEMA).expect("old init");
        c.execute(
            "INSERT OR REPLACE INTO dead(path, kind, reason, at) VALUES ('/s/z', 'out', 'gone', 60)",
            [],
        )
        .expect("old dead-letter insert");
        c.execute(
            "UPDATE jobs SET attempts = 1, next_at = 70, last_error = 'e' WHERE path = '/s/a'",
            [],
        )
        .expect("old reschedule");
    }

    /// `retry` and the uploader write the same database: a transaction that reads and then
    /// writes must wait for the other's commit, not fail with "database is locked" (seen
    /// end to end before transactions took the write lock up front).
    #[test]
    fn concurrent_writer_is_waited_for() {
        let d = tempfile::tempdir().expect("dir");
        let db = d.path().join("queue.sqlite");
        let mut q = Queue::open(&db).expect("open");
        q.enqueue(&[("/s/a".to_owned(), JobKind::Out)], 1)
            .expect("enqueue");
        let a = q.due(1, 1, &|_| false).expect("due").remove(0);
        let t = Transition::DeadLetter {
            attempts: 1,
            error: "403".into(),
            cause: DeadCause::Permanent(Side::Target),
        };
        q.apply(&a, &t, Some(Side::Target), 2).expect("dead");
        let other = Connection::open(&db).expect("other");
        other
            .busy_timeout(Duration::from_secs(10))
            .expect("timeout");
        other.execute_batch("BEGIN IMMEDIATE").expect("lock");
        other
            .execute(
                "INSERT INTO jobs(path, kind, enqueued_at, next_at) VALUES ('/s/b', 'out', 3, 3)",
                [],
            )
            .expect("insert");
        let committer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            other.execute_batch("COMMIT").expect("commit");
        });
        let (requeued, _) = q.requeue_dead(None, 4).expect("requeue waits for the lock");
        committer.join().expect("thread");
        assert_eq!(requeued, vec!["/s/a".to_owned()]);
        assert_eq!(q.status().expect("status").depth, 2);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let d = tempfile::tempdir().expect("dir");
        let db = d.path().join("queue.sqlite");
        drop(Queue::open(&db).expect("create"));
        {
            let c = Connection::open(&db).expect("open");
            c.pragma_update(None, "user_version", schema_version() + 1)
                .expect("bump");
        }
        let e = Queue::open(&db).err().expect("newer schema refused");
        assert!(matches!(e, QueueError::NewerSchema { .. }), "{e}");
        assert!(e.to_string().contains("schema version"), "{e}");
    }
}
