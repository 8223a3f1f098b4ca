//! The local store, through Nix's own command-line tools.
//!
//! Why the CLI and not the daemon socket or the SQLite database: the hook runs as the
//! daemon's user with the daemon's environment, so `nix-store` / `nix` open exactly the
//! store the daemon uses (a direct local store as root), whatever its layout; and the one
//! operation that must bypass the daemon, importing outputs whose locks the daemon holds
//! (docs/hook-protocol.md §3.4), is only possible in a process that opens the store itself.
//! Costs: one process per query batch and one per NAR, a few milliseconds each.
//!
//! - path infos: `nix path-info --json PATHS…` (one process for a whole closure);
//! - NARs: written in-process from the file system ([`ferry_nix::nar::dump_path`], as the
//!   stock hook's `LocalFSStore::narFromPath` does) when the store is a local one this
//!   process can read, else `nix-store --dump PATH` streamed from its stdout;
//! - derivations: the `.drv` file read and parsed with [`ferry_nix::derivation`];
//! - import: [`Importer`], either [`HeldLocksImporter`] (`NIX_HELD_LOCKS` + `nix-store
//!   --import`, Nix 2.0–2.28 and every Lix) or [`RestoreImporter`] (`nix-store --restore`
//!   then `--register-validity`, every version); [`held_locks_supported`] picks one from
//!   `nix-store --version` for `import-method = "auto"`.

use ferry_nix::derivation::{Derivation, DerivationError};
use ferry_nix::hash::Hash;
use ferry_nix::serve::PathInfo;
use ferry_nix::store_path::{StoreDir, StorePath, StorePathError};
use ferry_nix::store_uri::StoreUri;
use ferry_nix::wire::WireWriter;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::task::{Context, Poll};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::mpsc;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LocalError {
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("path info of {path} from `nix path-info --json`: {problem}")]
    BadInfo { path: String, problem: String },
    #[error("`nix path-info --json` printed something that is not its JSON: {0}")]
    BadJson(String),
    #[error("{path} is not valid in the local store")]
    NotValid { path: String },
    #[error("{0}")]
    BadPath(#[from] StorePathError),
    #[error("reading the derivation {path}: {source}")]
    Derivation {
        path: String,
        #[source]
        source: Box<DerivationError>,
    },
    #[error("NAR of {path} from the builder has hash {got}, the builder said {want}")]
    NarHashMismatch {
        path: String,
        got: String,
        want: String,
    },
    #[error("reading the NAR of {path}: {source}")]
    NarRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the references of {paths:?} form a cycle")]
    Cycle { paths: Vec<String> },
    #[error("importing {path}: {problem}")]
    Import { path: String, problem: String },
    #[error(
        "{path} was registered with NAR hash {got}, the builder said {want}; the store now \
         holds a wrong copy (repair it with `nix-store --repair-path {path}` or delete it)"
    )]
    RegisteredHashMismatch {
        path: String,
        got: String,
        want: String,
    },
}

/// Orders `infos` so that every path comes after the paths it references (self-references
/// ignored); references outside the set are taken as already present. Ties keep name order,
/// so the result is deterministic.
pub fn topo_sort(infos: Vec<PathInfo>) -> Result<Vec<PathInfo>, LocalError> {
    let mut pending: BTreeMap<StorePath, PathInfo> =
        infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut out = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let ready: Vec<StorePath> = pending
            .iter()
            .filter(|(p, info)| {
                info.references
                    .iter()
                    .all(|r| r == *p || !pending.contains_key(r))
            })
            .map(|(p, _)| p.clone())
            .collect();
        if ready.is_empty() {
            return Err(LocalError::Cycle {
                paths: pending.keys().map(ToString::to_string).collect(),
            });
        }
        for p in ready {
            if let Some(i) = pending.remove(&p) {
                out.push(i);
            }
        }
    }
    Ok(out)
}

/// Parses `nix path-info --json` output, in each shape Nix has printed:
/// - Nix 2.8 to 2.18: an array of objects, each with `path`; an invalid path has
///   `"valid": false`;
/// - Nix 2.19 to 2.33, and `--json-format 1`: an object keyed by absolute store path, `null`
///   for an invalid path (2.34 adds `storeDir` and `version` inside each entry);
/// - `--json-format 2` (Nix 2.34): `{"info": {<base name>: {...} | null}, "storeDir": ...,
///   "version": 2}`, references and deriver may be base names, and `ca` an object
///   `{"method": "nar" | "flat" | "text", "hash": <SRI>}`.
///
/// Each entry has `narHash` (SRI since 2.4, `sha256:` nix32 before), `narSize`,
/// `references`, optional `deriver`, `ca`, `signatures`. The shapes are told apart by their
/// structure, not by the Nix version, so a store reached through another Nix still parses.
/// Sources: `src/nix/path-info.cc` and `src/libstore/path-info.cc` (`UnkeyedValidPathInfo::toJSON`)
/// in <https://github.com/NixOS/nix>.
pub fn parse_path_info_json(text: &str, store_dir: &StoreDir) -> Result<Vec<PathInfo>, LocalError> {
    use serde_json::Value;
    let v: Value = serde_json::from_str(text).map_err(|e| LocalError::BadJson(e.to_string()))?;
    // (path as printed, entry): `None` for an invalid path.
    let mut entries: Vec<(String, Option<&Value>)> = Vec::new();
    // Store directory prefix for base names (format 2).
    let mut base_dir: Option<String> = None;
    match &v {
        Value::Array(a) => {
            for item in a {
                let path = item
                    .get("path")
                    .and_then(Value::as_str)
                    .ok_or_else(|| LocalError::BadJson("an array entry without \"path\"".into()))?
                    .to_owned();
                let valid = item.get("valid").and_then(Value::as_bool) != Some(false);
                entries.push((path, valid.then_some(item)));
            }
        }
        Value::Object(o) if o.get("info").is_some_and(Value::is_object) => {
            let dir = o
                .get("storeDir")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| store_dir.to_string());
            if let Some(Value::Object(info)) = o.get("info") {
                for (k, item) in info {
                    let path = if k.starts_with('/') {
                        k.clone()
                    } else {
                        format!("{}/{k}", dir.trim_end_matches('/'))
                    };
                    entries.push((path, item.is_object().then_some(item)));
                }
            }
            base_dir = Some(dir);
        }
        Value::Object(o) => {
            for (k, item) in o {
                match item {
                    Value::Object(_) => entries.push((k.clone(), Some(item))),
                    Value::Null => entries.push((k.clone(), None)),
                    _ => {
                        return Err(LocalError::BadJson(format!(
                            "the entry of {k:?} is neither an object nor null"
                        )));
                    }
                }
            }
        }
        _ => return Err(LocalError::BadJson("neither an array nor an object".into())),
    }
    let full = |p: &str| -> String {
        match &base_dir {
            Some(d) if !p.starts_with('/') => format!("{}/{p}", d.trim_end_matches('/')),
            _ => p.to_owned(),
        }
    };
    let mut out = Vec::new();
    for (path_text, item) in entries {
        let Some(item) = item else {
            return Err(LocalError::NotValid { path: path_text });
        };
        let bad = |problem: &str| LocalError::BadInfo {
            path: path_text.clone(),
            problem: problem.to_owned(),
        };
        let path = store_dir.parse(&path_text)?;
        let hash_text = item
            .get("narHash")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no narHash"))?;
        let nar_hash = Hash::parse_any_prefixed(hash_text)
            .map_err(|e| bad(&format!("narHash {hash_text:?}: {e}")))?;
        let nar_size = item
            .get("narSize")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("no narSize"))?;
        let strings = |key: &str| -> Vec<String> {
            item.get(key)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let references = strings("references")
            .iter()
            .map(|r| store_dir.parse(&full(r)))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let deriver = item
            .get("deriver")
            .and_then(Value::as_str)
            .filter(|d| !d.is_empty())
            .map(|d| store_dir.parse(&full(d)))
            .transpose()?;
        let ca = match item.get("ca") {
            None | Some(Value::Null) => None,
            Some(Value::String(c)) if c.is_empty() => None,
            Some(Value::String(c)) => Some(c.clone()),
            Some(obj @ Value::Object(_)) => Some(ca_from_json_object(obj).map_err(|p| bad(&p))?),
            Some(_) => return Err(bad("ca is neither a string nor an object")),
        };
        out.push(PathInfo {
            deriver,
            ca,
            references,
            sigs: strings("signatures").into_iter().collect(),
            path,
            nar_hash,
            nar_size,
        });
    }
    Ok(out)
}

