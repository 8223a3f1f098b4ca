//! One remote build over the serve protocol (hook-protocol.md §3, §4): copy the missing
//! input closure to the builder, build, fetch the outputs and import them locally.
//!
//! The serve-protocol calls are in the small private [`Serve`] client below (handshake,
//! QueryValidPaths, QueryPathInfos, AddToStoreNar, BuildPaths, DumpStorePath, as in Nix 2.8
//! `src/libstore/legacy-ssh-store.cc` and the server `opServe` in
//! `src/nix-store/nix-store.cc`). It is meant to be replaced by `ferry_nix::serve` once that
//! lands; nothing outside this file sees it.
//!
//! Building: the `.drv` closure is copied along with the inputs and built with `BuildPaths`
//! (`drv!out1,out2`), so the hook needs no derivation parser. The stock hook sends a
//! `BasicDerivation` with `BuildDerivation` instead and skips the `.drv` files; switching is
//! local to [`build_on`] once `ferry_nix::derivation` is available.

use crate::local::{Fetched, Importer, LocalError, LocalStore, PathInfo, topo_sort};
use crate::ssh::{LogTap, ProcessGuard, Session};
use ferry_nix::hash::Hash;
use ferry_nix::wire::{AsyncWireReader, AsyncWireWriter, WireError};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufWriter};

const SERVE_MAGIC_1: u64 = 0x390c_9deb;
const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// Serve protocol 2.7, what Nix 2.8–2.34 speak (hook-protocol.md §4.1).
const SERVE_VERSION: u64 = 0x207;
const MAX_STR: u64 = 1 << 20;
const MAX_PATHS: usize = 1 << 20;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RemoteError {
    #[error(
        "'{machine}' does not speak the serve protocol (got {got:#x} instead of the magic number); \
         is Nix installed there and on the login PATH? remote stderr: {stderr}"
    )]
    BadMagic {
        machine: String,
        got: u64,
        stderr: String,
    },
    #[error("'{machine}' speaks serve protocol {version:#x}, Ferry needs 2.x")]
    BadVersion { machine: String, version: u64 },
    #[error("serve protocol with '{machine}' during {step}: {source}; remote stderr: {stderr}")]
    Wire {
        machine: String,
        step: &'static str,
        #[source]
        source: WireError,
        stderr: String,
    },
    #[error("serve protocol with '{machine}' during {step}: {source}")]
    Io {
        machine: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("local store: {0}")]
    Local(#[from] LocalError),
    #[error("build of '{drv}' on '{machine}' failed: {message}")]
    BuildFailed {
        drv: String,
        machine: String,
        status: u64,
        message: String,
    },
    #[error("'{machine}' did not produce output {path} of '{drv}'")]
    MissingOutput {
        machine: String,
        drv: String,
        path: String,
    },
    #[error("the derivation '{drv}': {problem}")]
    Derivation { drv: String, problem: String },
}

impl RemoteError {
    /// The failure is the builder's or the link's (it could not be reached, did not speak
    /// the protocol, or the connection broke), not the build's or the local store's: it
    /// counts against the builder's health, and before the build starts another builder
    /// may take over.
    pub fn is_builder_fault(&self) -> bool {
        matches!(
            self,
            RemoteError::BadMagic { .. }
                | RemoteError::BadVersion { .. }
                | RemoteError::Wire { .. }
                | RemoteError::Io { .. }
        )
    }

    /// The hook's exit status for this failure (hook-protocol.md §1.8): 101 → `TimedOut`,
    /// 100 → permanent failure on Nix ≤ 2.28; any other non-zero is `MiscFailure`.
    pub fn exit_code(&self) -> i32 {
        match self {
            RemoteError::BuildFailed { status: 101, .. } => 101,
            RemoteError::BuildFailed { status: 100, .. } => 100,
            _ => 1,
        }
    }
}

/// Build settings sent to the builder (`BuildOptions`, hook-protocol.md §4.4), from the
/// daemon's settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildOptions {
    pub max_silent_time: u64,
    pub build_timeout: u64,
    pub max_log_size: u64,
    pub keep_failed: bool,
}

