//! Running the local tools: one-shot queries, and tools fed on their stdin while they run.

use crate::LocalError;
use std::process::Stdio;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// Runs `cmd` (a `program` invocation described as `what`) with `input` on its stdin and
/// fails with its stderr unless it exits 0.
pub(crate) async fn feed(
    mut cmd: Command,
    program: &str,
    what: &str,
    input: &[u8],
) -> Result<(), LocalError> {
    let mut child = spawn(&mut cmd, program)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows up as the tool's failure below.
        let _ = stdin.write_all(input).await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(spawn_failed(program))?;
    succeeded(out, what).map(drop)
}

/// The tool's stdout if it exited 0, else its status and stderr under `what`.
pub(crate) fn succeeded(out: std::process::Output, what: &str) -> Result<Vec<u8>, LocalError> {
    if !out.status.success() {
        return Err(tool_failed(what.to_owned(), out.status, &out.stderr));
    }
    Ok(out.stdout)
}

pub(crate) async fn output(
    mut c: Command,
    program: &str,
    what: &str,
) -> Result<Vec<u8>, LocalError> {
    let out = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(spawn_failed(program))?;
    succeeded(out, what)
}

/// Starts `cmd` with its stdin piped, its stdout discarded and its stderr piped (for the
/// error message), killed if the handle is dropped: how every tool fed on its stdin is run.
fn spawn(cmd: &mut Command, program: &str) -> Result<Child, LocalError> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_failed(program))
}

/// [`LocalError::Spawn`] for `program`: it could not be started or waited for.
fn spawn_failed(program: &str) -> impl FnOnce(std::io::Error) -> LocalError + '_ {
    move |source| LocalError::Spawn {
        program: program.to_owned(),
        source,
    }
}

/// [`LocalError::Failed`] for a tool that ran and failed: its exit status (or what else
/// went wrong with it) and its stderr, trimmed.
fn tool_failed(command: String, status: impl std::fmt::Display, stderr: &[u8]) -> LocalError {
    LocalError::Failed {
        command,
        status: status.to_string(),
        stderr: String::from_utf8_lossy(stderr).trim().to_owned(),
    }
}

/// A local tool fed on its stdin while it runs (`nix-store --import`, `--restore`): its
/// stderr is drained concurrently into a bounded tail, so a chatty tool never blocks on a
/// full pipe while we are still writing.
pub(crate) struct Tool {
    child: Child,
    stdin: Option<tokio::process::ChildStdin>,
    stderr: tokio::task::JoinHandle<Vec<u8>>,
    pub(crate) what: String,
}

/// How much of a tool's stderr is kept for its error message.
const TOOL_STDERR_TAIL: usize = 16 * 1024;

impl Tool {
    pub(crate) fn spawn(mut cmd: Command, program: &str, what: String) -> Result<Tool, LocalError> {
        let mut child = spawn(&mut cmd, program)?;
        let stdin = child.stdin.take();
        let mut err = child.stderr.take();
        let stderr = tokio::spawn(async move {
            let mut tail = Vec::new();
            let Some(err) = err.as_mut() else {
                return tail;
            };
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(buf.get(..n).unwrap_or_default());
                let extra = tail.len().saturating_sub(TOOL_STDERR_TAIL);
                tail.drain(..extra);
            }
            tail
        });
        Ok(Tool {
            child,
            stdin,
            stderr,
            what,
        })
    }

    pub(crate) fn stdin(&mut self) -> Result<&mut tokio::process::ChildStdin, LocalError> {
        let what = self.what.clone();
        self.stdin
            .as_mut()
            .ok_or_else(|| tool_failed(what, "its input is closed", b""))
    }

    /// Writes `bytes` to its stdin.
    pub(crate) async fn write(&mut self, bytes: &[u8]) -> Result<(), LocalError> {
        let what = self.what.clone();
        let written = self.stdin()?.write_all(bytes).await;
        written.map_err(|e| write_failed(what, &e))
    }

    /// Flushes its stdin.
    pub(crate) async fn flush(&mut self) -> Result<(), LocalError> {
        let what = self.what.clone();
        let flushed = self.stdin()?.flush().await;
        flushed.map_err(|e| write_failed(what, &e))
    }

    /// Closes its stdin and fails with its stderr unless it exits 0.
    pub(crate) async fn finish(mut self) -> Result<(), LocalError> {
        if let Some(mut stdin) = self.stdin.take() {
            // A write error shows up as the tool's failure below.
            let _ = stdin.shutdown().await;
        }
        let status = self.child.wait().await.map_err(spawn_failed(&self.what))?;
        let stderr = self.stderr.await.unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        Err(tool_failed(self.what, status, &stderr))
    }

    /// Stops it without a clean end of input (the kill comes before the end of its
    /// stream, so nothing half-received is committed). If it had already failed on its
    /// own, that failure (it usually says why our writes failed).
    pub(crate) async fn kill(mut self) -> Option<LocalError> {
        let exited = self.child.try_wait().ok().flatten();
        drop(self.stdin.take());
        if exited.is_none() {
            let _ = self.child.kill().await;
        }
        let stderr = self.stderr.await.unwrap_or_default();
        match exited {
            Some(status) if !status.success() => Some(tool_failed(self.what, status, &stderr)),
            _ => None,
        }
    }
}

/// [`LocalError::Failed`] for a write to a tool's stdin that failed (usually because the
/// tool is gone; its own failure, from [`Tool::kill`], says more).
fn write_failed(command: String, e: &std::io::Error) -> LocalError {
    tool_failed(command, format_args!("writing to it failed: {e}"), b"")
}

/// Removes whatever is at `p` (a tree, file or symlink); absent is fine.
pub(crate) fn remove_tree(p: &std::path::Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
    }
}
