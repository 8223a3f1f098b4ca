//! Typed encode and decode helpers over the wire reader and writer; each names the
//! operation in its errors and marks the connection broken until the operation ends.

use super::{ServeClient, ServeError};
use crate::store_path::StorePath;
use crate::wire::WireError;
use std::collections::BTreeSet;
use std::io;
use tokio::io::{AsyncRead, AsyncWrite};

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

    pub(super) async fn send_paths(
        &mut self,
        op: &'static str,
        paths: &BTreeSet<StorePath>,
    ) -> Result<(), ServeError> {
        let shown: Vec<String> = paths.iter().map(|p| self.store_dir.display(p)).collect();
        self.w
            .write_strings(&shown)
            .await
            .map_err(|e| self.send_err(op, e))
    }

    pub(super) async fn flush(&mut self, op: &'static str) -> Result<(), ServeError> {
        self.w.flush().await.map_err(|e| self.send_err(op, e))
    }

    pub(super) async fn recv_u64(&mut self, op: &'static str) -> Result<u64, ServeError> {
        self.r.read_u64().await.map_err(|e| self.wire_err(op, e))
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
        let at = self.r.offset();
        let n = self.recv_u64(op).await?;
        if n > self.limits.max_paths as u64 {
            return Err(self.wire_err(
                op,
                WireError::TooManyItems {
                    offset: at,
                    len: n,
                    limit: self.limits.max_paths as u64,
                },
            ));
        }
        let mut set = BTreeSet::new();
        for _ in 0..n {
            let at = self.r.offset();
            let s = self.recv_string(op, self.limits.max_path_len).await?;
            set.insert(self.parse_path(op, at, &s)?);
        }
        Ok(set)
    }
}
