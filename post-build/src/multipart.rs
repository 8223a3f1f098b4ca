//! S3 multipart uploads of large NARs, resumable across uploader restarts.
//!
//! A NAR at or above `multipart-threshold-mib` goes to an `s3://` target in parts (S3 refuses
//! a single `PUT` over 5 GiB, and a failed 3 GiB `PUT` would start again from zero). The
//! upload ID and every finished part's ETag are committed to the queue database before the
//! next step, so an uploader killed mid-upload continues with the missing parts when it
//! restarts: the NAR's key names its compressed bytes' hash and compression is
//! deterministic, so the re-prepared work file is the same file and the recorded parts still
//! fit it (each is checked against the file's MD5 before it is trusted).
//!
//! Integrity: each part is sent with its signed SHA-256 and its `Content-MD5`, and the part
//! ETag S3 answers must be that MD5; the completed object's ETag must be the MD5 of the part
//! MD5s (`ferry_s3::multipart`). An upload that cannot finish (a permanent error, a different
//! file under the same store path, a job that left the queue) is aborted so its parts do not
//! stay billed in the bucket.
//!
//! Memory: parts are streamed from the work file in 256 KiB reads, `multipart-parallel` at a
//! time; nothing scales with the part or NAR size.

use crate::queue::{QueueError, now_ms, prepare_connection};
use crate::target::{Body, Remote, Request, Resource, Target, TargetError};
use ferry_s3::multipart::{self as mp, Part};
use futures_util::stream::{self, StreamExt as _};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Mutex;

/// When and how NARs are cut into parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MultipartSettings {
    /// NARs of at least this many bytes go in parts (to S3 targets).
    pub(crate) threshold: u64,
    /// Bytes per part (clamped to S3's 5 MiB–5 GiB; grown to fit 10,000 parts).
    pub(crate) part_size: u64,
    /// Parts in flight at once, per NAR.
    pub(crate) parallel: usize,
}

impl Default for MultipartSettings {
    fn default() -> Self {
        MultipartSettings {
            threshold: 64 << 20,
            part_size: 16 << 20,
            parallel: 4,
        }
    }
}

/// An upload in progress as the queue database records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Recorded {
    pub(crate) target: String,
    pub(crate) key: String,
    /// The store path whose NAR this is.
    pub(crate) path: String,
    /// The queued job it is part of (the closure's root): while that is queued, the upload
    /// is resumed; once it is not, the upload is abandoned.
    pub(crate) job: String,
    pub(crate) upload_id: String,
    pub(crate) file_size: u64,
    pub(crate) part_size: u64,
    pub(crate) started_at: i64,
    /// Finished parts: number → ETag (unquoted).
    pub(crate) parts: BTreeMap<u32, String>,
}

/// The multipart tables of the queue database, through a connection of their own (the
/// daemon's `Queue` belongs to its main loop; upload workers record parts as they finish).
pub(crate) struct UploadLog {
    conn: Mutex<Connection>,
}