/// The textual content address (`fixed:r:sha256:<nix32>`, the form of narinfo `CA:` and the
/// serve protocol) of a format-2 `ca` object `{"method": ..., "hash": <SRI>}`
/// (`src/libstore/content-address.cc` `renderContentAddress`).
fn ca_from_json_object(obj: &serde_json::Value) -> Result<String, String> {
    let method = obj
        .get("method")
        .and_then(|m| m.as_str())
        .ok_or("ca has no method")?;
    let hash_text = obj
        .get("hash")
        .and_then(|h| h.as_str())
        .ok_or("ca has no hash")?;
    let hash =
        Hash::parse_any_prefixed(hash_text).map_err(|e| format!("ca hash {hash_text:?}: {e}"))?;
    let h = hash.to_nix32_prefixed();
    match method {
        "nar" => Ok(format!("fixed:r:{h}")),
        "flat" => Ok(format!("fixed:{h}")),
        "text" => Ok(format!("text:{h}")),
        other => Err(format!("ca method {other:?} is not one Ferry knows")),
    }
}

/// The store directory of the local store: `$NIX_STORE_DIR`, else `/nix/store` (Nix 2.8
/// `globals.cc` `nixStore`).
pub fn store_dir_from_env() -> StoreDir {
    std::env::var("NIX_STORE_DIR")
        .ok()
        .filter(|d| !d.is_empty())
        .and_then(|d| StoreDir::new(d).ok())
        .unwrap_or_else(default_store_dir)
}

fn default_store_dir() -> StoreDir {
    #[allow(clippy::expect_used)]
    StoreDir::new("/nix/store").expect("a valid literal")
}

/// Runs `cmd` (a `program` invocation described as `what`) with `input` on its stdin and
/// fails with its stderr unless it exits 0.
async fn feed(mut cmd: Command, program: &str, what: &str, input: &[u8]) -> Result<(), LocalError> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| LocalError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows up as the tool's failure below.
        let _ = stdin.write_all(input).await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| LocalError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    succeeded(out, what).map(drop)
}

