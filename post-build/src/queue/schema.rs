//! The queue database's schema, its forward migrations, and the settings of every connection.

use super::QueueError;
use rusqlite::{Connection, Transaction};
use std::time::Duration;

/// Schema steps; step `i` takes a database from version `i` to `i + 1`. Version 0 is both
/// a new file and the schema of the first release (which set no `user_version`), so step 0
/// uses `IF NOT EXISTS` and leaves an existing first-release database as it is.
/// Columns are only ever added (with defaults), never renamed or dropped: an older uploader
/// still reads and writes a migrated database correctly.
pub(crate) const MIGRATIONS: &[&str] = &[
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
    // 2 → 3: S3 multipart uploads in progress, so that a restarted uploader resumes them
    // (or aborts them) instead of leaving parts billed in the bucket (`crate::multipart`).
    "CREATE TABLE multipart (
        target TEXT NOT NULL,
        key TEXT NOT NULL,
        path TEXT NOT NULL,
        job TEXT NOT NULL,
        upload_id TEXT NOT NULL,
        file_size INTEGER NOT NULL,
        part_size INTEGER NOT NULL,
        started_at INTEGER NOT NULL,
        PRIMARY KEY (target, key)
    );
    CREATE TABLE multipart_parts (
        target TEXT NOT NULL,
        key TEXT NOT NULL,
        number INTEGER NOT NULL,
        etag TEXT NOT NULL,
        PRIMARY KEY (target, key, number)
    );",
];

pub(crate) fn schema_version() -> i64 {
    MIGRATIONS.len() as i64
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

/// Settings every connection to the queue database uses, then the schema migration.
pub(crate) fn prepare_connection(mut conn: Connection) -> Result<Connection, QueueError> {
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    migrate(&mut conn)?;
    Ok(conn)
}
