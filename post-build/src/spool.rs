//! The spool: how the post-build hook hands a job to the uploader without waiting for it.
//!
//! One file per hook run, written with the maildir discipline: create it exclusively under
//! `tmp/` (`O_EXCL`), write, `fsync`, `rename` into `new/`, `fsync` the `new/` directory.
//! A file in `new/` is therefore complete and durable; a crash leaves at most a stray file in
//! `tmp/`, which the uploader removes. The hook never talks to the uploader, so a stopped or
//! wedged uploader costs the build nothing (docs/upload.md §5.3).
//!
//! Record format (text, one field per line, store paths never contain newlines or spaces):
//!
//! ```text
//! ferry-post-build-spool 1
//! drv /nix/store/…-x.drv
//! out /nix/store/…-x
//! ```
//!
//! `drv` is optional; zero `out` lines with a `drv` line means "outputs unknown, resolve them
//! from the derivation" (Nix 2.8.0 passes an empty `OUT_PATHS`, NixOS/nix#6446). The hook
//! writes `drv` only when the outputs came from the derivation or are still unknown: a record
//! built from `OUT_PATHS` (Nix ≥ 2.14) has `out` lines only, like one written by `push`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

const MAGIC: &str = "ferry-post-build-spool 1";

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpoolRecord {
    pub(crate) drv: Option<String>,
    pub(crate) outs: Vec<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a spool record (first line {0:?})")]
    BadMagic(String),
    #[error("line {line}: {problem}")]
    BadLine { line: usize, problem: String },
    #[error("record names neither outputs nor a derivation")]
    Empty,
}

#[derive(Debug, Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to spool {0:?}: not an absolute path without spaces or newlines")]
    BadPath(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

fn valid_path(p: &str) -> bool {
    p.starts_with('/') && !p.contains(|c: char| c.is_whitespace() || c == '\0')
}

impl SpoolRecord {
    pub fn encode(&self) -> Result<String, SpoolError> {
        let mut s = format!("{MAGIC}\n");
        for (key, p) in self
            .drv
            .iter()
            .map(|d| ("drv", d))
            .chain(self.outs.iter().map(|o| ("out", o)))
        {
            if !valid_path(p) {
                return Err(SpoolError::BadPath(p.clone()));
            }
            s += &format!("{key} {p}\n");
        }
        Ok(s)
    }

    pub fn decode(text: &str) -> Result<SpoolRecord, DecodeError> {
        let mut lines = text.lines();
        let first = lines.next().unwrap_or_default();
        if first != MAGIC {
            return Err(DecodeError::BadMagic(first.chars().take(40).collect()));
        }
        let mut rec = SpoolRecord::default();
        for (i, l) in lines.enumerate() {
            let line = i + 2;
            let bad = |problem: &str| DecodeError::BadLine {
                line,
                problem: problem.to_owned(),
            };
            if l.is_empty() {
                continue;
            }
            let (key, value) = l.split_once(' ').ok_or_else(|| bad("no value"))?;
            if !valid_path(value) {
                return Err(bad("not an absolute path"));
            }
            match key {
                "drv" if rec.drv.is_none() => rec.drv = Some(value.to_owned()),
                "drv" => return Err(bad("two drv lines")),
                "out" => rec.outs.push(value.to_owned()),
                _ => return Err(bad("unknown key")),
            }
        }
        if rec.drv.is_none() && rec.outs.is_empty() {
            return Err(DecodeError::Empty);
        }
        Ok(rec)
    }
}

/// The spool directory with its `tmp/`, `new/` and `bad/` subdirectories.
#[derive(Debug, Clone)]
pub(crate) struct Spool {
    pub(crate) dir: PathBuf,
}

impl Spool {
    pub(crate) fn new(dir: impl Into<PathBuf>) -> Spool {
        Spool { dir: dir.into() }
    }

    pub(crate) fn tmp(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    pub(crate) fn new_dir(&self) -> PathBuf {
        self.dir.join("new")
    }

    pub(crate) fn bad_dir(&self) -> PathBuf {
        self.dir.join("bad")
    }

    /// Creates the spool's directories, 0700: records name what was built on this host,
    /// which local users need not read (docs/threat-model.md).
    pub(crate) fn ensure_dirs(&self) -> Result<(), SpoolError> {
        for d in [self.dir.clone(), self.tmp(), self.new_dir(), self.bad_dir()] {
            private_dir(&d).map_err(io_err(&d))?;
        }
        Ok(())
    }

    /// Writes `rec` durably and returns its name in `new/`.
    pub(crate) fn write(&self, rec: &SpoolRecord) -> Result<String, SpoolError> {
        let text = rec.encode()?;
        let name = unique_name();
        let tmp = self.tmp().join(&name);
        let new_dir = self.new_dir();
        let create = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
        };
        let mut f = match create() {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // First run: create the directories and try once more.
                self.ensure_dirs()?;
                create().map_err(io_err(&tmp))?
            }
            Err(e) => return Err(io_err(&tmp)(e)),
        };
        f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
        f.sync_data().map_err(io_err(&tmp))?;
        drop(f);
        let dest = new_dir.join(&name);
        fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
        fsync_dir(&new_dir).map_err(io_err(&new_dir))?;
        Ok(name)
    }

    /// Names in `new/`, oldest first (names start with a timestamp).
    pub(crate) fn pending(&self) -> Result<Vec<String>, SpoolError> {
        let dir = self.new_dir();
        let mut names = Vec::new();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for e in rd {
            let e = e.map_err(io_err(&dir))?;
            if let Some(n) = e.file_name().to_str() {
                names.push(n.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    pub(crate) fn read(&self, name: &str) -> Result<String, SpoolError> {
        let p = self.new_dir().join(name);
        fs::read_to_string(&p).map_err(io_err(&p))
    }

    /// Deletes a record once the queue has committed it.
    pub(crate) fn remove(&self, name: &str) -> Result<(), SpoolError> {
        let p = self.new_dir().join(name);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&p)(e)),
            _ => Ok(()),
        }
    }

    /// Moves an unreadable record aside (kept for inspection, never retried).
    pub(crate) fn quarantine(&self, name: &str) -> Result<(), SpoolError> {
        let from = self.new_dir().join(name);
        let to = self.bad_dir().join(name);
        fs::create_dir_all(self.bad_dir()).map_err(io_err(&to))?;
        fs::rename(&from, &to).map_err(io_err(&to))
    }

    /// Removes leftovers of hooks that died between create and rename. Only files older than
    /// a minute: a hook may be writing one right now.
    pub(crate) fn clean_tmp(&self) {
        let Ok(rd) = fs::read_dir(self.tmp()) else {
            return;
        };
        for e in rd.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 60);
            if old {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// `<nanoseconds since epoch, zero-padded>.<pid>.<random>`: sorts by time, unique across
/// concurrent hooks (the random part covers pid reuse within one nanosecond tick).
fn unique_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    format!(
        "{nanos:020}.{}.{:08x}",
        std::process::id(),
        u32::from_le_bytes(r)
    )
}

/// Creates `dir` (and missing parents) with mode 0700; an existing one loses its group and
/// other permissions, so a spool or state directory made 0755 by an earlier version is closed.
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode & !0o077))?;
    }
    Ok(())
}

