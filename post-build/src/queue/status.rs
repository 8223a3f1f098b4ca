//! What `ferry-post-build status` reports: per-target and local-store outcomes as the
//! uploader records them, the jobs that are retrying or dead-lettered, and the queue's
//! summary ([`QueueStatus`]). Only reads and bookkeeping: jobs move in the parent module.

use super::{DeadCause, JobKind, Queue, QueueError, clamp_u32, serialize_redacted};
use crate::failure::Side;
use rusqlite::{OptionalExtension, params};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct TargetStatus {
    /// As configured (the key of the `targets` table); serialised without credentials.
    #[serde(serialize_with = "serialize_redacted")]
    pub(crate) url: String,
    pub(crate) last_ok_ms: Option<i64>,
    pub(crate) last_error_ms: Option<i64>,
    pub(crate) last_error: Option<String>,
    pub(crate) paths_uploaded: i64,
}

/// The local store as the uploader sees it: when reading path infos and NARs last worked,
/// and the last error doing so.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct LocalStatus {
    pub(crate) last_ok_ms: Option<i64>,
    pub(crate) last_error_ms: Option<i64>,
    pub(crate) last_error: Option<String>,
    /// Failed attempts on the local side since the queue was created.
    pub(crate) errors: i64,
}

/// A queued job that has failed at least once.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct RetryingJob {
    pub(crate) path: String,
    pub(crate) kind: JobKind,
    pub(crate) enqueued_ms: i64,
    pub(crate) attempts: u32,
    pub(crate) next_attempt_ms: i64,
    pub(crate) last_error: Option<String>,
    pub(crate) last_error_ms: Option<i64>,
    /// `None` for errors recorded by a version that did not say.
    pub(crate) last_error_side: Option<Side>,
}

/// A dead-lettered job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct DeadJob {
    pub(crate) path: String,
    pub(crate) kind: JobKind,
    pub(crate) error: String,
    pub(crate) dead_since_ms: i64,
    pub(crate) attempts: u32,
    pub(crate) cause: DeadCause,
    pub(crate) enqueued_ms: Option<i64>,
}

/// The most recent error anywhere (local store or a target).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct LastError {
    pub(crate) at_ms: i64,
    pub(crate) error: String,
    /// `local` or the target's URL.
    pub(crate) source: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct QueueStatus {
    pub(crate) depth: i64,
    pub(crate) oldest_enqueued_ms: Option<i64>,
    pub(crate) dead: i64,
    pub(crate) retrying: i64,
    /// When the earliest rescheduled job is due again.
    pub(crate) next_retry_ms: Option<i64>,
    pub(crate) last_error: Option<LastError>,
    pub(crate) local: LocalStatus,
    pub(crate) targets: Vec<TargetStatus>,
}

impl Queue {
    pub(crate) fn record_target(
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
    pub(crate) fn record_local(&self, ok: Result<(), &str>, now: i64) -> Result<(), QueueError> {
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

    pub(crate) fn status(&self) -> Result<QueueStatus, QueueError> {
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
    pub(crate) fn retrying(&self, limit: usize) -> Result<Vec<RetryingJob>, QueueError> {
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
    pub(crate) fn dead(&self) -> Result<Vec<DeadJob>, QueueError> {
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
}
