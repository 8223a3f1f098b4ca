//! The operations that query, build and upload: ops 1, 2, 7, 8 and 9.

use super::{
    BuildOptions, BuildResult, BuildStatus, BuiltOutput, CMD_ADD_TO_STORE_NAR,
    CMD_BUILD_DERIVATION, CMD_QUERY_CLOSURE, CMD_QUERY_PATH_INFOS, CMD_QUERY_VALID_PATHS, PathInfo,
    ServeClient, ServeError, UPLOAD_CHUNK,
};
use crate::derivation::BasicDerivation;
use crate::hash::{Hash, HashAlgo, Sha256Sink};
use crate::store_path::StorePath;
use std::collections::BTreeSet;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> ServeClient<R, W> {
    /// `QueryValidPaths` (op 1): which of `paths` are valid on the remote. `lock` makes the
    /// remote hold temporary GC roots for them for the life of the connection; `substitute`
    /// lets it substitute missing ones first.
    pub async fn query_valid_paths(
        &mut self,
        lock: bool,
        substitute: bool,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, ServeError> {
        const OP: &str = "query_valid_paths";
        self.begin(OP)?;
        self.send_u64(OP, CMD_QUERY_VALID_PATHS).await?;
        self.send_bool(OP, lock).await?;
        self.send_bool(OP, substitute).await?;
        self.send_paths(OP, paths).await?;
        self.flush(OP).await?;
        let valid = self.recv_path_set(OP).await?;
        if let Some(extra) = valid.difference(paths).next() {
            return Err(self.bad_reply(
                OP,
                format!(
                    "the remote calls {} valid, which was not asked about",
                    self.store_dir.display(extra)
                ),
            ));
        }
        self.broken = false;
        Ok(valid)
    }

    /// `QueryPathInfos` (op 2): information about those of `paths` that are valid on the
    /// remote, in the remote's order (sorted). Invalid paths are left out.
    pub async fn query_path_infos(
        &mut self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<PathInfo>, ServeError> {
        const OP: &str = "query_path_infos";
        self.begin(OP)?;
        self.send_u64(OP, CMD_QUERY_PATH_INFOS).await?;
        self.send_paths(OP, paths).await?;
        self.flush(OP).await?;
        let mut infos = Vec::new();
        loop {
            let at = self.r.offset();
            let s = self.recv_string(OP, self.limits.max_path_len).await?;
            if s.is_empty() {
                break;
            }
            let path = self.parse_path(OP, at, &s)?;
            if !paths.contains(&path) || infos.len() >= paths.len() {
                return Err(self.bad_reply(
                    OP,
                    format!("information about {s}, which was not asked about"),
                ));
            }
            let deriver = self.recv_opt_path(OP).await?;
            let references = self.recv_path_set(OP).await?;
            let _download_size = self.recv_u64(OP).await?;
            let nar_size = self.recv_u64(OP).await?;
            // Present from 2.4; we require 2.5.
            let at = self.r.offset();
            let hash = self.recv_string(OP, self.limits.max_string).await?;
            let nar_hash =
                Hash::parse_any_prefixed(&hash).map_err(|source| ServeError::BadHash {
                    op: OP,
                    remote: self.remote.clone(),
                    offset: at,
                    got: hash.clone(),
                    source: Box::new(source),
                })?;
            let ca = self.recv_string(OP, self.limits.max_string).await?;
            let sigs = self
                .r
                .read_strings(self.limits.max_sigs, self.limits.max_string)
                .await
                .map_err(|e| self.wire_err(OP, e))?;
            infos.push(PathInfo {
                path,
                deriver,
                references,
                nar_size,
                nar_hash,
                ca: (!ca.is_empty()).then_some(ca),
                sigs: sigs.into_iter().collect(),
            });
        }
        self.broken = false;
        Ok(infos)
    }

    /// `QueryClosure` (op 7): the closure of `paths` on the remote, with the outputs of
    /// derivations in it if `include_outputs`.
    pub async fn query_closure(
        &mut self,
        include_outputs: bool,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, ServeError> {
        const OP: &str = "query_closure";
        self.begin(OP)?;
        self.send_u64(OP, CMD_QUERY_CLOSURE).await?;
        self.send_bool(OP, include_outputs).await?;
        self.send_paths(OP, paths).await?;
        self.flush(OP).await?;
        let closure = self.recv_path_set(OP).await?;
        self.broken = false;
        Ok(closure)
    }

    /// `AddToStoreNar` (op 9): adds `info.path` to the remote store from the NAR that
    /// `nar` yields. Exactly `info.nar_size` bytes are read from `nar` and streamed to the
    /// remote (never buffered whole) while they are hashed; the hash goes out as base-16
    /// without prefix (`narHash.to_string(Base16, false)`), with registration time 0 (the
    /// remote uses "now") and `ultimate` false. The remote must trust us (`NoCheckSigs`).
    ///
    /// The remote checks size and hash itself and fails the connection on a mismatch; we
    /// check too, so the error says what went wrong instead of "connection closed".
    pub async fn add_to_store_nar<N: AsyncRead + Unpin>(
        &mut self,
        info: &PathInfo,
        nar: N,
    ) -> Result<(), ServeError> {
        self.add_nar(info, nar, true).await
    }

    /// [`add_to_store_nar`](Self::add_to_store_nar) without hashing the NAR on this side.
    /// Hashing is a full extra pass over the data (on a copy that saturates the CPU, the
    /// sender's largest cost after the transport); the remote hashes it anyway (Nix 2.8
    /// `LocalStore::addToStore`: "hash mismatch importing path") and then ends the
    /// connection, so the call fails either way. A caller that wants to tell a bad local
    /// NAR from a broken connection checks its NAR after a failure.
    pub async fn add_to_store_nar_unhashed<N: AsyncRead + Unpin>(
        &mut self,
        info: &PathInfo,
        nar: N,
    ) -> Result<(), ServeError> {
        self.add_nar(info, nar, false).await
    }

    async fn add_nar<N: AsyncRead + Unpin>(
        &mut self,
        info: &PathInfo,
        mut nar: N,
        hash: bool,
    ) -> Result<(), ServeError> {
        const OP: &str = "add_to_store_nar";
        let path = self.store_dir.display(&info.path);
        if info.nar_size == 0 {
            return Err(self.bad_request(OP, &path, "the NAR size is 0 (the remote refuses it)"));
        }
        if info.nar_hash.algo() != HashAlgo::Sha256 {
            return Err(self.bad_request(OP, &path, "the NAR hash must be SHA-256"));
        }
        self.begin(OP)?;
        self.send_u64(OP, CMD_ADD_TO_STORE_NAR).await?;
        self.send_str(OP, &path).await?;
        self.send_opt_path(OP, info.deriver.as_ref()).await?;
        self.send_str(OP, &info.nar_hash.to_base16()).await?;
        self.send_paths(OP, &info.references).await?;
        self.send_u64(OP, 0).await?; // registrationTime
        self.send_u64(OP, info.nar_size).await?;
        self.send_bool(OP, false).await?; // ultimate
        self.send_strings(OP, &info.sigs).await?;
        self.send_opt_str(OP, info.ca.as_deref()).await?;

        let mut hasher = hash.then(Sha256Sink::new);
        let mut buf = vec![0u8; UPLOAD_CHUNK];
        let mut done = 0u64;
        while done < info.nar_size {
            let want = usize::try_from(info.nar_size - done)
                .unwrap_or(UPLOAD_CHUNK)
                .min(UPLOAD_CHUNK);
            let Some(chunk) = buf.get_mut(..want) else {
                break;
            };
            let n = match nar.read(chunk).await {
                Ok(0) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the NAR source ended early",
                )),
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            }
            .map_err(|source| ServeError::NarSource {
                remote: self.remote.clone(),
                path: path.clone(),
                done,
                size: info.nar_size,
                source,
            })?;
            let data = chunk.get(..n).unwrap_or(&[]);
            if let Some(h) = hasher.as_mut() {
                h.update(data);
            }
            self.send_raw(OP, data).await?;
            done += n as u64;
        }
        self.flush(OP).await?;
        if let Some(got) = hasher.map(Sha256Sink::finish)
            && got != info.nar_hash
        {
            return Err(ServeError::NarHashMismatch {
                remote: self.remote.clone(),
                path,
                expected: info.nar_hash.to_nix32_prefixed(),
                got: got.to_nix32_prefixed(),
            });
        }
        let at = self.r.offset();
        let reply = self.recv_u64(OP).await?;
        if reply != 1 {
            return Err(ServeError::BadReply {
                op: OP,
                remote: self.remote.clone(),
                offset: at,
                detail: format!("the remote answered {reply} instead of 1 for {path}"),
            });
        }
        self.broken = false;
        Ok(())
    }

    /// `BuildDerivation` (op 8): builds `drv` (its `.drv` path is `drv_path`, from which the
    /// remote takes the name) on the remote. A failed build is a [`BuildResult`] with a
    /// failure status, not an error; errors are protocol or connection failures. The build
    /// log is not in the protocol: the remote writes it to its stderr.
    pub async fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        options: &BuildOptions,
    ) -> Result<BuildResult, ServeError> {
        const OP: &str = "build_derivation";
        self.begin(OP)?;
        self.send_u64(OP, CMD_BUILD_DERIVATION).await?;
        let p = self.store_dir.display(drv_path);
        self.send_str(OP, &p).await?;
        let body = drv.to_wire(&self.store_dir);
        self.send_raw(OP, &body).await?;
        // `putBuildSettings`, by the version in use.
        self.send_u64(OP, options.max_silent_time).await?;
        self.send_u64(OP, options.build_timeout).await?;
        if self.minor() >= 2 {
            self.send_u64(OP, options.max_log_size).await?;
        }
        if self.minor() >= 3 {
            self.send_u64(OP, 0).await?; // nrRepeats
            self.send_bool(OP, false).await?; // enforceDeterminism
        }
        if self.minor() >= 7 {
            self.send_bool(OP, options.keep_failed).await?;
        }
        self.flush(OP).await?;

        let status = BuildStatus::from_code(self.recv_u64(OP).await?);
        let error_msg = self.recv_string(OP, self.limits.max_error_msg).await?;
        let mut result = BuildResult {
            status,
            error_msg,
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            built_outputs: Vec::new(),
        };
        if self.minor() >= 3 {
            result.times_built = self.recv_u64(OP).await?;
            result.is_non_deterministic = self.recv_bool(OP).await?;
            result.start_time = self.recv_u64(OP).await?;
            result.stop_time = self.recv_u64(OP).await?;
        }
        if self.minor() >= 6 {
            // `std::map<DrvOutput, Realisation>`: a count, then id and JSON per entry.
            let n = self.recv_count(OP, self.limits.max_built_outputs).await?;
            for _ in 0..n {
                let id = self.recv_string(OP, self.limits.max_string).await?;
                let realisation_json = self.recv_string(OP, self.limits.max_string).await?;
                result.built_outputs.push(BuiltOutput {
                    id,
                    realisation_json,
                });
            }
        }
        self.broken = false;
        Ok(result)
    }
}