/// Everything one remote build needs.
#[derive(Debug, Clone)]
pub struct Job {
    pub drv_path: String,
    pub inputs: BTreeSet<String>,
    pub wanted_outputs: BTreeSet<String>,
    pub options: BuildOptions,
    /// `builders-use-substitutes`: let the builder substitute missing inputs first.
    pub use_substitutes: bool,
}

type Reader = AsyncWireReader<Box<dyn AsyncRead + Send + Unpin>>;
type Writer = AsyncWireWriter<BufWriter<Box<dyn AsyncWrite + Send + Unpin>>>;

/// A connected builder: the serve client, the remote log and the transport process.
pub struct Connection {
    machine: String,
    r: Reader,
    w: Writer,
    log: LogTap,
    guard: ProcessGuard,
    /// The negotiated serve protocol version.
    pub version: u64,
}

/// Runs the serve handshake over a fresh session. On failure the remote stderr (ssh's and
/// the remote shell's messages, e.g. `nix-store: command not found`) is part of the error.
pub async fn open(machine: &str, session: Session) -> Result<Connection, RemoteError> {
    let (writer, reader, mut log, guard) = session.into_parts();
    let mut c = Connection {
        machine: machine.to_owned(),
        r: AsyncWireReader::new(reader),
        w: AsyncWireWriter::new(BufWriter::new(writer)),
        log: LogTap::spawn(tokio::io::empty()),
        guard,
        version: 0,
    };
    let result = async {
        c.w.write_u64(SERVE_MAGIC_1).await?;
        c.w.write_u64(SERVE_VERSION).await?;
        c.w.flush().await?;
        std::io::Result::Ok(())
    }
    .await;
    if let Err(source) = result {
        let stderr = log.collect(Duration::from_secs(2)).await;
        return Err(RemoteError::Wire {
            machine: machine.to_owned(),
            step: "the handshake",
            source: WireError::Io { offset: 0, source },
            stderr,
        });
    }
    let magic = match c.r.read_u64().await {
        Ok(m) => m,
        Err(source) => {
            let stderr = log.collect(Duration::from_secs(2)).await;
            return Err(RemoteError::Wire {
                machine: machine.to_owned(),
                step: "the handshake",
                source,
                stderr,
            });
        }
    };
    if magic != SERVE_MAGIC_2 {
        let stderr = log.collect(Duration::from_millis(500)).await;
        return Err(RemoteError::BadMagic {
            machine: machine.to_owned(),
            got: magic,
            stderr,
        });
    }
    let version = c.r.read_u64().await.map_err(|source| RemoteError::Wire {
        machine: machine.to_owned(),
        step: "the handshake",
        source,
        stderr: String::new(),
    })?;
    if version >> 8 != 2 {
        return Err(RemoteError::BadVersion {
            machine: machine.to_owned(),
            version,
        });
    }
    // Nix 2.8 clients use the server's number, HEAD the minimum; we only use what 2.7 has.
    c.version = version.min(SERVE_VERSION);
    c.log = log;
    Ok(c)
}

impl Connection {
    pub fn machine(&self) -> &str {
        &self.machine
    }

