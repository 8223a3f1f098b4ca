//! A connected builder ([`Connection`]): opening a session with the serve handshake (and
//! telling a missing remote command from other failures), each serve operation under its
//! [`Limit`], and forwarding the remote log.

use super::limit::{Activity, Deadlines, Limit, Tracked, within};
use super::{Job, RemoteError};
use crate::ssh::{LogTap, ProcessGuard, Session};
use ferry_nix::derivation::Derivation;
use ferry_nix::serve::{PathInfo, ServeClient, ServeError};
use ferry_nix::store_path::{StoreDir, StorePath};
use ferry_nix::store_uri::StoreUri;
use ferry_store::{ImportBatch, LocalStore, store_dir_from_env};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

type Reader = Tracked<Box<dyn AsyncRead + Send + Unpin>>;
type Writer = Tracked<Box<dyn AsyncWrite + Send + Unpin>>;

/// A connected builder: the serve client, the remote log and the transport process.
pub(crate) struct Connection {
    machine: String,
    client: ServeClient<Reader, Writer>,
    log: LogTap,
    guard: ProcessGuard,
    activity: Activity,
    pub(crate) deadlines: Deadlines,
}

/// The program a store URI runs on the builder (`remote-program`, default `nix-store`).
fn remote_program(uri: &str) -> String {
    StoreUri::parse(uri)
        .param_set("remote-program")
        .unwrap_or("nix-store")
        .to_owned()
}

/// Errors of a serve call that are about our side of it (what we asked or sent).
pub(crate) fn is_local_side(e: &ServeError) -> bool {
    matches!(
        e,
        ServeError::BadRequest { .. }
            | ServeError::NarSource { .. }
            | ServeError::NarHashMismatch { .. }
            | ServeError::Sink { .. }
    )
}

/// What a shell prints when it cannot run a command: bash `command not found` /
/// `No such file or directory`, dash `not found`.
fn looks_like_missing_command(stderr: &str) -> bool {
    stderr.contains("not found") || stderr.contains("No such file or directory")
}

/// Runs the serve handshake over a fresh session, in the local store directory
/// (`$NIX_STORE_DIR`, else `/nix/store`; Nix requires the builder's to be the same). No
/// timer here: callers bound it (the probe budget). On failure the remote stderr (ssh's and
/// the remote shell's messages, e.g. `nix-store: command not found`) is part of the error.
pub(crate) async fn open(machine: &str, session: Session) -> Result<Connection, RemoteError> {
    open_in(machine, session, store_dir_from_env()).await
}

pub(crate) async fn open_in(
    machine: &str,
    session: Session,
    store_dir: StoreDir,
) -> Result<Connection, RemoteError> {
    let (writer, reader, mut log, guard) = session.into_parts();
    let activity = Activity::new();
    let handshake = ServeClient::handshake(
        Tracked::new(reader, activity.clone()),
        Tracked::new(writer, activity.clone()),
        store_dir,
        machine,
    )
    .await;
    match handshake {
        Ok(client) => Ok(Connection {
            machine: machine.to_owned(),
            client,
            log,
            guard,
            activity,
            deadlines: Deadlines::default(),
        }),
        Err(source) => {
            // The remote side has exited or is about to: its stderr ends soon.
            let stderr = log.collect(Duration::from_secs(2)).await;
            drop(guard);
            let startup = matches!(
                source,
                ServeError::NoGreeting { .. }
                    | ServeError::BadMagic { .. }
                    | ServeError::Send { .. }
                    | ServeError::Closed { .. }
            );
            if startup && looks_like_missing_command(&stderr) {
                return Err(RemoteError::CommandNotFound {
                    machine: machine.to_owned(),
                    program: remote_program(machine),
                    stderr,
                });
            }
            Err(RemoteError::Handshake {
                machine: machine.to_owned(),
                source: Box::new(source),
                stderr,
            })
        }
    }
}

impl Connection {
    pub(crate) fn machine(&self) -> &str {
        &self.machine
    }

    pub(crate) fn store_dir(&self) -> &StoreDir {
        self.client.store_dir()
    }

    /// `QueryValidPaths` (op 1). `lock` adds temp roots on the builder so the paths are
    /// not collected before the build (Hydra does; the stock hook does not).
    pub(crate) async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        lock: bool,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, RemoteError> {
        // Substituting downloads on the builder, silently: no bound then.
        let limit = if substitute {
            Limit::default()
        } else {
            Limit {
                total: Some(self.deadlines.query),
                idle: None,
            }
        };
        let call = self.client.query_valid_paths(lock, substitute, paths);
        within(
            &self.activity,
            &self.machine,
            "query_valid_paths",
            limit,
            call,
        )
        .await
    }

