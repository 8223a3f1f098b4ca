//! Zero-copy NAR pass-through on Linux: upstream socket → pipe → client socket with
//! `splice(2)`, so the bytes of a NAR never enter Ferry's memory (docs/architecture.md,
//! "Splicing NAR bodies").
//!
//! hyper owns the client socket and writes what the response body yields, so the body cannot
//! hand it a file descriptor. Instead each accepted connection is a [`SpliceIo`] sharing a
//! [`SpliceConn`] (a pipe) with the handler. The NAR pump ([`crate::nar`]) splices upstream
//! bytes into the connection's pipe and yields, for those `n` bytes, a *placeholder* frame:
//! `n` bytes of a static zero buffer that no other body uses. When hyper writes the response,
//! [`SpliceIo`] recognises the placeholder by its address and splices `n` bytes from the pipe
//! to the socket instead of writing the zeros. Everything else (heads, narinfos, chunks from
//! HTTPS, S3 or the disk cache) is written as usual, in order, so the placeholder's bytes
//! land exactly where the frame stands in the response.
//!
//! Invariants that keep it correct:
//! - hyper writes a body's frames in order and, for HTTP/1, queues `Bytes` frames without
//!   copying them when the IO says it writes vectors (hyper's `WriteStrategy::Queue`), which
//!   [`SpliceIo`] does; HTTP/2 copies frames, so placeholders are only made for HTTP/1
//!   requests ([`crate::server::handle`]).
//! - the pump splices in only when the pipe is empty, and yields a placeholder for exactly
//!   the bytes it moved: the pipe holds the bytes of the queued placeholders, in order, and
//!   a `splice` into an empty pipe can only wait for the socket.
//! - a placeholder with no bytes counted in the pipe is an error (the connection is
//!   aborted), never a wait or zeros on the wire.

use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Largest placeholder frame, and the most one `splice` moves into the pipe.
pub(crate) const MAX_FRAME: usize = 1 << 20;

/// The placeholder bytes: zeroed heap pages that are never written nor read (no memory is
/// touched for them), and whose address range no other body shares.
fn zeros() -> &'static [u8] {
    static ZEROS: OnceLock<&'static [u8]> = OnceLock::new();
    ZEROS.get_or_init(|| vec![0u8; MAX_FRAME].leak())
}

/// A placeholder frame standing for the next `n` (≤ [`MAX_FRAME`]) bytes of the pipe.
pub(crate) fn placeholder(n: usize) -> bytes::Bytes {
    bytes::Bytes::from_static(&zeros()[..n.min(MAX_FRAME)])
}

fn is_placeholder(buf: &[u8]) -> bool {
    let z = zeros().as_ptr_range();
    !buf.is_empty() && z.contains(&buf.as_ptr())
}

/// One connection's pipe and the count of bytes in it.
#[derive(Default)]
pub(crate) struct SpliceConn {
    pipe: OnceLock<Option<Pipe>>,
    in_pipe: AtomicU64,
    drained: futures_util::task::AtomicWaker,
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> std::io::Result<Pipe> {
        use rustix::pipe::PipeFlags;
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // A larger pipe moves more per `splice`; the default (64 KiB) still works.
        let _ = rustix::pipe::fcntl_setpipe_size(&write, MAX_FRAME);
        Ok(Pipe { read, write })
    }
}

/// `splice(2)` of up to `len` bytes without blocking; `Ok(0)` is the end of `from`.
fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> std::io::Result<usize> {
    use rustix::pipe::SpliceFlags;
    Ok(rustix::pipe::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
    )?)
}

