//! Typed encode and decode helpers over the wire reader and writer; each names the
//! operation in its errors and marks the connection broken until the operation ends.

use super::{ServeClient, ServeError};
use crate::store_path::StorePath;
use crate::wire::WireError;
use std::collections::BTreeSet;
use std::io;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> ServeClient<R, W> {
    pub(super) fn begin(&mut self, op: &'static str) -> Result<(), ServeError> {
        if self.broken {
            return Err(ServeError::Broken {
                op,
                remote: self.remote.clone(),
            });
        }
        // Cleared by the operation when it completes; an error or a cancelled future
        // leaves the stream mid-message.
        self.broken = true;
        Ok(())
    }

    pub(super) fn wire_err(&self, op: &'static str, e: WireError) -> ServeError {
        match e {
            WireError::Eof { offset, .. } => ServeError::Closed {
                op,
                remote: self.remote.clone(),
                offset,
            },
            source => ServeError::Wire {
                op,
                remote: self.remote.clone(),
                source,
            },
        }
    }

    pub(super) fn send_err(&self, op: &'static str, source: io::Error) -> ServeError {
        ServeError::Send {
            op,
            remote: self.remote.clone(),
            source,
        }
    }

    pub(super) fn bad_reply(&self, op: &'static str, detail: String) -> ServeError {
        ServeError::BadReply {
            op,
            remote: self.remote.clone(),
            offset: self.r.offset(),
            detail,
        }
    }

    pub(super) fn bad_request(&self, op: &'static str, path: &str, detail: &str) -> ServeError {
        ServeError::BadRequest {
            op,
            remote: self.remote.clone(),
            path: path.to_owned(),
            detail: detail.to_owned(),
        }
    }

    pub(super) fn parse_path(
        &self,
        op: &'static str,
        at: u64,
        s: &str,
    ) -> Result<StorePath, ServeError> {
        self.store_dir
            .parse(s)
            .map_err(|source| ServeError::BadPath {
                op,
                remote: self.remote.clone(),
                offset: at,
                source: Box::new(source),
            })
    }

    pub(super) async fn send_u64(&mut self, op: &'static str, v: u64) -> Result<(), ServeError> {
        self.w.write_u64(v).await.map_err(|e| self.send_err(op, e))
    }

    pub(super) async fn send_str(&mut self, op: &'static str, s: &str) -> Result<(), ServeError> {
        self.w.write_str(s).await.map_err(|e| self.send_err(op, e))
    }

    /// A bool as the word 0 or 1.
    pub(super) async fn send_bool(&mut self, op: &'static str, b: bool) -> Result<(), ServeError> {
        self.w.write_bool(b).await.map_err(|e| self.send_err(op, e))
    }

    /// An optional absolute store path: the empty string for none (a deriver).
    pub(super) async fn send_opt_path(
        &mut self,
        op: &'static str,
        path: Option<&StorePath>,
    ) -> Result<(), ServeError> {
        let shown = path.map(|p| self.store_dir.display(p));
        self.send_str(op, shown.as_deref().unwrap_or("")).await
    }

    /// An optional string: the empty string for none (a content address).
    pub(super) async fn send_opt_str(
        &mut self,
        op: &'static str,
        s: Option<&str>,
    ) -> Result<(), ServeError> {
        self.send_str(op, s.unwrap_or("")).await
    }

    /// A count, then the strings.
    pub(super) async fn send_strings<I>(
        &mut self,
        op: &'static str,
        items: I,
    ) -> Result<(), ServeError>
    where
        I: IntoIterator,
        I::IntoIter: ExactSizeIterator,
        I::Item: AsRef<str>,
    {
        self.w
            .write_strings(items)
            .await
            .map_err(|e| self.send_err(op, e))
    }

    /// Bytes as they are, with no length or padding: an already encoded body or NAR data.
    pub(super) async fn send_raw(
        &mut self,
        op: &'static str,
        data: &[u8],
    ) -> Result<(), ServeError> {
        self.w
            .get_mut()
            .write_all(data)
            .await
            .map_err(|e| self.send_err(op, e))
    }

    pub(super) async fn send_paths(
        &mut self,
        op: &'static str,
        paths: &BTreeSet<StorePath>,
    ) -> Result<(), ServeError> {
        let shown: Vec<String> = paths.iter().map(|p| self.store_dir.display(p)).collect();
        self.send_strings(op, &shown).await
    }

    pub(super) async fn flush(&mut self, op: &'static str) -> Result<(), ServeError> {
        self.w.flush().await.map_err(|e| self.send_err(op, e))
    }

    pub(super) async fn recv_u64(&mut self, op: &'static str) -> Result<u64, ServeError> {
        self.r.read_u64().await.map_err(|e| self.wire_err(op, e))
    }

    pub(super) async fn recv_bool(&mut self, op: &'static str) -> Result<bool, ServeError> {
        self.r.read_bool().await.map_err(|e| self.wire_err(op, e))
    }

    /// A count of items that follow, at most `limit`.
    pub(super) async fn recv_count(
        &mut self,
        op: &'static str,
        limit: usize,
    ) -> Result<u64, ServeError> {
        let at = self.r.offset();
        let n = self.recv_u64(op).await?;
        if n > limit as u64 {
            return Err(self.wire_err(
                op,
                WireError::TooManyItems {
                    offset: at,
                    len: n,
                    limit: limit as u64,
                },
            ));
        }
        Ok(n)
    }

    /// An optional absolute store path: the empty string for none (a deriver).
    pub(super) async fn recv_opt_path(
        &mut self,
        op: &'static str,
    ) -> Result<Option<StorePath>, ServeError> {
        let at = self.r.offset();
        let s = self.recv_string(op, self.limits.max_path_len).await?;
        if s.is_empty() {
            return Ok(None);
        }
        self.parse_path(op, at, &s).map(Some)
    }

    pub(super) async fn recv_string(
        &mut self,
        op: &'static str,
        limit: u64,
    ) -> Result<String, ServeError> {
        self.r
            .read_string(limit)
            .await
            .map_err(|e| self.wire_err(op, e))
    }

    /// A `StorePathSet`: a count (at most `max_paths`), then absolute store paths.
    pub(super) async fn recv_path_set(
        &mut self,
        op: &'static str,
    ) -> Result<BTreeSet<StorePath>, ServeError> {
        let n = self.recv_count(op, self.limits.max_paths).await?;
        let mut set = BTreeSet::new();
        for _ in 0..n {
            let at = self.r.offset();
            let s = self.recv_string(op, self.limits.max_path_len).await?;
            set.insert(self.parse_path(op, at, &s)?);
        }
        Ok(set)
    }
}