/// `fsync` on a directory makes a rename in it durable (POSIX leaves it to the caller).
pub(crate) fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let rec = SpoolRecord {
            drv: Some("/nix/store/aaaa-x.drv".into()),
            outs: vec!["/nix/store/bbbb-x".into(), "/nix/store/cccc-x-dev".into()],
        };
        let text = rec.encode().expect("encode");
        assert_eq!(
            text,
            "ferry-post-build-spool 1\ndrv /nix/store/aaaa-x.drv\nout /nix/store/bbbb-x\nout /nix/store/cccc-x-dev\n"
        );
        assert_eq!(SpoolRecord::decode(&text), Ok(rec));
        let drv_only = SpoolRecord {
            drv: Some("/nix/store/aaaa-x.drv".into()),
            outs: vec![],
        };
        assert_eq!(
            SpoolRecord::decode(&drv_only.encode().expect("encode")),
            Ok(drv_only)
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            SpoolRecord::decode(""),
            Err(DecodeError::BadMagic(_))
        ));
        assert!(matches!(
            SpoolRecord::decode("hello\nout /x"),
            Err(DecodeError::BadMagic(_))
        ));
        assert_eq!(
            SpoolRecord::decode("ferry-post-build-spool 1\n"),
            Err(DecodeError::Empty)
        );
        let e = SpoolRecord::decode("ferry-post-build-spool 1\nout relative").expect_err("rel");
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = SpoolRecord::decode("ferry-post-build-spool 1\nsrc /nix/store/x").expect_err("key");
        assert!(e.to_string().contains("unknown key"), "{e}");
        let e = SpoolRecord::decode("ferry-post-build-spool 1\ndrv /a\ndrv /b").expect_err("2");
        assert!(e.to_string().contains("two drv"), "{e}");
        assert!(
            SpoolRecord {
                drv: None,
                outs: vec!["/nix/store/a b".into()]
            }
            .encode()
            .is_err()
        );
    }

    #[test]
    fn write_lands_in_new_only() {
        let d = tempfile::tempdir().expect("tempdir");
        let spool = Spool::new(d.path().join("spool"));
        let rec = SpoolRecord {
            drv: None,
            outs: vec!["/nix/store/bbbb-x".into()],
        };
        let a = spool.write(&rec).expect("write");
        let b = spool.write(&rec).expect("write");
        assert_ne!(a, b);
        assert_eq!(spool.pending().expect("pending"), vec![a.clone(), b]);
        assert_eq!(fs::read_dir(spool.tmp()).expect("tmp").count(), 0);
        assert_eq!(
            SpoolRecord::decode(&spool.read(&a).expect("read")).expect("decode"),
            rec
        );
        spool.remove(&a).expect("remove");
        spool.remove(&a).expect("remove twice is fine");
        assert_eq!(spool.pending().expect("pending").len(), 1);
    }

    /// Issue 12 item 10: spool records and their directories are not readable by other
    /// users (they were 0644 and 0755), also in a spool an earlier version created.
    #[test]
    fn spool_is_private() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().expect("tempdir");
        let mode = |p: &Path| fs::metadata(p).expect("stat").mode() & 0o777;
        let root = d.path().join("spool");
        fs::create_dir_all(root.join("new")).expect("old layout");
        fs::set_permissions(root.join("new"), fs::Permissions::from_mode(0o755)).expect("chmod");
        let spool = Spool::new(&root);
        let rec = SpoolRecord {
            drv: None,
            outs: vec!["/nix/store/bbbb-x".into()],
        };
        // `new/` exists, `tmp/` does not: the first write creates the rest.
        let name = spool.write(&rec).expect("write");
        assert_eq!(mode(&spool.new_dir().join(&name)), 0o600);
        spool.ensure_dirs().expect("dirs");
        for dir in [root.clone(), spool.tmp(), spool.new_dir(), spool.bad_dir()] {
            assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        }
    }
}
