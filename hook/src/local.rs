//! The local store, through Nix's own command-line tools.
//!
//! Why the CLI and not the daemon socket or the SQLite database: the hook runs as the
//! daemon's user with the daemon's environment, so `nix-store` / `nix` open exactly the
//! store the daemon uses (a direct local store as root), whatever its layout; and the one
//! operation that must bypass the daemon, importing outputs whose locks the daemon holds
//! (hook-protocol.md §3.4), is only possible in a process that opens the store itself.
//! Costs: one process per query batch and one per NAR, a few milliseconds each.
//!
//! - path infos: `nix path-info --json PATHS…` (one process for a whole closure);
//! - NARs: `nix-store --dump PATH` streamed from its stdout;
//! - derivations: the `.drv` file read and parsed with [`ferry_nix::derivation`];
//! - import: [`Importer`], today [`HeldLocksImporter`] (`NIX_HELD_LOCKS` + `nix-store
//!   --import`, Nix 2.0–2.28 and every Lix). A restore + `--register-validity` importer for
//!   Nix ≥ 2.29 fits the same trait.

use ferry_nix::derivation::{Derivation, DerivationError};
use ferry_nix::hash::{Hash, HashAlgo};
use ferry_nix::serve::PathInfo;
use ferry_nix::store_path::{StoreDir, StorePath, StorePathError};
use ferry_nix::wire::WireWriter;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdout, Command};

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
    #[error("the references of {paths:?} form a cycle")]
    Cycle { paths: Vec<String> },
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

