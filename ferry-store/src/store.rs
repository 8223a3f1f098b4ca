//! The local store as the CLI tools see it: path infos, derivations, NARs, the Nix version.

use crate::LocalError;
use crate::nar::{NAR_CHUNK, NarStream};
use crate::tool::output;
use ferry_nix::derivation::{Derivation, DerivationError};
use ferry_nix::hash::Hash;
use ferry_nix::nix_version::{NixVersion, parse_nix_version};
use ferry_nix::path_info::{parse_path_info_json, refusal_names_json_format};
use ferry_nix::serve::PathInfo;
use ferry_nix::store_path::{StoreDir, StorePath};
use ferry_nix::store_uri::StoreUri;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::OnceCell;

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

/// The local store as seen by the CLI tools.
#[derive(Debug, Clone)]
pub struct LocalStore {
    pub nix: String,
    pub nix_store: String,
    /// Passed as `NIX_REMOTE` to the tools when set (e.g. a `local?root=` test store).
    pub store: Option<String>,
    pub store_dir: StoreDir,
    /// The local Nix's version, asked at most once per store (its clones share it).
    pub(crate) version: Arc<OnceCell<Option<NixVersion>>>,
    /// A file remembering `nix-store --version` for the binary it was asked of
    /// ([`LocalStore::with_version_cache`]).
    pub version_cache: Option<PathBuf>,
}

impl Default for LocalStore {
    fn default() -> Self {
        LocalStore {
            nix: "nix".into(),
            nix_store: "nix-store".into(),
            store: None,
            store_dir: store_dir_from_env(),
            version: Arc::default(),
            version_cache: None,
        }
    }
}

impl LocalStore {
    /// The store the tools are pointed at (`NIX_REMOTE`), `None` for their default.
    pub fn with_store(self, store: Option<String>) -> LocalStore {
        LocalStore { store, ..self }
    }

    /// The store directory paths are shown and parsed in.
    pub fn with_store_dir(self, store_dir: StoreDir) -> LocalStore {
        LocalStore { store_dir, ..self }
    }

    /// Remembers the local Nix's version in `file` across processes, for the `nix-store`
    /// binary it was read from (its resolved path, size, modification time and inode): the
    /// hook runs once per derivation, and running `nix-store --version` each time cost
    /// 30–40 ms on the path from a finished remote build to its import.
    pub fn with_version_cache(self, file: PathBuf) -> LocalStore {
        LocalStore {
            version_cache: Some(file),
            ..self
        }
    }

    /// The local Nix's version from `nix-store --version`, asked once per store (and its
    /// clones), or read from the version cache when the binary is the one it was asked of;
    /// `None` when it cannot be run or parsed.
    pub async fn nix_version(&self) -> Option<NixVersion> {
        *self
            .version
            .get_or_init(|| async {
                let cache = self.version_cache.as_deref().and_then(|file| {
                    let key = binary_identity(&self.nix_store)?;
                    Some((file, key))
                });
                if let Some((file, key)) = &cache
                    && let Some(line) = cached_version(file, key)
                {
                    return parse_nix_version(&line);
                }
                let mut c = Command::new(&self.nix_store);
                c.arg("--version").stdin(Stdio::null()).kill_on_drop(true);
                let text = output(c, &self.nix_store, "nix-store --version")
                    .await
                    .ok()
                    .map(|o| String::from_utf8_lossy(&o).into_owned())?;
                let version = parse_nix_version(&text)?;
                if let (Some((file, key)), Some(line)) = (&cache, text.lines().next()) {
                    remember_version(file, key, line);
                }
                Some(version)
            })
            .await
    }

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
            Err(LocalError::Failed { stderr, .. }) if refusal_names_json_format(&stderr) => {
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

/// What identifies the `nix-store` that `program` runs (looked up in `PATH` as `Command`
/// does): its resolved path, size, modification time and inode. An upgrade replaces the
/// file, which changes at least one of them.
fn binary_identity(program: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let path = if program.contains('/') {
        PathBuf::from(program)
    } else {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join(program))
            .find(|p| p.is_file())?
    };
    let real = std::fs::canonicalize(&path).ok()?;
    let m = std::fs::metadata(&real).ok()?;
    Some(format!(
        "{} {} {}.{} {}:{}",
        real.display(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.dev(),
        m.ino()
    ))
}

/// The version line remembered in `file` for the binary `key`, if it is that binary's.
fn cached_version(file: &std::path::Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let (k, line) = text.split_once('\n')?;
    (k == key).then(|| line.trim_end().to_owned())
}

/// Writes `key` and `line` to `file` (replacing it whole; a failure only costs the next
/// process a `nix-store --version`).
fn remember_version(file: &std::path::Path, key: &str, line: &str) {
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let written =
        std::fs::write(&tmp, format!("{key}\n{line}\n")).and_then(|()| std::fs::rename(&tmp, file));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{sd, sp};

    /// A `nix-store` stand-in that prints `version` and counts its runs in `runs`.
    fn version_script(dir: &std::path::Path, version: &str) -> String {
        use std::os::unix::fs::PermissionsExt as _;
        let script = dir.join("nix-store");
        let runs = dir.join("runs");
        let tmp = dir.join("nix-store.new");
        std::fs::write(
            &tmp,
            format!(
                "#!/bin/sh\necho run >> {}\necho 'nix-store (Nix) {version}'\n",
                runs.display()
            ),
        )
        .expect("script");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // Replaced by rename, as a package upgrade does.
        std::fs::rename(&tmp, &script).expect("rename");
        script.display().to_string()
    }

    fn runs(dir: &std::path::Path) -> usize {
        std::fs::read_to_string(dir.join("runs"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    #[tokio::test]
    async fn the_nix_version_is_asked_once_per_binary_across_processes() {
        let d = tempfile::tempdir().expect("dir");
        let cache = d.path().join("nix-version");
        let store = |program: &str| {
            LocalStore {
                nix_store: program.to_owned(),
                ..LocalStore::default()
            }
            .with_version_cache(cache.clone())
        };
        let nix_2_8 = version_script(d.path(), "2.8.0");
        let v = store(&nix_2_8).nix_version().await.expect("version");
        assert_eq!((v.major, v.minor, runs(d.path())), (2, 8, 1));
        // A new process (a new store, nothing in memory) reads the file instead.
        let v = store(&nix_2_8).nix_version().await.expect("version");
        assert_eq!((v.major, v.minor, runs(d.path())), (2, 8, 1));
        // An upgraded binary is asked again.
        let upgraded = version_script(d.path(), "2.26.3");
        let v = store(&upgraded).nix_version().await.expect("version");
        assert_eq!((v.major, v.minor, runs(d.path())), (2, 26, 2));
        let v = store(&upgraded).nix_version().await.expect("version");
        assert_eq!((v.major, v.minor, runs(d.path())), (2, 26, 2));
        // A damaged cache file is ignored and replaced.
        std::fs::write(&cache, "garbage").expect("write");
        let v = store(&upgraded).nix_version().await.expect("version");
        assert_eq!((v.major, v.minor, runs(d.path())), (2, 26, 3));
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
}
