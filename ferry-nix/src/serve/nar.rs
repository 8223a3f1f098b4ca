//! `DumpStorePath` (op 3): the NAR copied to a sink and checked on the way by the NAR
//! grammar on a short-lived thread (see the documentation of [`super`]).

use super::{CHUNK, CMD_DUMP_STORE_PATH, PathInfo, ServeClient, ServeError};
use crate::hash::{Hash, HashAlgo, HashSink};
use crate::nar::{NarContents, NarReadError, NarVisitor, parse_from};
use crate::store_path::StorePath;
use crate::wire::WireReader;
use std::io;
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

        let (req_tx, mut req_rx) = tokio::sync::mpsc::channel::<FromParser>(1);
        let (resp_tx, resp_rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(1);
        let bridge = Bridge {
            req: req_tx,
            resp: resp_rx,
            buf: Vec::new(),
            pos: 0,
        };
        let spawned = std::thread::Builder::new()
            .name("ferry-nar-check".into())
            .spawn(move || {
                let mut r = WireReader::new(bridge);
                let result = parse_from(&mut r, &mut Discard);
                let _ = r.get_mut().req.blocking_send(FromParser::Done(result));
            });
        if let Err(e) = spawned {
            return Err(ServeError::NarCheck {
                remote: self.remote.clone(),
                path: shown,
                detail: format!("cannot start the NAR checking thread: {e}"),
            });
        }

        let mut total = 0u64;
        loop {
            match req_rx.recv().await {
                Some(FromParser::Need(n)) => {
                    if total.saturating_add(n as u64) > limit {
                        // Reading exactly what the parser asks never goes past the NAR, so
                        // a NAR that needs more than the limit is over it.
                        return Err(ServeError::NarTooLarge {
                            remote: self.remote.clone(),
                            path: shown,
                            limit,
                        });
                    }
                    let mut chunk = vec![0u8; n];
                    if let Err(e) = self.r.read_exact(&mut chunk).await {
                        let _ = resp_tx.try_send(Err(io::Error::other(e.to_string())));
                        return Err(self.wire_err(OP, e));
                    }
                    total += n as u64;
                    if let Some((a, b)) = hashes.as_deref_mut() {
                        a.update(&chunk);
                        if let Some(b) = b {
                            b.update(&chunk);
                        }
                    }
                    if let Err(source) = sink.write_all(&chunk).await {
                        return Err(ServeError::Sink {
                            remote: self.remote.clone(),
                            path: shown,
                            source,
                        });
                    }
                    // The parser waits for exactly one answer per request, so the slot is free.
                    if resp_tx.try_send(Ok(chunk)).is_err() {
                        return Err(ServeError::NarCheck {
                            remote: self.remote.clone(),
                            path: shown,
                            detail: "the NAR checking thread stopped".into(),
                        });
                    }
                }
                Some(FromParser::Done(Ok(size))) => {
                    if size != total {
                        return Err(ServeError::NarCheck {
                            remote: self.remote.clone(),
                            path: shown,
                            detail: format!("parsed {size} NAR bytes but read {total}"),
                        });
                    }
                    sink.flush().await.map_err(|source| ServeError::Sink {
                        remote: self.remote.clone(),
                        path: shown.clone(),
                        source,
                    })?;
                    self.broken = false;
                    return Ok(size);
                }
                Some(FromParser::Done(Err(source))) => {
                    return Err(ServeError::Nar {
                        remote: self.remote.clone(),
                        path: shown,
                        source: Box::new(source),
                    });
                }
                None => {
                    return Err(ServeError::NarCheck {
                        remote: self.remote.clone(),
                        path: shown,
                        detail: "the NAR checking thread stopped without a result".into(),
                    });
                }
            }
        }
    }
}

/// Messages from the NAR checking thread.
enum FromParser {
    /// The parser needs exactly this many more bytes for its current read.
    Need(usize),
    /// The parser finished: the NAR size, or why the NAR is bad.
    Done(Result<u64, NarReadError>),
}

/// The checking thread's `Read`: each read asks this task for bytes and waits for them.
struct Bridge {
    req: tokio::sync::mpsc::Sender<FromParser>,
    resp: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl io::Read for Bridge {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.buf.len() {
            // `WireReader::read_exact` asks for what it still needs, never more, so a request
            // for `out.len()` bytes (capped) never reads past the NAR.
            let want = out.len().min(CHUNK);
            let gone = || io::Error::other("the dump was cancelled");
            self.req
                .blocking_send(FromParser::Need(want))
                .map_err(|_| gone())?;
            self.buf = self.resp.recv().map_err(|_| gone())??;
            self.pos = 0;
        }
        let avail = self.buf.get(self.pos..).unwrap_or(&[]);
        let n = avail.len().min(out.len());
        if let (Some(dst), Some(src)) = (out.get_mut(..n), avail.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.pos += n;
        Ok(n)
    }
}

/// A visitor that accepts everything: the parser's own checks are the validation.
struct Discard;

impl NarVisitor for Discard {
    fn directory(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn regular(&mut self, _: &[u8], _: bool, _: &mut NarContents<'_>) -> io::Result<()> {
        Ok(())
    }
    fn symlink(&mut self, _: &[u8], _: &[u8]) -> io::Result<()> {
        Ok(())
    }
}