    /// `QueryPathInfos` (op 2) for paths valid on the builder.
    pub(crate) async fn query_path_infos(
        &mut self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<PathInfo>, RemoteError> {
        let limit = Limit {
            total: Some(self.deadlines.query),
            idle: None,
        };
        let call = self.client.query_path_infos(paths);
        within(
            &self.activity,
            &self.machine,
            "query_path_infos",
            limit,
            call,
        )
        .await
    }

    /// `AddToStoreNar` (op 9): uploads one path, its NAR streamed from the local store
    /// ([`LocalStore::nar`]).
    ///
    /// The NAR is not hashed on the way out: that pass over the data would be the
    /// sender's largest cost, and the builder hashes it anyway and ends the connection on
    /// a mismatch. Only when the call fails after the whole NAR went out is the local NAR
    /// hashed, so that a local store whose files no longer match their recorded hash is
    /// reported as such ([`ServeError::NarHashMismatch`], not the builder's fault) rather
    /// than as a broken connection.
    pub(crate) async fn add_to_store_nar(
        &mut self,
        info: &PathInfo,
        local: &LocalStore,
    ) -> Result<(), RemoteError> {
        let mut nar = local.nar(&info.path)?;
        let limit = Limit {
            total: None,
            idle: Some(self.deadlines.idle),
        };
        let call = self.client.add_to_store_nar_unhashed(info, &mut nar);
        let r = within(
            &self.activity,
            &self.machine,
            "add_to_store_nar",
            limit,
            call,
        )
        .await;
        let sent_all = nar.bytes_read() >= info.nar_size;
        nar.finish().await;
        match r {
            Err(RemoteError::Serve(e)) if sent_all && !is_local_side(&e) => {
                if let Ok(got) = local.nar_hash(&info.path).await
                    && got != info.nar_hash
                {
                    return Err(ServeError::NarHashMismatch {
                        remote: self.machine.clone(),
                        path: local.display(&info.path),
                        expected: info.nar_hash.to_nix32_prefixed(),
                        got: got.to_nix32_prefixed(),
                    }
                    .into());
                }
                Err(RemoteError::Serve(e))
            }
            r => r,
        }
    }

    /// `BuildDerivation` (op 8). A failed build is [`RemoteError::BuildFailed`].
    pub(crate) async fn build_derivation(
        &mut self,
        job: &Job,
        drv: &Derivation,
    ) -> Result<(), RemoteError> {
        // 2.8 `build-remote.cc`: with input derivations, the builder gets the whole input
        // closure as `inputSrcs` (it has no `.drv` to find the input derivations' outputs).
        let basic = if drv.input_drvs.is_empty() {
            drv.to_basic()
        } else {
            drv.to_basic_with_inputs(job.inputs.clone())
        };
        let limit = self.deadlines.build(&job.options);
        let call = self
            .client
            .build_derivation(&job.drv_path, &basic, &job.options);
        let result = within(
            &self.activity,
            &self.machine,
            "build_derivation",
            limit,
            call,
        )
        .await?;
        if result.status.is_success() {
            return Ok(());
        }
        Err(RemoteError::BuildFailed {
            drv: self.store_dir().display(&job.drv_path),
            machine: self.machine.clone(),
            status: result.status,
            message: result.plain_error_msg(),
        })
    }

    /// `DumpStorePath` (op 3): the NAR of `info.path` streamed into `batch`, checked against
    /// the size and hash `info` declares on the way ([`ServeClient::dump_store_path_checked`]);
    /// the object is completed in `batch` only when it passed.
    pub(crate) async fn dump_store_path(
        &mut self,
        info: &PathInfo,
        batch: &mut ImportBatch,
    ) -> Result<(), RemoteError> {
        let limit = Limit {
            total: None,
            idle: Some(self.deadlines.idle),
        };
        let sink = batch.open(info).await?;
        let call = self.client.dump_store_path_checked(info, sink);
        let sha256 = within(
            &self.activity,
            &self.machine,
            "dump_store_path",
            limit,
            call,
        )
        .await?;
        batch.close(info, sha256).await?;
        Ok(())
    }

    /// Ends the session: closes the builder's stdin and waits for the transport.
    pub(crate) async fn close(self) -> LogTap {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.close()).await;
        self.guard.finish().await;
        self.log
    }

    /// Takes the remote log tap out, leaving an empty one.
    pub(crate) fn take_log(&mut self) -> LogTap {
        std::mem::replace(&mut self.log, LogTap::spawn(tokio::io::empty()))
    }

    /// Forwards the remote log (the serve process's stderr) to `log_path` (fd 4) as it
    /// arrives; log output counts as activity, so a build that logs is alive. The last
    /// [`LOG_TAIL`] bytes are also kept in the returned tail: after a failure they often
    /// name its cause (the serve protocol reports errors only in build results).
    pub(crate) fn forward_log(
        &mut self,
        log_path: PathBuf,
    ) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<u8>>>) {
        let mut tap = self.take_log();
        let activity = self.activity.clone();
        let tail = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&tail);
        let remember = move |chunk: &[u8]| {
            if let Ok(mut t) = keep.lock() {
                t.extend_from_slice(chunk);
                let extra = t.len().saturating_sub(LOG_TAIL);
                t.drain(..extra);
            }
        };
        let task = tokio::spawn(async move {
            let Ok(file) = std::fs::OpenOptions::new().write(true).open(&log_path) else {
                while let Some(chunk) = tap.next().await {
                    activity.touch();
                    remember(&chunk);
                }
                return;
            };
            let mut file = tokio::fs::File::from_std(file);
            while let Some(chunk) = tap.next().await {
                use tokio::io::AsyncWriteExt;
                activity.touch();
                remember(&chunk);
                if file.write_all(&chunk).await.is_err() {
                    break;
                }
                let _ = file.flush().await;
            }
        });
        (task, tail)
    }
}

/// How much of the end of a remote log [`Connection::forward_log`] keeps.
pub(crate) const LOG_TAIL: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_commands_are_recognised() {
        assert!(looks_like_missing_command(
            "bash: line 1: /nonexistent/nix-store: No such file or directory"
        ));
        assert!(looks_like_missing_command("sh: 1: nix-store: not found"));
        assert!(!looks_like_missing_command(
            "Permission denied (publickey)."
        ));
        assert_eq!(
            remote_program("ssh://h?remote-program=/opt/nix-store&x=1"),
            "/opt/nix-store"
        );
        assert_eq!(remote_program("ssh://h"), "nix-store");
    }
}