impl SpliceConn {
    /// Waits until the client has taken every byte of the pipe.
    pub(crate) async fn drained(&self) {
        std::future::poll_fn(|cx| {
            if self.in_pipe.load(Ordering::Acquire) == 0 {
                return Poll::Ready(());
            }
            self.drained.register(cx.waker());
            if self.in_pipe.load(Ordering::Acquire) == 0 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Moves up to `max` bytes from `from` into the (empty, see [`SpliceConn::drained`]) pipe,
    /// waiting for `from` to have data: `Ok(0)` at the end of `from`.
    pub(crate) async fn fill(&self, from: &TcpStream, max: usize) -> std::io::Result<usize> {
        loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || self.fill_now(from, max)) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// Moves up to `max` bytes from `file`'s current offset into the (empty) pipe, advancing
    /// the offset: `Ok(0)` at the end of the file. May block on the disk; an empty pipe always
    /// takes something, so there is no EAGAIN to wait out.
    pub(crate) fn fill_from_file(
        &self,
        file: &std::fs::File,
        max: usize,
    ) -> std::io::Result<usize> {
        self.fill_now(file, max)
    }

    /// One `splice` of up to `max` bytes from `from` into the pipe, which must be empty:
    /// into a pipe holding bytes, EAGAIN could mean a full pipe rather than an idle `from`.
    fn fill_now(&self, from: impl AsFd, max: usize) -> std::io::Result<usize> {
        let Some(pipe) = self.pipe() else {
            return Err(std::io::ErrorKind::Unsupported.into());
        };
        if self.in_pipe.load(Ordering::Acquire) != 0 {
            return Err(std::io::Error::other(
                "splice into a pipe that is not empty",
            ));
        }
        let n = splice(from, &pipe.write, max.min(MAX_FRAME))?;
        self.in_pipe.fetch_add(n as u64, Ordering::AcqRel);
        Ok(n)
    }

    /// The connection's pipe, made on first use; `None` if it cannot be made.
    fn pipe(&self) -> Option<&Pipe> {
        self.pipe.get_or_init(|| Pipe::new().ok()).as_ref()
    }

    /// Whether this connection can splice (its pipe exists or can be made).
    pub(crate) fn available(&self) -> bool {
        self.pipe().is_some()
    }

    /// Splices up to `want` bytes of the pipe into `to`.
    fn poll_drain(
        &self,
        to: &TcpStream,
        want: usize,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        let queued = self.in_pipe.load(Ordering::Acquire);
        let pipe = match self.pipe.get() {
            Some(Some(p)) if queued > 0 => p,
            _ => {
                return Poll::Ready(Err(std::io::Error::other(
                    "placeholder frame without spliced bytes",
                )));
            }
        };
        let want = want.min(queued as usize);
        loop {
            std::task::ready!(to.poll_write_ready(cx))?;
            match to.try_io(Interest::WRITABLE, || splice(&pipe.read, to, want)) {
                Ok(0) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    if self.in_pipe.fetch_sub(n as u64, Ordering::AcqRel) == n as u64 {
                        self.drained.wake();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// An accepted connection: a TCP stream whose writes splice placeholder frames from the
/// connection's pipe.
pub(crate) struct SpliceIo {
    tcp: TcpStream,
    conn: Arc<SpliceConn>,
}

impl AsyncRead for SpliceIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for SpliceIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if is_placeholder(buf) {
            let this = &*self;
            return this.conn.poll_drain(&this.tcp, buf.len(), cx);
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        // Ordinary bytes up to the first placeholder go out as one writev; a placeholder at
        // the front is spliced. hyper calls again for the rest.
        match bufs.iter().position(|b| is_placeholder(b)) {
            Some(0) => {
                let this = &*self;
                this.conn.poll_drain(&this.tcp, bufs[0].len(), cx)
            }
            Some(p) => Pin::new(&mut self.tcp).poll_write_vectored(cx, &bufs[..p]),
            None => Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        // Required: hyper copies every frame into one buffer ("flatten") for an IO that does
        // not write vectors, and would send the placeholders' zeros.
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The listener `axum::serve` accepts [`SpliceIo`] connections from.
pub(crate) struct SpliceListener(pub(crate) TcpListener);

impl axum::serve::Listener for SpliceListener {
    type Io = SpliceIo;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (SpliceIo, std::net::SocketAddr) {
        loop {
            match self.0.accept().await {
                Ok((tcp, addr)) => {
                    let conn = Arc::new(SpliceConn::default());
                    return (SpliceIo { tcp, conn }, addr);
                }
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: as axum's own
                    // listener does, wait a moment instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.local_addr()
    }
}

/// The connection's splice state, as a request extension (`ConnectInfo`).
#[derive(Clone)]
pub(crate) struct SpliceHandle(pub(crate) Arc<SpliceConn>);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, SpliceListener>>
    for SpliceHandle
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, SpliceListener>) -> Self {
        SpliceHandle(Arc::clone(&stream.io().conn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_recognised_by_address_only() {
        let p = placeholder(4096);
        assert_eq!(p.len(), 4096);
        assert!(is_placeholder(&p));
        assert!(is_placeholder(&p[100..]));
        assert!(!is_placeholder(&[0u8; 4096]));
        assert!(!is_placeholder(&p[..0]));
        assert_eq!(placeholder(MAX_FRAME + 1).len(), MAX_FRAME);
    }
}