/// The tool's stdout if it exited 0, else its status and stderr under `what`.
fn succeeded(out: std::process::Output, what: &str) -> Result<Vec<u8>, LocalError> {
    if !out.status.success() {
        return Err(LocalError::Failed {
            command: what.to_owned(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

/// The local store as seen by the CLI tools.
#[derive(Debug, Clone)]
pub struct LocalStore {
    pub nix: String,
    pub nix_store: String,
    /// Passed as `NIX_REMOTE` to the tools when set (e.g. a `local?root=` test store).
    pub store: Option<String>,
    pub store_dir: StoreDir,
}

impl Default for LocalStore {
    fn default() -> Self {
        LocalStore {
            nix: "nix".into(),
            nix_store: "nix-store".into(),
            store: None,
            store_dir: store_dir_from_env(),
        }
    }
}

impl LocalStore {
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        if let Some(s) = &self.store {
            c.env("NIX_REMOTE", s);
        }
        c.stdin(Stdio::null()).kill_on_drop(true);
        c
    }

    /// The store URI for a tool that must open the store itself rather than ask the daemon
    /// (the hook runs as the daemon's user): the configured `local…` store, else `local`.
    pub fn direct_uri(&self) -> String {
        match &self.store {
            Some(s) if s.starts_with("local") => s.clone(),
            _ => "local".to_owned(),
        }
    }

    /// The absolute path of `p` as the tools and the daemon print it.
    pub fn display(&self, p: &StorePath) -> String {
        self.store_dir.display(p)
    }

    /// Where `p` is on this machine's file system: under the `root` of a chroot store
    /// (`local?root=/r`, Nix 2.8 `LocalFSStore::toRealPath`), else the logical path.
    pub fn real_path(&self, p: &StorePath) -> PathBuf {
        let logical = self.display(p);
        let root = self
            .store
            .as_deref()
            .and_then(|s| StoreUri::parse(s).param_set("root"));
        match root {
            Some(r) => PathBuf::from(format!("{}{logical}", r.trim_end_matches('/'))),
            None => PathBuf::from(logical),
        }
    }

    /// Path infos of the closure of `paths` (`nix path-info --json -r`). A `.drv` among
    /// them (an input source can be one) is taken as the file itself (`--derivation`), not
    /// its outputs; other paths as they are (with `--derivation` they would turn into their
    /// derivers), hence up to two processes.
    pub async fn closure_infos(
        &self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<PathInfo>, LocalError> {
        let (drvs, others): (Vec<&StorePath>, Vec<&StorePath>) =
            paths.iter().partition(|p| p.is_derivation());
        let mut all: BTreeMap<StorePath, PathInfo> = BTreeMap::new();
        for (group, extra) in [(drvs, Some("--derivation")), (others, None)] {
            if group.is_empty() {
                continue;
            }
            let out = self.path_info_json(extra, &group).await?;
            for i in parse_path_info_json(&String::from_utf8_lossy(&out), &self.store_dir)? {
                all.insert(i.path.clone(), i);
            }
        }
        Ok(all.into_values().collect())
    }

    /// Runs `nix path-info --json -r [extra] PATHS` and returns its stdout. Plain `--json` is
    /// what every version from 2.8 on accepts (2.26 rejects `--json-format`); Nix 2.34 warns
    /// that it is deprecated and a later Nix may refuse it, so a refusal that names
    /// `--json-format` is answered by asking again with `--json-format 1`, the format every
    /// version that has the flag prints (keyed by absolute path).
    async fn path_info_json(
        &self,
        extra: Option<&str>,
        paths: &[&StorePath],
    ) -> Result<Vec<u8>, LocalError> {
        let run = |format: Option<&'static str>| {
            let mut c = self.command(&self.nix);
            c.args([
                "--extra-experimental-features",
                "nix-command",
                "path-info",
                "--json",
            ])
            .args(format.map(|f| ["--json-format", f]).into_iter().flatten())
            .arg("-r")
            .args(extra)
            .args(paths.iter().map(|p| self.display(p)));
            output(c, &self.nix, "nix path-info --json -r")
        };
        match run(None).await {
            Err(LocalError::Failed { stderr, .. }) if stderr.contains("--json-format") => {
                run(Some("1")).await
            }
            other => other,
        }
    }

    /// Reads and parses the `.drv` file (valid in the local store: the daemon asked about it).
    pub fn read_derivation(&self, drv: &StorePath) -> Result<Derivation, LocalError> {
        let real = self.real_path(drv);
        let bad = |source| LocalError::Derivation {
            path: self.display(drv),
            source: Box::new(source),
        };
        let file = std::fs::File::open(&real)
            .map_err(|source| bad(DerivationError::Io { offset: 0, source }))?;
        Derivation::read_from(std::io::BufReader::new(file), &self.store_dir).map_err(bad)
    }

    /// Whether this process can read the store's files where [`real_path`](Self::real_path)
    /// says they are: the default store or an explicit local one (`auto`, `local`, `daemon`,
    /// `unix://…`, `local?root=…`). A store with its files elsewhere (`local?real=…`) or a
    /// non-local one is left to the tools.
    fn files_readable_here(&self) -> bool {
        let Some(uri) = self.store.as_deref() else {
            return true;
        };
        let uri = StoreUri::parse(uri);
        // Nix 2.34 hands the hook `store` rendered as a URI, `local://?root=/r` for
        // `local?root=/r` (ferry-nix/tests/golden/wire/nix-2.34/hook-stdin.bin;
        // https://github.com/NixOS/nix/blob/2.34.0/src/libstore/store-reference.cc).
        let name = uri.scheme().unwrap_or(uri.base());
        let local = matches!(name, "auto" | "local" | "daemon") || uri.scheme() == Some("unix");
        local && !uri.params().any(|(k, _)| k == "real" || k == "store")
    }

    /// The NAR of `path`, streamed. Written in this process from the file system when the
    /// store's files are readable here (one process and one pipe fewer than `nix-store
    /// --dump`, whose output this process would otherwise copy once more), else by
    /// `nix-store --dump`.
    pub fn nar(&self, path: &StorePath) -> Result<NarStream, LocalError> {
        let real = self.real_path(path);
        if self.files_readable_here() && std::fs::symlink_metadata(&real).is_ok() {
            return Ok(NarStream::from_file_system(real));
        }
        let (child, stdout) = self.dump(path)?;
        Ok(NarStream::Tool {
            child,
            stdout,
            read: 0,
        })
    }

    /// The SHA-256 of `path`'s NAR as [`nar`](Self::nar) produces it.
    pub async fn nar_hash(&self, path: &StorePath) -> Result<Hash, LocalError> {
        let mut nar = self.nar(path)?;
        let mut sink = ferry_nix::hash::Sha256Sink::new();
        let mut buf = vec![0u8; NAR_CHUNK];
        loop {
            let n = nar
                .read(&mut buf)
                .await
                .map_err(|source| LocalError::NarRead {
                    path: self.display(path),
                    source,
                })?;
            if n == 0 {
                break;
            }
            sink.update(buf.get(..n).unwrap_or_default());
        }
        nar.finish().await;
        Ok(sink.finish())
    }

    /// Starts `nix-store --dump path`; the NAR is the child's stdout.
    pub fn dump(&self, path: &StorePath) -> Result<(Child, ChildStdout), LocalError> {
        let mut c = self.command(&self.nix_store);
        c.arg("--dump")
            .arg(self.display(path))
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = c.spawn().map_err(|source| LocalError::Spawn {
            program: self.nix_store.clone(),
            source,
        })?;
        let stdout = child.stdout.take().ok_or_else(|| LocalError::Spawn {
            program: self.nix_store.clone(),
            source: std::io::Error::other("no stdout pipe"),
        })?;
        Ok((child, stdout))
    }
}

/// Size of the pieces an in-process NAR is handed over in.
const NAR_CHUNK: usize = 256 * 1024;
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
    fn from_file_system(real: PathBuf) -> NarStream {
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

async fn output(mut c: Command, program: &str, what: &str) -> Result<Vec<u8>, LocalError> {
    let out = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|source| LocalError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    succeeded(out, what)
}

/// A local tool fed on its stdin while it runs (`nix-store --import`, `--restore`): its
/// stderr is drained concurrently into a bounded tail, so a chatty tool never blocks on a
/// full pipe while we are still writing.
struct Tool {
    child: Child,
    stdin: Option<tokio::process::ChildStdin>,
    stderr: tokio::task::JoinHandle<Vec<u8>>,
    what: String,
}

/// How much of a tool's stderr is kept for its error message.
const TOOL_STDERR_TAIL: usize = 16 * 1024;

impl Tool {
    fn spawn(mut cmd: Command, program: &str, what: String) -> Result<Tool, LocalError> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| LocalError::Spawn {
                program: program.to_owned(),
                source,
            })?;
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

    fn stdin(&mut self) -> Result<&mut tokio::process::ChildStdin, LocalError> {
        let what = self.what.clone();
        self.stdin.as_mut().ok_or(LocalError::Failed {
            command: what,
            status: "its input is closed".into(),
            stderr: String::new(),
        })
    }

    /// Closes its stdin and fails with its stderr unless it exits 0.
    async fn finish(mut self) -> Result<(), LocalError> {
        if let Some(mut stdin) = self.stdin.take() {
            // A write error shows up as the tool's failure below.
            let _ = stdin.shutdown().await;
        }
        let status = self
            .child
            .wait()
            .await
            .map_err(|source| LocalError::Spawn {
                program: self.what.clone(),
                source,
            })?;
        let stderr = self.stderr.await.unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        Err(LocalError::Failed {
            command: self.what,
            status: status.to_string(),
            stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
        })
    }

    /// Stops it without a clean end of input (the kill comes before the end of its
    /// stream, so nothing half-received is committed). If it had already failed on its
    /// own, that failure (it usually says why our writes failed).
    async fn kill(mut self) -> Option<LocalError> {
        let exited = self.child.try_wait().ok().flatten();
        drop(self.stdin.take());
        if exited.is_none() {
            let _ = self.child.kill().await;
        }
        let stderr = self.stderr.await.unwrap_or_default();
        match exited {
            Some(status) if !status.success() => Some(LocalError::Failed {
                command: self.what,
                status: status.to_string(),
                stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
            }),
            _ => None,
        }
    }
}

/// `nix-store --import` of an export stream with `NIX_HELD_LOCKS` naming the outputs, so
/// the store skips the locks the daemon holds for them (`LocalStore` constructor, Nix
/// 2.0–2.28 and Lix; removed in Nix 2.29). Requires opening the store directly, so the
/// tool runs with `NIX_REMOTE=local` (or the daemon's own local store URI).
///
/// `nix-store --import` holds each NAR in memory before it adds it (`importPaths` tees the
/// NAR into a `StringSink`,
/// <https://github.com/NixOS/nix/blob/2.8.0/src/libstore/export-import.cc>), so a
/// batch with a NAR over [`HELD_LOCKS_MAX_NAR`] goes through [`RestoreImporter`], which
/// streams on every version: memory stays bounded in the tool too, not only in the hook.
#[derive(Debug, Clone)]
pub struct HeldLocksImporter {
    pub local: LocalStore,
}

/// The largest NAR [`HeldLocksImporter`] hands to `nix-store --import` (which buffers it
/// whole, and grows its buffer by doubling).
pub const HELD_LOCKS_MAX_NAR: u64 = 64 << 20;

/// The part of the `nix-store --export` stream (2.8 `Store::exportPath` / `importPaths`)
/// before one object's NAR: `1`.
pub const EXPORT_OBJECT_START: [u8; 8] = 1u64.to_le_bytes();

/// The part of the export stream after one object's NAR: `0x4558494e, path, references,
/// deriver, 0`. The stream ends with another `0`.
pub fn export_trailer(info: &PathInfo, store_dir: &StoreDir) -> Vec<u8> {
    let mut w = WireWriter::new(Vec::new());
    // Writes to a Vec cannot fail.
    let _ = (|| -> std::io::Result<()> {
        w.write_u64(0x4558_494e)?;
        w.write_str(&store_dir.display(&info.path))?;
        w.write_strings(info.references.iter().map(|r| store_dir.display(r)))?;
        let deriver = info.deriver.as_ref().map(|d| store_dir.display(d));
        w.write_str(deriver.as_deref().unwrap_or(""))?;
        w.write_u64(0)
    })();
    w.into_inner()
}

impl HeldLocksImporter {
    fn start(&self, infos: &[PathInfo]) -> Result<Tool, LocalError> {
        let held: Vec<String> = infos.iter().map(|i| self.local.display(&i.path)).collect();
        let program = &self.local.nix_store;
        let mut cmd = Command::new(program);
        cmd.arg("--import")
            .env("NIX_REMOTE", self.local.direct_uri())
            .env("NIX_HELD_LOCKS", held.join(" "));
        Tool::spawn(cmd, program, "nix-store --import".into())
    }
}

/// What `nix-store --version` says about the local Nix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NixVersion {
    /// Lix (`nix-store (Lix, like Nix) 2.91.1`) rather than Nix.
    pub lix: bool,
    pub major: u64,
    pub minor: u64,
}

/// Parses the first line of `nix-store --version`: `nix-store (Nix) 2.8.0`, `nix-store
/// (Lix, like Nix) 2.93.0`, `nix-store (Determinate Nix 3.8.2) 2.30.1`, `nix-store (Nix)
/// 2.29.0pre20250407_1a2b3c4d`. The version is the last word; `None` if it has no
/// `major.minor`.
pub fn parse_nix_version(text: &str) -> Option<NixVersion> {
    let line = text.lines().next()?.trim();
    let word = line.split_whitespace().last()?;
    let mut parts = word.split('.');
    let number = |s: Option<&str>| -> Option<u64> {
        let digits: String = s?.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let major = number(parts.next())?;
    let minor = number(parts.next())?;
    Some(NixVersion {
        lix: line.contains("Lix"),
        major,
        minor,
    })
}

/// Whether `NIX_HELD_LOCKS` still works: every Lix (`lix/libstore/local-store.cc`) and Nix
/// before 2.29.0, which removed it (commit 78eed85b).
pub fn held_locks_supported(v: &NixVersion) -> bool {
    v.lix || (v.major, v.minor) < (2, 29)
}

/// Whether a `# decline` under `max-jobs = 0` makes the daemon wait for a build slot (woken
/// when any of its builds ends) rather than fail. Up to 2.32 a declined goal goes to the
/// local-build path, whose first step, with `max-jobs = 0` always true, is
/// `curBuilds >= maxBuildJobs` → `waitForBuildSlot` (2.8 `DerivationGoal::tryLocalBuild`;
/// <https://github.com/NixOS/nix/blob/2.26.3/src/libstore/unix/build/local-derivation-goal.cc#L192>;
/// <https://github.com/NixOS/nix/blob/2.32.0/src/libstore/build/derivation-building-goal.cc#L705>);
/// the platform check that would reject it comes only after that, in `startBuilder`.
/// From 2.33.0 (commit b57caaa1) a declined derivation is checked with `canBuildLocally`,
/// false under `max-jobs = 0`, and fails at once: "Cannot build … required system or
/// feature not available" (2.33), "… local builds are disabled (max-jobs = 0)" (2.34,
/// <https://github.com/NixOS/nix/blob/2.34.0/src/libstore/build/derivation-building-goal.cc#L362>).
/// Lix is not known to wait, so no.
pub fn decline_waits_with_max_jobs_zero(v: &NixVersion) -> bool {
    !v.lix && (v.major, v.minor) < (2, 33)
}

/// The stdin of `nix-store --register-validity` without `--hash-given` (2.8
/// `decodeValidPathInfo`): per path its absolute path, its deriver (empty line if none),
/// the number of references, then one reference per line. `infos` in the order given
/// (references first: Nix registers them in one transaction either way, but keep the order
/// a reader expects).
pub fn register_validity_input(infos: &[&PathInfo], store_dir: &StoreDir) -> String {
    let mut s = String::new();
    for i in infos {
        s.push_str(&store_dir.display(&i.path));
        s.push('\n');
        if let Some(d) = &i.deriver {
            s.push_str(&store_dir.display(d));
        }
        s.push('\n');
        s.push_str(&i.references.len().to_string());
        s.push('\n');
        for r in &i.references {
            s.push_str(&store_dir.display(r));
            s.push('\n');
        }
    }
    s
}

/// Makes objects valid without taking the output locks, on every Nix version
/// (docs/hook-protocol.md §3.4): `nix-store --restore` of the NAR under a temporary name in the
/// store directory, `rename` into place (same directory: atomic), `nix-store
/// --register-validity` for all of them in one transaction (Nix hashes the files itself and
/// canonicalises them: mode 444/555, mtime 1, owner root), then `nix-store -q --hash` must
/// equal the builder's `narHash`. No signatures, `ca` or `ultimate` are recorded, unlike
/// `--import` (the daemon does not need them for a built output).
///
/// Garbage collection: a path is garbage while it is invalid and unrooted. The final name is
/// rooted for the whole hook run: the daemon's `DerivationGoal::haveDerivation` calls
/// `addTempRoot` on every known output path before it asks the hook (2.8
/// `derivation-goal.cc`, unchanged at HEAD), and a concurrent GC reads those temp roots. The
/// temporary name is not rooted, so a GC running right then may delete it while it is
/// being restored (`LocalStore::collectGarbage` deletes any entry of the store directory
/// that is not a valid or rooted path); then the restore or the rename fails, or the tree is
/// incomplete — which is why the NAR hash of the final path is checked before it is
/// registered. Nothing is ever registered that does not hash to the builder's `narHash`.
#[derive(Debug, Clone)]
pub struct RestoreImporter {
    pub local: LocalStore,
}

/// Removes whatever is at `p` (a tree, file or symlink); absent is fine.
fn remove_tree(p: &std::path::Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
    }
}

impl RestoreImporter {
    fn tool(&self) -> Command {
        let mut c = Command::new(&self.local.nix_store);
        c.env("NIX_REMOTE", self.local.direct_uri())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    fn failed(&self, path: &StorePath, problem: impl std::fmt::Display) -> LocalError {
        LocalError::Import {
            path: self.local.display(path),
            problem: problem.to_string(),
        }
    }

    /// The subset of `paths` that is not valid (`nix-store --check-validity --print-invalid`).
    async fn invalid(&self, paths: &[&StorePath]) -> Result<BTreeSet<StorePath>, LocalError> {
        let mut c = self.tool();
        c.args(["--check-validity", "--print-invalid"])
            .args(paths.iter().map(|p| self.local.display(p)));
        let out = output(c, &self.local.nix_store, "nix-store --check-validity").await?;
        String::from_utf8_lossy(&out)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                self.local
                    .store_dir
                    .parse(l.trim())
                    .map_err(LocalError::from)
            })
            .collect()
    }

    /// The temporary name `path` is restored under: short (a store path's name may be 211
    /// bytes and NAME_MAX is 255) and unique per hook process.
    fn temporary(&self, path: &StorePath) -> Result<PathBuf, LocalError> {
        let real = self.local.real_path(path);
        let Some(dir) = real.parent() else {
            return Err(self.failed(path, "the store path has no parent directory"));
        };
        Ok(dir.join(format!(
            ".ferry-import-{}-{}",
            path.hash_part(),
            std::process::id()
        )))
    }

    /// Starts `nix-store --restore` of `path`'s NAR under its temporary name; a leftover of a
    /// crashed run with the same pid is removed first.
    fn start(&self, path: &StorePath) -> Result<(Tool, PathBuf), LocalError> {
        let tmp = self.temporary(path)?;
        remove_tree(&tmp)
            .map_err(|e| self.failed(path, format!("removing {}: {e}", tmp.display())))?;
        let mut cmd = self.tool();
        cmd.arg("--restore").arg(&tmp);
        let what = format!("nix-store --restore {}", tmp.display());
        Ok((Tool::spawn(cmd, &self.local.nix_store, what)?, tmp))
    }

    /// After the restore of `path` ended: renames the tree into place and checks its NAR
    /// hash against `sha256`, the hash of the bytes that were checked against the builder's
    /// declaration on the way in. Pushes the final path to `placed` once something is there.
    async fn place(
        &self,
        path: &StorePath,
        tmp: &std::path::Path,
        sha256: &Hash,
        placed: &mut Vec<PathBuf>,
    ) -> Result<(), LocalError> {
        let real = self.local.real_path(path);
        // Something at the final name is an invalid leftover (the path was checked invalid
        // and the daemon holds its lock): Nix deletes it too before it adds a path (2.8
        // `LocalStore::addToStore`, `deletePath(realPath)`).
        let moved = remove_tree(&real).and_then(|()| std::fs::rename(tmp, &real));
        if let Err(e) = moved {
            let _ = remove_tree(tmp);
            return Err(self.failed(path, format!("moving {} into place: {e}", tmp.display())));
        }
        placed.push(real.clone());
        let at = real.clone();
        let hashed = tokio::task::spawn_blocking(move || {
            ferry_nix::nar::dump_path_hashed(&at, std::io::sink())
        })
        .await
        .map_err(|e| self.failed(path, e))?
        .map_err(|e| self.failed(path, format!("hashing the restored tree: {e}")))?;
        if hashed.0 != *sha256 {
            return Err(self.failed(
                path,
                format!(
                    "the restored tree has NAR hash {}, the builder sent {} (was it \
                     changed while restoring, e.g. by a garbage collection?)",
                    hashed.0.to_nix32_prefixed(),
                    sha256.to_nix32_prefixed()
                ),
            ));
        }
        Ok(())
    }

    /// `nix-store --register-validity` for every placed object, in one transaction.
    async fn register(&self, done: &[(PathInfo, Hash)]) -> Result<(), LocalError> {
        let infos: Vec<&PathInfo> = done.iter().map(|(i, _)| i).collect();
        let input = register_validity_input(&infos, &self.local.store_dir);
        let mut cmd = self.tool();
        cmd.arg("--register-validity");
        feed(
            cmd,
            &self.local.nix_store,
            "nix-store --register-validity",
            input.as_bytes(),
        )
        .await
    }

    /// `nix-store -q --hash` of each path must be the SHA-256 of the NAR that was checked
    /// on the way in (the builder's `narHash` itself when it is SHA-256).
    async fn check_registered(&self, done: &[(PathInfo, Hash)]) -> Result<(), LocalError> {
        let mut c = self.tool();
        c.args(["-q", "--hash"])
            .args(done.iter().map(|(i, _)| self.local.display(&i.path)));
        let out = output(c, &self.local.nix_store, "nix-store -q --hash").await?;
        let text = String::from_utf8_lossy(&out);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.len() != done.len() {
            return Err(LocalError::BadJson(format!(
                "`nix-store -q --hash` printed {} lines for {} paths",
                lines.len(),
                done.len()
            )));
        }
        for ((info, sha256), line) in done.iter().zip(lines) {
            let got = Hash::parse_any_prefixed(line.trim())
                .map_err(|e| self.failed(&info.path, format!("registered hash {line:?}: {e}")))?;
            if got != *sha256 {
                return Err(LocalError::RegisteredHashMismatch {
                    path: self.local.display(&info.path),
                    got: got.to_nix32_prefixed(),
                    want: sha256.to_nix32_prefixed(),
                });
            }
        }
        Ok(())
    }

    /// Removes placed trees the store confirms invalid (after a failed or abandoned batch:
    /// registration is one transaction, so normally none of them is valid).
    async fn clean_up(&self, done: &[(PathInfo, Hash)], placed: &[PathBuf]) {
        let paths: Vec<&StorePath> = done.iter().map(|(i, _)| &i.path).collect();
        if paths.is_empty() {
            return;
        }
        if let Ok(still) = self.invalid(&paths).await {
            for (info, _) in done {
                let real = self.local.real_path(&info.path);
                if still.contains(&info.path) && placed.contains(&real) {
                    let _ = remove_tree(&real);
                }
            }
        }
    }
}

/// The importer `import-method` asks for; `auto` looks at `nix-store --version` once per
/// process (unknown versions get [`RestoreImporter`], which works everywhere).
#[derive(Debug, Clone)]
pub enum AnyImporter {
    HeldLocks(HeldLocksImporter),
    Restore(RestoreImporter),
}

static LOCAL_VERSION: tokio::sync::OnceCell<Option<NixVersion>> =
    tokio::sync::OnceCell::const_new();

/// The local Nix's version from `nix-store --version`, asked once per process; `None` when
/// it cannot be run or parsed.
pub async fn local_nix_version(local: &LocalStore) -> Option<NixVersion> {
    *LOCAL_VERSION
        .get_or_init(|| async {
            let mut c = Command::new(&local.nix_store);
            c.arg("--version").stdin(Stdio::null()).kill_on_drop(true);
            output(c, &local.nix_store, "nix-store --version")
                .await
                .ok()
                .and_then(|o| parse_nix_version(&String::from_utf8_lossy(&o)))
        })
        .await
}

impl AnyImporter {
    pub async fn choose(method: crate::config::ImportMethod, local: &LocalStore) -> AnyImporter {
        use crate::config::ImportMethod;
        let held = match method {
            ImportMethod::HeldLocks => true,
            ImportMethod::Restore => false,
            ImportMethod::Auto => local_nix_version(local)
                .await
                .is_some_and(|v| held_locks_supported(&v)),
        };
        let local = local.clone();
        if held {
            AnyImporter::HeldLocks(HeldLocksImporter { local })
        } else {
            AnyImporter::Restore(RestoreImporter { local })
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            AnyImporter::HeldLocks(_) => "held-locks",
            AnyImporter::Restore(_) => "restore",
        }
    }
}

impl AnyImporter {
    /// Starts importing `infos` (in dependency order, as fetched from the builder): which
    /// of them still need their NAR, and the tool that takes it.
    pub async fn begin(&self, infos: &[PathInfo]) -> Result<ImportBatch, LocalError> {
        let restore = match self {
            AnyImporter::HeldLocks(h) => {
                if infos.iter().all(|i| i.nar_size <= HELD_LOCKS_MAX_NAR) {
                    return Ok(ImportBatch(BatchKind::HeldLocks {
                        importer: h.clone(),
                        infos: infos.to_vec(),
                        tool: None,
                    }));
                }
                RestoreImporter {
                    local: h.local.clone(),
                }
            }
            AnyImporter::Restore(r) => r.clone(),
        };
        let paths: Vec<&StorePath> = infos.iter().map(|i| &i.path).collect();
        // Outputs already valid (built earlier, or another output of the same derivation
        // registered by an earlier run) are left alone, and not fetched.
        let needed = if paths.is_empty() {
            BTreeSet::new()
        } else {
            restore.invalid(&paths).await?
        };
        Ok(ImportBatch(BatchKind::Restore {
            importer: restore,
            needed,
            current: None,
            done: Vec::new(),
            placed: Vec::new(),
        }))
    }
}

/// An import in progress: the builder's NARs stream through it one at a time, straight
/// into the local tool, so the hook holds one chunk of a NAR at a time whatever the size of
/// the output (issue 12 item 5). Nothing becomes valid before its NAR was checked against
/// the builder's declared size and hash: [`ImportBatch::open`] hands out the tool's
/// input, and only [`ImportBatch::close`] with the checked hash completes an object.
pub struct ImportBatch(BatchKind);

enum BatchKind {
    /// One `nix-store --import` for the batch: per object `1`, the NAR, then the trailer
    /// that makes `importPaths` add it; killed before a trailer if a NAR fails its check.
    HeldLocks {
        importer: HeldLocksImporter,
        infos: Vec<PathInfo>,
        tool: Option<Tool>,
    },
    /// One `nix-store --restore` per object under a temporary name, renamed into place
    /// when its check passed; one `--register-validity` for all at [`ImportBatch::commit`].
    Restore {
        importer: RestoreImporter,
        needed: BTreeSet<StorePath>,
        current: Option<(Tool, PathBuf)>,
        /// Placed objects with the SHA-256 of their checked NAR.
        done: Vec<(PathInfo, Hash)>,
        placed: Vec<PathBuf>,
    },
}

impl ImportBatch {
    /// The method in use (a held-locks batch with a large NAR is a restore batch).
    pub fn name(&self) -> &'static str {
        match &self.0 {
            BatchKind::HeldLocks { .. } => "held-locks",
            BatchKind::Restore { .. } => "restore",
        }
    }

    /// Whether `path`'s NAR is wanted (it is not valid locally yet).
    pub fn needs(&self, path: &StorePath) -> bool {
        match &self.0 {
            BatchKind::HeldLocks { .. } => true,
            BatchKind::Restore { needed, .. } => needed.contains(path),
        }
    }

    /// Starts one object: the writer its NAR goes to.
    pub async fn open(
        &mut self,
        info: &PathInfo,
    ) -> Result<&mut tokio::process::ChildStdin, LocalError> {
        match &mut self.0 {
            BatchKind::HeldLocks {
                importer,
                infos,
                tool,
            } => {
                if tool.is_none() {
                    *tool = Some(importer.start(infos)?);
                }
                let Some(t) = tool.as_mut() else {
                    return Err(importer.local_failed(&info.path, "no import tool"));
                };
                let what = t.what.clone();
                let stdin = t.stdin()?;
                if let Err(e) = stdin.write_all(&EXPORT_OBJECT_START).await {
                    return Err(LocalError::Failed {
                        command: what,
                        status: format!("writing to it failed: {e}"),
                        stderr: String::new(),
                    });
                }
                Ok(stdin)
            }
            BatchKind::Restore {
                importer, current, ..
            } => {
                if let Some((old, tmp)) = current.take() {
                    let _ = old.kill().await;
                    let _ = remove_tree(&tmp);
                }
                let (t, tmp) = importer.start(&info.path)?;
                let (t, _) = current.insert((t, tmp));
                t.stdin()
            }
        }
    }

    /// Completes the object [`open`](Self::open) started, once its NAR passed the check;
    /// `sha256` is the hash of the NAR written.
    pub async fn close(&mut self, info: &PathInfo, sha256: Hash) -> Result<(), LocalError> {
        match &mut self.0 {
            BatchKind::HeldLocks { importer, tool, .. } => {
                let trailer = export_trailer(info, &importer.local.store_dir);
                let Some(t) = tool.as_mut() else {
                    return Err(importer.local_failed(&info.path, "no import tool"));
                };
                let what = t.what.clone();
                let stdin = t.stdin()?;
                let written = async {
                    stdin.write_all(&trailer).await?;
                    stdin.flush().await
                };
                written.await.map_err(|e| LocalError::Failed {
                    command: what,
                    status: format!("writing to it failed: {e}"),
                    stderr: String::new(),
                })
            }
            BatchKind::Restore {
                importer,
                current,
                done,
                placed,
                ..
            } => {
                let Some((t, tmp)) = current.take() else {
                    return Err(importer.failed(&info.path, "no restore running"));
                };
                if let Err(e) = t.finish().await {
                    let _ = remove_tree(&tmp);
                    return Err(e);
                }
                importer.place(&info.path, &tmp, &sha256, placed).await?;
                done.push((info.clone(), sha256));
                Ok(())
            }
        }
    }

    /// Makes every closed object valid.
    pub async fn commit(self) -> Result<(), LocalError> {
        match self.0 {
            BatchKind::HeldLocks { tool, .. } => {
                let Some(mut t) = tool else {
                    return Ok(());
                };
                // The end of the export stream.
                let what = t.what.clone();
                if let Err(e) = t.stdin()?.write_all(&0u64.to_le_bytes()).await {
                    return Err(t.kill().await.unwrap_or(LocalError::Failed {
                        command: what,
                        status: format!("writing to it failed: {e}"),
                        stderr: String::new(),
                    }));
                }
                t.finish().await
            }
            BatchKind::Restore {
                importer,
                current,
                done,
                placed,
                ..
            } => {
                if let Some((t, tmp)) = current {
                    let _ = t.kill().await;
                    let _ = remove_tree(&tmp);
                }
                if done.is_empty() {
                    return Ok(());
                }
                if let Err(e) = importer.register(&done).await {
                    importer.clean_up(&done, &placed).await;
                    return Err(e);
                }
                importer.check_registered(&done).await
            }
        }
    }

    /// Gives the batch up after a failure: nothing of the object in progress is kept, and
    /// placed objects are removed. If the local tool had failed on its own (a write to it
    /// failed because it was gone), its error, which says why.
    pub async fn abort(self) -> Option<LocalError> {
        match self.0 {
            BatchKind::HeldLocks { tool, .. } => match tool {
                Some(t) => t.kill().await,
                None => None,
            },
            BatchKind::Restore {
                importer,
                current,
                done,
                placed,
                ..
            } => {
                let mut failure = None;
                if let Some((t, tmp)) = current {
                    failure = t.kill().await;
                    let _ = remove_tree(&tmp);
                }
                importer.clean_up(&done, &placed).await;
                failure
            }
        }
    }
}

impl HeldLocksImporter {
    fn local_failed(&self, path: &StorePath, problem: &str) -> LocalError {
        LocalError::Import {
            path: self.local.display(path),
            problem: problem.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").expect("dir")
    }

    /// A store path named `name` with a hash part made of `c`.
    fn sp(c: char, name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{}-{name}", c.to_string().repeat(32))).expect("path")
    }

    fn info(path: &StorePath, refs: &[&StorePath]) -> PathInfo {
        PathInfo {
            path: path.clone(),
            deriver: None,
            nar_hash: Hash::sha256_of(b""),
            nar_size: 0,
            references: refs.iter().map(|p| (*p).clone()).collect(),
            ca: None,
            sigs: BTreeSet::new(),
        }
    }

    #[test]
    fn references_come_first() {
        let (a, b, c, outside) = (sp('a', "a"), sp('b', "b"), sp('c', "c"), sp('d', "o"));
        let sorted = topo_sort(vec![
            info(&a, &[&b, &c]),
            info(&b, &[&c, &outside]),
            info(&c, &[]),
        ])
        .expect("sorted");
        let names: Vec<&str> = sorted.iter().map(|i| i.path.name()).collect();
        assert_eq!(names, ["c", "b", "a"]);
        let e = topo_sort(vec![info(&a, &[&b]), info(&b, &[&a])]).expect_err("cycle");
        assert!(e.to_string().contains(&a.to_string()), "{e}");
    }

    #[test]
    fn path_info_json_of_nix_2_8() {
        // Printed by Nix 2.8.0 for a file added with `nix-store --add`.
        let text = r#"[{"path":"/nix/store/ab3li50xq0nl4q5lxdyinb8w8y13my9s-f","narHash":"sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=","narSize":120,"references":[],"ca":"fixed:r:sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h","registrationTime":1795325397}]"#;
        let infos = parse_path_info_json(text, &sd()).expect("parse");
        assert_eq!(infos.len(), 1);
        let i = &infos[0];
        assert_eq!(i.path.name(), "f");
        assert_eq!(i.nar_size, 120);
        assert_eq!(
            i.nar_hash.to_base16(),
            "10551daed7fa467d0b58826e7eb9a0f2af7d693de319f2ef775fffcda244b9f6"
        );
        assert!(i.ca.as_deref().is_some_and(|c| c.starts_with("fixed:")));
        assert_eq!(i.deriver, None);
        // Another store directory does not take it.
        let other = StoreDir::new("/gnu/store").expect("dir");
        let e = parse_path_info_json(text, &other).expect_err("not in /gnu/store");
        assert!(e.to_string().contains("/gnu/store"), "{e}");
    }

    /// The same store object as Nix 2.26 and 2.34 print it (`nix path-info --json`, and
    /// 2.34's `--json-format 2`), with an invalid path beside it: every shape gives the same
    /// path info, and the invalid path is reported as such.
    #[test]
    fn path_info_json_of_newer_nix() {
        let a = "/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt";
        let v226 = r#"{"/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt":{"ca":"fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw","deriver":null,"narHash":"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=","narSize":120,"references":[],"registrationTime":1796491372,"signatures":[],"ultimate":false}}"#;
        let v234 = r#"{"/nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt":{"ca":"fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw","deriver":null,"narHash":"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=","narSize":120,"references":[],"registrationTime":1796491363,"signatures":[],"storeDir":"/nix/store","ultimate":false,"version":1}}"#;
        let v234f2 = r#"{"info":{"z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt":{"ca":{"hash":"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=","method":"nar"},"deriver":null,"narHash":"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=","narSize":120,"references":[],"registrationTime":1796491363,"signatures":[],"storeDir":"/nix/store","ultimate":false,"version":2}},"storeDir":"/nix/store","version":2}"#;
        let mut seen = Vec::new();
        for text in [v226, v234, v234f2] {
            let infos = parse_path_info_json(text, &sd()).expect("parse");
            assert_eq!(infos.len(), 1, "{text}");
            let i = &infos[0];
            assert_eq!(sd().display(&i.path), a);
            assert_eq!(i.nar_size, 120);
            assert_eq!(
                i.ca.as_deref(),
                Some("fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw")
            );
            assert_eq!(i.deriver, None);
            seen.push(i.clone());
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
        // Invalid paths: `null` (keyed forms), as Nix 2.26 and 2.34 print them.
        let x = "/nix/store/00000000000000000000000000000000-x";
        let e = parse_path_info_json(&format!(r#"{{"{x}":null}}"#), &sd()).expect_err("null");
        assert!(
            matches!(&e, LocalError::NotValid { path } if path == x),
            "{e}"
        );
        let e = parse_path_info_json(
            r#"{"info":{"00000000000000000000000000000000-x":null},"storeDir":"/nix/store","version":2}"#,
            &sd(),
        )
        .expect_err("null");
        assert!(
            matches!(&e, LocalError::NotValid { path } if path == x),
            "{e}"
        );
        // Format 2 references and derivers as base names.
        let f2 = format!(
            r#"{{"info":{{"z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt":{{"narHash":"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=","narSize":120,"references":["{b}"],"deriver":"{b}.drv","ca":{{"method":"text","hash":"sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM="}}}}}},"storeDir":"/nix/store","version":2}}"#,
            b = "00000000000000000000000000000000-x"
        );
        let i = &parse_path_info_json(&f2, &sd()).expect("f2")[0];
        assert_eq!(
            i.references
                .iter()
                .map(|r| sd().display(r))
                .collect::<Vec<_>>(),
            [x]
        );
        assert_eq!(
            i.deriver.as_ref().map(|d| sd().display(d)),
            Some(format!("{x}.drv"))
        );
        assert!(
            i.ca.as_deref()
                .is_some_and(|c| c.starts_with("text:sha256:"))
        );
    }

    #[test]
    fn bad_path_info_is_named() {
        let e = parse_path_info_json("nope", &sd()).expect_err("not json");
        assert!(e.to_string().contains("not its JSON"), "{e}");
        let x = sd().display(&sp('x', "x"));
        let e = parse_path_info_json(&format!(r#"[{{"path":"{x}","valid":false}}]"#), &sd())
            .expect_err("invalid");
        assert!(
            e.to_string().contains(&x) && e.to_string().contains("not valid"),
            "{e}"
        );
        let e = parse_path_info_json(
            &format!(r#"[{{"path":"{x}","narHash":"md7:zz","narSize":1}}]"#),
            &sd(),
        )
        .expect_err("hash");
        assert!(e.to_string().contains("narHash"), "{e}");
    }

    #[test]
    fn chroot_stores_map_to_real_paths() {
        let p = sp('a', "a");
        let plain = LocalStore {
            store_dir: sd(),
            ..LocalStore::default()
        };
        assert_eq!(plain.real_path(&p), PathBuf::from(sd().display(&p)));
        let chroot = LocalStore {
            store: Some("local?root=/tmp/r/".into()),
            store_dir: sd(),
            ..LocalStore::default()
        };
        assert_eq!(
            chroot.real_path(&p),
            PathBuf::from(format!("/tmp/r{}", sd().display(&p)))
        );
    }

    #[test]
    fn export_trailer_layout() {
        let (a, b) = (sp('a', "a"), sp('b', "b"));
        let i = info(&a, &[&b]);
        assert_eq!(EXPORT_OBJECT_START, 1u64.to_le_bytes());
        let t = export_trailer(&i, &sd());
        assert_eq!(&t[..8], &0x4558_494eu64.to_le_bytes());
        let shown = sd().display(&a);
        assert_eq!(&t[8..16], &(shown.len() as u64).to_le_bytes());
        assert_eq!(&t[16..16 + shown.len()], shown.as_bytes());
        // No deriver (an empty string), then the end of the object.
        assert_eq!(&t[t.len() - 16..], &[0u8; 16]);
    }

    #[test]
    fn decline_waits_for_a_slot_only_on_nix_before_2_33() {
        let v = |t: &str| parse_nix_version(t).expect("version");
        assert!(decline_waits_with_max_jobs_zero(&v(
            "nix-store (Nix) 2.8.0"
        )));
        assert!(decline_waits_with_max_jobs_zero(&v(
            "nix-store (Nix) 2.18.8"
        )));
        assert!(decline_waits_with_max_jobs_zero(&v(
            "nix-store (Nix) 2.26.3"
        )));
        assert!(decline_waits_with_max_jobs_zero(&v(
            "nix-store (Nix) 2.32.4"
        )));
        assert!(!decline_waits_with_max_jobs_zero(&v(
            "nix-store (Nix) 2.33.0"
        )));
        assert!(!decline_waits_with_max_jobs_zero(&v(
            "nix-store (Nix) 2.34.8"
        )));
        assert!(!decline_waits_with_max_jobs_zero(&v(
            "nix-store (Lix, like Nix) 2.91.1"
        )));
    }

    #[test]
    fn nix_versions_choose_the_importer() {
        let v = |t| parse_nix_version(t).expect(t);
        let nix28 = v("nix-store (Nix) 2.8.0\n");
        assert_eq!(
            nix28,
            NixVersion {
                lix: false,
                major: 2,
                minor: 8
            }
        );
        assert!(held_locks_supported(&nix28));
        assert!(held_locks_supported(&v("nix-store (Nix) 2.28.4")));
        assert!(!held_locks_supported(&v("nix-store (Nix) 2.29.0")));
        assert!(!held_locks_supported(&v(
            "nix-store (Nix) 2.29.0pre20250407_1a2b3c4d"
        )));
        assert!(!held_locks_supported(&v("nix-store (Nix) 3.0.1")));
        assert!(!held_locks_supported(&v(
            "nix-store (Determinate Nix 3.8.2) 2.30.1"
        )));
        let lix = v("nix-store (Lix, like Nix) 2.93.0\nSystem type: x86_64-linux\n");
        assert!(lix.lix && lix.minor == 93);
        assert!(held_locks_supported(&lix));
        assert_eq!(parse_nix_version(""), None);
        assert_eq!(parse_nix_version("nix-store (Nix) unknown"), None);
        assert_eq!(parse_nix_version("nix-store (Nix) 2"), None);
    }

    #[test]
    fn register_validity_input_layout() {
        let (out, dev, lib, drv) = (
            sp('a', "p"),
            sp('b', "p-dev"),
            sp('c', "lib"),
            sp('d', "p.drv"),
        );
        let mut o = info(&out, &[&lib, &out]);
        o.deriver = Some(drv.clone());
        let d = info(&dev, &[&out]);
        let text = register_validity_input(&[&o, &d], &sd());
        let (a, b, c, dd) = (
            sd().display(&out),
            sd().display(&dev),
            sd().display(&lib),
            sd().display(&drv),
        );
        // References in path order (hash part a < c), the self-reference included.
        assert_eq!(text, format!("{a}\n{dd}\n2\n{a}\n{c}\n{b}\n\n1\n{a}\n"));
        assert_eq!(register_validity_input(&[], &sd()), "");
    }

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

    #[test]
    fn only_local_stores_are_read_in_process() {
        let with = |s: Option<&str>| LocalStore {
            store: s.map(str::to_owned),
            ..LocalStore::default()
        };
        for ok in [
            None,
            Some("auto"),
            Some("local"),
            Some("daemon"),
            Some("unix:///nix/var/nix/daemon-socket/socket"),
            Some("local?root=/tmp/r"),
            // As Nix 2.34 sends them in the settings stream.
            Some("local://?root=/tmp/r"),
            Some("local://"),
            Some("daemon://"),
        ] {
            assert!(with(ok).files_readable_here(), "{ok:?}");
        }
        for no in [
            Some("local?real=/elsewhere"),
            Some("local?store=/other/store"),
            Some("local://?real=/elsewhere"),
            Some("ssh://h"),
            Some("s3://bucket"),
        ] {
            assert!(!with(no).files_readable_here(), "{no:?}");
        }
    }

    /// The Nix versions of `integration/nix-versions` and their directory of
    /// `ferry-nix/tests/golden/cli/` (regen-cli.sh; 2.26 and 2.34 through regen-version.sh).
    fn cli_goldens() -> Vec<(&'static str, std::path::PathBuf)> {
        let base =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ferry-nix/tests/golden/cli");
        vec![
            ("2.8", base.clone()),
            ("2.26", base.join("nix-2.26")),
            ("2.34", base.join("nix-2.34")),
        ]
    }

    fn read_golden(dir: &std::path::Path, rel: &str) -> String {
        let p = dir.join(rel);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// `<key> <value>` lines (paths.txt, statuses.txt) as a map.
    fn golden_map(dir: &std::path::Path, rel: &str) -> BTreeMap<String, String> {
        read_golden(dir, rel)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// Every `nix path-info --json` output the real Nix versions printed parses to the store
    /// objects regen-cli.sh made, with `--json-format 1` and `2` where the version has them;
    /// where it has not, the refusal names the flag, which is what `path_info_json`'s retry
    /// looks for. The NAR hashes agree with `nix-store -q --hash`, what RestoreImporter checks.
    #[test]
    fn real_path_info_json_of_every_version() {
        for (label, dir) in cli_goldens() {
            let paths = golden_map(&dir, "paths.txt");
            let statuses = golden_map(&dir, "statuses.txt");
            let p = |name: &str| {
                let text = paths.get(name).unwrap_or_else(|| panic!("{label}: {name}"));
                sd().parse(text).expect("golden store path")
            };
            let valid: BTreeSet<StorePath> = ["hello", "tree", "flat", "text", "built"]
                .into_iter()
                .map(p)
                .collect();
            let q_hash: Vec<Hash> = read_golden(&dir, "query/hash.out")
                .lines()
                .map(|l| Hash::parse_any_prefixed(l).expect("nix-store -q --hash"))
                .collect();
            for case in ["valid", "closure", "invalid", "drv"] {
                let mut shapes = Vec::new();
                for fmt in ["", ".f1", ".f2"] {
                    let stem = format!("path-info/{case}{fmt}");
                    let what = format!("Nix {label} {stem}");
                    let status = statuses.get(&stem).map(String::as_str);
                    if status != Some("0") {
                        assert!(!fmt.is_empty() && label != "2.34", "{what}: {status:?}");
                        let err = read_golden(&dir, &format!("{stem}.stderr"));
                        assert!(err.contains("--json-format"), "{what}: {err}");
                        continue;
                    }
                    let text = read_golden(&dir, &format!("{stem}.json"));
                    let got = parse_path_info_json(&text, &sd());
                    if case == "invalid" {
                        let e = got.expect_err(&what);
                        assert!(
                            matches!(&e, LocalError::NotValid { path } if *path == sd().display(&p("missing"))),
                            "{what}: {e}"
                        );
                        continue;
                    }
                    let infos = got.unwrap_or_else(|e| panic!("{what}: {e}"));
                    let by: BTreeMap<StorePath, PathInfo> =
                        infos.into_iter().map(|i| (i.path.clone(), i)).collect();
                    let names: BTreeSet<StorePath> = by.keys().cloned().collect();
                    match case {
                        "valid" => assert_eq!(names, valid, "{what}"),
                        "closure" => {
                            assert_eq!(names, BTreeSet::from([p("built"), p("hello")]), "{what}")
                        }
                        _ => assert!(
                            names.contains(&p("built-drv")) && names.contains(&p("hello")),
                            "{what}: {names:?}"
                        ),
                    }
                    let hello = &by[&p("hello")];
                    assert_eq!(hello.nar_hash, q_hash[0], "{what}");
                    assert!(
                        hello
                            .ca
                            .as_deref()
                            .is_some_and(|c| c.starts_with("fixed:r:sha256:")),
                        "{what}: {:?}",
                        hello.ca
                    );
                    if let Some(built) = by.get(&p("built")) {
                        assert_eq!(built.nar_hash, q_hash[1], "{what}");
                        assert_eq!(built.deriver, Some(p("built-drv")), "{what}");
                        // `echo $out > $out`: a self-reference besides hello.
                        assert_eq!(
                            built.references,
                            BTreeSet::from([p("built"), p("hello")]),
                            "{what}"
                        );
                        assert_eq!(built.ca, None, "{what}");
                    }
                    if case == "valid" {
                        let ca = |n: &str| by[&p(n)].ca.clone().unwrap_or_default();
                        assert!(ca("flat").starts_with("fixed:sha256:"), "{what}");
                        assert!(ca("tree").starts_with("fixed:r:sha256:"), "{what}");
                        assert!(ca("text").starts_with("text:sha256:"), "{what}");
                        assert_eq!(by[&p("text")].references, BTreeSet::from([p("hello")]));
                    }
                    // registrationTime aside, every format says the same thing.
                    shapes.push(by);
                }
                assert!(
                    shapes.windows(2).all(|w| w[0] == w[1]),
                    "Nix {label} {case}"
                );
            }
        }
    }

    /// `nix-store --version` of each real Nix: the version Ferry reads picks the importer
    /// (`NIX_HELD_LOCKS` is gone from 2.29) and whether a decline under max-jobs 0 waits.
    #[test]
    fn real_nix_versions_choose_the_importer() {
        for (label, dir) in cli_goldens() {
            for file in ["versions/nix-store.txt", "versions/nix.txt"] {
                let text = read_golden(&dir, file);
                let v = parse_nix_version(&text).unwrap_or_else(|| panic!("{label}: {text}"));
                assert_eq!(format!("{}.{}", v.major, v.minor), label, "{file}");
                assert!(!v.lix);
                assert_eq!(held_locks_supported(&v), label != "2.34", "{label}");
                // Up to 2.32 a declined goal waits for a build slot; 2.33 rejects it.
                assert_eq!(
                    decline_waits_with_max_jobs_zero(&v),
                    label != "2.34",
                    "{label}"
                );
            }
        }
    }

    /// What RestoreImporter reads from `nix-store --check-validity --print-invalid` (one
    /// invalid path a line, exit 0) and `-q --hash` (one hash a line; an invalid path fails).
    #[test]
    fn real_nix_store_queries_of_every_version() {
        for (label, dir) in cli_goldens() {
            let paths = golden_map(&dir, "paths.txt");
            let statuses = golden_map(&dir, "statuses.txt");
            for q in [
                "check-validity-invalid",
                "check-validity-valid",
                "hash",
                "references",
            ] {
                assert_eq!(statuses[&format!("query/{q}")], "0", "Nix {label} {q}");
            }
            assert_ne!(statuses["query/hash-invalid"], "0", "Nix {label}");
            let invalid: Vec<StorePath> = read_golden(&dir, "query/check-validity-invalid.out")
                .lines()
                .map(|l| sd().parse(l.trim()).expect("a store path a line"))
                .collect();
            assert_eq!(
                invalid,
                [sd().parse(&paths["missing"]).expect("path")],
                "{label}"
            );
            assert_eq!(
                read_golden(&dir, "query/check-validity-valid.out"),
                "",
                "{label}"
            );
            assert_eq!(
                read_golden(&dir, "query/hash.out").lines().count(),
                2,
                "Nix {label}: one line per path"
            );
        }
    }
}
