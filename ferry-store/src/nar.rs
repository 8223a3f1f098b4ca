//! A NAR of the local store as a byte stream: written in-process from the file system, or
//! `nix-store --dump`'s stdout.

use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::process::{Child, ChildStdout};
use tokio::sync::mpsc;

/// Size of the pieces an in-process NAR is handed over in.
pub(crate) const NAR_CHUNK: usize = 256 * 1024;
/// Pieces produced ahead of the reader: the file reads overlap the writes into the
/// transport, with at most this many pieces (1 MiB) in memory.
const NAR_AHEAD: usize = 4;

/// A NAR being produced, read as a byte stream. Dropping it stops the producer (the dump
/// thread sees the channel closed; the tool is killed).
pub enum NarStream {
    /// [`ferry_nix::nar::dump_path`] on a blocking thread, handing pieces over a channel.
    /// An error (a file that changed or cannot be read) arrives in order, as a read error
    /// naming the file.
    FileSystem {
        rx: mpsc::Receiver<std::io::Result<Vec<u8>>>,
        piece: Vec<u8>,
        at: usize,
        read: u64,
    },
    /// `nix-store --dump`'s stdout.
    Tool {
        child: Child,
        stdout: ChildStdout,
        read: u64,
    },
}

/// The dump thread's output: fills a piece, sends it when full.
struct PieceWriter {
    tx: mpsc::Sender<std::io::Result<Vec<u8>>>,
    piece: Vec<u8>,
}

impl PieceWriter {
    fn send(&mut self) -> std::io::Result<()> {
        let piece = std::mem::replace(&mut self.piece, Vec::with_capacity(NAR_CHUNK));
        self.tx
            .blocking_send(Ok(piece))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reader gone"))
    }
}

impl std::io::Write for PieceWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = NAR_CHUNK.saturating_sub(self.piece.len());
        let n = data.len().min(room);
        self.piece
            .extend_from_slice(data.get(..n).unwrap_or_default());
        if self.piece.len() >= NAR_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.piece.is_empty() {
            return Ok(());
        }
        self.send()
    }
}

impl NarStream {
    pub(crate) fn from_file_system(real: PathBuf) -> NarStream {
        let (tx, rx) = mpsc::channel(NAR_AHEAD);
        tokio::task::spawn_blocking(move || {
            let mut w = PieceWriter {
                tx: tx.clone(),
                piece: Vec::with_capacity(NAR_CHUNK),
            };
            let r = ferry_nix::nar::dump_path(&real, &mut w)
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|_| std::io::Write::flush(&mut w));
            if let Err(e) = r {
                // Nobody listening any more is fine: the upload was given up.
                let _ = tx.blocking_send(Err(e));
            }
        });
        NarStream::FileSystem {
            rx,
            piece: Vec::new(),
            at: 0,
            read: 0,
        }
    }

    /// Bytes handed out so far.
    pub fn bytes_read(&self) -> u64 {
        match self {
            NarStream::FileSystem { read, .. } | NarStream::Tool { read, .. } => *read,
        }
    }

    /// Waits for the producer to end (the tool to exit).
    pub async fn finish(self) {
        if let NarStream::Tool { mut child, .. } = self {
            let _ = child.wait().await;
        }
    }
}

impl AsyncRead for NarStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            NarStream::Tool { stdout, read, .. } => {
                let before = buf.filled().len();
                let r = Pin::new(stdout).poll_read(cx, buf);
                *read += (buf.filled().len() - before) as u64;
                r
            }
            NarStream::FileSystem {
                rx,
                piece,
                at,
                read,
            } => {
                while *at >= piece.len() {
                    match rx.poll_recv(cx) {
                        Poll::Pending => return Poll::Pending,
                        // The producer is done: end of the NAR.
                        Poll::Ready(None) => return Poll::Ready(Ok(())),
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                        Poll::Ready(Some(Ok(next))) => {
                            *piece = next;
                            *at = 0;
                        }
                    }
                }
                let rest = piece.get(*at..).unwrap_or_default();
                let n = rest.len().min(buf.remaining());
                buf.put_slice(rest.get(..n).unwrap_or_default());
                *at += n;
                *read += n as u64;
                Poll::Ready(Ok(()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalStore;
    use crate::test_util::{sd, sp};
    use ferry_nix::hash::Hash;
    use tokio::io::AsyncReadExt;

    fn chroot_store(root: &std::path::Path) -> LocalStore {
        LocalStore {
            store: Some(format!("local?root={}", root.display())),
            store_dir: sd(),
            ..LocalStore::default()
        }
    }

    async fn read_all(mut n: NarStream) -> std::io::Result<Vec<u8>> {
        let mut v = Vec::new();
        n.read_to_end(&mut v).await?;
        n.finish().await;
        Ok(v)
    }

    /// The in-process NAR is byte for byte `nix-store --dump`'s, across several pieces.
    #[tokio::test]
    async fn in_process_nar_matches_nix_store_dump() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = sp('g', "tree");
        let local = chroot_store(tmp.path());
        let real = local.real_path(&p);
        std::fs::create_dir_all(real.join("bin")).expect("mkdir");
        // Larger than a few pieces, not a multiple of the piece size.
        let big: Vec<u8> = (0..(NAR_CHUNK * 5 + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(real.join("big"), &big).expect("big");
        std::fs::write(real.join("bin/run"), b"#!/bin/sh\n").expect("run");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(real.join("bin/run"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::os::unix::fs::symlink("big", real.join("link")).expect("symlink");

        let nar = local.nar(&p).expect("nar");
        assert!(matches!(nar, NarStream::FileSystem { .. }));
        let got = read_all(nar).await.expect("read");
        let want = std::process::Command::new("nix-store")
            .arg("--dump")
            .arg(&real)
            .output()
            .expect("nix-store --dump");
        assert!(want.status.success());
        assert_eq!(got.len(), want.stdout.len());
        assert!(got == want.stdout, "NAR bytes differ");
        assert_eq!(
            local.nar_hash(&p).await.expect("hash"),
            Hash::sha256_of(&want.stdout)
        );
    }

    /// A file that cannot be read ends the stream with an error naming it.
    #[tokio::test]
    async fn in_process_nar_reports_unreadable_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = sp('h', "fifo");
        let local = chroot_store(tmp.path());
        let real = local.real_path(&p);
        std::fs::create_dir_all(&real).expect("mkdir");
        let fifo = real.join("pipe");
        let st = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(st.success());
        let e = read_all(local.nar(&p).expect("nar"))
            .await
            .expect_err("a FIFO has no NAR");
        assert!(e.to_string().contains("pipe"), "{e}");
    }
}
