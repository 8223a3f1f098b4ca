//! The handshake (docs/hook-protocol.md §4.1) and what a bad greeting said.

use super::{
    MAX_BANNER, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, READ_BUFFER, SERVE_MAGIC_1, SERVE_MAGIC_2,
};
use super::{ServeClient, ServeError, ServeLimits};
use crate::store_path::StoreDir;
use crate::wire::{AsyncWireReader, AsyncWireWriter, WireError};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> ServeClient<R, W> {
    /// Performs the handshake with default limits. `store_dir` is the store directory of the
    /// remote (Nix requires it to equal the local one); `remote` names the connection in errors.
    pub async fn handshake(
        reader: R,
        writer: W,
        store_dir: StoreDir,
        remote: impl Into<String>,
    ) -> Result<Self, ServeError> {
        Self::handshake_with_limits(reader, writer, store_dir, remote, ServeLimits::default()).await
    }

    /// Performs the handshake (docs/hook-protocol.md §4.1): sends `SERVE_MAGIC_1` and 2.7, expects
    /// `SERVE_MAGIC_2` and a version with major 2 and minor ≥ 5.
    ///
    /// If the first 8 bytes are not the magic, this closes the writer (so a remote waiting for
    /// input exits, as `LegacySSHStore::openConnection` does), reads what else the remote
    /// prints until end of input (at most 4 KiB) and returns [`ServeError::BadMagic`] with it as
    /// text: usually a shell banner or `nix-store: command not found`.
    pub async fn handshake_with_limits(
        reader: R,
        writer: W,
        store_dir: StoreDir,
        remote: impl Into<String>,
        limits: ServeLimits,
    ) -> Result<Self, ServeError> {
        let remote = remote.into();
        let mut r = BufReader::with_capacity(READ_BUFFER, reader);
        let mut w = AsyncWireWriter::new(BufWriter::new(writer));
        // A failed write usually means the remote is gone; what it printed explains why,
        // so read that before reporting the write error.
        let sent = async {
            w.write_u64(SERVE_MAGIC_1).await?;
            w.write_u64(PROTOCOL_VERSION).await?;
            w.flush().await
        }
        .await;

        let mut greeting = Vec::with_capacity(8);
        read_up_to(&mut r, &mut greeting, 8).await;
        if greeting.len() == 8 && greeting == SERVE_MAGIC_2.to_le_bytes() {
            if let Err(source) = sent {
                return Err(ServeError::Send {
                    op: "handshake",
                    remote,
                    source,
                });
            }
        } else {
            if greeting.is_empty() {
                return Err(match sent {
                    Err(source) => ServeError::Send {
                        op: "handshake",
                        remote,
                        source,
                    },
                    Ok(()) => ServeError::NoGreeting { remote },
                });
            }
            // Dropping the writer closes it (a `shutdown` alone does not close a pipe).
            let _ = w.get_mut().shutdown().await;
            drop(w);
            read_up_to(&mut r, &mut greeting, MAX_BANNER).await;
            return Err(ServeError::BadMagic {
                remote,
                got: banner_text(&greeting),
            });
        }

        let mut rr = AsyncWireReader::new(r);
        let remote_version = match rr.read_u64().await {
            Ok(v) => v,
            Err(WireError::Eof { .. }) => {
                return Err(ServeError::Closed {
                    op: "handshake",
                    remote,
                    offset: rr.offset(),
                });
            }
            Err(source) => {
                return Err(ServeError::Wire {
                    op: "handshake",
                    remote,
                    source,
                });
            }
        };
        // Major 2 exactly (Nix masks with 0xff00 only; higher bits are never set by any Nix).
        if remote_version >> 8 != 2 || remote_version < MIN_PROTOCOL_VERSION {
            return Err(ServeError::UnsupportedVersion {
                remote,
                version: remote_version,
            });
        }
        Ok(ServeClient {
            r: rr,
            w,
            store_dir,
            remote,
            remote_version,
            version: remote_version.min(PROTOCOL_VERSION),
            limits,
            broken: false,
        })
    }
}

/// Reads into `buf` until it holds `limit` bytes or the stream ends or fails (the greeting:
/// whatever arrived is what the error shows).
async fn read_up_to<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, limit: usize) {
    let mut chunk = [0u8; 512];
    while buf.len() < limit {
        let want = (limit - buf.len()).min(chunk.len());
        let Some(dst) = chunk.get_mut(..want) else {
            return;
        };
        match r.read(dst).await {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(dst.get(..n).unwrap_or(&[])),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// What a bad greeting said, as text: the leading UTF-8 text up to the first byte that is
/// neither printable nor a line break or tab (a remote that echoes its input, like `cat`,
/// sends our binary handshake back after its banner), trailing whitespace trimmed.
pub(super) fn banner_text(bytes: &[u8]) -> String {
    let valid = match std::str::from_utf8(bytes) {
        Ok(s) => s,
        // `valid_up_to` is a char boundary, so the slice is valid UTF-8.
        Err(e) => std::str::from_utf8(bytes.get(..e.valid_up_to()).unwrap_or(&[])).unwrap_or(""),
    };
    let end = valid
        .char_indices()
        .find(|(_, c)| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        .map_or(valid.len(), |(i, _)| i);
    let text = valid.get(..end).unwrap_or("").trim_end();
    if text.is_empty() {
        format!("{} bytes that are not text", bytes.len())
    } else if end < bytes.len() {
        format!(
            "{text}\n(then {} bytes that are not text)",
            bytes.len() - end
        )
    } else {
        text.to_owned()
    }
}