fn lock(m: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl UploadLog {
    /// Opens the queue database at `path` (already created by [`crate::queue::Queue::open`]).
    pub(crate) fn open(path: &Path) -> Result<UploadLog, QueueError> {
        Ok(UploadLog {
            conn: Mutex::new(prepare_connection(Connection::open(path)?)?),
        })
    }

    #[cfg(test)]
    pub(crate) fn open_in_memory() -> Result<UploadLog, QueueError> {
        Ok(UploadLog {
            conn: Mutex::new(prepare_connection(Connection::open_in_memory()?)?),
        })
    }

    fn read(conn: &Connection, target: &str, key: &str) -> rusqlite::Result<Option<Recorded>> {
        let head = conn
            .query_row(
                "SELECT path, job, upload_id, file_size, part_size, started_at FROM multipart
                 WHERE target = ?1 AND key = ?2",
                params![target, key],
                |r| {
                    Ok(Recorded {
                        target: target.to_owned(),
                        key: key.to_owned(),
                        path: r.get(0)?,
                        job: r.get(1)?,
                        upload_id: r.get(2)?,
                        file_size: r.get::<_, i64>(3)? as u64,
                        part_size: r.get::<_, i64>(4)? as u64,
                        started_at: r.get(5)?,
                        parts: BTreeMap::new(),
                    })
                },
            )
            .optional()?;
        let Some(mut rec) = head else { return Ok(None) };
        let mut st = conn
            .prepare("SELECT number, etag FROM multipart_parts WHERE target = ?1 AND key = ?2")?;
        for row in st.query_map(params![target, key], |r| {
            Ok((r.get::<_, u32>(0)?, r.get(1)?))
        })? {
            let (n, e) = row?;
            rec.parts.insert(n, e);
        }
        Ok(Some(rec))
    }

    pub(crate) fn find(&self, target: &str, key: &str) -> Result<Option<Recorded>, QueueError> {
        Ok(Self::read(&lock(&self.conn), target, key)?)
    }

    /// Every recorded upload (for the start-up sweep and `status`).
    pub(crate) fn all(&self) -> Result<Vec<Recorded>, QueueError> {
        let conn = lock(&self.conn);
        let keys: Vec<(String, String)> = conn
            .prepare("SELECT target, key FROM multipart ORDER BY started_at")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for (t, k) in keys {
            out.extend(Self::read(&conn, &t, &k)?);
        }
        Ok(out)
    }

    /// Uploads of `path` to `target` under another key than `key` (an earlier work file).
    pub(crate) fn others_for_path(
        &self,
        target: &str,
        path: &str,
        key: &str,
    ) -> Result<Vec<Recorded>, QueueError> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|r| r.target == target && r.path == path && r.key != key)
            .collect())
    }

    pub(crate) fn begin(&self, rec: &Recorded) -> Result<(), QueueError> {
        let conn = lock(&self.conn);
        conn.execute(
            "DELETE FROM multipart_parts WHERE target = ?1 AND key = ?2",
            params![rec.target, rec.key],
        )?;
        conn.execute(
            "INSERT OR REPLACE INTO multipart
             (target, key, path, job, upload_id, file_size, part_size, started_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                rec.target,
                rec.key,
                rec.path,
                rec.job,
                rec.upload_id,
                rec.file_size as i64,
                rec.part_size as i64,
                rec.started_at
            ],
        )?;
        Ok(())
    }

    pub(crate) fn part_done(
        &self,
        target: &str,
        key: &str,
        number: u32,
        etag: &str,
    ) -> Result<(), QueueError> {
        lock(&self.conn).execute(
            "INSERT OR REPLACE INTO multipart_parts (target, key, number, etag) VALUES (?1, ?2, ?3, ?4)",
            params![target, key, number, etag],
        )?;
        Ok(())
    }

    pub(crate) fn forget_part(
        &self,
        target: &str,
        key: &str,
        number: u32,
    ) -> Result<(), QueueError> {
        lock(&self.conn).execute(
            "DELETE FROM multipart_parts WHERE target = ?1 AND key = ?2 AND number = ?3",
            params![target, key, number],
        )?;
        Ok(())
    }

    /// Drops the record of a completed or aborted upload.
    pub(crate) fn forget(&self, target: &str, key: &str) -> Result<(), QueueError> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM multipart_parts WHERE target = ?1 AND key = ?2",
            params![target, key],
        )?;
        tx.execute(
            "DELETE FROM multipart WHERE target = ?1 AND key = ?2",
            params![target, key],
        )?;
        tx.commit()?;
        Ok(())
    }
}

/// MD5 and SHA-256 of one part of `file` (blocking; read in 256 KiB chunks).
fn hash_part(file: &Path, part: Part) -> std::io::Result<([u8; 16], String)> {
    let mut f = std::fs::File::open(file)?;
    f.seek(SeekFrom::Start(part.offset))?;
    let mut f = f.take(part.len);
    let mut md5 = mp::Md5Sink::new();
    let mut sha = ferry_nix::hash::Sha256Sink::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        md5.update(&buf[..n]);
        std::io::Write::write_all(&mut sha, &buf[..n])?;
        got += n as u64;
    }
    if got != part.len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "part {} of {}: {got} of {} bytes",
                part.number,
                file.display(),
                part.len
            ),
        ));
    }
    Ok((md5.finish(), sha.finish().to_base16()))
}

async fn hash_part_async(file: &Path, part: Part) -> std::io::Result<([u8; 16], String)> {
    let file = file.to_owned();
    tokio::task::spawn_blocking(move || hash_part(&file, part))
        .await
        .map_err(std::io::Error::other)?
}

