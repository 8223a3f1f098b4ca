//! The uploader's durable queue: SQLite in WAL mode with `synchronous=FULL`, so a committed
//! transaction survives a power cut (NORMAL in WAL may lose the last one; docs/upload.md §4.2).
//!
//! One row per store path to upload (`PRIMARY KEY`, so a path enqueued by many hooks is one
//! job), or per derivation whose outputs are still unknown (Nix 2.8's empty `OUT_PATHS`).
//! A job is deleted only after every target has confirmed its whole closure; failures
//! reschedule it with back-off; a path that can never be uploaded (gone from the store,
//! corrupt) moves to `dead` with its reason. "Running" is not stored: a job being uploaded
//! when the uploader dies is simply still queued when it restarts.

use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
#[error("queue database: {0}")]
pub struct QueueError(#[from] rusqlite::Error);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// Worth trying again (network, target error, local hiccup).
    Transient {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Will never work (the path left the store, its NAR hash is wrong).
    Permanent { reason: String },
}

/// What the queue does with a job after an attempt: the pure core of the state machine
/// (queued → running → deleted | rescheduled | dead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Delete,
    Reschedule {
        attempts: u32,
        next_at_ms: i64,
        error: String,
    },
    DeadLetter {
        reason: String,
    },
}

pub fn transition(
    job: &Job,
    outcome: &Outcome,
    now_ms: i64,
    policy: &crate::retry::RetryPolicy,
    unit: f64,
) -> Transition {
    match outcome {
        Outcome::Uploaded => Transition::Delete,
        Outcome::Permanent { reason } => Transition::DeadLetter {
            reason: reason.clone(),
        },
        Outcome::Transient { error, retry_after } => {
            let attempts = job.attempts.saturating_add(1);
            let delay = policy.delay(attempts, unit, *retry_after);
            Transition::Reschedule {
                attempts,
                next_at_ms: now_ms.saturating_add(delay.as_millis().min(i64::MAX as u128) as i64),
                error: error.clone(),
            }
        }
    }
}

pub struct Queue {
    conn: Connection,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetStatus {
    pub url: String,
    pub last_ok_ms: Option<i64>,
    pub last_error_ms: Option<i64>,
    pub last_error: Option<String>,
    pub paths_uploaded: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueStatus {
    pub depth: i64,
    pub oldest_enqueued_ms: Option<i64>,
    pub dead: i64,
    pub retrying: i64,
    pub targets: Vec<TargetStatus>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Queue {
    pub fn open(path: &Path) -> Result<Queue, QueueError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Queue, QueueError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Queue, QueueError> {
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
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
        )?;
        Ok(Queue { conn })
    }

    /// Adds jobs in one transaction; paths already queued stay as they are (dedup).
    pub fn enqueue(&mut self, jobs: &[(String, JobKind)], now: i64) -> Result<usize, QueueError> {
        let tx = self.conn.transaction()?;
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
        let tx = self.conn.transaction()?;
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
                attempts: r.get::<_, i64>(3)?.clamp(0, u32::MAX as i64) as u32,
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

    pub fn apply(&mut self, job: &Job, t: &Transition, now: i64) -> Result<(), QueueError> {
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
                    "UPDATE jobs SET attempts = ?2, next_at = ?3, last_error = ?4 WHERE path = ?1",
                    params![job.path, attempts, next_at_ms, error],
                )?;
            }
            Transition::DeadLetter { reason } => {
                let tx = self.conn.transaction()?;
                tx.execute(
                    "INSERT OR REPLACE INTO dead(path, kind, reason, at) VALUES (?1, ?2, ?3, ?4)",
                    params![job.path, job.kind.as_str(), reason, now],
                )?;
                tx.execute("DELETE FROM jobs WHERE path = ?1", params![job.path])?;
                tx.commit()?;
            }
        }
        Ok(())
    }

    pub fn contains(&self, path: &str) -> Result<bool, QueueError> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM jobs WHERE path = ?1", params![path], |_| {
                Ok(())
            })
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

    pub fn status(&self) -> Result<QueueStatus, QueueError> {
        let (depth, oldest, retrying): (i64, Option<i64>, i64) = self.conn.query_row(
            "SELECT COUNT(*), MIN(enqueued_at), COALESCE(SUM(attempts > 0), 0) FROM jobs",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let dead: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM dead", [], |r| r.get(0))?;
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
        Ok(QueueStatus {
            depth,
            oldest_enqueued_ms: oldest,
            dead,
            retrying,
            targets,
        })
    }

    /// Dead-lettered paths with their reasons.
    pub fn dead(&self) -> Result<Vec<(String, String)>, QueueError> {
        let mut st = self
            .conn
            .prepare("SELECT path, reason FROM dead ORDER BY path")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
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

    fn job(attempts: u32) -> Job {
        Job {
            path: "/s/a".into(),
            kind: JobKind::Out,
            enqueued_at_ms: 0,
            attempts,
        }
    }

    #[test]
    fn transitions() {
        assert_eq!(
            transition(&job(0), &Outcome::Uploaded, 5, &P, 0.5),
            Transition::Delete
        );
        let t = transition(
            &job(2),
            &Outcome::Transient {
                error: "503".into(),
                retry_after: None,
            },
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
            &job(0),
            &Outcome::Permanent {
                reason: "gone".into(),
            },
            1,
            &P,
            0.0,
        );
        assert_eq!(
            t,
            Transition::DeadLetter {
                reason: "gone".into()
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

        let t = transition(
            &due[0],
            &Outcome::Transient {
                error: "down".into(),
                retry_after: None,
            },
            20,
            &P,
            1.0,
        );
        q.apply(&due[0], &t, 20).expect("apply");
        let due2 = q.due(20, 10, &|_| false).expect("due");
        assert_eq!(due2.len(), 1, "a rescheduled job is not due yet");
        assert_eq!(q.next_due_ms().expect("next"), Some(12));
        let later = q.due(1020, 10, &|_| false).expect("due");
        assert!(later.iter().any(|j| j.path == "/s/a" && j.attempts == 1));

        q.resolve_drv("/s/x.drv", &["/s/x".into(), "/s/a".into()], 30)
            .expect("resolve");
        assert!(!q.contains("/s/x.drv").expect("c"));
        assert!(q.contains("/s/x").expect("c"));

        let st = q.status().expect("status");
        assert_eq!(st.depth, 2);
        assert_eq!(st.retrying, 1);
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
                reason: "gone".into(),
            },
            40,
        )
        .expect("dead");
        q.apply(&due[0], &Transition::Delete, 40).expect("delete");
        let st = q.status().expect("status");
        assert_eq!((st.depth, st.dead), (0, 1));
        assert_eq!(
            q.dead().expect("dead"),
            vec![("/s/x".into(), "gone".into())]
        );
        // Enqueued again (rebuilt): it leaves the dead letters.
        q.enqueue(&[("/s/x".to_owned(), JobKind::Out)], 50)
            .expect("again");
        assert_eq!(q.status().expect("status").dead, 0);
    }

    #[test]
    fn target_status() {
        let q = Queue::open_in_memory().expect("open");
        q.record_target("file:///c", Ok(3), 5).expect("ok");
        q.record_target("file:///c", Err("disk full"), 6)
            .expect("err");
        q.record_target("file:///c", Ok(2), 7).expect("ok");
        let t = &q.status().expect("status").targets[0];
        assert_eq!(t.paths_uploaded, 5);
        assert_eq!(t.last_ok_ms, Some(7));
        assert_eq!(t.last_error.as_deref(), Some("disk full"));
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
}