/// Parses `nix path-info --json` output (Nix 2.8: an array of objects with `path`,
/// `narHash` (SRI in 2.8, `sha256:` nix32 in older versions), `narSize`, `references`,
/// optional `deriver`, `ca`, `signatures`; an invalid path has `"valid": false`).
pub fn parse_path_info_json(text: &str, store_dir: &StoreDir) -> Result<Vec<PathInfo>, LocalError> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| LocalError::BadJson(e.to_string()))?;
    let items: Vec<&serde_json::Value> = match &v {
        serde_json::Value::Array(a) => a.iter().collect(),
        // Newer Nix prints an object keyed by path.
        serde_json::Value::Object(o) => o.values().collect(),
        _ => return Err(LocalError::BadJson("neither an array nor an object".into())),
    };
    let mut out = Vec::new();
    for item in items {
        let path_text = item
            .get("path")
            .and_then(|p| p.as_str())
            .ok_or_else(|| LocalError::BadJson("an entry without \"path\"".into()))?
            .to_owned();
        let bad = |problem: &str| LocalError::BadInfo {
            path: path_text.clone(),
            problem: problem.to_owned(),
        };
        if item.get("valid").and_then(|v| v.as_bool()) == Some(false) {
            return Err(bad("not valid in the local store"));
        }
        let path = store_dir.parse(&path_text)?;
        let hash_text = item
            .get("narHash")
            .and_then(|h| h.as_str())
            .ok_or_else(|| bad("no narHash"))?;
        let nar_hash = Hash::parse_any_prefixed(hash_text)
            .map_err(|e| bad(&format!("narHash {hash_text:?}: {e}")))?;
        let nar_size = item
            .get("narSize")
            .and_then(|n| n.as_u64())
            .ok_or_else(|| bad("no narSize"))?;
        let strings = |key: &str| -> Vec<String> {
            item.get(key)
                .and_then(|r| r.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let opt = |key: &str| {
            item.get(key)
                .and_then(|d| d.as_str())
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
        };
        let references = strings("references")
            .iter()
            .map(|r| store_dir.parse(r))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let deriver = opt("deriver").map(|d| store_dir.parse(&d)).transpose()?;
        out.push(PathInfo {
            deriver,
            ca: opt("ca"),
            references,
            sigs: strings("signatures").into_iter().collect(),
            path,
            nar_hash,
            nar_size,
        });
    }
    Ok(out)
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

    /// The absolute path of `p` as the tools and the daemon print it.
    pub fn display(&self, p: &StorePath) -> String {
        self.store_dir.display(p)
    }

    /// Where `p` is on this machine's file system: under the `root` of a chroot store
    /// (`local?root=/r`, Nix 2.8 `LocalFSStore::toRealPath`), else the logical path.
    pub fn real_path(&self, p: &StorePath) -> PathBuf {
        let logical = self.display(p);
        let root = self.store.as_deref().and_then(|s| {
            let (_, query) = s.split_once('?')?;
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix("root="))
                .filter(|r| !r.is_empty())
        });
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
            let mut c = self.command(&self.nix);
            c.args([
                "--extra-experimental-features",
                "nix-command",
                "path-info",
                "--json",
                "-r",
            ])
            .args(extra)
            .args(group.iter().map(|p| self.display(p)));
            let out = output(c, &self.nix, "nix path-info --json -r").await?;
            for i in parse_path_info_json(&String::from_utf8_lossy(&out), &self.store_dir)? {
                all.insert(i.path.clone(), i);
            }
        }
        Ok(all.into_values().collect())
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
    if !out.status.success() {
        return Err(LocalError::Failed {
            command: what.to_owned(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

/// A store object fetched from a builder.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub info: PathInfo,
    pub nar: Vec<u8>,
}

impl Fetched {
    /// Checks the NAR against the hash the builder reported.
    pub fn verify(&self) -> Result<(), LocalError> {
        let got = Hash::sha256_of(&self.nar);
        if self.info.nar_hash.algo() == HashAlgo::Sha256 && got != self.info.nar_hash {
            return Err(LocalError::NarHashMismatch {
                path: self.info.path.to_string(),
                got: got.to_nix32_prefixed(),
                want: self.info.nar_hash.to_nix32_prefixed(),
            });
        }
        Ok(())
    }
}

/// Makes fetched outputs valid in the local store while the daemon holds their locks.
pub trait Importer {
    /// `objects` are in dependency order.
    fn import(&self, objects: &[Fetched]) -> impl Future<Output = Result<(), LocalError>> + Send;
}

/// `nix-store --import` of an export stream with `NIX_HELD_LOCKS` naming the outputs, so
/// the store skips the locks the daemon holds for them (`LocalStore` constructor, Nix
/// 2.0–2.28 and Lix; removed in Nix 2.29). Requires opening the store directly, so the
/// tool runs with `NIX_REMOTE=local` (or the daemon's own local store URI).
#[derive(Debug, Clone)]
pub struct HeldLocksImporter {
    pub local: LocalStore,
}

/// The `nix-store --export` stream for `objects` (2.8 `Store::exportPath` /
/// `importPaths`): per path `1, NAR, 0x4558494e, path, references, deriver, 0`; then `0`.
pub fn export_stream(objects: &[Fetched], store_dir: &StoreDir) -> Vec<u8> {
    let mut w = WireWriter::new(Vec::new());
    // Writes to a Vec cannot fail.
    let _ = (|| -> std::io::Result<()> {
        for o in objects {
            w.write_u64(1)?;
            std::io::Write::write_all(w.get_mut(), &o.nar)?;
            w.write_u64(0x4558_494e)?;
            w.write_str(&store_dir.display(&o.info.path))?;
            w.write_strings(o.info.references.iter().map(|r| store_dir.display(r)))?;
            let deriver = o.info.deriver.as_ref().map(|d| store_dir.display(d));
            w.write_str(deriver.as_deref().unwrap_or(""))?;
            w.write_u64(0)?;
        }
        w.write_u64(0)
    })();
    w.into_inner()
}

impl Importer for HeldLocksImporter {
    async fn import(&self, objects: &[Fetched]) -> Result<(), LocalError> {
        if objects.is_empty() {
            return Ok(());
        }
        let held: Vec<String> = objects
            .iter()
            .map(|o| self.local.display(&o.info.path))
            .collect();
        let stream = export_stream(objects, &self.local.store_dir);
        let store = match &self.local.store {
            Some(s) if s.starts_with("local") => s.clone(),
            _ => "local".to_owned(),
        };
        let program = &self.local.nix_store;
        let mut child = Command::new(program)
            .arg("--import")
            .env("NIX_REMOTE", store)
            .env("NIX_HELD_LOCKS", held.join(" "))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| LocalError::Spawn {
                program: program.clone(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            // A write error shows up as the tool's failure below.
            let _ = stdin.write_all(&stream).await;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|source| LocalError::Spawn {
                program: program.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(LocalError::Failed {
                command: "nix-store --import".into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
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
    fn export_stream_layout_and_nar_check() {
        let nar = b"0123456789".to_vec();
        let (a, b) = (sp('a', "a"), sp('b', "b"));
        let mut i = info(&a, &[&b]);
        i.nar_hash = Hash::sha256_of(&nar);
        let f = Fetched { info: i, nar };
        f.verify().expect("hash matches");
        let s = export_stream(std::slice::from_ref(&f), &sd());
        assert_eq!(&s[..8], &1u64.to_le_bytes());
        assert_eq!(&s[8..18], b"0123456789");
        assert_eq!(&s[18..26], &0x4558_494eu64.to_le_bytes());
        assert_eq!(&s[s.len() - 8..], &0u64.to_le_bytes());
        let mut bad = f.clone();
        bad.nar.push(b'x');
        let e = bad.verify().expect_err("mismatch");
        assert!(e.to_string().contains(&a.to_string()), "{e}");
    }
}
