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

/// The queue at `db`, with the output `/s/a` enqueued at 1.
fn open_with_a(db: &Path) -> Queue {
    let mut q = Queue::open(db).expect("open");
    q.enqueue(&[("/s/a".to_owned(), JobKind::Out)], 1)
        .expect("enqueue");
    q
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
    drop(open_with_a(&db));
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
    let q = open_with_a(&db);
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
    let mut q = open_with_a(&db);
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