/// One multipart upload of a work file to an S3 target.
pub(crate) struct Upload<'a> {
    pub(crate) target: &'a Target,
    pub(crate) log: &'a UploadLog,
    /// The store path (to find and abort uploads of an earlier work file).
    pub(crate) path: &'a str,
    /// The queued job this NAR is uploaded for.
    pub(crate) job: &'a str,
    pub(crate) key: &'a str,
    pub(crate) file: &'a Path,
    pub(crate) content_type: &'a str,
    pub(crate) settings: MultipartSettings,
}

impl Upload<'_> {
    fn remote(&self) -> Result<&Remote, TargetError> {
        self.target
            .s3_remote()
            .ok_or_else(|| TargetError::BadParam {
                url: self.target.shown(),
                message: "multipart uploads need an s3:// target".into(),
            })
    }

    fn io(&self, e: std::io::Error) -> TargetError {
        TargetError::Io {
            target: self.target.shown(),
            path: self.file.to_owned(),
            source: e,
        }
    }

    fn db(&self, e: QueueError) -> TargetError {
        self.io(std::io::Error::other(e))
    }

    fn answer_error(&self, method: &'static str, e: mp::AnswerError) -> TargetError {
        TargetError::Network {
            target: self.target.shown(),
            method,
            key: self.key.to_owned(),
            message: e.to_string(),
        }
    }

    async fn initiate(&self, remote: &Remote) -> Result<String, TargetError> {
        let r = self
            .target
            .send(
                remote,
                Request {
                    query: &[("uploads", "")],
                    content_type: Some(self.content_type),
                    ..Request::new("POST", Resource::Key(self.key), Body::Empty)
                },
            )
            .await?;
        if !r.status().is_success() {
            return Err(self.target.status_error("POST", self.key, r).await);
        }
        let body = self
            .target
            .small_text("POST", self.key, r, crate::target::MAX_XML_ANSWER)
            .await?;
        mp::parse_initiate(&body).map_err(|e| self.answer_error("POST", e))
    }

    /// Aborts an upload (best effort: S3 also expires them by lifecycle rules) and forgets
    /// it. A 404 means it is gone already.
    pub(crate) async fn abort(
        target: &Target,
        log: &UploadLog,
        rec: &Recorded,
    ) -> Result<(), TargetError> {
        let Some(remote) = target.s3_remote() else {
            return Ok(());
        };
        let r = target
            .send(
                remote,
                Request {
                    query: &[("uploadId", &rec.upload_id)],
                    ..Request::new("DELETE", Resource::Key(&rec.key), Body::Empty)
                },
            )
            .await?;
        let status = r.status().as_u16();
        if !(200..300).contains(&status) && status != 404 {
            return Err(target.status_error("DELETE", &rec.key, r).await);
        }
        tracing::info!(target = %target.shown(), key = %rec.key, parts = rec.parts.len(),
            "aborted an unfinished multipart upload");
        log.forget(&rec.target, &rec.key)
            .map_err(|e| TargetError::Network {
                target: target.shown(),
                method: "DELETE",
                key: rec.key.clone(),
                message: e.to_string(),
            })
    }

    async fn put_part(
        &self,
        remote: &Remote,
        upload_id: &str,
        part: Part,
    ) -> Result<String, TargetError> {
        let (md5, sha) = hash_part_async(self.file, part)
            .await
            .map_err(|e| self.io(e))?;
        let number = part.number.to_string();
        let r = self
            .target
            .send(
                remote,
                Request {
                    query: &[("partNumber", &number), ("uploadId", upload_id)],
                    content_md5: Some(mp::content_md5(&md5)),
                    sha256: Some(sha),
                    ..Request::new(
                        "PUT",
                        Resource::Key(self.key),
                        Body::Range {
                            path: self.file,
                            offset: part.offset,
                            len: part.len,
                        },
                    )
                },
            )
            .await?;
        if !r.status().is_success() {
            return Err(self.target.status_error("PUT", self.key, r).await);
        }
        let want = mp::hex(&md5);
        let got = r
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(|e| mp::unquote_etag(e).to_ascii_lowercase());
        if got.as_deref() != Some(want.as_str()) {
            return Err(TargetError::Network {
                target: self.target.shown(),
                method: "PUT",
                key: format!("{} part {}", self.key, part.number),
                message: format!("ETag {got:?} is not the part's MD5 {want}"),
            });
        }
        Ok(want)
    }

    /// Uploads the file; on success the object exists in full and the record is gone.
    pub(crate) async fn run(&self) -> Result<(), TargetError> {
        let remote = self.remote()?;
        let size = tokio::fs::metadata(self.file)
            .await
            .map_err(|e| self.io(e))?
            .len();
        let plan = mp::plan(size, self.settings.part_size)
            .map_err(|e| self.io(std::io::Error::other(e)))?;
        let part_size = plan
            .first()
            .map(|p| p.len)
            .unwrap_or(0)
            .max(mp::MIN_PART_SIZE);
        let url = &self.target.url;
        // An earlier work file of the same path (other key): its parts can never be used.
        for old in self
            .log
            .others_for_path(url, self.path, self.key)
            .map_err(|e| self.db(e))?
        {
            if let Err(e) = Self::abort(self.target, self.log, &old).await {
                tracing::warn!(target = %self.target.shown(), key = %old.key, error = %e,
                    "could not abort an outdated multipart upload");
            }
        }
        let mut rec = match self.log.find(url, self.key).map_err(|e| self.db(e))? {
            Some(r) if r.file_size == size && r.part_size == part_size => {
                tracing::info!(target = %self.target.shown(), key = %self.key,
                    done = r.parts.len(), parts = plan.len(), "resuming a multipart upload");
                r
            }
            other => {
                if let Some(stale) = other {
                    let _ = Self::abort(self.target, self.log, &stale).await;
                }
                let upload_id = self.initiate(remote).await?;
                let rec = Recorded {
                    target: url.clone(),
                    key: self.key.to_owned(),
                    path: self.path.to_owned(),
                    job: self.job.to_owned(),
                    upload_id,
                    file_size: size,
                    part_size,
                    started_at: now_ms(),
                    parts: BTreeMap::new(),
                };
                self.log.begin(&rec).map_err(|e| self.db(e))?;
                rec
            }
        };
        match self.parts_and_complete(remote, &mut rec, &plan).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // The upload ID itself is gone (aborted elsewhere, expired): start over next
                // time rather than failing on it forever.
                let gone =
                    matches!(&e, TargetError::Status { code: Some(c), .. } if c == "NoSuchUpload");
                if (gone || crate::failure::Classify::is_permanent(&e))
                    && let Err(ae) = Self::abort(self.target, self.log, &rec).await
                {
                    tracing::warn!(target = %self.target.shown(), key = %self.key, error = %ae,
                        "could not abort a failed multipart upload");
                    if gone {
                        let _ = self.log.forget(url, self.key);
                    }
                }
                Err(e)
            }
        }
    }

    async fn parts_and_complete(
        &self,
        remote: &Remote,
        rec: &mut Recorded,
        plan: &[Part],
    ) -> Result<(), TargetError> {
        let url = &self.target.url;
        // Recorded parts are trusted only if they are this file's bytes.
        let mut todo = Vec::new();
        for &part in plan {
            match rec.parts.get(&part.number) {
                Some(etag) => {
                    let (md5, _) = hash_part_async(self.file, part)
                        .await
                        .map_err(|e| self.io(e))?;
                    if mp::hex(&md5) != *etag {
                        self.log
                            .forget_part(url, self.key, part.number)
                            .map_err(|e| self.db(e))?;
                        rec.parts.remove(&part.number);
                        todo.push(part);
                    }
                }
                None => todo.push(part),
            }
        }
        // Parts recorded beyond the plan cannot be: the plan is a function of the size.
        rec.parts.retain(|n, _| plan.iter().any(|p| p.number == *n));
        let upload_id = rec.upload_id.clone();
        let mut results = stream::iter(todo)
            .map(|part| {
                let upload_id = &upload_id;
                async move { (part.number, self.put_part(remote, upload_id, part).await) }
            })
            .buffer_unordered(self.settings.parallel.max(1));
        let mut first_err = None;
        while let Some((n, r)) = results.next().await {
            match r {
                Ok(etag) => {
                    self.log
                        .part_done(url, self.key, n, &etag)
                        .map_err(|e| self.db(e))?;
                    rec.parts.insert(n, etag);
                }
                // Let the parts in flight finish (and be recorded) before giving up.
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        drop(results);
        if let Some(e) = first_err {
            return Err(e);
        }
        let parts: Vec<(u32, String)> = rec.parts.iter().map(|(n, e)| (*n, e.clone())).collect();
        let md5s: Vec<String> = parts.iter().map(|(_, e)| e.clone()).collect();
        let body = mp::complete_body(&parts);
        let r = self
            .target
            .send(
                remote,
                Request {
                    query: &[("uploadId", &upload_id)],
                    content_type: Some("application/xml"),
                    ..Request::new(
                        "POST",
                        Resource::Key(self.key),
                        Body::Bytes(body.into_bytes()),
                    )
                },
            )
            .await?;
        if !r.status().is_success() {
            return Err(self.target.status_error("POST", self.key, r).await);
        }
        let text = self
            .target
            .small_text("POST", self.key, r, crate::target::MAX_XML_ANSWER)
            .await?;
        let etag = mp::parse_complete(&text).map_err(|e| self.answer_error("POST", e))?;
        let want = mp::multipart_etag(&md5s).unwrap_or_default();
        if !etag.eq_ignore_ascii_case(&want) {
            return Err(TargetError::Network {
                target: self.target.shown(),
                method: "POST",
                key: self.key.to_owned(),
                message: format!("completed object's ETag {etag} is not {want}"),
            });
        }
        self.log.forget(url, self.key).map_err(|e| self.db(e))?;
        tracing::info!(target = %self.target.shown(), key = %self.key, parts = parts.len(),
            size = rec.file_size, "multipart upload complete");
        Ok(())
    }
}

/// At start-up: aborts recorded uploads of paths no longer queued (the job finished another
/// way, was dropped with `retry --drop`, or the path was collected), and forgets records of
/// targets no longer configured (their credentials are gone; S3's lifecycle rules or the
/// next uploader of that target clean up).
pub(crate) async fn sweep(
    targets: &[std::sync::Arc<Target>],
    log: &UploadLog,
    queued: &dyn Fn(&str) -> bool,
) {
    let Ok(all) = log.all() else { return };
    for rec in all {
        let Some(target) = targets.iter().find(|t| t.url == rec.target) else {
            let _ = log.forget(&rec.target, &rec.key);
            continue;
        };
        if queued(&rec.job) {
            continue;
        }
        if let Err(e) = Upload::abort(target, log, &rec).await {
            tracing::warn!(target = %target.shown(), key = %rec.key, error = %e,
                "could not abort an abandoned multipart upload; will try again at the next start");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_round_trips_and_forgets() {
        let log = UploadLog::open_in_memory().expect("log");
        let rec = Recorded {
            target: "s3://b".into(),
            key: "nar/x.nar.zst".into(),
            path: "/nix/store/x".into(),
            job: "/nix/store/x".into(),
            upload_id: "u1".into(),
            file_size: 100,
            part_size: 5 << 20,
            started_at: 1,
            parts: BTreeMap::new(),
        };
        log.begin(&rec).expect("begin");
        log.part_done("s3://b", "nar/x.nar.zst", 2, "bb")
            .expect("p2");
        log.part_done("s3://b", "nar/x.nar.zst", 1, "aa")
            .expect("p1");
        let got = log
            .find("s3://b", "nar/x.nar.zst")
            .expect("find")
            .expect("some");
        assert_eq!(
            got.parts.into_iter().collect::<Vec<_>>(),
            vec![(1, "aa".into()), (2, "bb".into())]
        );
        assert_eq!(
            log.others_for_path("s3://b", "/nix/store/x", "nar/y")
                .expect("o")
                .len(),
            1
        );
        assert!(
            log.others_for_path("s3://b", "/nix/store/x", "nar/x.nar.zst")
                .expect("o")
                .is_empty()
        );
        // A new upload under the same key starts with no parts.
        log.begin(&Recorded {
            upload_id: "u2".into(),
            ..rec.clone()
        })
        .expect("again");
        assert!(
            log.find("s3://b", "nar/x.nar.zst")
                .expect("f")
                .expect("s")
                .parts
                .is_empty()
        );
        log.forget("s3://b", "nar/x.nar.zst").expect("forget");
        assert!(log.all().expect("all").is_empty());
    }

    #[test]
    fn part_hashes_read_exactly_the_range() {
        let d = tempfile::tempdir().expect("dir");
        let f = d.path().join("w");
        std::fs::write(&f, b"hello world").expect("w");
        let (md5, sha) = hash_part(
            &f,
            Part {
                number: 2,
                offset: 6,
                len: 5,
            },
        )
        .expect("hash");
        assert_eq!(mp::hex(&md5), mp::md5_hex(b"world"));
        assert_eq!(sha, ferry_s3::sha256_hex(b"world"));
        assert!(
            hash_part(
                &f,
                Part {
                    number: 3,
                    offset: 6,
                    len: 50
                }
            )
            .is_err()
        );
    }
}