    fn wire(&self, step: &'static str) -> impl Fn(WireError) -> RemoteError + '_ {
        move |source| RemoteError::Wire {
            machine: self.machine.clone(),
            step,
            source,
            stderr: String::new(),
        }
    }

    fn io(&self, step: &'static str) -> impl Fn(std::io::Error) -> RemoteError + '_ {
        move |source| RemoteError::Io {
            machine: self.machine.clone(),
            step,
            source,
        }
    }

    /// `QueryValidPaths` (op 1): which of `paths` the builder has. `lock` adds temp roots
    /// on the builder so they are not collected before the build.
    pub async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<String>,
        lock: bool,
        substitute: bool,
    ) -> Result<BTreeSet<String>, RemoteError> {
        let step = "QueryValidPaths";
        let io = |source| RemoteError::Io {
            machine: self.machine.clone(),
            step,
            source,
        };
        let w = &mut self.w;
        async {
            w.write_u64(1).await?;
            w.write_bool(lock).await?;
            w.write_bool(substitute).await?;
            w.write_strings(paths.iter()).await?;
            w.flush().await
        }
        .await
        .map_err(io)?;
        let valid = self
            .r
            .read_strings(MAX_PATHS, MAX_STR)
            .await
            .map_err(self.wire(step))?;
        Ok(valid.into_iter().collect())
    }

    /// `QueryPathInfos` (op 2) for paths valid on the builder.
    pub async fn query_path_infos(
        &mut self,
        paths: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, PathInfo>, RemoteError> {
        let step = "QueryPathInfos";
        let w = &mut self.w;
        let r = async {
            w.write_u64(2).await?;
            w.write_strings(paths.iter()).await?;
            w.flush().await
        }
        .await;
        r.map_err(self.io(step))?;
        let mut out = BTreeMap::new();
        loop {
            let path = self.r.read_string(MAX_STR).await.map_err(self.wire(step))?;
            if path.is_empty() {
                return Ok(out);
            }
            let deriver = self.r.read_string(MAX_STR).await.map_err(self.wire(step))?;
            let references = self
                .r
                .read_strings(MAX_PATHS, MAX_STR)
                .await
                .map_err(self.wire(step))?;
            let _download_size = self.r.read_u64().await.map_err(self.wire(step))?;
            let nar_size = self.r.read_u64().await.map_err(self.wire(step))?;
            // Protocol ≥ 2.4 (every Nix since 2.0) adds narHash, ca and sigs.
            let hash = self.r.read_string(MAX_STR).await.map_err(self.wire(step))?;
            let ca = self.r.read_string(MAX_STR).await.map_err(self.wire(step))?;
            let sigs = self
                .r
                .read_strings(MAX_PATHS, MAX_STR)
                .await
                .map_err(self.wire(step))?;
            let nar_hash =
                Hash::parse_any_prefixed(&hash).map_err(|e| RemoteError::Derivation {
                    drv: path.clone(),
                    problem: format!("the builder sent narHash {hash:?}: {e}"),
                })?;
            out.insert(
                path.clone(),
                PathInfo {
                    path,
                    deriver: Some(deriver).filter(|d| !d.is_empty()),
                    nar_hash,
                    nar_size,
                    references: references.into_iter().collect(),
                    ca: Some(ca).filter(|c| !c.is_empty()),
                    sigs,
                },
            );
        }
    }

    /// `AddToStoreNar` (op 9, serve ≥ 2.5): uploads one path, its NAR streamed from
    /// `nix-store --dump`.
    pub async fn add_to_store_nar(
        &mut self,
        info: &PathInfo,
        local: &LocalStore,
    ) -> Result<(), RemoteError> {
        let step = "AddToStoreNar";
        let (mut child, mut nar) = local.dump(&info.path)?;
        let w = &mut self.w;
        let sent = async {
            w.write_u64(9).await?;
            w.write_str(&info.path).await?;
            w.write_str(info.deriver.as_deref().unwrap_or("")).await?;
            w.write_str(&info.nar_hash.to_base16()).await?;
            w.write_strings(info.references.iter()).await?;
            w.write_u64(0).await?; // registrationTime: now, on the builder
            w.write_u64(info.nar_size).await?;
            w.write_bool(false).await?; // ultimate
            w.write_strings(info.sigs.iter()).await?;
            w.write_str(info.ca.as_deref().unwrap_or("")).await?;
            // Exactly narSize bytes: the server reads a sized source.
            let copied = tokio::io::copy(&mut (&mut nar).take(info.nar_size), w.get_mut()).await?;
            if copied != info.nar_size {
                return Err(std::io::Error::other(format!(
                    "nix-store --dump {} gave {copied} bytes, the store says {}",
                    info.path, info.nar_size
                )));
            }
            w.flush().await
        }
        .await;
        let _ = child.wait().await;
        sent.map_err(self.io(step))?;
        let ok = self.r.read_u64().await.map_err(self.wire(step))?;
        if ok != 1 {
            return Err(RemoteError::Io {
                machine: self.machine.clone(),
                step,
                source: std::io::Error::other(format!("the builder answered {ok} instead of 1")),
            });
        }
        Ok(())
    }

    /// `BuildPaths` (op 6) of `drv!outputs`. The server answers 0, or the failure's exit
    /// status and message (2.8 `opServe`).
    pub async fn build_paths(
        &mut self,
        drv: &str,
        outputs: &BTreeSet<String>,
        opts: &BuildOptions,
    ) -> Result<(), RemoteError> {
        let step = "BuildPaths";
        let outs: Vec<&str> = outputs.iter().map(String::as_str).collect();
        let target = if outs.is_empty() {
            drv.to_owned()
        } else {
            format!("{drv}!{}", outs.join(","))
        };
        let version = self.version;
        let w = &mut self.w;
        let r = async {
            w.write_u64(6).await?;
            w.write_strings([&target]).await?;
            write_build_options(w, opts, version).await?;
            w.flush().await
        }
        .await;
        r.map_err(self.io(step))?;
        let status = self.r.read_u64().await.map_err(self.wire(step))?;
        if status == 0 {
            return Ok(());
        }
        let message = self.r.read_string(MAX_STR).await.map_err(self.wire(step))?;
        Err(RemoteError::BuildFailed {
            drv: drv.to_owned(),
            machine: self.machine.clone(),
            status,
            message,
        })
    }

    /// `DumpStorePath` (op 3): the NAR, unframed; its size comes from QueryPathInfos.
    pub async fn dump_store_path(&mut self, info: &PathInfo) -> Result<Vec<u8>, RemoteError> {
        let step = "DumpStorePath";
        let w = &mut self.w;
        let r = async {
            w.write_u64(3).await?;
            w.write_str(&info.path).await?;
            w.flush().await
        }
        .await;
        r.map_err(self.io(step))?;
        let len = usize::try_from(info.nar_size).map_err(|_| RemoteError::Io {
            machine: self.machine.clone(),
            step,
            source: std::io::Error::other("NAR too large for this machine"),
        })?;
        let mut nar = Vec::with_capacity(len.min(64 << 20));
        let got = (&mut self.r.get_mut())
            .take(info.nar_size)
            .read_to_end(&mut nar)
            .await
            .map_err(self.io(step))?;
        if got != len {
            return Err(RemoteError::Io {
                machine: self.machine.clone(),
                step,
                source: std::io::Error::other(format!(
                    "NAR of {} ended after {got} of {len} bytes",
                    info.path
                )),
            });
        }
        Ok(nar)
    }

    /// Ends the session: closes the builder's stdin and waits for the transport.
    pub async fn close(self) -> LogTap {
        drop(self.w);
        drop(self.r);
        self.guard.finish().await;
        self.log
    }

    /// Takes the remote log tap out (to forward it to the build log), leaving an empty one.
    pub fn take_log(&mut self) -> LogTap {
        std::mem::replace(&mut self.log, LogTap::spawn(tokio::io::empty()))
    }
}

/// `BuildOptions` as the server reads them (`getBuildSettings` in 2.8 `opServe`).
async fn write_build_options(
    w: &mut Writer,
    o: &BuildOptions,
    version: u64,
) -> std::io::Result<()> {
    let minor = version & 0xff;
    w.write_u64(o.max_silent_time).await?;
    w.write_u64(o.build_timeout).await?;
    if minor >= 2 {
        w.write_u64(o.max_log_size).await?;
    }
    if minor >= 3 {
        // nrRepeats, enforceDeterminism: HEAD refuses anything but 0, 0.
        w.write_u64(0).await?;
        w.write_u64(0).await?;
    }
    if minor >= 7 {
        w.write_bool(o.keep_failed).await?;
    }
    Ok(())
}

/// Progress callbacks, so the caller can report through `@nix` messages.
pub trait Progress {
    fn message(&self, text: &str);
}

/// What a copy moved, for the builder's measured transfer rate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Transfer {
    pub bytes: u64,
    pub secs: f64,
}

/// Step one of a remote build (hook-protocol.md §4.6): copy the input closure and the `.drv`
/// closure to the builder, as far as it lacks them. Failures here happen before the build
/// starts, so the caller may retry on another builder.
pub async fn upload(
    conn: &mut Connection,
    job: &Job,
    local: &LocalStore,
    progress: &dyn Progress,
    upload_lock: Option<crate::slots::HeldLock>,
) -> Result<Transfer, RemoteError> {
    let start = std::time::Instant::now();
    // The inputs plus the .drv closure (BuildPaths needs the derivations on the builder).
    let mut roots: Vec<String> = job.inputs.iter().cloned().collect();
    roots.push(job.drv_path.clone());
    let closure = local.closure_infos(&roots).await?;
    let all: BTreeSet<String> = closure.iter().map(|i| i.path.clone()).collect();
    let valid = conn
        .query_valid_paths(&all, true, job.use_substitutes)
        .await?;
    let missing: Vec<PathInfo> = closure
        .into_iter()
        .filter(|i| !valid.contains(&i.path))
        .collect();
    let missing = topo_sort(missing)?;
    if !missing.is_empty() {
        progress.message(&format!(
            "copying {} paths to '{}'",
            missing.len(),
            conn.machine()
        ));
    }
    let mut bytes = 0;
    for info in &missing {
        conn.add_to_store_nar(info, local).await?;
        bytes += info.nar_size;
    }
    // Uploads are serialised per builder; the build itself is not.
    drop(upload_lock);
    Ok(Transfer {
        bytes,
        secs: start.elapsed().as_secs_f64(),
    })
}

/// Step two: build, fetch the missing outputs and import them. `outputs` maps output
/// name → store path. Returns the build time and what was fetched.
pub async fn build_and_fetch<I: Importer + Sync>(
    conn: &mut Connection,
    job: &Job,
    outputs: &BTreeMap<String, String>,
    importer: &I,
) -> Result<(f64, Transfer), RemoteError> {
    let start = std::time::Instant::now();
    conn.build_paths(&job.drv_path, &job.wanted_outputs, &job.options)
        .await?;
    let build_secs = start.elapsed().as_secs_f64();

    let fetch_start = std::time::Instant::now();
    let mut wanted = BTreeSet::new();
    for name in &job.wanted_outputs {
        let path = outputs.get(name).ok_or_else(|| RemoteError::Derivation {
            drv: job.drv_path.clone(),
            problem: format!("it has no output '{name}'"),
        })?;
        wanted.insert(path.clone());
    }
    let infos = conn.query_path_infos(&wanted).await?;
    for p in &wanted {
        if !infos.contains_key(p) {
            return Err(RemoteError::MissingOutput {
                machine: conn.machine().to_owned(),
                drv: job.drv_path.clone(),
                path: p.clone(),
            });
        }
    }
    let infos = topo_sort(infos.into_values().collect())?;
    let mut fetched = Vec::new();
    let mut bytes = 0;
    for info in infos {
        let nar = conn.dump_store_path(&info).await?;
        bytes += info.nar_size;
        let f = Fetched { info, nar };
        f.verify()?;
        fetched.push(f);
    }
    let fetch_secs = fetch_start.elapsed().as_secs_f64();
    importer.import(&fetched).await?;
    Ok((
        build_secs,
        Transfer {
            bytes,
            secs: fetch_secs,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_remote_status() {
        let f = |status| RemoteError::BuildFailed {
            drv: "d".into(),
            machine: "m".into(),
            status,
            message: "x".into(),
        };
        assert_eq!(f(101).exit_code(), 101);
        assert_eq!(f(100).exit_code(), 100);
        assert_eq!(f(1).exit_code(), 1);
        assert_eq!(f(7).exit_code(), 1);
    }

    #[test]
    fn build_options_by_version() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let o = BuildOptions {
            max_silent_time: 5,
            build_timeout: 6,
            max_log_size: 7,
            keep_failed: true,
        };
        let bytes = rt.block_on(async {
            let (a, mut b) = tokio::io::duplex(4096);
            let boxed: Box<dyn AsyncWrite + Send + Unpin> = Box::new(a);
            let mut w = AsyncWireWriter::new(BufWriter::new(boxed));
            write_build_options(&mut w, &o, 0x207).await.expect("w");
            w.flush().await.expect("flush");
            drop(w);
            let mut v = Vec::new();
            b.read_to_end(&mut v).await.expect("read");
            v
        });
        let nums: Vec<u64> = bytes
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect();
        assert_eq!(nums, [5, 6, 7, 0, 0, 1]);
    }
}
