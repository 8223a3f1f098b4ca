//! `DumpStorePath` (op 3): the NAR copied to a sink and checked on the way by the push NAR
//! checker, which also finds where it ends (see the documentation of [`super`]).

use super::{CMD_DUMP_STORE_PATH, PathInfo, ServeClient, ServeError};
use crate::hash::{Hash, HashAlgo, HashSink};
use crate::nar::NarChecker;
use crate::store_path::StorePath;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> ServeClient<R, W> {
    /// `DumpStorePath` (op 3): the NAR of `path`, copied to `sink` exactly and validated on
    /// the way (see the module documentation). Returns the NAR size. On error the sink may
    /// hold a prefix of the NAR, which the caller must discard.
    pub async fn dump_store_path<S: AsyncWrite + Unpin>(
        &mut self,
        path: &StorePath,
        sink: S,
    ) -> Result<u64, ServeError> {
        let limit = self.limits.max_nar_size;
        self.dump(path, sink, limit, None).await
    }

    /// `DumpStorePath` of `info.path`, checked against what `info` (from `QueryPathInfos`)
    /// declares while it streams: reading stops as soon as the NAR needs more than
    /// `info.nar_size` bytes ([`ServeError::NarTooLarge`]), and a NAR that ends short of it
    /// or hashes to anything but `info.nar_hash` (SHA-256 or SHA-512) fails with
    /// [`ServeError::NarNotAsDeclared`]. The sink has then received bytes that must not be
    /// used: the caller commits what the sink wrote only after `Ok`. Memory stays at one
    /// chunk whatever the size. Returns the NAR's SHA-256 (what a local store records).
    ///
    /// Why: the remote is not trusted. Nix's own client passes the remote's `narSize` and
    /// `narHash` to `addToStore`, which checks both
    /// (<https://github.com/NixOS/nix/blob/2.8.0/src/libstore/local-store.cc#L1163-L1171>).
    pub async fn dump_store_path_checked<S: AsyncWrite + Unpin>(
        &mut self,
        info: &PathInfo,
        sink: S,
    ) -> Result<Hash, ServeError> {
        let limit = self.limits.max_nar_size.min(info.nar_size);
        let declared = info.nar_hash.algo();
        let mut hashes = (
            HashSink::new(HashAlgo::Sha256),
            (declared != HashAlgo::Sha256).then(|| HashSink::new(declared)),
        );
        let shown = self.store_dir.display(&info.path);
        let remote = self.remote.clone();
        let not_as_declared = |detail: String| ServeError::NarNotAsDeclared {
            remote: remote.clone(),
            path: shown.clone(),
            detail,
        };
        let size = match self.dump(&info.path, sink, limit, Some(&mut hashes)).await {
            Err(ServeError::NarTooLarge { limit, .. }) if limit == info.nar_size => {
                return Err(not_as_declared(format!(
                    "the remote declared a NAR of {limit} bytes and sent more"
                )));
            }
            r => r?,
        };
        if size != info.nar_size {
            return Err(not_as_declared(format!(
                "the remote declared a NAR of {} bytes and sent one of {size}",
                info.nar_size
            )));
        }
        let (sha256, other) = hashes;
        let sha256 = sha256.finish();
        let got = match other {
            Some(h) => h.finish(),
            None => sha256.clone(),
        };
        if got != info.nar_hash {
            return Err(not_as_declared(format!(
                "the NAR hashes to {}, the remote declared {}",
                got.to_nix32_prefixed(),
                info.nar_hash.to_nix32_prefixed()
            )));
        }
        Ok(sha256)
    }

    /// The body of both dumps: at most `limit` bytes, fed to `hashes` as they go.
    async fn dump<S: AsyncWrite + Unpin>(
        &mut self,
        path: &StorePath,
        mut sink: S,
        limit: u64,
        mut hashes: Option<&mut (HashSink, Option<HashSink>)>,
    ) -> Result<u64, ServeError> {
        const OP: &str = "dump_store_path";
        self.begin(OP)?;
        let shown = self.store_dir.display(path);
        self.send_u64(OP, CMD_DUMP_STORE_PATH).await?;
        self.send_str(OP, &shown).await?;
        self.flush(OP).await?;

        let remote = self.remote.clone();
        let mut checker = NarChecker::new();
        while !checker.is_done() {
            let total = checker.offset();
            if total >= limit {
                // The checker has taken `limit` bytes and the NAR goes on.
                return Err(ServeError::NarTooLarge {
                    remote,
                    path: shown,
                    limit,
                });
            }
            let buf = match self.r.fill_buf().await {
                Ok(buf) if !buf.is_empty() => buf,
                Ok(_) => {
                    return Err(ServeError::Closed {
                        op: OP,
                        remote,
                        offset: self.r.offset(),
                    });
                }
                Err(e) => return Err(self.wire_err(OP, e)),
            };
            // Never more than the limit, so a NAR over it is stopped at the limit.
            let room = usize::try_from(limit - total).unwrap_or(usize::MAX);
            let offered = buf.get(..buf.len().min(room)).unwrap_or(buf);
            // The checker takes the bytes up to the NAR's end; the rest is the next reply.
            let taken = match checker.feed(offered) {
                Ok(n) => offered.get(..n).unwrap_or(offered),
                Err(source) => {
                    return Err(ServeError::Nar {
                        remote,
                        path: shown,
                        source: Box::new(source),
                    });
                }
            };
            if let Some((a, b)) = hashes.as_deref_mut() {
                a.update(taken);
                if let Some(b) = b {
                    b.update(taken);
                }
            }
            if let Err(source) = sink.write_all(taken).await {
                return Err(ServeError::Sink {
                    remote,
                    path: shown,
                    source,
                });
            }
            let n = taken.len();
            self.r.consume(n);
        }
        sink.flush().await.map_err(|source| ServeError::Sink {
            remote,
            path: shown,
            source,
        })?;
        self.broken = false;
        Ok(checker.offset())
    }
}
