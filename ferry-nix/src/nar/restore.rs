//! A NAR to a new file tree on disk, all or nothing.
//!
//! Follows `restorePath` / `RestoreSink` in `src/libutil/archive.cc` and
//! `src/libutil/fs-sink.cc`: directories are created with the default mode (minus umask),
//! files with `O_CREAT | O_EXCL`, executable files get `+x` for owner, group and others,
//! symlinks are created with their raw target.
//!
//! **Staying inside the target.** Every node is created at `root` joined with the NAR path,
//! whose names passed [`super::check_name`]: each is one component, never `.`, `..` or
//! absolute. Every proper prefix of a NAR path is a directory that this restore created just
//! before (the parser announces a directory before its entries), and names are unique within
//! a directory (the parser requires strictly increasing names), so no later entry can have a
//! symlink restored earlier as a parent, whatever that symlink points to (`../..`, `/tmp`).
//! The last component is always created with `create_dir`, `O_EXCL` or `symlink`, none of
//! which follows an existing symlink. The staging directory is mode 0700, so only the same
//! user (or root) could interfere while the restore runs.
//!
//! **All or nothing.** The tree is built in a fresh staging directory next to the target
//! (same parent, so the same file system) and moved into place only after the whole NAR
//! parsed and restored without error; on any error the staging directory is removed and the
//! target path is left absent.

use super::CHUNK;
use super::parse::{NarContents, NarReadError, NarVisitor, parse};
use std::ffi::{OsStr, OsString};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;

/// Errors from [`restore`].
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("cannot restore a NAR to {path}: it already exists")]
    TargetExists { path: PathBuf },
    #[error("cannot restore a NAR to {path}: {reason}")]
    BadTarget { path: PathBuf, reason: &'static str },
    #[error("restoring a NAR: cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("restoring a NAR to {target}: {source}")]
    Nar {
        target: PathBuf,
        #[source]
        source: NarReadError,
    },
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes the staging directory when dropped, on success and on every error path.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        // `remove_dir_all` does not follow symlinks (std since 1.58.1). Nothing useful can be
        // done with an error here: the restore already failed or succeeded.
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Unpacks the NAR read from `reader` at `target`, which must not exist yet; its parent
/// must. `reader` must hold exactly one NAR (trailing bytes are an error). Returns the NAR
/// size.
///
/// On error nothing is left at `target` or beside it: the tree is restored into a staging
/// directory in the same parent (`.<name>.ferry-restore-<pid>-<n>`) and moved to `target`
/// only at the end; the staging directory is always removed. A regular file or symlink is
/// moved with `link`, which refuses an existing target (or, where the file system has no
/// hard links, with `rename` after a final check); a directory with `rename` after a final
/// check, so an empty directory created at `target` concurrently in that window would be
/// replaced. Nothing is fsynced.
pub fn restore(reader: impl Read, target: &Path) -> Result<u64, RestoreError> {
    let name = target.file_name().ok_or_else(|| RestoreError::BadTarget {
        path: target.to_owned(),
        reason: "the path has no final name",
    })?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    check_absent(target)?;

    let staging = make_staging(&parent, name)?;
    let root = staging.0.join("root");
    let mut visitor = Restorer { root: root.clone() };
    let size = parse(reader, &mut visitor).map_err(|source| RestoreError::Nar {
        target: target.to_owned(),
        source,
    })?;

    let md = fs::symlink_metadata(&root).map_err(|source| RestoreError::Io {
        action: "inspect the restored root",
        path: root.clone(),
        source,
    })?;
    if md.is_dir() {
        check_absent(target)?;
        fs::rename(&root, target).map_err(|source| RestoreError::Io {
            action: "move the restored tree to",
            path: target.to_owned(),
            source,
        })?;
    } else {
        // `link` fails if the target exists and links a symlink itself (`linkat` without
        // `AT_SYMLINK_FOLLOW`).
        match fs::hard_link(&root, target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(RestoreError::TargetExists {
                    path: target.to_owned(),
                });
            }
            // A file system without hard links: fall back to a checked rename.
            Err(_) => {
                check_absent(target)?;
                fs::rename(&root, target).map_err(|source| RestoreError::Io {
                    action: "move the restored file to",
                    path: target.to_owned(),
                    source,
                })?;
            }
        }
    }
    drop(staging);
    Ok(size)
}

fn check_absent(target: &Path) -> Result<(), RestoreError> {
    match fs::symlink_metadata(target) {
        Ok(_) => Err(RestoreError::TargetExists {
            path: target.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RestoreError::Io {
            action: "inspect",
            path: target.to_owned(),
            source,
        }),
    }
}

fn make_staging(parent: &Path, name: &OsStr) -> Result<Staging, RestoreError> {
    let mut tries = 0;
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut base = OsString::from(".");
        base.push(name);
        base.push(format!(".ferry-restore-{}-{n}", std::process::id()));
        let path = parent.join(base);
        match DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(Staging(path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 100 => tries += 1,
            Err(source) => {
                return Err(RestoreError::Io {
                    action: "create the staging directory",
                    path,
                    source,
                });
            }
        }
    }
}

struct Restorer {
    root: PathBuf,
}

impl Restorer {
    /// Where the node at NAR path `path` goes. The names are checked single components.
    fn at(&self, path: &[u8]) -> PathBuf {
        match path.strip_prefix(b"/") {
            Some(rel) => self.root.join(OsStr::from_bytes(rel)),
            None => self.root.clone(),
        }
    }
}

fn ctx(action: &str, path: &Path) -> impl FnOnce(io::Error) -> io::Error {
    let what = format!("cannot {action} {}", path.display());
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl NarVisitor for Restorer {
    fn directory(&mut self, path: &[u8]) -> io::Result<()> {
        let p = self.at(path);
        fs::create_dir(&p).map_err(ctx("create directory", &p))
    }

    fn regular(
        &mut self,
        path: &[u8],
        executable: bool,
        contents: &mut NarContents<'_>,
    ) -> io::Result<()> {
        let p = self.at(path);
        let mut f: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .map_err(ctx("create file", &p))?;
        let mut buf = vec![0u8; CHUNK.min(usize::try_from(contents.size()).unwrap_or(CHUNK))];
        loop {
            let n = contents.read(&mut buf)?;
            if n == 0 {
                break;
            }
            f.write_all(buf.get(..n).unwrap_or_default())
                .map_err(ctx("write", &p))?;
        }
        if executable {
            // As `RestoreSink`: add x for owner, group and others to the mode it was created with.
            let mode = f.metadata().map_err(ctx("stat", &p))?.permissions().mode();
            f.set_permissions(fs::Permissions::from_mode(mode | 0o111))
                .map_err(ctx("make executable", &p))?;
        }
        Ok(())
    }

    fn symlink(&mut self, path: &[u8], target: &[u8]) -> io::Result<()> {
        let p = self.at(path);
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &p).map_err(ctx("create symlink", &p))
    }
}
